"""Exact integrals of a dense (C, H, W) intensity map over shapes, streamed block by block.

The map is piecewise constant on its pixels (pixel (i, j) covers x in [j, j + 1], y in [i, i + 1]), so the
integral over a shape is sum(overlap area * value). Only one map block (all channels) and the shapes whose
bounding boxes touch it are held at a time, so memory stays flat however large the map is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, NamedTuple

import numba
import numpy as np
import scipy.sparse as sp

from .._core.validate import check_positive, fail
from ._geometry import PolygonEdges, circle_weights, concat_ranges, edge_weights, polygon_edges

logger = logging.getLogger(__name__)

_POINT, _POLYGON, _MULTIPOLYGON = 0, 3, 6
#: height (map px) of the strips in which a block's shapes are visited
_STRIP_PX = 32


class MapIntegrals(NamedTuple):
    """Per-shape read-out of a map.

    values
        (n, C) float64: integral of each channel over each shape (map unit x um^2, i.e. expected counts
        for an intensity in counts per um^2).
    covered_um2
        (n,) area of each shape that lies on the map, in um^2.
    area_um2
        (n,) full area of each shape, in um^2.
    """

    values: np.ndarray
    covered_um2: np.ndarray
    area_um2: np.ndarray


@numba.njit(cache=True, nogil=True)
def _accumulate_csr(indptr, pixel_row, pixel_col, data, window, rows, out):
    """out[rows[k], c] += sum_n data[n] * window[c, pixel_row[n], pixel_col[n]] over row k of a CSR matrix."""
    n_rows = len(indptr) - 1
    for c in range(window.shape[0]):
        plane = window[c]
        for k in range(n_rows):
            total = 0.0
            for n in range(indptr[k], indptr[k + 1]):
                total += data[n] * plane[pixel_row[n], pixel_col[n]]
            out[rows[k], c] += total


def accumulate(weights: sp.csr_matrix, window: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """``out[rows] += weights @ window.reshape(C, -1).T`` for a (C, h, w) window, read in place (no copy).

    Channels are the outer loop so that each pass reads one contiguous plane; callers order the rows in
    horizontal strips so that consecutive shapes read the same map rows while they are in cache.
    """
    weights = weights.tocsr()
    pixel_row, pixel_col = np.divmod(weights.indices.astype(np.int64, copy=False), window.shape[2])
    _accumulate_csr(
        weights.indptr.astype(np.int64, copy=False),
        pixel_row,
        pixel_col,
        weights.data.astype(np.float64, copy=False),
        window,
        np.asarray(rows, dtype=np.int64),
        out,
    )


def as_map_array(map_array: Any) -> Any:
    """A (C, H, W) numpy or dask array from numpy, dask or an xarray DataArray."""
    data = getattr(map_array, "data", map_array) if hasattr(map_array, "dims") else map_array
    if not hasattr(data, "ndim"):
        data = np.asarray(data)
    if data.ndim != 3:
        fail("dense map", f"has {data.ndim} dimension(s), not 3 (c, y, x)", "Pass a (channels, y, x) array")
    return data


class WindowReader:
    """Reads all channels of map windows as float32/float64 numpy arrays, one window at a time.

    A numpy map is returned as a view (no copy). A dask map is computed window by window straight into one
    reusable buffer, so memory holds a single window plus the chunks being decoded, never the whole map.
    """

    def __init__(self, map_array: Any):
        self.map = map_array
        self.is_lazy = hasattr(map_array, "dask")
        self.dtype = np.float64 if map_array.dtype == np.float64 else np.float32
        self._buffer: np.ndarray | None = None

    def __call__(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        window = self.map[:, y0:y1, x0:x1]
        if not self.is_lazy:
            window = np.asarray(window)
            return window if window.dtype == self.dtype else window.astype(self.dtype)
        import dask.array as da

        C, h, w = window.shape
        if self._buffer is None or self._buffer.shape[1] < h or self._buffer.shape[2] < w:
            held = (0, 0, 0) if self._buffer is None else self._buffer.shape
            self._buffer = np.empty((C, max(h, held[1]), max(w, held[2])), dtype=self.dtype)
        out = self._buffer[:, :h, :w]
        da.store(window.astype(self.dtype, copy=False), out, lock=False)
        return out


class ShapeSet(NamedTuple):
    """Shapes in map pixel coordinates, split into circles and polygons (positions into the input order)."""

    n: int
    circle_ids: np.ndarray
    centers: np.ndarray
    radii: np.ndarray
    polygon_ids: np.ndarray
    edges: PolygonEdges
    bounds: np.ndarray  # (n, 4) xmin, ymin, xmax, ymax of every shape
    area_px: np.ndarray  # (n,) exact full area in map px^2


def shape_set(shapes_px: Any, radii: Any = None) -> ShapeSet:
    """Split a GeoSeries / GeoDataFrame / array of geometries into circles and polygons and validate them."""
    import shapely

    geoms = np.asarray(getattr(shapes_px, "geometry", shapes_px), dtype=object).reshape(-1)
    n = len(geoms)
    if any(g is None for g in geoms):
        fail("shapes", "contain missing (None) geometries", "Drop or repair them before reading out the map")
    types = shapely.get_type_id(geoms) if n else np.zeros(0, dtype=int)
    unsupported = ~np.isin(types, (_POINT, _POLYGON, _MULTIPOLYGON))
    if unsupported.any():
        kinds = sorted({geoms[i].geom_type for i in np.flatnonzero(unsupported)})
        fail("shapes", f"contain unsupported geometry types {kinds}", "Use circles or polygons")
    circle_ids = np.flatnonzero(types == _POINT)
    polygon_ids = np.flatnonzero(types != _POINT)
    bounds = np.zeros((n, 4))
    area_px = np.zeros(n)
    centers = np.zeros((0, 2))
    circle_radii = np.zeros(0)
    if len(circle_ids):
        if radii is None:
            fail("shapes", f"{len(circle_ids)} are points but no radii were given", "Pass radii=...")
        all_radii = np.broadcast_to(np.asarray(radii, dtype=float), (n,))
        circle_radii = np.ascontiguousarray(all_radii[circle_ids])
        if not np.all(np.isfinite(circle_radii) & (circle_radii > 0)):
            fail("shapes", "some circle radii are not positive finite numbers", "Give each a radius > 0")
        centers = shapely.get_coordinates(geoms[circle_ids]).reshape(-1, 2)
        if len(centers) != len(circle_ids):
            fail("shapes", "some points are empty", "Drop empty geometries")
        bounds[circle_ids] = np.c_[centers - circle_radii[:, None], centers + circle_radii[:, None]]
        area_px[circle_ids] = np.pi * circle_radii**2
    edges = polygon_edges(geoms[polygon_ids])
    if len(polygon_ids):
        bounds[polygon_ids] = edges.bounds
        area_px[polygon_ids] = shapely.area(geoms[polygon_ids])
    if not np.all(np.isfinite(bounds)):
        fail("shapes", "contain non-finite coordinates", "Check the shapes and their placement on the map")
    return ShapeSet(n, circle_ids, centers, circle_radii, polygon_ids, edges, bounds, area_px)


def shapes_per_block(
    bounds: np.ndarray, shape_hw: tuple[int, int], block_px: int
) -> Iterator[tuple[int, int, np.ndarray]]:
    """(block row, block column, ids of the shapes whose clipped bounding box touches the block)."""
    H, W = shape_hw
    n_bx = -(-W // block_px)
    x0 = np.clip(np.floor(bounds[:, 0]), 0, W).astype(np.int64)
    x1 = np.clip(np.ceil(bounds[:, 2]), 0, W).astype(np.int64)
    y0 = np.clip(np.floor(bounds[:, 1]), 0, H).astype(np.int64)
    y1 = np.clip(np.ceil(bounds[:, 3]), 0, H).astype(np.int64)
    on_map = np.flatnonzero((x1 > x0) & (y1 > y0))
    bx0, bx1 = x0[on_map] // block_px, (x1[on_map] - 1) // block_px
    by0, by1 = y0[on_map] // block_px, (y1[on_map] - 1) // block_px
    nx, ny = bx1 - bx0 + 1, by1 - by0 + 1
    counts = nx * ny
    owner = np.repeat(np.arange(len(on_map)), counts)
    k = concat_ranges(np.zeros_like(counts), counts)
    block_id = (by0[owner] + k // nx[owner]) * n_bx + bx0[owner] + k % nx[owner]
    order = np.argsort(block_id, kind="stable")
    block_id, shape_id = block_id[order], on_map[owner[order]]
    blocks, first = np.unique(block_id, return_index=True)
    last = np.r_[first[1:], len(block_id)]
    for b, a, z in zip(blocks, first, last, strict=True):
        yield int(b // n_bx), int(b % n_bx), shape_id[a:z]


def integrate_map(
    map_array: Any,
    shapes_px: Any,
    *,
    um_per_px: float,
    radii: Any = None,
    block_px: int = 2048,
    progress: bool = True,
) -> MapIntegrals:
    """Exact integrals of every channel of a (C, H, W) map over circles and polygons.

    Parameters
    ----------
    map_array
        (C, H, W) numpy or dask array (or xarray DataArray) of intensities per um^2. A dask array is read
        one block of ``block_px`` x ``block_px`` pixels (all channels) at a time.
    shapes_px
        GeoSeries / GeoDataFrame / array of shapely geometries in map pixel coordinates: Points (circles,
        with ``radii``) and Polygons / MultiPolygons (holes included). Shapes may overlap; each gets its
        full integral. Parts outside the map contribute nothing (see ``covered_um2``).
    um_per_px
        Microns per map pixel.
    radii
        Circle radii in map pixels: a scalar or one value per shape (ignored for polygons).
    block_px
        Side of the square map blocks read at a time.
    progress
        Show a tqdm progress bar over blocks.

    Returns
    -------
    :class:`MapIntegrals` with ``values`` (n, C) float64 = sum(area_px * um_per_px^2 * intensity),
    ``covered_um2`` (n,) and ``area_um2`` (n,).
    """
    from tqdm.auto import tqdm

    check_positive(um_per_px, "um_per_px", "dense map")
    if int(block_px) < 1:
        fail("integrate_map", f"block_px={block_px!r} is not a positive integer", "Pass block_px >= 1")
    block_px = int(block_px)
    data = as_map_array(map_array)
    C, H, W = map(int, data.shape)
    shapes = shape_set(shapes_px, radii)
    values = np.zeros((shapes.n, C))
    covered_px = np.zeros(shapes.n)
    # position of every shape inside its own kind's arrays, to pick circles / polygons per block
    kind_pos = np.full(shapes.n, -1, dtype=np.int64)
    kind_pos[shapes.circle_ids] = np.arange(len(shapes.circle_ids))
    kind_pos[shapes.polygon_ids] = np.arange(len(shapes.polygon_ids))
    is_circle = np.zeros(shapes.n, dtype=bool)
    is_circle[shapes.circle_ids] = True

    blocks = list(shapes_per_block(shapes.bounds, (H, W), block_px))
    read_window = WindowReader(data)
    for by, bx, ids in tqdm(blocks, desc="integrating map blocks", unit="block", disable=not progress):
        y0, x0 = by * block_px, bx * block_px
        y1, x1 = min(y0 + block_px, H), min(x0 + block_px, W)
        window = read_window(y0, y1, x0, x1)
        hw = (y1 - y0, x1 - x0)
        for ids_kind, weights in _block_weights(shapes, ids, is_circle, kind_pos, (x0, y0), hw):
            accumulate(weights, window, ids_kind, values)
            covered_px[ids_kind] += np.asarray(weights.sum(axis=1)).ravel()
    px_area = float(um_per_px) ** 2
    logger.info("integrated %d channel(s) over %d shape(s) in %d block(s)", C, shapes.n, len(blocks))
    return MapIntegrals(values * px_area, covered_px * px_area, shapes.area_px * px_area)


def _strip_order(bounds: np.ndarray) -> np.ndarray:
    """Order shapes by horizontal strips of their top edge, then left to right.

    Visited in this order, consecutive shapes read the same map rows, which stay in cache for every channel.
    """
    return np.lexsort((bounds[:, 0], np.floor(bounds[:, 1] / _STRIP_PX)))


def _block_weights(shapes: ShapeSet, ids, is_circle, kind_pos, origin, hw):
    """(shape ids, CSR weights within the block) for the block's circles and for its polygons."""
    ids = ids[_strip_order(shapes.bounds[ids])]
    circles = ids[is_circle[ids]]
    if len(circles):
        pos = kind_pos[circles]
        yield circles, circle_weights(shapes.centers[pos], shapes.radii[pos], hw, origin=origin)
    polygons = ids[~is_circle[ids]]
    if len(polygons):
        yield polygons, edge_weights(shapes.edges, hw, subset=kind_pos[polygons], origin=origin)


