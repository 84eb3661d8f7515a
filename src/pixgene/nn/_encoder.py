"""Frozen image encoders that turn an RGB tile into a multi-scale feature pyramid.

Every encoder takes ``(B, 3, H, W)`` RGB in [0, 1], applies its own normalisation and returns one feature
map per pyramid level, finest first; level ``k`` has shape ``(B, channels[k], H / r, W / r)`` with stride
``r = reductions[k]``.
CNNs are timm backbones with ``features_only``; plain ViTs (UNI, UNI2-h, H-optimus, Virchow2, ...) expose four
intermediate blocks, resampled without parameters to strides 4, 8, 16 and 32 (see ``_vit_pyramid``).
:func:`pixgene.nn.build_encoder` builds them from the registry (``_registry``) and loads their weights
(``_weights``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
from torch import nn

from .._core.validate import fail
from ._vit_pyramid import VIT_REDUCTIONS, pad_to_patch, patch_offset, pyramid_level, vit_pyramid

__all__ = ["CNNEncoder", "Encoder", "ViTEncoder", "encoder_flops_per_pixel"]

logger = logging.getLogger(__name__)


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
