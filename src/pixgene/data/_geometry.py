"""Exact overlap areas between shapes (disks, polygons with holes) and the square pixels of a grid.

Grid convention: pixel (row i, column j) covers x in [j, j + 1] and y in [i, i + 1] in grid coordinates
(x to the right, y down), so a shape's integral of a piecewise-constant map is sum(area * value).
Disks use a closed form of the disk/quadrant area; polygons an exact edge integration (Green's theorem).
Both kernels are compiled with numba and return scipy CSR matrices (shape x pixel).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numba
import numpy as np
import scipy.sparse as sp

#: overlap areas at or below this (grid px^2) are rounding noise and are not stored
AREA_TOLERANCE = 1e-12


@numba.njit(cache=True, nogil=True)
def _window_extent(lo: float, hi: float, size: int) -> tuple[int, int]:
    """Pixel index range [a, b) covering [lo, hi], clipped to [0, size)."""
    a = max(int(np.floor(lo)), 0)
    b = min(int(np.ceil(hi)), size)
    return a, b


def _disk_antiderivative(u: np.ndarray, r: np.ndarray) -> np.ndarray:
    """S(u) = integral of sqrt(r^2 - t^2) dt from 0 to u, for |u| <= r."""
    ratio = np.clip(u / r, -1.0, 1.0)
    return 0.5 * (u * np.sqrt(np.maximum(r * r - u * u, 0.0)) + r * r * np.arcsin(ratio))


def disk_quadrant_area(x: np.ndarray, y: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Area of the disk of radius r at the origin intersected with {u <= x, v <= y}, in closed form."""
    x, y, r = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float), np.asarray(r, float))
    xc = np.clip(x, -r, r)
    yc = np.clip(y, -r, r)
    a = np.sqrt(np.maximum(r * r - yc * yc, 0.0))
    S = _disk_antiderivative
    mid = np.clip(xc, -a, a)
    # over |u| <= a the vertical chord is cut at v = y; beyond it (only when y >= 0) the whole chord counts
    central = yc * (mid + a) + S(mid, r) - S(-a, r)
    upper = yc >= 0
    left = 2.0 * (S(np.minimum(xc, -a), r) - S(-r, r))
    right = 2.0 * (S(np.maximum(xc, a), r) - S(a, r))
    return central + np.where(upper, left + right, 0.0)


def disk_rect_area(cx, cy, r, x0, y0, x1, y1) -> np.ndarray:
    """Exact area of disk(cx, cy, r) intersected with the rectangle [x0, x1] x [y0, y1] (broadcasting)."""
    X0, X1 = np.asarray(x0, float) - cx, np.asarray(x1, float) - cx
    Y0, Y1 = np.asarray(y0, float) - cy, np.asarray(y1, float) - cy
    Q = disk_quadrant_area
    area = Q(X1, Y1, r) - Q(X0, Y1, r) - Q(X1, Y0, r) + Q(X0, Y0, r)
    return np.maximum(area, 0.0)


@numba.njit(cache=True, nogil=True, inline="always")
def _disk_antiderivative_scalar(u: float, r: float) -> float:
    ratio = min(max(u / r, -1.0), 1.0)
    return 0.5 * (u * np.sqrt(max(r * r - u * u, 0.0)) + r * r * np.arcsin(ratio))


@numba.njit(cache=True, nogil=True)
def _disk_quadrant_area_scalar(x: float, y: float, r: float) -> float:
    """Scalar :func:`disk_quadrant_area` (same closed form) for the compiled kernel."""
    xc = min(max(x, -r), r)
    yc = min(max(y, -r), r)
    a = np.sqrt(max(r * r - yc * yc, 0.0))
    mid = min(max(xc, -a), a)
    area = yc * (mid + a) + _disk_antiderivative_scalar(mid, r) - _disk_antiderivative_scalar(-a, r)
    if yc >= 0.0:
        area += 2.0 * (_disk_antiderivative_scalar(min(xc, -a), r) - _disk_antiderivative_scalar(-r, r))
        area += 2.0 * (_disk_antiderivative_scalar(max(xc, a), r) - _disk_antiderivative_scalar(a, r))
    return area