class LabelIntegrals(NamedTuple):
    """Per-label read-out of a map; rows are the non-zero label ids in increasing order.

    label_ids
        (m,) int64 label ids.
    values, covered_um2, area_um2
        As in :class:`MapIntegrals`.
    centroids
        (m, 2) mean (x, y) of each label's pixel centres, in the labels' intrinsic coordinates.
    """

    label_ids: np.ndarray
    values: np.ndarray
    covered_um2: np.ndarray
    area_um2: np.ndarray
    centroids: np.ndarray


def label_boundary_edges(block: np.ndarray, *, horizontal: bool = True, vertical: bool = True):
    """Positively oriented boundary edges of every label region (non-zero) of a 2-D block.

    Pixel (r, c) is the square [c, c + 1] x [r, r + 1]; the block's border counts as a boundary, so each
    region is the label restricted to the block. Returns (label, x0, y0, x1, y1) arrays.
    """
    padded = np.pad(block, 1)
    parts = []
    if horizontal:
        above, below = padded[:-1, 1:-1], padded[1:, 1:-1]
        differ = above != below
        r, c = np.nonzero(differ & (below != 0))  # top edge of pixel (r, c), running +x
        parts.append((below[r, c], c, r, c + 1, r))
        r, c = np.nonzero(differ & (above != 0))  # bottom edge of pixel (r - 1, c), running -x
        parts.append((above[r, c], c + 1, r, c, r))
    if vertical:
        left, right = padded[1:-1, :-1], padded[1:-1, 1:]
        differ = left != right
        r, c = np.nonzero(differ & (right != 0))  # left edge of pixel (r, c), running -y
        parts.append((right[r, c], c, r + 1, c, r))
        r, c = np.nonzero(differ & (left != 0))  # right edge of pixel (r, c - 1), running +y
        parts.append((left[r, c], c, r, c, r + 1))
    if not parts:
        return tuple(np.zeros(0) for _ in range(5))
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(5))


