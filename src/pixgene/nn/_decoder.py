"""Decoders that turn an encoder pyramid into a dense map, and the non-negative intensity head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def inverse_std(std: torch.Tensor) -> torch.Tensor:
    """1 / std per channel, with std floored at 1% of the level's median (at least 1e-6): a channel that is
    nearly constant on the tiles the statistics came from is not blown up to swamp the others elsewhere."""
    floor = max(1e-6, 0.01 * float(std.float().median()))
    return 1.0 / std.float().clamp_min(floor)


def upsample_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)``, deterministic on CUDA too.

    CUDA's bilinear backward has no deterministic kernel (it raises under
    ``torch.use_deterministic_algorithms``, which training turns on); there the same interpolation runs as two
    products with the interpolation matrices, whose gradients are deterministic. Elsewhere it is the plain call.
    """
    if x.is_cuda and torch.are_deterministic_algorithms_enabled() and torch.is_grad_enabled():
        return upsample_bilinear_by_matmul(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def upsample_bilinear_by_matmul(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resampling of a (B, C, H, W) tensor to ``size`` as ``A_h @ x @ A_w^T`` (align_corners=False)."""
    rows = interpolation_matrix(int(size[0]), x.shape[-2], dtype=x.dtype, device=x.device)
    cols = interpolation_matrix(int(size[1]), x.shape[-1], dtype=x.dtype, device=x.device)
    return torch.matmul(torch.matmul(rows, x), cols.T)


def interpolation_matrix(n_out: int, n_in: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D linear interpolation with PyTorch's align_corners=False convention
    (:func:`pixgene._core.raster.linear_weights` at ``n_in / n_out`` input pixels per output pixel)."""
    import numpy as np

    from .._core.raster import linear_weights

    lo, hi, w = linear_weights(n_out, n_in, n_in / n_out)
    out = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(out, (rows, lo), 1.0 - w)
    np.add.at(out, (rows, hi), w)
    return torch.from_numpy(out).to(dtype=dtype, device=device)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor, per pixel.

    A channels-last tensor (training's layout) goes through the fused ``layer_norm`` kernel on its
    (B, H, W, C) view, which is contiguous: no copy, and a quarter less time per training step than the
    explicit mean and variance. Any other layout is normalised along dim 1 explicitly, which beats permuting
    it (a copy each way) on a CPU. Both are the same function, equal to the rounding of the dtype they run in
    (the fused kernel accumulates bfloat16 inputs in float32, the explicit path rounds each step to bfloat16).
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last):
            nhwc = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
            return nhwc.permute(0, 3, 1, 2)
        return self.explicit(x)

    def explicit(self, x: torch.Tensor) -> torch.Tensor:
        """The normalisation along dim 1 by explicit mean and variance, in any layout."""
        mean = x.mean(1, keepdim=True)
        centred = x - mean
        var = centred.pow(2).mean(1, keepdim=True)
        return centred * torch.rsqrt(var + self.eps) * self.weight[:, None, None] + self.bias[:, None, None]


class SkipRefine(nn.Module):
    """Depthwise 3x3 conv, SiLU, 1x1 conv, LayerNorm, with a residual (the first half of a fusion block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.pw = nn.Conv2d(channels, channels, 1)
        self.norm = ChannelLayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.pw(F.silu(self.dw(x))))


class WindowAttention(nn.Module):
    """Softmax attention among the pixels of non-overlapping ``window`` x ``window`` windows, with a residual.

    Windows (rather than the whole tile) keep every output a function of a bounded neighbourhood, so a slide
    predicted tile by tile (tiles aligned to the window grid) equals a single pass over the whole image.

    With one grid of windows, neighbouring pixels on either side of a window edge attend to disjoint sets, so
    the output steps there: a dense map shows the window grid as a lattice of straight edges. ``smooth=True``
    runs four grids, offset by half a window in y, x or both (windows cut by the map's edge attend to their
    pixels inside it), and blends them with tent weights that fall to 1/window at a window's edge and add up
    to one: the output is continuous across window edges, for four times the attention's cost.
    """

    def __init__(self, in_channels: int, channels: int, heads: int = 4, window: int = 8,
                 smooth: bool = False) -> None:
        super().__init__()
        self.smooth = bool(smooth)
        heads = max(1, min(heads, channels))
        while channels % heads:
            heads -= 1
        self.heads, self.window = heads, window
        self.qkv = nn.Conv2d(in_channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.skip = nn.Conv2d(in_channels, channels, 1) if in_channels != channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        k = self.window
        if h % k or w % k:
            raise ValueError(f"feature map {h}x{w} is not a multiple of the attention window {k}")
        qkv = self.qkv(x)
        if not self.smooth:
            out = self._windows(qkv, None)
        else:
            out = None
            for oy in (0, k // 2):
                for ox in (0, k // 2):
                    part = self._shifted(qkv, oy, ox) * (_tent(h, k, oy, qkv)[:, None] * _tent(w, k, ox, qkv)[None])
                    out = part if out is None else out + part
        return self.skip(x) + self.proj(out)

    def _shifted(self, qkv: torch.Tensor, oy: int, ox: int) -> torch.Tensor:
        """Attention in windows whose grid starts ``oy``, ``ox`` pixels before the map (padding masked)."""
        if not (oy or ox):
            return self._windows(qkv, None)
        k = self.window
        h, w = qkv.shape[-2:]
        pad = (ox, (k - ox) % k, oy, (k - oy) % k)
        valid = F.pad(torch.ones(1, 1, h, w, dtype=qkv.dtype, device=qkv.device), pad)
        out = self._windows(F.pad(qkv, pad), valid)
        return out[..., oy:oy + h, ox:ox + w]

    def _windows(self, qkv: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        b, c3, h, w = qkv.shape
        k = self.window
        c = c3 // 3
        d = c // self.heads
        nw = (h // k) * (w // k)
        # the windows are cut from the (b, h, w, 3c) view, which is contiguous for a channels-last qkv (the
        # layout of training and prediction): one copy each way, against two through (b, 3c, h, w); and the
        # output comes back channels-last, the layout the projection's weights have. The same values either way.
        # (b, h/k, k, w/k, k, 3, heads, d) -> (3, b * h/k * w/k * heads, k*k, d)
        t = qkv.permute(0, 2, 3, 1).reshape(b, h // k, k, w // k, k, 3, self.heads, d)
        q, key, v = t.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, b * nw * self.heads, k * k, d).unbind(0)
        # plain softmax(q k^T / sqrt(d)) v: on a CPU, scaled_dot_product_attention falls back to a "safe"
        # softmax whose masking checks cost ~15% of a training step here, for the same values
        logits = torch.bmm(q * d**-0.5, key.transpose(1, 2))
        if valid is not None:
            # padded keys get no weight: (h/k * w/k, 1, k*k) bias, the same for every image and head
            mask = valid.reshape(h // k, k, w // k, k).permute(0, 2, 1, 3).reshape(nw, 1, k * k)
            bias = (mask - 1.0) * 1e4
            logits = (logits.reshape(b, nw, self.heads, k * k, k * k) + bias[None, :, None]).reshape(logits.shape)
        out = torch.bmm(logits.softmax(-1), v)
        # (b, h/k, w/k, heads, k, k, d) -> (b, h, w, c), seen as (b, c, h, w) channels-last
        out = out.reshape(b, h // k, w // k, self.heads, k, k, d).permute(0, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, h, w, c).permute(0, 3, 1, 2)


def _tent(n: int, k: int, offset: int, like: torch.Tensor) -> torch.Tensor:
    """Weight of each of ``n`` pixels in its window of a grid of ``k``-pixel windows starting ``offset`` pixels
    before pixel 0: 1 at the window's centre, falling linearly to 1/k at its edges. The weights of the grids
    at offsets 0 and k / 2 add up to 1 at every pixel."""
    r = (torch.arange(n, dtype=like.dtype, device=like.device) + offset) % k
    return 1.0 - (r + 0.5 - k / 2).abs() / (k / 2)


class FusionBlock(nn.Module):
    """Refine the skip feature, concatenate with the upsampled decoder feature, attend (PixNet's SAFB)."""

    def __init__(self, skip_channels: int, channels: int, heads: int = 4, window: int = 8,
                 smooth: bool = False) -> None:
        super().__init__()
        self.inp = nn.Conv2d(skip_channels, channels, 1)
        self.refine = SkipRefine(channels)
        self.attend = WindowAttention(2 * channels, channels, heads, window, smooth=smooth)
        self.out = SkipRefine(channels)

    def forward(self, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        s = self.refine(self.inp(skip))
        return self.out(self.attend(torch.cat([s, up], dim=1)))


class ConvBlock(nn.Module):
    """Plain U-Net fusion (the ablation): concatenate, two 3x3 convs with per-pixel LayerNorm and SiLU.

    No normalisation pools over the tile, so tiled and whole-image predictions agree. ``heads``, ``window`` and
    ``smooth`` are accepted for a common signature with :class:`FusionBlock` and unused.
    """

    def __init__(self, skip_channels: int, channels: int, heads: int = 4, window: int = 8,
                 smooth: bool = False) -> None:
        super().__init__()
        self.inp = nn.Conv2d(skip_channels, channels, 1)
        self.body = nn.Sequential(
            nn.Conv2d(2 * channels, channels, 3, padding=1),
            ChannelLayerNorm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            ChannelLayerNorm(channels),
            nn.SiLU(),
        )

    def forward(self, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([self.inp(skip), up], dim=1))


BLOCKS = {"fusion": FusionBlock, "conv": ConvBlock}


class Decoder(nn.Module):
    """U-Net style decoder from the coarsest pyramid level down to ``out_stride``."""

    def __init__(
        self,
        channels: list[int],
        reductions: list[int],
        *,
        width: int = 64,
        out_stride: int = 4,
        block: str = "fusion",
        heads: int = 4,
        window: int = 8,
        standardize: bool = False,
        smooth: bool = False,
    ) -> None:
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"decoder block {block!r} unknown; choose one of {sorted(BLOCKS)}")
        if out_stride not in reductions:
            raise ValueError(f"out_stride={out_stride} is not a pyramid level {reductions}")
        self.levels = [i for i, r in enumerate(reductions) if r >= out_stride]
        self.reductions = reductions
        self.out_stride = out_stride
        self.standardize = standardize
        if standardize:
            # per-channel shift and scale of each used encoder level, set from the training features
            # (:meth:`set_feature_stats`) and saved with the weights; identity until then
            for i in self.levels:
                self.register_buffer(f"feature_mean_{i}", torch.zeros(channels[i]))
                self.register_buffer(f"feature_inv_std_{i}", torch.ones(channels[i]))
        coarsest = self.levels[-1]
        self.top = nn.Sequential(nn.Conv2d(channels[coarsest], width, 1), SkipRefine(width))
        self.blocks = nn.ModuleList(
            BLOCKS[block](channels[i], width, heads, window, smooth=smooth) for i in reversed(self.levels[:-1])
        )
        attention = block == "fusion"
        # tiles must start on multiples of this (encoder pixels) for attention windows to align across tiles
        self.alignment = max(
            [max(reductions)] + ([reductions[i] * window for i in self.levels[:-1]] if attention else [])
        )

    def set_feature_stats(self, means: dict[int, torch.Tensor], stds: dict[int, torch.Tensor]) -> None:
        """Standardise level ``i`` as (f - means[i]) / stds[i] per channel from now on."""
        if not self.standardize:
            raise ValueError("this decoder was built without standardize=True")
        for i in self.levels:
            getattr(self, f"feature_mean_{i}").copy_(means[i])
            getattr(self, f"feature_inv_std_{i}").copy_(inverse_std(stds[i]))

    def _level(self, features: list[torch.Tensor], i: int) -> torch.Tensor:
        f = features[i]
        if not self.standardize:
            return f
        mean = getattr(self, f"feature_mean_{i}").to(f.dtype)
        inv = getattr(self, f"feature_inv_std_{i}").to(f.dtype)
        return (f - mean[:, None, None]) * inv[:, None, None]

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.top(self._level(features, self.levels[-1]))
        for block, i in zip(self.blocks, reversed(self.levels[:-1]), strict=True):
            skip = self._level(features, i)
            up = upsample_bilinear(x, skip.shape[-2:])
            x = block(skip, up)
        return x


class IntensityHead(nn.Module):
    """1x1 conv to one channel per output, softplus: a non-negative intensity (counts per um^2)."""

    def __init__(self, width: int, n_outputs: int) -> None:
        super().__init__()
        self.hidden = nn.Conv2d(width, width, 1)
        self.out = nn.Conv2d(width, n_outputs, 1)
        self.register_buffer("log_scale", torch.zeros(n_outputs))

    def set_scale(self, mean_intensity: torch.Tensor) -> None:
        """Start every output near the training mean: softplus(0 + b) * scale = mean."""
        self.log_scale.copy_(torch.log(mean_intensity.clamp_min(1e-12) / F.softplus(torch.tensor(0.0))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.out(F.silu(self.hidden(x))).float()  # float32 from here under bfloat16 autocast
        return F.softplus(z) * self.log_scale.exp()[None, :, None, None]

    def forward_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """The same function on single pixels: ``x`` (P, width) -> (P, n_outputs); its 1x1 convolutions as
        matrix products."""
        h = F.silu(F.linear(x, self.hidden.weight.flatten(1), self.hidden.bias))
        z = F.linear(h, self.out.weight.flatten(1), self.out.bias).float()
        return F.softplus(z) * self.log_scale.exp()[None, :]