@numba.njit(cache=True, nogil=True)
def circle_weights_kernel(cx, cy, radii, H, W):
    """CSR (indptr, indices, data) of exact disk/pixel overlap areas on an H x W grid."""
    n = len(cx)
    total = 0
    max_corners = 1
    for k in range(n):
        r = radii[k]
        i0, i1 = _window_extent(cy[k] - r, cy[k] + r, H)
        j0, j1 = _window_extent(cx[k] - r, cx[k] + r, W)
        if i1 > i0 and j1 > j0:
            total += (i1 - i0) * (j1 - j0)
            max_corners = max(max_corners, (i1 - i0 + 1) * (j1 - j0 + 1))
    indices = np.empty(total, dtype=np.int64)
    data = np.empty(total, dtype=np.float64)
    indptr = np.zeros(n + 1, dtype=np.int64)
    # quadrant areas at pixel corners, shared by the up to four boundary pixels meeting there
    corner = np.empty(max_corners)
    pos = 0
    for k in range(n):
        r = radii[k]
        r2 = r * r
        i0, i1 = _window_extent(cy[k] - r, cy[k] + r, H)
        j0, j1 = _window_extent(cx[k] - r, cx[k] + r, W)
        w1 = j1 - j0 + 1
        corner[: (i1 - i0 + 1) * w1] = np.nan
        for i in range(i0, i1):
            v0 = i - cy[k]
            v1 = v0 + 1.0
            vnear = 0.0 if v0 <= 0.0 <= v1 else min(abs(v0), abs(v1))
            vfar = max(abs(v0), abs(v1))
            for j in range(j0, j1):
                u0 = j - cx[k]
                u1 = u0 + 1.0
                unear = 0.0 if u0 <= 0.0 <= u1 else min(abs(u0), abs(u1))
                if unear * unear + vnear * vnear >= r2:
                    continue
                ufar = max(abs(u0), abs(u1))
                # the disk is convex: a pixel whose farthest corner is inside lies wholly inside
                if ufar * ufar + vfar * vfar <= r2:
                    area = 1.0
                else:
                    area = 0.0
                    for di in range(2):
                        for dj in range(2):
                            c = (i - i0 + di) * w1 + (j - j0 + dj)
                            if np.isnan(corner[c]):
                                corner[c] = _disk_quadrant_area_scalar(u0 + dj, v0 + di, r)
                            area += corner[c] if di == dj else -corner[c]
                if area > AREA_TOLERANCE:
                    indices[pos] = i * W + j
                    data[pos] = area
                    pos += 1
        indptr[k + 1] = pos
    return indptr, indices[:pos].copy(), data[:pos].copy()


def circle_weights(
    centers: np.ndarray,
    radii: np.ndarray,
    grid_shape: tuple[int, int],
    *,
    origin: tuple[float, float] = (0.0, 0.0),
) -> sp.csr_matrix:
    """Sparse (n_circles, H * W) matrix of exact overlap areas (in grid pixels^2) of circles with pixels.

    ``centers`` are (x, y) in grid coordinates (pixel (i, j) covers x in [j, j + 1], y in [i, i + 1]);
    ``radii`` is a scalar or one value per circle. ``origin`` (x, y) is where the grid's top-left corner
    lies in the centres' coordinates (a window of a larger grid). Circles partly outside the grid keep only
    their covered part.
    """
    centers = np.asarray(centers, dtype=float).reshape(-1, 2)
    radii = np.ascontiguousarray(np.broadcast_to(np.asarray(radii, dtype=float), (len(centers),)))
    H, W = map(int, grid_shape)
    indptr, indices, data = circle_weights_kernel(
        np.ascontiguousarray(centers[:, 0] - origin[0]), np.ascontiguousarray(centers[:, 1] - origin[1]),
        radii, H, W,
    )
    return sp.csr_matrix((data, indices, indptr), shape=(len(centers), H * W))