def _label_block_edges(block: np.ndarray, ids: np.ndarray, affine: np.ndarray, offset) -> PolygonEdges:
    """Boundary edges of each label ``ids[k]`` within ``block``, mapped into map pixels, grouped by label."""
    from .._core.coords import apply_affine

    # an edge contributes only through its extent in map x: skip the family that maps to vertical lines
    label, x0, y0, x1, y1 = label_boundary_edges(
        block, horizontal=affine[0, 0] != 0, vertical=affine[0, 1] != 0
    )
    group = np.searchsorted(ids, label)
    order = np.argsort(group, kind="stable")
    group = group[order]
    start_xy = apply_affine(affine, np.c_[x0[order] + offset[0], y0[order] + offset[1]])
    stop_xy = apply_affine(affine, np.c_[x1[order] + offset[0], y1[order] + offset[1]])
    if np.linalg.det(affine[:2, :2]) < 0:
        start_xy, stop_xy = stop_xy, start_xy  # a reflection reverses the orientation
    start = np.searchsorted(group, np.arange(len(ids) + 1)).astype(np.int64)
    first = start[:-1]
    xs = np.minimum(start_xy[:, 0], stop_xy[:, 0]), np.maximum(start_xy[:, 0], stop_xy[:, 0])
    ys = np.minimum(start_xy[:, 1], stop_xy[:, 1]), np.maximum(start_xy[:, 1], stop_xy[:, 1])
    bounds = np.c_[
        np.minimum.reduceat(xs[0], first), np.minimum.reduceat(ys[0], first),
        np.maximum.reduceat(xs[1], first), np.maximum.reduceat(ys[1], first),
    ]
    return PolygonEdges(
        np.ascontiguousarray(start_xy[:, 0]), np.ascontiguousarray(start_xy[:, 1]),
        np.ascontiguousarray(stop_xy[:, 0]), np.ascontiguousarray(stop_xy[:, 1]),
        start, np.ascontiguousarray(bounds),
    )


