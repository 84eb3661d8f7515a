"""Tissue mask of an H&E image at a coarse resolution, computed without loading the full-resolution image."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .._core.keys import IMAGE_KEY
from .._core.raster import level_for_downsample, rgb_array
from .._core.units import resolve_um_per_px
from .._core.validate import check_positive, require_element

logger = logging.getLogger(__name__)

#: Otsu's thresholds are kept within these bounds, so that a slide that is all glass or all tissue (where
#: Otsu would split glass from glass or tissue from tissue) is not cut in the wrong place. Saturation: white
#: or grey glass has a few percent, pale eosin-stained stroma about 0.15 and more.
SATURATION_THRESHOLD_RANGE = (0.05, 0.15)
#: texture (standard deviation of grey level within a mask pixel, intensities in [0, 1]): glass is smooth
#: (JPEG noise ~0.005), tissue shows cells even where it is pale and barely stained
TEXTURE_THRESHOLD_RANGE = (0.01, 0.03)
#: pixels whose brightest channel is below this are scanner background or debris (black), not tissue
MIN_BRIGHTNESS = 0.15


def block_mean(array: Any, step: int) -> np.ndarray:
    """(c, y, x) array -> (c, ceil(y / step), ceil(x / step)) float64 means over step x step blocks.

    A dask array is reduced chunk by chunk (rechunked to multiples of ``step``), so only the small result is
    ever held in memory; blocks at the right and bottom edges average the pixels they have.
    """
    import dask.array as da

    array = array if isinstance(array, da.Array) else da.asarray(array)
    c, h, w = array.shape
    target = step * max(1, 2048 // step)
    array = array.rechunk((c, target, target))

    def reduce(block: np.ndarray) -> np.ndarray:
        bc, bh, bw = block.shape
        oh, ow = -(-bh // step), -(-bw // step)
        padded = np.zeros((bc, oh * step, ow * step))
        padded[:, :bh, :bw] = block
        counts = np.zeros((oh * step, ow * step))
        counts[:bh, :bw] = 1.0
        sums = padded.reshape(bc, oh, step, ow, step).sum(axis=(2, 4))
        return sums / counts.reshape(oh, step, ow, step).sum(axis=(1, 3))

    out_chunks = (array.chunks[0], *(tuple(-(-s // step) for s in sizes) for sizes in array.chunks[1:]))
    return np.asarray(array.map_blocks(reduce, chunks=out_chunks, dtype=np.float64).compute())


def tissue_mask(
    sdata: Any,
    image_key: str = IMAGE_KEY,
    *,
    um_per_px_mask: float = 16.0,
    min_object_um2: float = 20_000.0,
    max_hole_um2: float = 100_000.0,
    image_um_per_px: float | None = None,
) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of an H&E image at about ``um_per_px_mask`` microns per mask pixel.

    The coarsest pyramid level that is still fine enough is reduced over blocks (lazily, chunk by chunk) to
    two features per mask pixel: the saturation of the mean colour, which separates stained tissue (pink to
    purple, pale stroma included) from white or grey glass, and the texture (standard deviation of grey
    level inside the block), which finds pale, barely stained tissue on smooth glass. Both are
    median-filtered and thresholded with Otsu's method (within fixed bounds); a pixel is tissue when either
    exceeds its threshold. Near-black pixels are dropped, specks smaller than ``min_object_um2`` removed and
    holes smaller than ``max_hole_um2`` filled. Along the tissue's edge the mask is conservative: a mask
    pixel partly covered by tissue is usually marked tissue (its texture is high), so tiles there are kept.

    Parameters
    ----------
    sdata
        SpatialData holding the image; its microns per pixel must be recorded or derivable.
    image_key
        RGB image element (single-scale or multiscale).
    um_per_px_mask
        Target mask resolution in microns per mask pixel (never finer than the image).
    min_object_um2, max_hole_um2
        Size limits, in um^2, for removed specks and filled holes.
    image_um_per_px
        Microns per image pixel; default: recorded by the reader or derived from the spots.

    Returns
    -------
    ``(mask, factor)``: ``mask`` is a (rows, cols) bool array; mask pixel (i, j) covers image pixels
    x in [j * factor, (j + 1) * factor], y in [i * factor, (i + 1) * factor] (``factor`` = image pixels per
    mask pixel, in the full-resolution image's pixel space).
    """
    from skimage.filters import threshold_otsu

    element = require_element(sdata, image_key, "images")
    full = rgb_array(element, image_key)
    check_positive(um_per_px_mask, "um_per_px_mask", f"image {image_key!r}")
    um_per_px = resolve_um_per_px(sdata, image_key, um_per_px=image_um_per_px)
    wanted = max(um_per_px_mask / um_per_px, 1.0)
    level, level_factor = level_for_downsample(element, wanted)
    step = max(1, int(round(wanted / level_factor)))
    factor = level_factor * step
    saturation, texture, brightest = _coarse_features(level.data, step, full.dtype)
    thresholds = []
    for feature, (lo, hi) in ((saturation, SATURATION_THRESHOLD_RANGE), (texture, TEXTURE_THRESHOLD_RANGE)):
        otsu = threshold_otsu(feature) if np.ptp(feature) > 0 else hi
        thresholds.append(float(np.clip(otsu, lo, hi)))
    # stain (saturation) finds most tissue; texture adds pale, barely stained tissue that glass never has
    mask = ((saturation > thresholds[0]) | (texture > thresholds[1])) & (brightest >= MIN_BRIGHTNESS)
    mask_px_um2 = (factor * um_per_px) ** 2
    mask = _remove_small_objects(mask, min_object_um2 / mask_px_um2)
    mask = _fill_small_holes(mask, max_hole_um2 / mask_px_um2)
    logger.info(
        "tissue mask of %r: %.1f%% tissue at %.3g um/mask px (thresholds: saturation %.3f, texture %.3f)",
        image_key, 100 * mask.mean(), factor * um_per_px, *thresholds,
    )
    return mask, float(factor)


