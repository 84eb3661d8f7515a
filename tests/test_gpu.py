"""The CUDA path: training there is deterministic too, and CUDA maps match the CPU's. Skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import pixgene as pg  # noqa: E402
from pixgene._core.raster import full_resolution  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_decoder_upsampling_on_cuda_equals_the_cpu_interpolation(monkeypatch):
    import torch.nn.functional as F

    from pixgene.nn._decoder import upsample_bilinear

    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 10, requires_grad=True)
    weights = torch.randn(2, 8, 12, 20)
    ref = F.interpolate(x, size=(12, 20), mode="bilinear", align_corners=False)
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), x)
    xc = x.detach().cuda().requires_grad_(True)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, as training sets it
    torch.use_deterministic_algorithms(True)
    try:
        out = upsample_bilinear(xc, (12, 20))  # raises in backward if it took CUDA's bilinear kernel
        (grad,) = torch.autograd.grad((out * weights.cuda()).sum(), xc)
    finally:
        torch.use_deterministic_algorithms(False)
    np.testing.assert_allclose(out.detach().cpu().numpy(), ref.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(grad.cpu().numpy(), grad_ref.numpy(), atol=1e-4)


def test_fit_on_cuda_is_reproducible_and_its_map_matches_the_cpus(synthetic_small_session):
    from conftest import FIT_GENES
    from spatialdata import deepcopy

    def fitted():
        sdata = deepcopy(synthetic_small_session)
        # float32: the comparison with the CPU below is about the device, not bfloat16's rounding
        model = pg.tl.fit(sdata, genes=FIT_GENES, max_epochs=2, progress=False, precision='32', random_state=0, decoder=pg.tl.DecoderConfig(width=16), training=pg.tl.TrainConfig(n_views=2))
        return sdata, model

    sdata, first = fitted()
    _, second = fitted()
    a, b = first.module.state_dict(), second.module.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "two CUDA fits with one seed differ"
    assert first.training["epochs_run"] >= 1

    pg.tl.predict_dense(sdata, first, key_added="on_cuda", device="cuda", progress=False)
    pg.tl.predict_dense(sdata, first, key_added="on_cpu", device="cpu", progress=False)
    gpu = full_resolution(sdata.images["on_cuda"]).values
    cpu = full_resolution(sdata.images["on_cpu"]).values
    assert gpu.shape == cpu.shape and np.isfinite(gpu).all()
    # cuDNN may run convolutions in TF32: close, not bit-equal
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=2e-2 * float(np.abs(cpu).max()))
    assert np.corrcoef(gpu.ravel(), cpu.ravel())[0, 1] > 0.9999


def test_fine_tuned_mse_fit_on_cuda_calibrates_and_predicts(synthetic_small):
    """Fine-tuning keeps tile pixels and runs the encoder in every step; the MSE-only loss then rescales the
    outputs with the encoder again: both on the GPU."""
    from conftest import FIT_GENES

    model = pg.tl.fit(synthetic_small, genes=FIT_GENES[:3], max_epochs=1, progress=False, decoder=pg.tl.DecoderConfig(width=8), training=pg.tl.TrainConfig(n_views=1, finetune_levels=1, loss_weights={'count': 0.0, 'mse': 1.0, 'pearson': 0.0}))
    assert np.isfinite(model.training["scale_factor"]) and model.training["scale_factor"] > 0
    assert next(model.module.parameters()).device.type == "cpu"
    pg.tl.predict_dense(synthetic_small, model, key_added="tuned", device="cuda", progress=False)
    dense = full_resolution(synthetic_small.images["tuned"]).values
    assert np.isfinite(dense).all() and dense.max() > 0


def test_vit_encoder_fit_on_cuda_and_its_map_matches_the_cpus(synthetic_small):
    """The ViT path (patch grids resampled into a pyramid) trains and predicts on the GPU as on the CPU."""
    from conftest import FIT_GENES

    model = pg.tl.fit(synthetic_small, genes=FIT_GENES[:3], encoder='vit_tiny_patch16_224', encoder_weights=None, max_epochs=1, precision='32', progress=False, decoder=pg.tl.DecoderConfig(width=8), training=pg.tl.TrainConfig(n_views=1))
    pg.tl.predict_dense(synthetic_small, model, key_added="vit_cuda", device="cuda", progress=False)
    pg.tl.predict_dense(synthetic_small, model, key_added="vit_cpu", device="cpu", progress=False)
    gpu = full_resolution(synthetic_small.images["vit_cuda"]).values
    cpu = full_resolution(synthetic_small.images["vit_cpu"]).values
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=2e-2 * float(np.abs(cpu).max()))
    assert np.corrcoef(gpu.ravel(), cpu.ravel())[0, 1] > 0.9999