def integrate_labels(
    map_array: Any,
    labels: Any,
    affine: np.ndarray,
    *,
    um_per_px: float,
    block_px: int = 2048,
    progress: bool = True,
) -> LabelIntegrals:
    """Exact integrals of a (C, H, W) map over the regions of a labels raster, both streamed block by block.

    Every label pixel is the exact square it covers in the labels' grid, carried into the map's pixel grid
    by ``affine`` (3 x 3, labels (x, y) -> map (x, y); any invertible affine, rotations and shears
    included). A labels block is read with the map window it lands on; a label cut by block borders is the
    sum of its pieces, so no halo is needed.

    Parameters
    ----------
    map_array
        (C, H, W) numpy / dask array or DataArray of intensities per um^2.
    labels
        (y, x) integer numpy / dask array or DataArray; 0 is background.
    affine
        Labels intrinsic (x, y) to map pixel (x, y).
    um_per_px
        Microns per map pixel.
    block_px
        Map pixels per side of the map window read at a time (labels blocks are sized to match).
    progress
        Show a tqdm progress bar over labels blocks.

    Returns
    -------
    :class:`LabelIntegrals` for every non-zero label present.
    """
    from tqdm.auto import tqdm

    check_positive(um_per_px, "um_per_px", "dense map")
    data = as_map_array(map_array)
    C, H, W = map(int, data.shape)
    lab = labels.data if hasattr(labels, "dims") else labels
    if lab.ndim != 2:
        fail("labels", f"have {lab.ndim} dimension(s), not 2 (y, x)", "Pass a 2-D labels raster")
    if not np.issubdtype(lab.dtype, np.integer):
        fail("labels", f"have dtype {lab.dtype}, not an integer type", "Pass integer ids (0 = background)")
    affine = np.asarray(affine, dtype=float)
    det = float(np.linalg.det(affine[:2, :2]))
    if not np.isfinite(det) or det == 0:
        fail("labels", "their transformation to the map is singular", "Give an invertible transformation")
    map_px_per_label_px = np.sqrt(abs(det))
    side = int(block_px) if map_px_per_label_px <= 1 else max(64, int(block_px / map_px_per_label_px))
    LH, LW = map(int, lab.shape)
    starts = [(y, x) for y in range(0, LH, side) for x in range(0, LW, side)]
    parts = []
    read_window = WindowReader(data)
    for y0, x0 in tqdm(starts, desc="integrating labels blocks", unit="block", disable=not progress):
        block = lab[y0 : y0 + side, x0 : x0 + side]
        block = np.asarray(block.compute() if hasattr(block, "compute") else block)
        parts.append(_integrate_label_block(read_window, C, block, affine, (x0, y0), (H, W)))
    ids = np.concatenate([p[0] for p in parts])
    uniq, inverse = np.unique(ids, return_inverse=True)

    def total(k: int) -> np.ndarray:
        stacked = np.concatenate([p[k] for p in parts])
        out = np.zeros((len(uniq),) + stacked.shape[1:])
        np.add.at(out, inverse, stacked)
        return out

    values, covered, counts, xy_sums = total(1), total(2), total(3), total(4)
    px_area = float(um_per_px) ** 2
    logger.info("integrated %d channel(s) over %d label(s) in %d block(s)", C, len(uniq), len(starts))
    return LabelIntegrals(
        uniq.astype(np.int64),
        values * px_area,
        covered * px_area,
        counts * abs(det) * px_area,
        xy_sums / np.maximum(counts, 1)[:, None],
    )