# ----------------------------------------------------------------------------------------------------------
# Polygons: exact overlap areas by edge integration (Green's theorem)
#
# For the pixel (i, j) let F(x, y) = [j <= x < j + 1] * clamp(y - i, 0, 1). Its y-derivative is the pixel's
# indicator, so for a positively oriented boundary (shoelace area > 0 in (x, y)) Green's theorem gives
#     area(shape ∩ pixel) = -∮ F dx.
# Each edge is cut at the column lines; on a piece F is linear inside the rows it crosses (closed form
# below) and exactly 1 in every row above it, which a per-column difference array adds in O(1). The
# boundary does not have to be a set of ordered rings: any collection of directed edges that closes (a
# labels mask's pixel edges, for example) works, because every edge is integrated on its own.
# ----------------------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, inline="always")
def _ramp_integral(t: float) -> float:
    """G(t) = integral of clamp(s, 0, 1) ds from -inf to t."""
    if t <= 0.0:
        return 0.0
    if t < 1.0:
        return 0.5 * t * t
    return t - 0.5


@numba.njit(cache=True, nogil=True)
def edge_weights_kernel(ex0, ey0, ex1, ey1, edge_start, bounds, geoms, ox, oy, H, W):
    """CSR (indptr, indices, data) of exact areas of the shapes ``geoms`` within the window of H x W pixels.

    Shape g is bounded by the positively oriented edges ``edge_start[g]:edge_start[g + 1]`` and lies in
    ``bounds[g]`` (xmin, ymin, xmax, ymax). Coordinates are shifted by (-ox, -oy) so the window's top-left
    pixel is (0, 0); row k of the result is shape ``geoms[k]``; column = row * W + col within the window.
    """
    n = len(geoms)
    max_cells = 1
    total = 0
    for k in range(n):
        g = geoms[k]
        i0, i1 = _window_extent(bounds[g, 1] - oy, bounds[g, 3] - oy, H)
        j0, j1 = _window_extent(bounds[g, 0] - ox, bounds[g, 2] - ox, W)
        if i1 > i0 and j1 > j0:
            cells = (i1 - i0 + 1) * (j1 - j0)
            max_cells = max(max_cells, cells)
            total += cells
    acc = np.zeros(max_cells)
    above = np.zeros(max_cells)  # difference array: above[t, col] adds to every row < t of that column
    capacity = max(min(total, 1 << 22), max_cells)
    indices = np.empty(capacity, dtype=np.int64)
    data = np.empty(capacity, dtype=np.float64)
    indptr = np.zeros(n + 1, dtype=np.int64)
    pos = 0
    for k in range(n):
        g = geoms[k]
        i0, i1 = _window_extent(bounds[g, 1] - oy, bounds[g, 3] - oy, H)
        j0, j1 = _window_extent(bounds[g, 0] - ox, bounds[g, 2] - ox, W)
        if i1 <= i0 or j1 <= j0:
            indptr[k + 1] = pos
            continue
        h = i1 - i0
        w = j1 - j0
        acc[: h * w] = 0.0
        above[: (h + 1) * w] = 0.0
        for e in range(edge_start[g], edge_start[g + 1]):
            x0 = ex0[e] - ox
            x1 = ex1[e] - ox
            if x0 == x1:
                continue  # vertical edges have dx = 0
            y0 = ey0[e] - oy
            y1 = ey1[e] - oy
            sign = 1.0
            if x1 < x0:
                x0, x1, y0, y1 = x1, x0, y1, y0
                sign = -1.0
            if max(y0, y1) <= i0:
                continue  # F = 0 on every row of the window
            ylo = min(y0, y1)
            yhi = max(y0, y1)
            slope = (y1 - y0) / (x1 - x0)
            jstart = max(int(np.floor(x0)), j0)
            jstop = min(int(np.ceil(x1)), j1)
            for j in range(jstart, jstop):
                xa = max(x0, float(j))
                xb = min(x1, float(j + 1))
                length = xb - xa
                if length <= 0.0:
                    continue
                ya = min(max(y0 + (xa - x0) * slope, ylo), yhi)
                yb = min(max(y0 + (xb - x0) * slope, ylo), yhi)
                lo = min(ya, yb)
                hi = max(ya, yb)
                col = j - j0
                full_below = int(np.floor(lo))  # rows < full_below have F = 1 on the whole piece
                if full_below > i0:
                    t = min(full_below, i1) - i0
                    above[t * w + col] += sign * length
                dy = yb - ya
                for i in range(max(full_below, i0), min(int(np.ceil(hi)), i1)):
                    if abs(dy) < 1e-9:
                        mean_f = min(max(0.5 * (ya + yb) - i, 0.0), 1.0)
                    else:
                        mean_f = (_ramp_integral(yb - i) - _ramp_integral(ya - i)) / dy
                    acc[(i - i0) * w + col] += sign * length * mean_f
        for col in range(w):
            running = 0.0
            for t in range(h, 0, -1):
                running += above[t * w + col]
                acc[(t - 1) * w + col] += running
        if pos + h * w > capacity:
            capacity = max(2 * capacity, pos + h * w)
            grown_i = np.empty(capacity, dtype=np.int64)
            grown_d = np.empty(capacity, dtype=np.float64)
            grown_i[:pos] = indices[:pos]
            grown_d[:pos] = data[:pos]
            indices = grown_i
            data = grown_d
        for r in range(h):
            for c in range(w):
                v = -acc[r * w + c]
                if v > AREA_TOLERANCE:
                    indices[pos] = (i0 + r) * W + (j0 + c)
                    data[pos] = v
                    pos += 1
        indptr[k + 1] = pos
    return indptr, indices[:pos].copy(), data[:pos].copy()


