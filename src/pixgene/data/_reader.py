"""Read any region of an H&E image resampled to a target pixel size, without loading the whole image."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._raster import level_for_downsample, rgb_array, scale_levels, to_float01

#: value of pixels outside the slide: white glass, like an H&E background
BACKGROUND = 1.0


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

    def read(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """(3, height, width) float32 in [0, 1]; outside the image is white."""
        from scipy import ndimage

        r = self.rel
        H, W = int(self.array.sizes["y"]), int(self.array.sizes["x"])
        pad = int(np.ceil(2 * max(r, 1.0))) + 2
        lx0 = int(np.floor(x0 * r)) - pad
        ly0 = int(np.floor(y0 * r)) - pad
        lx1 = int(np.ceil((x0 + width) * r)) + pad
        ly1 = int(np.ceil((y0 + height) * r)) + pad
        window = np.full((3, ly1 - ly0, lx1 - lx0), BACKGROUND, dtype=np.float32)
        sx0, sy0, sx1, sy1 = max(lx0, 0), max(ly0, 0), min(lx1, W), min(ly1, H)
        if sx1 > sx0 and sy1 > sy0:
            block = self.array.data[:, sy0:sy1, sx0:sx1]
            block = block.compute() if hasattr(block, "compute") else np.asarray(block)
            window[:, sy0 - ly0 : sy1 - ly0, sx0 - lx0 : sx1 - lx0] = to_float01(block)
        if abs(r - 1.0) < 1e-9:
            ox, oy = x0 - lx0, y0 - ly0
            return window[:, oy : oy + height, ox : ox + width].copy()
        # centres of target pixels in window coordinates (pixel centres at +0.5 on both grids)
        ys = (np.arange(height) + y0 + 0.5) * r - 0.5 - ly0
        xs = (np.arange(width) + x0 + 0.5) * r - 0.5 - lx0
        out = np.empty((3, height, width), dtype=np.float32)
        sigma = max(0.0, (r - 1.0) / 2.0)
        for c in range(3):
            plane = ndimage.gaussian_filter(window[c], sigma) if sigma > 0 else window[c]
            grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
            out[c] = ndimage.map_coordinates(plane, [grid_y, grid_x], order=1, mode="nearest")
        return out