def _integrate_label_block(read_window, C, block, affine, offset, map_hw):
    """(ids, values, covered px^2, pixel counts, sums of pixel-centre (x, y)) for one labels block."""
    H, W = map_hw
    ids, inverse, counts = np.unique(block, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(block.shape)
    rows, cols = np.indices(block.shape, dtype=np.float64)
    sum_x = np.bincount(inverse.ravel(), weights=(cols + 0.5 + offset[0]).ravel(), minlength=len(ids))
    sum_y = np.bincount(inverse.ravel(), weights=(rows + 0.5 + offset[1]).ravel(), minlength=len(ids))
    nonzero = ids != 0
    ids, counts, xy_sums = ids[nonzero], counts[nonzero], np.c_[sum_x, sum_y][nonzero]
    values = np.zeros((len(ids), C))
    covered = np.zeros(len(ids))
    if len(ids):
        h, w = block.shape
        from .._core.coords import apply_affine

        corners = np.array([[0, 0], [w, 0], [0, h], [w, h]], float) + np.asarray(offset, float)
        corners = apply_affine(affine, corners)
        wx0, wy0 = max(int(np.floor(corners[:, 0].min())), 0), max(int(np.floor(corners[:, 1].min())), 0)
        wx1, wy1 = min(int(np.ceil(corners[:, 0].max())), W), min(int(np.ceil(corners[:, 1].max())), H)
        if wx1 > wx0 and wy1 > wy0:
            edges = _label_block_edges(block, ids, affine, offset)
            order = _strip_order(edges.bounds)
            weights = edge_weights(edges, (wy1 - wy0, wx1 - wx0), subset=order, origin=(wx0, wy0))
            window = read_window(wy0, wy1, wx0, wx1)
            accumulate(weights, window, order, values)
            covered[order] = np.asarray(weights.sum(axis=1)).ravel()
    return ids.astype(np.int64), values, covered, counts.astype(np.float64), xy_sums