class PolygonEdges(NamedTuple):
    """Positively oriented boundary edges of n shapes: shape g owns edges ``start[g]:start[g + 1]``."""

    x0: np.ndarray
    y0: np.ndarray
    x1: np.ndarray
    y1: np.ndarray
    start: np.ndarray
    bounds: np.ndarray  # (n, 4) xmin, ymin, xmax, ymax; zeros for empty shapes


def polygon_edges(polygons: Any) -> PolygonEdges:
    """Boundary edges of Polygons / MultiPolygons, exteriors oriented positively and holes negatively."""
    import shapely

    geoms = np.asarray(polygons, dtype=object).reshape(-1)
    n = len(geoms)
    if n == 0:
        empty = np.zeros(0)
        return PolygonEdges(empty, empty, empty, empty, np.zeros(1, np.int64), np.zeros((0, 4)))
    if any(g is None for g in geoms):
        raise ValueError("polygon_weights: missing (None) geometries; drop or repair them first")
    type_ids = shapely.get_type_id(geoms)
    bad = ~np.isin(type_ids, (3, 6))
    if bad.any():
        kinds = sorted({geoms[i].geom_type for i in np.flatnonzero(bad)})
        raise ValueError(f"polygon_weights: expected Polygon or MultiPolygon, got {kinds}")
    kind, coords, offsets = shapely.to_ragged_array(geoms, include_z=False)
    ring_offsets = offsets[0].astype(np.int64)
    rings_of_poly = offsets[1].astype(np.int64)
    polys_of_geom = offsets[2].astype(np.int64) if len(offsets) > 2 else np.arange(n + 1, dtype=np.int64)
    n_rings = len(ring_offsets) - 1
    ring_len = np.diff(ring_offsets)
    # a closed ring repeats its first vertex, so a ring of m coordinates has m - 1 edges
    is_edge_start = np.ones(len(coords), dtype=bool)
    is_edge_start[ring_offsets[1:] - 1] = False
    starts = np.flatnonzero(is_edge_start)
    ring_of_edge = np.repeat(np.arange(n_rings), np.maximum(ring_len - 1, 0))
    x0, y0 = coords[starts, 0], coords[starts, 1]
    x1, y1 = coords[starts + 1, 0], coords[starts + 1, 1]
    # shoelace relative to each ring's first vertex keeps the sign reliable far from the origin
    ref = coords[ring_offsets[:-1][ring_of_edge]] if len(starts) else np.zeros((0, 2))
    cross = (x0 - ref[:, 0]) * (y1 - ref[:, 1]) - (x1 - ref[:, 0]) * (y0 - ref[:, 1])
    ring_area = np.bincount(ring_of_edge, weights=cross, minlength=n_rings)
    is_exterior = np.zeros(n_rings, dtype=bool)
    has_rings = np.diff(rings_of_poly) > 0
    is_exterior[rings_of_poly[:-1][has_rings]] = True
    flip = ((ring_area > 0) != is_exterior)[ring_of_edge]
    x0, x1 = np.where(flip, x1, x0), np.where(flip, x0, x1)
    y0, y1 = np.where(flip, y1, y0), np.where(flip, y0, y1)
    first_ring = rings_of_poly[polys_of_geom]
    start = ring_offsets[first_ring] - first_ring
    bounds = shapely.bounds(geoms)
    bounds[~np.isfinite(bounds).all(axis=1)] = 0.0
    return PolygonEdges(
        *(np.ascontiguousarray(a, dtype=np.float64) for a in (x0, y0, x1, y1)),
        start.astype(np.int64),
        np.ascontiguousarray(bounds, dtype=np.float64),
    )


