"""Access to raster elements that may be single-scale (DataArray) or multiscale (DataTree)."""

from __future__ import annotations

from typing import Any

import numpy as np


def scale_levels(element: Any) -> list[tuple[Any, float]]:
    """``[(DataArray, downsample factor relative to level 0), ...]``, finest first."""
    if hasattr(element, "children") and len(getattr(element, "children", {})) > 0:
        names = sorted(element.children, key=lambda n: int(str(n).replace("scale", "") or 0))
        arrays = [next(iter(element[name].ds.data_vars.values())) for name in names]
        full = arrays[0].sizes["x"]
        return [(a, full / a.sizes["x"]) for a in arrays]
    return [(element, 1.0)]


def linear_weights(n_out: int, n_in: int, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1-D linear interpolation at the centres of ``n_out`` output pixels of ``scale`` input pixels each
    (align_corners=False: output pixel ``o`` reads input coordinate ``(o + 0.5) * scale - 0.5``, clamped to the
    first and last samples). Returns ``(lo, hi, w)``: output ``o`` is ``(1 - w[o]) * in[lo[o]] + w[o] * in[hi[o]]``.
    """
    pos = np.clip((np.arange(n_out) + 0.5) * scale - 0.5, 0, n_in - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, pos - lo


def full_resolution(element: Any) -> Any:
    return scale_levels(element)[0][0]


def level_for_downsample(element: Any, factor: float) -> tuple[Any, float]:
    """The coarsest level that is still at least as fine as ``factor`` (so resampling only shrinks)."""
    best = scale_levels(element)[0]
    for array, scale in scale_levels(element):
        if scale <= factor * (1 + 1e-6):
            best = (array, scale)
    return best


def rgb_array(element: Any, name: str) -> Any:
    """The full-resolution (c, y, x) array, checked to be a three-channel colour image."""
    from .validate import fail

    array = full_resolution(element)
    if tuple(array.dims) != ("c", "y", "x"):
        fail(f"image {name!r}", f"has dims {tuple(array.dims)}, not ('c', 'y', 'x')", "Parse it with Image2DModel")
    if array.sizes["c"] != 3:
        fail(
            f"image {name!r}",
            f"has {array.sizes['c']} channel(s); H&E needs exactly 3 (RGB)",
            "Pass an RGB image (drop alpha with image.sel(c=[0, 1, 2]); convert greyscale to RGB)",
        )
    return array


def require_finite(array: Any, name: str) -> None:
    """Fail if a float image holds NaN or infinite pixels (integer images cannot); one pass over the pixels,
    chunk by chunk for a dask-backed array."""
    from .validate import fail

    if not np.issubdtype(array.dtype, np.floating):
        return
    data = getattr(array, "data", array)
    bad = ~np.isfinite(data)
    n_bad = int(bad.sum().compute() if hasattr(bad, "compute") else bad.sum())
    if n_bad:
        fail(f"image {name!r}", f"{n_bad} pixel value(s) are NaN or infinite",
             "Fill them before fitting or predicting (e.g. image.fillna(255) for white background), or crop them away")


def to_float01(block: np.ndarray) -> np.ndarray:
    """uint8/uint16/float image block to float32 in [0, 1]."""
    block = np.asarray(block)
    if block.dtype == np.uint8:
        return block.astype(np.float32) / 255.0
    if block.dtype == np.uint16:
        return block.astype(np.float32) / 65535.0
    block = block.astype(np.float32)
    if block.size and np.nanmax(block) > 1.5:
        block = block / 255.0
    return np.clip(block, 0.0, 1.0)
