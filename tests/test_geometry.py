"""Exact shape/pixel overlap areas against independent references (supersampling, polygon clipping)."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import MultiPolygon, Polygon, box

from pixgene.data._geometry import circle_weights, disk_rect_area, polygon_weights


def supersampled(inside, H: int, W: int, n: int = 200) -> np.ndarray:
    """(H, W) pixel areas by counting n x n sub-pixel midpoints for which ``inside(x, y)`` holds."""
    out = np.zeros((H, W))
    sub = (np.arange(n) + 0.5) / n
    xs = (np.arange(W)[:, None] + sub[None]).ravel()
    for i in range(H):
        X, Y = np.meshgrid(xs, i + sub)
        out[i] = inside(X, Y).reshape(n, W, n).sum(axis=(0, 2)) / n**2
    return out


def clipped_areas(geom, H: int, W: int) -> np.ndarray:
    """(H, W) pixel areas by exact polygon clipping (GEOS), an algorithm independent of edge integration."""
    i, j = np.divmod(np.arange(H * W), W)
    return shapely.area(shapely.intersection(geom, shapely.box(j, i, j + 1, i + 1))).reshape(H, W)


def dense_row(weights, k: int, H: int, W: int) -> np.ndarray:
    return weights[k].toarray().reshape(H, W)


CONCAVE_WITH_HOLE = Polygon(
    [(1.3, 0.7), (8.9, 2.2), (6.1, 9.4), (3.3, 5.5), (0.4, 8.8)],
    [[(3.1, 2.2), (5.2, 2.9), (4.4, 4.1)]],
)


def test_polygon_matches_supersampling():
    shapely.prepare(CONCAVE_WITH_HOLE)
    ref = supersampled(lambda x, y: shapely.contains_xy(CONCAVE_WITH_HOLE, x, y), 10, 10)
    got = dense_row(polygon_weights([CONCAVE_WITH_HOLE], (10, 10)), 0, 10, 10)
    assert np.abs(got - ref).max() < 1e-3
    assert got.sum() == pytest.approx(CONCAVE_WITH_HOLE.area, abs=1e-10)


def test_circle_matches_supersampling():
    cx, cy, r = 4.37, 5.11, 3.73
    ref = supersampled(lambda x, y: (x - cx) ** 2 + (y - cy) ** 2 <= r * r, 10, 10)
    got = dense_row(circle_weights(np.array([[cx, cy]]), r, (10, 10)), 0, 10, 10)
    assert np.abs(got - ref).max() < 1e-3
    assert got.sum() == pytest.approx(np.pi * r * r, rel=1e-12)


def test_circles_match_closed_form_partly_outside():
    rng = np.random.default_rng(3)
    centers = rng.uniform(-4, 24, (40, 2))
    radii = rng.uniform(0.2, 9, 40)
    H, W = 18, 21
    weights = circle_weights(centers, radii, (H, W))
    I, J = np.mgrid[0:H, 0:W]  # noqa: E741
    for k in range(40):
        ref = disk_rect_area(centers[k, 0], centers[k, 1], radii[k], J, I, J + 1, I + 1)
        np.testing.assert_allclose(dense_row(weights, k, H, W), ref, atol=1e-10)


def random_star_polygon(rng, center, n_vertices):
    # increasing angles less than pi apart with radii > 0 give a simple (often concave) star polygon
    step = 2 * np.pi / n_vertices
    angles = np.arange(n_vertices) * step + rng.uniform(0, 0.9 * step, n_vertices)
    radii = rng.uniform(1.5, 8.0, n_vertices)
    return Polygon(np.c_[center[0] + radii * np.cos(angles), center[1] + radii * np.sin(angles)])


def test_polygons_match_clipping_concave_holes_multi_and_outside():
    rng = np.random.default_rng(0)
    H, W = 16, 19
    shapes = [random_star_polygon(rng, rng.uniform(-3, 22, 2), int(rng.integers(3, 14))) for _ in range(25)]
    shapes.append(CONCAVE_WITH_HOLE)
    moved = shapely.affinity.translate(CONCAVE_WITH_HOLE, 9, 0)
    shapes.append(MultiPolygon([box(0.3, 0.2, 3.7, 5.1), box(10.2, 11.3, 30.0, 12.9), moved]))
    shapes.append(box(-6, -6, -1, -1))  # entirely outside
    shapes.append(box(-2.5, 3.25, 25.0, 4.75))  # crosses the grid, clipped on both sides
    exterior, hole = CONCAVE_WITH_HOLE.exterior.coords, CONCAVE_WITH_HOLE.interiors[0].coords
    shapes.append(Polygon(exterior[::-1], [hole[::-1]]))  # rings in the opposite orientation
    assert all(s.is_valid for s in shapes)
    weights = polygon_weights(shapes, (H, W))
    assert weights.shape == (len(shapes), H * W)
    grid = box(0, 0, W, H)
    for k, shape in enumerate(shapes):
        np.testing.assert_allclose(dense_row(weights, k, H, W), clipped_areas(shape, H, W), atol=1e-9)
        assert weights[k].sum() == pytest.approx(shape.intersection(grid).area, abs=1e-9)
    assert weights[len(shapes) - 3].nnz == 0


def test_polygon_far_from_origin_and_empty():
    offset = 30_000.0
    far = shapely.affinity.translate(CONCAVE_WITH_HOLE, offset, offset)
    H = W = 30_012
    weights = polygon_weights([far, Polygon()], (H, W))
    near = dense_row(polygon_weights([CONCAVE_WITH_HOLE], (12, 12)), 0, 12, 12)
    rows, cols = np.divmod(weights[0].indices, W)
    got = np.zeros((12, 12))
    got[rows - 30_000, cols - 30_000] = weights[0].data
    np.testing.assert_allclose(got, near, atol=1e-9)
    assert weights[1].nnz == 0


def test_polygon_rejects_points():
    with pytest.raises(ValueError, match="Polygon or MultiPolygon"):
        polygon_weights([shapely.Point(1, 1)], (4, 4))


cuts = st.lists(st.floats(0.01, 0.99), min_size=0, max_size=4, unique=True)


@settings(max_examples=40, deadline=None)
@given(
    x0=st.floats(-3, 10),
    y0=st.floats(-3, 10),
    width=st.floats(0.05, 12),
    height=st.floats(0.05, 12),
    x_cuts=cuts,
    y_cuts=cuts,
)
def test_rectangle_partition_is_additive(x0, y0, width, height, x_cuts, y_cuts):
    xs = x0 + width * np.r_[0.0, sorted(x_cuts), 1.0]
    ys = y0 + height * np.r_[0.0, sorted(y_cuts), 1.0]
    # pieces share their cut coordinates exactly, so they partition the rectangle
    pieces = [box(xs[a], ys[b], xs[a + 1], ys[b + 1]) for a in range(len(xs) - 1) for b in range(len(ys) - 1)]
    whole = box(xs[0], ys[0], xs[-1], ys[-1])
    weights = polygon_weights([whole, *pieces], (12, 13))
    total = np.asarray(weights[1:].sum(axis=0)).ravel()
    np.testing.assert_allclose(total, weights[0].toarray().ravel(), atol=1e-9)
    assert weights[0].sum() == pytest.approx(whole.intersection(box(0, 0, 13, 12)).area, abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(
    origin=st.tuples(st.floats(-2, 6), st.floats(-2, 6)),
    size=st.floats(0.3, 3.0),
    block=st.tuples(st.integers(0, 3), st.integers(0, 3)),
)
def test_two_by_two_bins_sum_to_parent(origin, size, block):
    def bin_box(row: int, col: int, side: float):
        # edges are index * side, as make_grid computes them: (2k) * s == k * (2s) bit for bit
        x0, y0 = origin
        return box(x0 + col * side, y0 + row * side, x0 + (col + 1) * side, y0 + (row + 1) * side)

    r, c = block
    parent = bin_box(r, c, 2 * size)
    children = [bin_box(2 * r + dr, 2 * c + dc, size) for dr in (0, 1) for dc in (0, 1)]
    weights = polygon_weights([parent, *children], (20, 20))
    children_sum = np.asarray(weights[1:].sum(axis=0)).ravel()
    np.testing.assert_allclose(children_sum, weights[0].toarray().ravel(), atol=1e-9)
    assert weights[0].sum() == pytest.approx(parent.intersection(box(0, 0, 20, 20)).area, abs=1e-9)