def edge_weights(
    edges: PolygonEdges,
    grid_shape: tuple[int, int],
    *,
    subset: np.ndarray | None = None,
    origin: tuple[float, float] = (0.0, 0.0),
) -> sp.csr_matrix:
    """Exact overlap areas of (a subset of) the shapes in ``edges`` with the pixels of a window.

    The window has ``grid_shape`` (H, W) pixels and its top-left corner at ``origin`` (x, y) in the edges'
    coordinates; row k of the result is shape ``subset[k]``.
    """
    H, W = map(int, grid_shape)
    n_total = len(edges.start) - 1
    subset = np.arange(n_total, dtype=np.int64) if subset is None else np.asarray(subset, dtype=np.int64)
    indptr, indices, data = edge_weights_kernel(
        edges.x0, edges.y0, edges.x1, edges.y1, edges.start, edges.bounds, subset,
        float(origin[0]), float(origin[1]), H, W,
    )
    return sp.csr_matrix((data, indices, indptr), shape=(len(subset), H * W))


def polygon_weights(polygons: Any, grid_shape: tuple[int, int]) -> sp.csr_matrix:
    """Sparse (n_polygons, H * W) matrix of exact overlap areas (grid px^2) of polygons with pixels.

    Parameters
    ----------
    polygons
        Shapely Polygons / MultiPolygons (holes included) in grid coordinates: pixel (i, j) covers
        x in [j, j + 1], y in [i, i + 1]. Ring orientation does not matter.
    grid_shape
        (H, W) of the grid. Parts of a polygon outside it are dropped (only the covered part counts).

    Returns
    -------
    CSR matrix; row k holds the areas of polygon k in every pixel it overlaps (column = i * W + j).
    """
    return edge_weights(polygon_edges(polygons), grid_shape)


def scaled_polygons(polygons: np.ndarray, factor: float,
                    offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Polygons with every vertex mapped to ``vertex * factor - offset``."""
    import shapely

    shift = np.asarray(offset, dtype=float)
    return shapely.transform(polygons, lambda xy: xy * factor - shift)


def spot_weights(
    centers: np.ndarray,
    radius: Any,
    polygons: np.ndarray | None,
    grid_shape: tuple[int, int],
    *,
    scale: float = 1.0,
    corner: tuple[float, float] = (0.0, 0.0),
    stride: int = 1,
) -> sp.csr_matrix:
    """Sparse (n, H * W) exact overlap areas (grid px^2) of spots with a grid: circles (``centers``,
    ``radius``) or, when ``polygons`` is given, those polygons. A spot's point ``p`` lies at
    ``(p / scale - corner) / stride`` on the grid: a view read at ``scale`` slide pixels per pixel whose
    top-left corner is ``corner`` (view pixels) and whose output pixel is ``stride`` view pixels."""
    if polygons is None:
        centers_out = (np.asarray(centers, dtype=float) / scale - np.asarray(corner)) / stride
        return circle_weights(centers_out, np.asarray(radius, dtype=float) / scale / stride, grid_shape)
    placed = scaled_polygons(polygons, 1.0 / (scale * stride), (corner[0] / stride, corner[1] / stride))
    return polygon_weights(placed, grid_shape)


def concat_ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """The concatenation of ``arange(a, b)`` for every ``(a, b)`` of ``starts``, ``stops``."""
    lengths = stops - starts
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + offsets
