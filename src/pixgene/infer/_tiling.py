"""The dense output grid and the tiling halo: how chunks map to image windows, and how wide a halo makes a
tiled map equal one pass."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: tiled and single-pass maps agree to this fraction of the map's maximum
TILING_TOLERANCE = 1e-4



#: the halo is chosen where the probe's error is this many times below the tolerance: a chunk's corner sees
#: two tile edges at once, and tissue is not the probe's texture: at 4 (and 8), a small conv-decoder model
#: left 1.03e-4 on a synthetic slide, ten times its probe error; at 16 one alignment step more left 1.1e-5
HALO_SAFETY = 16.0



#: the probe measures the edge error up to this distance (encoder px); larger receptive fields are capped
MAX_HALO_PX = 1024



def overlap_matrix(n_out: int, out_start: float, out_size: float, n_in: int, in_start: float, in_size: float):
    """(n_out, n_in) fractions of each output interval covered by each input interval (rows sum to <= 1).

    Intervals: output k = [out_start + k * out_size, ... + out_size], likewise input. Applied on both axes it
    turns a piecewise-constant intensity on one grid into its exact area average on another.
    """
    oe = out_start + out_size * np.arange(n_out + 1)
    ie = in_start + in_size * np.arange(n_in + 1)
    lo = np.maximum(oe[:-1, None], ie[None, :-1])
    hi = np.minimum(oe[1:, None], ie[None, 1:])
    return np.clip(hi - lo, 0.0, None) / out_size



@dataclass(frozen=True)
class DenseGrid:
    """Where the output map lies: output pixel (i, j) covers microns [j * um, (j + 1) * um] from (0, 0)."""

    shape: tuple[int, int]
    out_um: float
    enc_um: float
    model_um: float
    stride: int  # encoder pixels per model output pixel
    align: int  # encoder pixels; tile origins are multiples of this
    halo: int  # encoder pixels of context around each written region

    def read_window(self, oy0: int, oy1: int, ox0: int, ox1: int) -> tuple[int, int, int, int]:
        """Encoder-pixel window (x0, y0, w, h), aligned, that covers output rows/cols plus the halo."""
        s = self.out_um / self.enc_um
        x0 = int(np.floor(ox0 * s / self.align)) * self.align - self.halo
        y0 = int(np.floor(oy0 * s / self.align)) * self.align - self.halo
        x1 = int(np.ceil(ox1 * s / self.align)) * self.align + self.halo
        y1 = int(np.ceil(oy1 * s / self.align)) * self.align + self.halo
        return x0, y0, x1 - x0, y1 - y0

    def tile_shape(self, blocks: list[tuple[int, int, int, int]]) -> tuple[int, int]:
        """(h, w) of the one tile size that covers every block's window (equal tiles can be batched)."""
        windows = np.array([self.read_window(*b) for b in blocks]).reshape(-1, 4)
        return int(windows[:, 3].max()), int(windows[:, 2].max())



def chunk_blocks(shape: tuple[int, int], chunk_px: int) -> list[tuple[int, int, int, int]]:
    """Output chunks (oy0, oy1, ox0, ox1) in row-major order; they are also the zarr chunks of the map."""
    return [
        (oy, min(oy + chunk_px, shape[0]), ox, min(ox + chunk_px, shape[1]))
        for oy in range(0, shape[0], chunk_px)
        for ox in range(0, shape[1], chunk_px)
    ]



def resample_to_output(lam: np.ndarray, grid: DenseGrid, block: tuple[int, int, int, int], x0: int, y0: int):
    """Model-grid intensity of a tile read at encoder pixel (x0, y0) -> exact area average on one block."""
    oy0, oy1, ox0, ox1 = block
    m = grid.model_um
    sy, sx = (oy0 * grid.out_um - y0 * grid.enc_um) / m, (ox0 * grid.out_um - x0 * grid.enc_um) / m
    if grid.out_um == m and float(sy).is_integer() and float(sx).is_integer():
        # same grid, whole-pixel offset: the area average is a crop (rows of the overlap matrices are one-hot)
        iy, ix = int(sy), int(sx)
        if 0 <= iy and 0 <= ix and iy + oy1 - oy0 <= lam.shape[1] and ix + ox1 - ox0 <= lam.shape[2]:
            return np.ascontiguousarray(lam[:, iy : iy + oy1 - oy0, ix : ix + ox1 - ox0])
    ry = overlap_matrix(oy1 - oy0, oy0 * grid.out_um, grid.out_um, lam.shape[1], y0 * grid.enc_um, m)
    rx = overlap_matrix(ox1 - ox0, ox0 * grid.out_um, grid.out_um, lam.shape[2], x0 * grid.enc_um, m)
    return np.einsum("yi,cij,xj->cyx", ry, lam, rx, optimize=True)