def _coarse_features(array: Any, step: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per mask pixel: saturation of the mean colour, standard deviation of grey level, brightest channel."""
    import dask.array as da
    from scipy import ndimage

    array = (array if isinstance(array, da.Array) else da.asarray(array)).astype(np.float32)
    grey = array.mean(axis=0, keepdims=True)
    moments = block_mean(da.concatenate([array, grey, grey * grey], axis=0), step)
    if dtype == np.uint8:
        scale = 255.0
    elif dtype == np.uint16:
        scale = 65535.0
    else:
        scale = 255.0 if float(moments[:3].max(initial=0.0)) > 1.5 else 1.0
    rgb = np.clip(moments[:3] / scale, 0.0, 1.0)
    texture = np.sqrt(np.maximum(moments[4] - moments[3] ** 2, 0.0)) / scale
    brightest = rgb.max(axis=0)
    saturation = np.where(brightest > 0, (brightest - rgb.min(axis=0)) / np.maximum(brightest, 1e-12), 0.0)
    # a 3 x 3 median removes isolated noisy mask pixels (JPEG blocks, dust) before thresholding
    saturation = ndimage.median_filter(saturation, size=3, mode="nearest")
    texture = ndimage.median_filter(texture, size=3, mode="nearest")
    return saturation, texture, brightest


def _remove_small_objects(mask: np.ndarray, min_px: float) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return mask
    keep = np.bincount(labels.ravel(), minlength=n + 1) >= min_px
    keep[0] = False
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(~mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    # background reaching the border is outside the tissue, not a hole in it
    border = np.unique(np.r_[labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    fill = sizes <= max_px
    fill[0] = False
    fill[border] = False
    return mask | fill[labels]


def _overlaps(lo: float, hi: float, factor: float, n: int) -> tuple[int, np.ndarray]:
    """First mask index and the lengths of [lo, hi] inside each mask pixel [k * factor, (k + 1) * factor]."""
    first = max(int(np.floor(lo / factor)), 0)
    last = min(int(np.ceil(hi / factor)), n)
    if last <= first:
        return first, np.zeros(0)
    edges = np.arange(first, last + 1) * factor
    return first, np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0.0, None)


def mask_fraction_in_region(
    mask: np.ndarray, factor: float, x0: float, y0: float, x1: float, y1: float
) -> float:
    """Exact fraction of the image-pixel rectangle [x0, x1] x [y0, y1] covered by tissue.

    ``mask`` and ``factor`` come from :func:`tissue_mask`; parts of the rectangle outside the mask's extent
    count as background. Tiled prediction uses this to skip tiles without tissue.
    """
    area = (x1 - x0) * (y1 - y0)
    if area <= 0:
        return 0.0
    j0, wx = _overlaps(x0, x1, factor, mask.shape[1])
    i0, wy = _overlaps(y0, y1, factor, mask.shape[0])
    if len(wx) == 0 or len(wy) == 0:
        return 0.0
    window = mask[i0 : i0 + len(wy), j0 : j0 + len(wx)].astype(np.float64)
    return float(wy @ window @ wx / area)
