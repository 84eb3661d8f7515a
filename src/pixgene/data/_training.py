"""Training tiles: where to cut them, their cached frozen-encoder features and their spot operators."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ._geometry import concat_ranges, spot_weights
from ._reader import SlideReader

logger = logging.getLogger(__name__)


@dataclass
class SlideSpots:
    """One training slide in encoder pixels."""

    name: str
    reader: SlideReader
    centers: np.ndarray  # (n, 2) x, y in encoder pixels
    radius: float | np.ndarray  # encoder pixels: circles' radius, or each polygon's half extent
    counts: np.ndarray  # (n, G + 1): selected genes then the library size
    train_mask: np.ndarray  # (n,) bool; False = held out for validation
    slide_index: int = 0
    #: (n,) shapely polygons in encoder pixels when the spots are polygons (square bins, ...); None for circles
    polygons: np.ndarray | None = None

    def area_operator(self, ids: np.ndarray, scale: float, corner: tuple[int, int], stride: int, n_out: int):
        """Sparse (len(ids), n_out * n_out) exact overlap areas (output px^2) of spots ``ids`` with the output
        pixels of a view read at ``scale`` encoder pixels per pixel, its top-left corner at ``corner`` (view
        pixels)."""
        radius = self.radius if np.ndim(self.radius) == 0 else self.radius[ids]
        polygons = None if self.polygons is None else self.polygons[ids]
        return spot_weights(self.centers[ids], radius, polygons, (n_out, n_out), scale=scale, corner=corner,
                            stride=stride)


def plan_tiles(centers: np.ndarray, radius, tile: int, margin: int) -> np.ndarray:
    """Top-left corners of few tiles such that every spot lies fully inside the core of at least one.

    ``radius`` is one value for every spot or one per spot (a polygon's half extent). Candidates on a grid fine
    enough that each spot fits some candidate; then a greedy set cover (the candidate that holds the most spots
    not yet covered, the first in row-major order on ties). Each spot's candidates are found from its position
    on the grid, so memory and time grow with the number of spots, not with spots x candidates.
    """
    centers = np.asarray(centers, dtype=float).reshape(-1, 2)
    n = len(centers)
    r = np.broadcast_to(np.asarray(radius, dtype=float), (n,))
    r_max = float(r.max()) if n else float(np.max(radius, initial=0.0))
    core = tile - 2 * margin
    if 2 * r_max > core:
        raise ValueError(f"spots of diameter {2 * r_max:.0f} px do not fit a {tile} px tile with margin {margin}")
    if n == 0:
        return np.zeros((0, 2), dtype=int)
    step = max(8, int((core - 2 * r_max) // 2))
    lo = np.floor(centers.min(0) - tile).astype(int)
    hi = np.ceil(centers.max(0)).astype(int)
    axes = [np.arange(lo[k], hi[k] + 1, step) for k in (0, 1)]
    nx_all = len(axes[0])
    pairs = [_candidate_pairs(centers[i : i + _PLAN_CHUNK], r[i : i + _PLAN_CHUNK], i, axes, lo, step, tile,
                              margin) for i in range(0, n, _PLAN_CHUNK)]
    cand = np.concatenate([c for c, _ in pairs])  # grouped by spot, spots in order
    spot = np.concatenate([j for _, j in pairs])
    spot_start = np.searchsorted(spot, np.arange(n + 1))
    by_cand = np.argsort(cand, kind="stable")
    cand_spots = spot[by_cand]
    cand_start = np.searchsorted(cand[by_cand], np.arange(nx_all * len(axes[1]) + 1))
    gain = np.bincount(cand, minlength=nx_all * len(axes[1]))
    uncovered = np.ones(n, dtype=bool)
    chosen = []
    while True:
        best = int(np.argmax(gain))
        if gain[best] == 0:
            break
        chosen.append((axes[0][best % nx_all], axes[1][best // nx_all]))
        newly = cand_spots[cand_start[best] : cand_start[best + 1]]
        newly = newly[uncovered[newly]]
        uncovered[newly] = False
        # every candidate that held a newly covered spot gains one spot less
        np.subtract.at(gain, cand[concat_ranges(spot_start[newly], spot_start[newly + 1])], 1)
    return np.asarray(chosen, dtype=int).reshape(-1, 2)


#: spots whose candidate tiles are listed at a time (bounds the memory of planning a grid of many bins)
_PLAN_CHUNK = 32768


def _candidate_pairs(centers, r, first_spot, axes, lo, step, tile, margin) -> tuple[np.ndarray, np.ndarray]:
    """(candidate, spot) of every candidate corner whose tile core holds a spot: each spot's range of corners
    on the grid, one wider on each side, then the exact comparison :func:`spots_inside` makes."""
    lims = []
    for k in (0, 1):
        a = np.floor((centers[:, k] + r - tile + margin - lo[k]) / step).astype(np.int64) - 1
        z = np.floor((centers[:, k] - r - margin - lo[k]) / step).astype(np.int64) + 1
        lims.append((np.clip(a, 0, len(axes[k]) - 1), np.clip(z, 0, len(axes[k]) - 1)))
    (x_a, x_z), (y_a, y_z) = lims
    nx = np.maximum(x_z - x_a + 1, 0)
    per_spot = nx * np.maximum(y_z - y_a + 1, 0)
    spot = np.repeat(np.arange(len(centers)), per_spot)
    k = concat_ranges(np.zeros(len(centers), dtype=np.int64), per_spot)
    ix = x_a[spot] + k % np.maximum(nx, 1)[spot]
    iy = y_a[spot] + k // np.maximum(nx, 1)[spot]
    cx, cy, rr = centers[spot, 0], centers[spot, 1], r[spot]
    gx, gy = axes[0][ix], axes[1][iy]
    ok = ((cx >= gx + margin + rr) & (cx <= gx + tile - margin - rr)
          & (cy >= gy + margin + rr) & (cy <= gy + tile - margin - rr))
    return (iy * len(axes[0]) + ix)[ok], spot[ok] + first_spot


def spots_inside(corners: np.ndarray, centers: np.ndarray, radius, tile: int, margin: int) -> np.ndarray:
    """(n_corners, n_spots): whether each spot (``radius`` one value or one per spot) lies in each tile's core."""
    r = np.asarray(radius, dtype=float)
    if r.ndim:
        r = r[None, :, None]
    lo = corners[:, None, :] + margin + r
    hi = corners[:, None, :] + tile - margin - r
    c = centers[None, :, :]
    return np.all((c >= lo) & (c <= hi), axis=-1)


@dataclass
class TileView:
    slide: int
    spot_ids: np.ndarray  # indices into the slide's spots
    rows: np.ndarray  # nonzero entries of the (spots x output pixels) area operator, um^2
    cols: np.ndarray
    weights: np.ndarray
    dihedral: int


@dataclass
class TrainingCache:
    """Frozen-encoder features of every (tile, view), and what each view supervises."""

    features: list | None  # per decoder level: tensor (n_tiles, n_views, C, h, w) float16; None if images
    views: list[list[TileView]]  # [tile][view]
    slides: list[SlideSpots]
    tile: int
    out_stride: int
    levels: list[int] = field(default_factory=list)
    images: object = None  # (n_tiles, n_views, 3, tile, tile) uint8 when the encoder is fine-tuned
    #: ``expand(k, cached, (tile, tile))`` -> decoder level ``k`` when ``features`` hold the encoder's compact
    #: form (a ViT's token grids); None when they are the levels themselves
    expand: object = None

    @property
    def n_tiles(self) -> int:
        return len(self.views)

    def level(self, k: int, cached):
        """Decoder level ``k`` of a batch of cached entries (B, C, h, w): float32, expanded if compact."""
        import torch

        x = cached.float()
        if self.expand is None:
            return x
        return self.expand(k, x, (self.tile, self.tile)).contiguous(memory_format=torch.channels_last)