def probe_texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(3, height, width) float32 H&E-like texture: pink stroma, purple nuclei, white lumina, pixel noise.

    The edge error of a tile depends on how much its content differs from the zero padding the network sees
    beyond it; a textured, stained probe is a harder case than blank glass.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)

    def field(cell: int) -> np.ndarray:
        coarse = rng.random((height // cell + 2, width // cell + 2))
        return ndimage.zoom(coarse, cell, order=1)[:height, :width]

    stroma = np.array([0.93, 0.70, 0.82])[:, None, None]
    nuclei = np.array([0.35, 0.22, 0.55])[:, None, None]
    glass = np.array([0.97, 0.96, 0.97])[:, None, None]
    texture = field(6) * 0.6 + field(24) * 0.4
    lumen = field(48)
    image = np.where(texture > 0.62, nuclei, stroma)
    image = np.where(lumen > 0.85, glass, image)
    image = image + 0.04 * rng.standard_normal((3, height, width))
    return np.clip(image, 0.0, 1.0).astype(np.float32)



@contextlib.contextmanager
def _in_float32(model: Any):
    """The model computes in float32 inside (a bfloat16 model's rounding, about 1e-2 relative, would hide how
    far a tile edge reaches: that is a property of the architecture's receptive field, not of the precision)."""
    module = model.module
    precision = module.precision
    module.precision = "32"
    try:
        yield
    finally:
        module.precision = precision



def edge_error_profile(model: Any, *, max_halo_px: int = MAX_HALO_PX) -> np.ndarray:
    """Error a tile edge leaves at each distance: ``profile[k]`` at ``k * out_stride`` encoder px from it.

    A textured strip is predicted whole, with its first ``max_halo_px`` columns cut off and with its last
    ``max_halo_px`` columns cut off (the cuts on multiples of ``model.alignment``); the largest difference over
    all outputs, rows, both cuts and columns at distance ``>= k * out_stride`` from the cut, relative to the
    largest intensity, is ``profile[k]`` (non-increasing). Both sides count: an encoder with TensorFlow "SAME"
    padding pads its strided convolutions more after the image than before it, so a tile's right and bottom
    edges reach further in than its left and top ones. Measured in float32 whatever the model's precision.
    """
    a, s = int(model.alignment), int(model.out_stride)
    margin = int(np.ceil(max_halo_px / a)) * a
    height = int(np.ceil(max(256, 2 * a) / a)) * a
    crop_width = margin + 2 * a
    strip = probe_texture(height, margin + crop_width)
    with _in_float32(model):
        whole = model.predict_intensity(strip)
        after_left_cut = model.predict_intensity(strip[:, :, margin:])  # column k: k * s px right of the cut
        before_right_cut = model.predict_intensity(strip[:, :, :crop_width])  # column n-1-k: k * s px left of it
    n = crop_width // s
    left = np.abs(whole[:, :, -n:] - after_left_cut).max(axis=(0, 1))
    right = np.abs(whole[:, :, :n] - before_right_cut).max(axis=(0, 1))[::-1]
    per_column = np.maximum(left, right) / max(float(np.abs(whole).max()), 1e-30)
    return np.maximum.accumulate(per_column[::-1])[::-1]



def tiling_halo(
    model: Any, *, tolerance: float = TILING_TOLERANCE, max_halo_px: int = MAX_HALO_PX
) -> tuple[int, float]:
    """Halo (encoder px, a multiple of ``model.alignment``) for tiled prediction within ``tolerance``.

    Measured once per model and cached on the instance (keyed by the model id): the smallest multiple of the
    alignment where :func:`edge_error_profile` is below ``tolerance / HALO_SAFETY``. A model whose receptive
    field never gets there within ``max_halo_px`` (a ViT with global attention) gets ``max_halo_px`` and a
    logged warning with the error it leaves.

    Returns
    -------
    ``(halo_px, edge_error)``: the halo and the probe's relative error at that distance from a tile edge.
    """
    cache = model.__dict__.setdefault("_tiling_halo_cache", {})
    key = (model.model_id, float(tolerance), int(max_halo_px))
    if key in cache:
        return cache[key]
    a, s = int(model.alignment), int(model.out_stride)
    profile = edge_error_profile(model, max_halo_px=max_halo_px)
    limit = int(np.ceil(max_halo_px / a)) * a
    halo = next((d for d in range(0, limit + 1, a) if profile[d // s] <= tolerance / HALO_SAFETY), None)
    if halo is None:
        halo = limit
        logger.warning(
            "the model's receptive field exceeds %d px: tiles leave a relative error of %.2g at their seams "
            "(tolerance %.2g); pass a larger halo_px to predict_dense to reduce it",
            limit, profile[limit // s], tolerance,
        )
    cache[key] = (int(halo), float(profile[halo // s]))
    logger.info("tiling halo %d px (edge error %.2g, tolerance %.2g)", halo, profile[halo // s], tolerance)
    return cache[key]
