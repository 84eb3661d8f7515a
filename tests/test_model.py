"""PixNet's parts: decoder blocks against references, save/load round trip, tiled vs single-pass prediction."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pixgene._validate import PixgeneInputError  # noqa: E402


def test_import_pixgene_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, pixgene as pg; pg.io; pg.pp; pg.tl; pg.pl; pg.datasets; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_window_attention_matches_explicit_per_window_softmax():
    from pixgene.nn._decoder import WindowAttention

    torch.manual_seed(0)
    attn = WindowAttention(6, 4, heads=2, window=4).eval()
    x = torch.randn(1, 6, 8, 12)
    out = attn(x).detach().numpy()
    qkv = attn.qkv(x).detach().numpy()[0]  # (12, 8, 12)
    q, k, v = qkv[:4], qkv[4:8], qkv[8:]
    ref = np.zeros((4, 8, 12))
    for wy in range(2):
        for wx in range(3):
            rows, cols = slice(4 * wy, 4 * wy + 4), slice(4 * wx, 4 * wx + 4)
            for h in range(2):
                ch = slice(2 * h, 2 * h + 2)
                Q = q[ch][:, rows, cols].reshape(2, -1).T
                K = k[ch][:, rows, cols].reshape(2, -1).T
                V = v[ch][:, rows, cols].reshape(2, -1).T
                a = Q @ K.T / np.sqrt(2)
                a = np.exp(a - a.max(1, keepdims=True))
                a /= a.sum(1, keepdims=True)
                ref[ch, 4 * wy : 4 * wy + 4, 4 * wx : 4 * wx + 4] = (a @ V).T.reshape(2, 4, 4)
    proj = torch.nn.functional.conv2d(torch.from_numpy(ref[None]).float(), attn.proj.weight, attn.proj.bias)
    skip = attn.skip(x)
    np.testing.assert_allclose(out, (skip + proj).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("block", ["fusion", "conv"])
def test_decoder_output_is_non_negative_at_output_stride(block):
    from pixgene.nn import build_encoder
    from pixgene.nn._pixnet import PixNetModule

    enc = build_encoder("efficientnet_lite0")
    module = PixNetModule(enc, 3, width=16, out_stride=4, block=block).eval()
    for size in (128, 256):
        with torch.no_grad():
            lam = module(torch.rand(2, 3, size, size))
        assert lam.shape == (2, 3, size // 4, size // 4)
        assert float(lam.min()) >= 0


def test_overlap_matrix_conserves_integrals():
    from pixgene.tl._predict import overlap_matrix

    rng = np.random.default_rng(0)
    values = rng.random(12)  # piecewise constant on 12 cells of 4 um from 0 um
    R = overlap_matrix(7, 2.0, 6.0, 12, 0.0, 4.0)  # 7 cells of 6 um from 2 um: [2, 44] inside [0, 48]
    out = R @ values
    fine = np.repeat(values, 400)  # 0.01 um samples
    ref = np.array([fine[int((2 + 6 * k) * 100) : int((8 + 6 * k) * 100)].mean() for k in range(7)])
    np.testing.assert_allclose(out, ref, rtol=1e-9)


def test_save_load_round_trip_gives_identical_predictions(fitted_session, tmp_path):
    from pixgene.tl import PixNet

    _, model = fitted_session
    model.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["genes"] == model.genes and config["model_id"] == model.model_id
    loaded = PixNet.load(tmp_path / "m")
    assert loaded.model_id == model.model_id
    assert not loaded.module.training
    tile = np.random.default_rng(1).random((3, 128, 128)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict_intensity(tile), model.predict_intensity(tile))


def test_save_refuses_to_overwrite_and_load_detects_tampering(fitted_session, tmp_path):
    from safetensors.torch import load_file, save_file

    from pixgene.tl import PixNet

    _, model = fitted_session
    model.save(tmp_path / "m")
    with pytest.raises(PixgeneInputError, match="overwrite=True"):
        model.save(tmp_path / "m")
    model.save(tmp_path / "m", overwrite=True)
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    key = next(iter(state))
    state[key] = state[key] + 1
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(PixgeneInputError, match="model_id"):
        PixNet.load(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(PixgeneInputError, match="model.safetensors is missing"):
        PixNet.load(tmp_path / "m")


def test_same_seed_same_model(synthetic_small):
    import pixgene as pg
    from conftest import FIT_GENES

    kwargs = dict(genes=FIT_GENES[:3], max_epochs=1, n_views=1, width=16, progress=False, random_state=7)
    a = pg.tl.fit(synthetic_small, **kwargs)
    b = pg.tl.fit(synthetic_small, **kwargs)
    assert a.model_id == b.model_id
    assert a.history == b.history


def test_finetuned_encoder_is_trained_saved_and_restored(synthetic_small, tmp_path):
    import numpy as np
    import torch

    import pixgene as pg
    from conftest import FIT_GENES
    from pixgene.nn._encoders import build_encoder

    model = pg.tl.fit(synthetic_small, genes=FIT_GENES[:3], max_epochs=1, n_views=1, width=16, progress=False,
                      random_state=1, finetune_levels=1)
    pristine = build_encoder("efficientnet_lite0").state_dict()
    tuned = model.module.encoder.state_dict()
    changed = sorted(k for k in pristine if not torch.equal(pristine[k], tuned[k]))
    # only tensors of the last stage moved, and exactly those are recorded for saving
    assert changed and all(f"encoder.{k}" in model.finetuned for k in changed)
    assert not any(k.startswith("body.blocks.0.") or k.startswith("body.conv_stem") for k in changed)
    assert all(not p.requires_grad for p in model.module.encoder.parameters())
    model.save(tmp_path / "m")
    again = pg.tl.PixNet.load(tmp_path / "m")
    assert again.finetuned == model.finetuned and again.model_id == model.model_id
    tile = np.random.default_rng(0).random((3, 256, 256), dtype=np.float32)
    np.testing.assert_array_equal(model.predict_intensity(tile), again.predict_intensity(tile))
    # a frozen fit keeps the pristine encoder and saves none of it
    frozen = pg.tl.fit(synthetic_small, genes=FIT_GENES[:3], max_epochs=1, n_views=1, width=16, progress=False,
                       random_state=1)
    assert frozen.finetuned == []
    assert all(torch.equal(pristine[k], v) for k, v in frozen.module.encoder.state_dict().items())


def test_scale_jitter_views_keep_spot_integrals_exact():
    """A view read at magnification s: spot operators scaled so a constant map integrates to the disk area."""
    import numpy as np
    from spatialdata.models import Image2DModel

    from pixgene.data._reader import SlideReader
    from pixgene.data._training import SlideSpots, build_cache

    class Constant:  # a module stand-in: encoding is not what is tested here
        out_stride = 4
        used_levels = [0]

        def parameters(self):
            import torch

            yield torch.zeros(1)

        def encode(self, x):
            return [x[:, :1, ::4, ::4]]

    rng = np.random.default_rng(0)
    img = (rng.random((3, 1200, 1200)) * 255).astype(np.uint8)
    reader = SlideReader(Image2DModel.parse(img, dims=("c", "y", "x")), image_um=1.0, target_um=1.0)
    centers = np.array([[300.0, 300.0], [420.0, 330.0], [800.0, 760.0]])
    radius = 27.5
    slide = SlideSpots("s", reader, centers, radius, np.ones((3, 2), np.float32), np.ones(3, bool))
    cache = build_cache([slide], Constant(), tile=256, margin=16, n_views=6, stain_strength=0.0,
                        rng=np.random.default_rng(3), scale_jitter=0.2, progress=False)
    area = np.pi * radius**2
    n_checked = 0
    for views in cache.views:
        for v in views:
            per_spot = np.bincount(v.rows, weights=v.weights, minlength=len(v.spot_ids))
            np.testing.assert_allclose(per_spot, area, rtol=1e-6)  # um^2 whatever the view's scale
            n_checked += len(v.spot_ids)
    assert n_checked >= 3 * 6 - 3  # spots stay in their views (at most a few pushed out by the scale)


def test_default_training_length_follows_the_number_of_steps():
    from pixgene.tl._fit import MAX_AUTO_EPOCHS, MIN_EPOCHS, MIN_STEPS, training_length

    # her2st-sized (551 tiles, 69 steps an epoch): the minimum epochs already give >= MIN_STEPS steps
    assert training_length(551, 8, None, None) == (MIN_EPOCHS, 4)
    # 230 tiles = 29 steps an epoch: ceil(800 / 29) = 28 epochs, patience a third of them
    epochs, patience = training_length(230, 8, None, None)
    assert (epochs, patience) == (28, 9)
    assert epochs * 29 >= MIN_STEPS > (epochs - 1) * 29
    assert training_length(3, 8, None, None)[0] == MAX_AUTO_EPOCHS  # one step an epoch: capped
    assert training_length(230, 8, 5, None) == (5, 4)  # given values are kept
    assert training_length(230, 8, 30, 2) == (30, 2)


def test_feature_stats_match_numpy_over_every_tile_and_view():
    from pixgene.data._training import TrainingCache, feature_stats

    rng = np.random.default_rng(0)
    # 37 tiles (not a multiple of the chunk), 3 views, two levels of different widths and scales
    feats = [torch.from_numpy((rng.normal(2.0, 5.0, (37, 3, 6, 4, 4))).astype(np.float16)),
             torch.from_numpy((rng.normal(-1.0, 0.1, (37, 3, 5, 2, 2))).astype(np.float16))]
    cache = TrainingCache(features=feats, views=[[None] * 3] * 37, slides=[], tile=16, out_stride=4, levels=[1, 3])
    means, stds = feature_stats(cache, module=None)
    for f, i in zip(feats, (1, 3), strict=True):
        ref = f.numpy().astype(np.float64).transpose(2, 0, 1, 3, 4).reshape(f.shape[2], -1)
        np.testing.assert_allclose(means[i].numpy(), ref.mean(1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stds[i].numpy(), ref.std(1), rtol=1e-4)


@pytest.mark.parametrize("block", ["fusion", "conv"])
def test_standardising_decoder_equals_plain_decoder_on_standardised_features(block):
    from pixgene.nn._decoder import Decoder

    torch.manual_seed(0)
    channels, reductions = [3, 4, 6, 8], [2, 4, 8, 16]
    plain = Decoder(channels, reductions, width=8, block=block, window=2).eval()
    standard = Decoder(channels, reductions, width=8, block=block, window=2, standardize=True).eval()
    standard.load_state_dict(plain.state_dict(), strict=False)
    feats = [torch.randn(1, c, 32 // r, 32 // r) * 3 + 1 for c, r in zip(channels, reductions, strict=True)]
    means = {i: torch.randn(channels[i]) for i in standard.levels}
    stds = {i: torch.rand(channels[i]) + 0.5 for i in standard.levels}
    standard.set_feature_stats(means, stds)
    by_hand = [f if i not in means else (f - means[i][:, None, None]) / stds[i][:, None, None]
               for i, f in enumerate(feats)]
    with torch.no_grad():
        np.testing.assert_allclose(standard(feats).numpy(), plain(by_hand).numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="standardize=True"):
        plain.set_feature_stats(means, stds)
