"""Parameter-free resampling of plain-ViT token grids into a feature pyramid at strides 4, 8, 16 and 32.

A plain ViT sees the image through one grid of patches (stride 14 or 16). The decoder wants a pyramid whose
level ``r`` has exactly ``(H / r, W / r)`` cells, cell ``j`` covering input pixels ``[j r, (j + 1) r)``.
Every level is therefore sampled at the centres of its own cells, in the input's pixel frame, so the levels
stay aligned with each other and with the image for any patch size and any padding. Nothing here has
trainable parameters: the encoder stays frozen, and a decoder sees the same features at train and test time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Strides of the ViT pyramid relative to the input image, finest first.
VIT_REDUCTIONS: tuple[int, ...] = (4, 8, 16, 32)


def vit_block_indices(depth: int, n_levels: int = len(VIT_REDUCTIONS)) -> list[int]:
    """Evenly spaced transformer blocks ending at the last one (depth 24 -> ``[5, 11, 17, 23]``).

    Shallow test models repeat blocks (depth 2 -> ``[0, 0, 1, 1]``) rather than skipping levels.
    """
    return [max(0, math.ceil((k + 1) * depth / n_levels) - 1) for k in range(n_levels)]


def pad_to_patch(x: torch.Tensor, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad ``x`` (B, C, H, W) symmetrically to multiples of ``patch``; return it and (top, left).

    Symmetric padding keeps the patch grid centred on the image, so neither border is systematically
    covered by half-empty patches.
    """
    h, w = x.shape[-2:]
    ph, pw = -h % patch, -w % patch
    if ph == 0 and pw == 0:
        return x, (0, 0)
    top, left = patch_offset((h, w), patch)
    # reflect needs the pad narrower than the image; a patch-sized pad always is for inputs >= one patch
    mode = "reflect" if min(h, w) > max(ph, pw) else "replicate"
    return F.pad(x, (left, pw - left, top, ph - top), mode=mode), (top, left)


def patch_offset(image_hw: tuple[int, int], patch: int) -> tuple[int, int]:
    """(top, left) pixels that :func:`pad_to_patch` adds before an image of ``image_hw`` pixels."""
    return (-int(image_hw[0]) % patch) // 2, (-int(image_hw[1]) % patch) // 2


def resample_grid(
    grid: torch.Tensor, *, patch: int, offset: tuple[int, int], out_hw: tuple[int, int], stride: int
) -> torch.Tensor:
    """Bilinearly sample a token grid (B, C, gh, gw) at the centres of stride-``stride`` output cells.

    Token ``t`` covers padded pixels ``[t patch, (t + 1) patch)``; the padded image starts ``offset``
    (top, left) pixels before the input image. Output cell ``j`` is centred on input pixel
    ``(j + 0.5) stride``.
    """
    oh, ow = out_hw
    gh, gw = grid.shape[-2:]
    if offset == (0, 0) and patch % stride == 0 and gh * patch == oh * stride and gw * patch == ow * stride:
        # the common patch-16 case: a plain x1/x2/x4 bilinear upsampling lands on exactly these centres
        factor = patch // stride
        if factor == 1:
            return grid
        return F.interpolate(grid, scale_factor=factor, mode="bilinear", align_corners=False)
    # with align_corners=False, normalised coordinate -1/+1 are the outer edges of the padded image
    padded_h, padded_w = gh * patch, gw * patch
    # coordinates in float64 on the host (not every accelerator has it), sampling in at least float32:
    # half-precision coordinates would be off by a fraction of a cell on large grids
    ys = ((torch.arange(oh, dtype=torch.float64) + 0.5) * stride + offset[0]) / padded_h * 2 - 1
    xs = ((torch.arange(ow, dtype=torch.float64) + 0.5) * stride + offset[1]) / padded_w * 2 - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    work = grid if grid.dtype in (torch.float32, torch.float64) else grid.float()
    coords = torch.stack([xx, yy], dim=-1).to(device=grid.device, dtype=work.dtype)
    coords = coords.expand(grid.shape[0], oh, ow, 2)
    out = F.grid_sample(work, coords, mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(grid.dtype)


def vit_pyramid(
    grids: list[torch.Tensor], *, patch: int, offset: tuple[int, int], image_hw: tuple[int, int]
) -> list[torch.Tensor]:
    """Turn four token grids (earliest block first) into levels at strides 4, 8, 16, 32 of an H x W image.

    Levels 4, 8 and 16 sample their grid bilinearly at their own cell centres (for patch 16 this is
    upsampling x4, x2 and the identity); level 32 averages 2 x 2 cells of its grid's stride-16 sampling, so
    coarse features summarise their whole footprint instead of picking every other token.
    """
    if len(grids) != len(VIT_REDUCTIONS):
        raise ValueError(f"expected {len(VIT_REDUCTIONS)} grids, got {len(grids)}")
    return [pyramid_level(g, r, patch=patch, offset=offset, image_hw=image_hw) for g, r in zip(grids, VIT_REDUCTIONS)]


def pyramid_level(
    grid: torch.Tensor, stride: int, *, patch: int, offset: tuple[int, int], image_hw: tuple[int, int]
) -> torch.Tensor:
    """One level of :func:`vit_pyramid`: ``grid`` sampled at the cells of stride ``stride`` of the image."""
    h, w = image_hw
    if stride <= 16:
        return resample_grid(grid, patch=patch, offset=offset, out_hw=(h // stride, w // stride), stride=stride)
    fine = resample_grid(grid, patch=patch, offset=offset, out_hw=(h // 16, w // 16), stride=16)
    return F.avg_pool2d(fine, kernel_size=stride // 16)
