"""Read any region of an H&E image resampled to a target pixel size, without loading the whole image."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._core.raster import level_for_downsample, rgb_array, scale_levels, to_float01

#: value of pixels outside the slide: white glass, like an H&E background
BACKGROUND = 1.0
#: a pyramid level up to this size is loaded into memory once, at the first read
CACHE_BYTES = 256 * 2**20


class SlideReader:
    """Regions of an RGB image element on a grid of ``target_um`` microns per pixel.

    Target pixel (i, j) covers image-level-0 pixels [j * f, (j + 1) * f] x [i * f, (i + 1) * f], with
    ``f = target_um / image_um``; the finest pyramid level that is at least as fine is read and resampled
    (Gaussian pre-filter when shrinking, then linear interpolation at the target pixel centres).
    """

    def __init__(self, element: Any, *, image_um: float, target_um: float, name: str = "image") -> None:
        rgb_array(element, name)  # validates dims and channels
        self.factor = float(target_um) / float(image_um)
        array, level_scale = level_for_downsample(element, self.factor)
        self.array = array
        self.level_scale = level_scale
        self.rel = self.factor / level_scale  # level pixels per target pixel
        full = scale_levels(element)[0][0]
        self.shape_level0 = (int(full.sizes["y"]), int(full.sizes["x"]))
        self.shape = (
            int(np.ceil(self.shape_level0[0] / self.factor)),
            int(np.ceil(self.shape_level0[1] / self.factor)),
        )
        self.target_um = float(target_um)
        self._pixels = None

    def __getstate__(self) -> dict:
        # a copy sent to another process (dask.distributed) loads its own cache
        return {**self.__dict__, "_pixels": None}

    def _level_pixels(self):
        """The level's pixels: loaded once when small (a lazy level, e.g. a pyramid level computed from the
        full image, would otherwise be recomputed for every read: ~0.16 s per 256 px tile of her2st)."""
        if self._pixels is None:
            data = self.array.data
            if hasattr(data, "compute") and data.nbytes <= CACHE_BYTES:
                self._pixels = np.asarray(data.compute())
            else:
                return data
        return self._pixels

    def read(self, x0: int, y0: int, width: int, height: int, scale: float = 1.0) -> np.ndarray:
        """(3, height, width) float32 in [0, 1]; outside the image is white.

        ``scale`` reads on a grid of ``scale * target_um`` microns per pixel instead (``x0``, ``y0`` in that
        grid's pixels), from the same pyramid level: the scale-jitter augmentation.
        """

        r = self.rel * float(scale)
        H, W = int(self.array.sizes["y"]), int(self.array.sizes["x"])
        pad = int(np.ceil(2 * max(r, 1.0))) + 2
        lx0 = int(np.floor(x0 * r)) - pad
        ly0 = int(np.floor(y0 * r)) - pad
        lx1 = int(np.ceil((x0 + width) * r)) + pad
        ly1 = int(np.ceil((y0 + height) * r)) + pad
        window = np.full((3, ly1 - ly0, lx1 - lx0), BACKGROUND, dtype=np.float32)
        sx0, sy0, sx1, sy1 = max(lx0, 0), max(ly0, 0), min(lx1, W), min(ly1, H)
        if sx1 > sx0 and sy1 > sy0:
            block = self._level_pixels()[:, sy0:sy1, sx0:sx1]
            block = block.compute() if hasattr(block, "compute") else np.asarray(block)
            window[:, sy0 - ly0 : sy1 - ly0, sx0 - lx0 : sx1 - lx0] = to_float01(block)
        if abs(r - 1.0) < 1e-9:
            ox, oy = x0 - lx0, y0 - ly0
            return window[:, oy : oy + height, ox : ox + width].copy()
        n = int(round(r))
        if n >= 2 and abs(r - n) < 1e-9:
            # an integer factor: each target pixel is exactly n x n level pixels, so their mean is the area
            # average (and ~10x faster than filtering and interpolating)
            ox, oy = x0 * n - lx0, y0 * n - ly0
            block = window[:, oy : oy + height * n, ox : ox + width * n]
            out = np.zeros((3, height, width), dtype=np.float32)
            for dy in range(n):
                for dx in range(n):
                    out += block[:, dy::n, dx::n]
            return out * np.float32(1.0 / (n * n))
        # centres of target pixels in window coordinates (pixel centres at +0.5 on both grids)
        ys = (np.arange(height) + y0 + 0.5) * r - 0.5 - ly0
        xs = (np.arange(width) + x0 + 0.5) * r - 0.5 - lx0
        out = np.empty((3, height, width), dtype=np.float32)
        sigma = max(0.0, (r - 1.0) / 2.0)
        # the Gaussian pre-filter and the bilinear interpolation are both separable and linear: per axis they
        # compose into one sparse banded matrix, so each plane costs two sparse products (the values of
        # ndimage.gaussian_filter then ndimage.map_coordinates(order=1, mode="nearest"), several times faster)
        wy = _linear_weights(ys, window.shape[1]) @ _gaussian_matrix(window.shape[1], sigma)
        wx = (_linear_weights(xs, window.shape[2]) @ _gaussian_matrix(window.shape[2], sigma)).tocsr()
        for c in range(3):
            out[c] = (wx @ (wy @ window[c]).T).T
        return out


def _linear_weights(positions: np.ndarray, n: int):
    """(len(positions), n) sparse linear-interpolation weights, positions clamped to [0, n - 1]."""
    import scipy.sparse as sp

    p = np.clip(positions, 0, n - 1)
    i0 = np.floor(p).astype(np.int64)
    i1 = np.minimum(i0 + 1, n - 1)
    f = (p - i0).astype(np.float32)
    rows = np.arange(len(p))
    return sp.csr_matrix(
        (np.concatenate([1 - f, f]), (np.concatenate([rows, rows]), np.concatenate([i0, i1]))),
        shape=(len(p), n),
    )


def _gaussian_matrix(n: int, sigma: float, truncate: float = 4.0):
    """(n, n) sparse matrix of ndimage.gaussian_filter1d along one axis (same kernel, mode "reflect")."""
    import scipy.sparse as sp

    if sigma <= 0:
        return sp.identity(n, dtype=np.float32, format="csr")
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    rows = np.repeat(np.arange(n), len(x))
    cols = (np.arange(n)[:, None] + x[None, :]).ravel()
    # "reflect" (d c b a | a b c d | d c b a): index -1 -> 0, n -> n - 1, repeated for long kernels
    period = 2 * n
    cols = np.mod(cols, period)
    cols = np.where(cols >= n, period - 1 - cols, cols)
    weights = np.tile(kernel, n).astype(np.float32)
    return sp.csr_matrix((weights, (rows, cols)), shape=(n, n))  # duplicates are summed
