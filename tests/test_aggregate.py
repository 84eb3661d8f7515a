"""Streaming exact integrals of dense maps and pg.tl.aggregate, against brute-force clipping references."""

from __future__ import annotations

import dask.array as da
import geopandas as gpd
import numpy as np
import pytest
import shapely
from shapely.geometry import MultiPolygon, Point, Polygon, box

from pixgene._core.keys import (
    AREA_OBS,
    COVERAGE_OBS,
    INSTANCE_KEY,
    REGION_KEY,
    TOTAL_CHANNEL,
    TOTAL_OBS,
    UNS_KEY,
)
from pixgene._core.validate import PixgeneInputError
from pixgene.data._operator import integrate_labels, integrate_map
from pixgene.tl._aggregate import aggregate

MAP_UM = 4.0
GENES = ["A", "B", "C"]


def reference_integrals(map_chw: np.ndarray, geoms_px, um_per_px: float) -> np.ndarray:
    """sum over map pixels of (exact clipped area of the shape in the pixel) * value, by GEOS clipping."""
    C, H, W = map_chw.shape
    i, j = np.divmod(np.arange(H * W), W)
    pixels = shapely.box(j, i, j + 1, i + 1)
    planes = map_chw.reshape(C, -1).astype(np.float64)
    return np.array([planes @ shapely.area(shapely.intersection(g, pixels)) for g in geoms_px]) * um_per_px**2


def as_disk(center, radius):
    return Point(center).buffer(radius, quad_segs=512)  # polygonal disk: area off by ~6e-6 relative


def transform(matrix: np.ndarray, geom):
    return shapely.transform(geom, lambda xy: xy @ matrix[:2, :2].T + matrix[:2, 2])


def similarity(angle: float, scale: float, tx: float, ty: float) -> np.ndarray:
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    return np.array([[c, -s, tx], [s, c, ty], [0.0, 0.0, 1.0]])


# ------------------------------------------------------------------------------------------------------
# integrate_map
# ------------------------------------------------------------------------------------------------------


def random_shapes(rng, n_polygons: int, n_circles: int, extent: tuple[float, float]):
    polygons = []
    for _ in range(n_polygons):
        center = rng.uniform(-3, 1, 2) + rng.uniform(0, 1, 2) * np.asarray(extent)
        m = int(rng.integers(3, 10))
        step = 2 * np.pi / m
        angles = np.arange(m) * step + rng.uniform(0, 0.9 * step, m)
        radii = rng.uniform(1.0, 9.0, m)
        ring = np.c_[center[0] + radii * np.cos(angles), center[1] + radii * np.sin(angles)]
        polygons.append(Polygon(ring))
    centers = rng.uniform(-2, 1, (n_circles, 2)) + rng.uniform(0, 1, (n_circles, 2)) * np.asarray(extent)
    radii = rng.uniform(0.7, 8.0, n_circles)
    return polygons, centers, radii


def test_constant_map_gives_value_times_area():
    value = 2.5
    C, H, W = 2, 30, 40
    const = np.full((C, H, W), value, dtype=np.float32)
    geoms = gpd.GeoSeries(
        [
            Polygon([(2, 2), (20, 3), (11, 25)], [[(8, 8), (12, 9), (10, 13)]]),
            Point(30.5, 12.25),
            MultiPolygon([box(1, 26, 5, 29), box(33, 1, 38.5, 6)]),
            box(-10, -10, 10, 5),  # partly outside the map
        ]
    )
    radii = np.array([0.0, 6.3, 0.0, 0.0])
    result = integrate_map(const, geoms, um_per_px=MAP_UM, radii=radii, progress=False)
    exact_area = np.array([geoms[0].area, np.pi * 6.3**2, geoms[2].area, 300.0]) * MAP_UM**2
    np.testing.assert_allclose(result.area_um2, exact_area, rtol=1e-12)
    np.testing.assert_allclose(result.covered_um2, [*exact_area[:3], 10 * 5 * MAP_UM**2], rtol=1e-12)
    expected = np.repeat(result.covered_um2[:, None] * value, C, axis=1)
    np.testing.assert_allclose(result.values, expected, rtol=1e-6)


def test_dask_blocks_equal_numpy_and_reference_with_overlaps():
    rng = np.random.default_rng(1)
    C, H, W = 3, 45, 61
    values = rng.gamma(2.0, 1.0, (C, H, W)).astype(np.float32)
    polygons, centers, radii = random_shapes(rng, 12, 8, (W, H))
    polygons += [polygons[0], polygons[0].buffer(2.0)]  # exact duplicate and an overlapping superset
    geoms = gpd.GeoSeries([*polygons, *shapely.points(centers)])
    all_radii = np.r_[np.zeros(len(polygons)), radii]

    one_block = integrate_map(values, geoms, um_per_px=MAP_UM, radii=all_radii, block_px=4096, progress=False)
    lazy = da.from_array(values, chunks=(C, 16, 16))
    blocked = integrate_map(lazy, geoms, um_per_px=MAP_UM, radii=all_radii, block_px=16, progress=False)
    np.testing.assert_allclose(blocked.values, one_block.values, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(blocked.covered_um2, one_block.covered_um2, rtol=1e-12, atol=1e-9)

    disks = [as_disk(c, r) for c, r in zip(centers, radii, strict=True)]
    reference = reference_integrals(values, [*polygons, *disks], MAP_UM)
    n_poly = len(polygons)
    np.testing.assert_allclose(one_block.values[:n_poly], reference[:n_poly], rtol=1e-9, atol=1e-7)
    np.testing.assert_allclose(one_block.values[n_poly:], reference[n_poly:], rtol=2e-4, atol=1e-3)
    # overlapping shapes each keep their full integral
    np.testing.assert_allclose(one_block.values[n_poly - 2], one_block.values[0], rtol=1e-12)
    assert np.all(one_block.values[n_poly - 1] > one_block.values[0])


def test_float16_map_and_shapes_off_the_map():
    values = np.linspace(0, 1, 2 * 10 * 12, dtype=np.float16).reshape(2, 10, 12)
    geoms = gpd.GeoSeries([box(2, 2, 7, 9), box(50, 50, 60, 60)])
    result = integrate_map(values, geoms, um_per_px=1.0, progress=False)
    expected = values[:, 2:9, 2:7].astype(np.float64).sum(axis=(1, 2))
    np.testing.assert_allclose(result.values[0], expected, rtol=1e-6)
    assert np.all(result.values[1] == 0) and result.covered_um2[1] == 0 and result.area_um2[1] == 100.0


def test_integrate_map_input_errors():
    values = np.zeros((1, 4, 4), dtype=np.float32)
    with pytest.raises(PixgeneInputError, match="radii"):
        integrate_map(values, gpd.GeoSeries([Point(1, 1)]), um_per_px=1.0, progress=False)
    with pytest.raises(PixgeneInputError, match="LineString"):
        line = gpd.GeoSeries([shapely.LineString([(0, 0), (1, 1)])])
        integrate_map(values, line, um_per_px=1.0, progress=False)
    with pytest.raises(PixgeneInputError, match="3"):
        integrate_map(values[0], gpd.GeoSeries([box(0, 0, 1, 1)]), um_per_px=1.0, progress=False)


# ------------------------------------------------------------------------------------------------------
# aggregate on a SpatialData: map at 4 um/px (Scale(4)) over a 1 um/px H&E, shapes in their own frames
# ------------------------------------------------------------------------------------------------------

CELLS_FRAME = similarity(0.4, 2.0, 10.0, 3.0)  # cells' intrinsic -> global (= H&E pixels)
SPOTS_FRAME = similarity(-0.7, 1.5, 30.0, 5.0)
LABELS_FRAME = similarity(0.3, 1.25, 6.0, 2.0)
GLOBAL_TO_MAP = np.diag([1 / MAP_UM, 1 / MAP_UM, 1.0])

CELLS = [
    Polygon([(1, 1), (9, 2), (6, 10)]),
    box(10, 5, 14, 9),
    Polygon([(0, 12), (12, 12), (12, 24), (0, 24)], [[(3, 15), (8, 15), (5, 20)]]),
    MultiPolygon([box(15, 0, 18, 3), box(20, 10, 24, 16)]),
    box(10, 5, 14, 9).buffer(1.0),  # overlaps cell 1
    box(-30, -10, -5, 5),  # partly off the map
]
SPOT_CENTERS = np.array([[3.0, 4.0], [10.0, 12.0], [20.0, 2.0], [-18.0, -2.0]])
SPOT_RADIUS = np.array([3.0, 5.5, 2.0, 4.0])


def labels_raster() -> np.ndarray:
    labels = np.zeros((36, 40), dtype=np.int32)
    labels[2:9, 3:14] = 7
    labels[12:30, 5:12] = 3
    labels[15:20, 7:10] = 0  # a hole
    yy, xx = np.mgrid[0:36, 0:40]
    labels[(yy - 22) ** 2 + (xx - 28) ** 2 < 60] = 12
    labels[30:36, 30:40] = 5  # reaches the raster border
    return labels


def build_sdata(*, second_map: bool = False):
    import spatialdata as sd
    from spatialdata.models import Image2DModel, Labels2DModel, ShapesModel
    from spatialdata.transformations import Affine, Identity, Scale

    from pixgene._core.units import record_um_per_px

    rng = np.random.default_rng(7)
    he = Image2DModel.parse(
        rng.integers(0, 255, (3, 96, 96), dtype=np.uint8),
        dims=("c", "y", "x"),
        transformations={"global": Identity()},
    )
    values = rng.gamma(2.0, 0.5, (4, 24, 24)).astype(np.float32)
    dense = Image2DModel.parse(
        values,
        dims=("c", "y", "x"),
        c_coords=[*GENES, TOTAL_CHANNEL],
        transformations={"global": Scale([MAP_UM, MAP_UM], axes=("x", "y"))},
        chunks=(4, 8, 8),
    )

    def affine(matrix):
        return {"global": Affine(matrix, input_axes=("x", "y"), output_axes=("x", "y"))}

    cells = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=CELLS, index=[f"cell{k}" for k in range(len(CELLS))]),
        transformations=affine(CELLS_FRAME),
    )
    spots = ShapesModel.parse(
        SPOT_CENTERS, geometry=0, radius=SPOT_RADIUS, transformations=affine(SPOTS_FRAME)
    )
    stretched = ShapesModel.parse(
        SPOT_CENTERS, geometry=0, radius=SPOT_RADIUS, transformations=affine(np.diag([2.0, 1.0, 1.0]))
    )
    labels = Labels2DModel.parse(labels_raster(), dims=("y", "x"), transformations=affine(LABELS_FRAME))
    images = {"he": he, "he_pixgene": dense}
    if second_map:
        images["other_pixgene"] = dense
    sdata = sd.SpatialData(
        images=images,
        shapes={"cells": cells, "spots": spots, "stretched": stretched},
        labels={"cell_labels": labels},
    )
    sdata.attrs[UNS_KEY] = {"dense": {"he_pixgene": {"model": "test-model", "genes": GENES}}}
    record_um_per_px(sdata, "he", 1.0)
    record_um_per_px(sdata, "he_pixgene", MAP_UM)
    return sdata, values


def test_aggregate_polygons_in_a_third_frame_match_reference():
    sdata, values = build_sdata()
    adata = aggregate(sdata, shapes="cells", block_px=8, progress=False)
    to_map = GLOBAL_TO_MAP @ CELLS_FRAME
    reference = reference_integrals(values, [transform(to_map, g) for g in CELLS], MAP_UM)
    np.testing.assert_allclose(adata.X, reference[:, :3], rtol=1e-5)
    assert adata.X.dtype == np.float32
    np.testing.assert_allclose(adata.obs[TOTAL_OBS], reference[:, 3], rtol=1e-9)
    global_area = np.array([g.area for g in CELLS]) * 4.0  # the frame scales by 2: 1 global unit = 1 um
    np.testing.assert_allclose(adata.obs[AREA_OBS], global_area, rtol=1e-9)
    map_box = box(0, 0, 24, 24)
    coverage = [transform(to_map, g).intersection(map_box).area / transform(to_map, g).area for g in CELLS]
    np.testing.assert_allclose(adata.obs[COVERAGE_OBS], coverage, rtol=1e-9)
    assert coverage[-1] < 1 and adata.obs[COVERAGE_OBS].iloc[0] == pytest.approx(1.0)
    # table layout
    assert list(adata.var_names) == GENES
    assert list(adata.obs_names) == [f"cell{k}" for k in range(len(CELLS))]
    assert list(adata.obs[INSTANCE_KEY]) == list(adata.obs_names)
    assert adata.obs[REGION_KEY].dtype == "category" and set(adata.obs[REGION_KEY]) == {"cells"}
    np.testing.assert_allclose(adata.obsm["spatial"], [[g.centroid.x, g.centroid.y] for g in CELLS])
    info = adata.uns[UNS_KEY]
    assert info["dense_key"] == "he_pixgene" and info["dense"]["model"] == "test-model"
    assert info["params"]["shapes"] == "cells" and info["params"]["block_px"] == 8
    assert info["params"]["progress"] is False
    assert info["params"]["key_added"] == "cells_pixgene"
    assert adata.uns["spatialdata_attrs"]["region"] == "cells"
    assert sdata.tables["cells_pixgene"] is adata


def test_aggregate_circles_under_a_similarity():
    sdata, values = build_sdata()
    adata = aggregate(sdata, shapes="spots", key_added="spots_readout", block_px=16)
    to_map = GLOBAL_TO_MAP @ SPOTS_FRAME
    disks = [transform(to_map, as_disk(c, r)) for c, r in zip(SPOT_CENTERS, SPOT_RADIUS)]
    reference = reference_integrals(values, disks, MAP_UM)
    np.testing.assert_allclose(adata.X, reference[:, :3], rtol=2e-4)
    np.testing.assert_allclose(adata.obs[AREA_OBS], np.pi * (SPOT_RADIUS * 1.5) ** 2, rtol=1e-12)
    np.testing.assert_allclose(adata.obsm["spatial"], SPOT_CENTERS)
    assert adata.obs[COVERAGE_OBS].iloc[-1] < 1.0
    assert "spots_readout" in sdata.tables


def label_regions_in_map(labels: np.ndarray, to_map: np.ndarray) -> dict[int, object]:
    regions = {}
    for label in np.unique(labels[labels > 0]):
        rows, cols = np.nonzero(labels == label)
        pixels = shapely.union_all(shapely.box(cols, rows, cols + 1, rows + 1))
        regions[int(label)] = transform(to_map, pixels)
    return regions


def test_aggregate_labels_rotated_streamed_in_blocks():
    sdata, values = build_sdata()
    adata = aggregate(sdata, shapes="cell_labels", block_px=5)  # many labels blocks, labels cut by borders
    labels = labels_raster()
    regions = label_regions_in_map(labels, GLOBAL_TO_MAP @ LABELS_FRAME)
    reference = reference_integrals(values, list(regions.values()), MAP_UM)
    assert list(adata.obs[INSTANCE_KEY]) == list(regions)
    assert list(adata.obs_names) == [str(k) for k in regions]
    np.testing.assert_allclose(adata.X, reference[:, :3], rtol=1e-5)
    counts = np.array([(labels == k).sum() for k in regions])
    np.testing.assert_allclose(adata.obs[AREA_OBS], counts * 1.25**2, rtol=1e-12)
    rows, cols = np.indices(labels.shape)
    centroids = [[(cols[labels == k] + 0.5).mean(), (rows[labels == k] + 0.5).mean()] for k in regions]
    np.testing.assert_allclose(adata.obsm["spatial"], centroids, rtol=1e-12)
    one_block = aggregate(sdata, shapes="cell_labels", block_px=4096, key_added="one_block", inplace=False)
    np.testing.assert_allclose(one_block.X, adata.X, rtol=1e-6)
    assert "one_block" not in sdata.tables


def test_integrate_labels_axis_aligned_matches_pixel_sums():
    # labels at 1 um/px under a 4 um/px map: every label pixel lies in exactly one map pixel
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 6, (40, 44)).astype(np.uint16)
    values = rng.random((2, 10, 11)).astype(np.float32)
    affine = np.diag([1 / MAP_UM, 1 / MAP_UM, 1.0])
    lazy_labels = da.from_array(labels, chunks=7)
    result = integrate_labels(values, lazy_labels, affine, um_per_px=MAP_UM, block_px=3, progress=False)
    upsampled = values.repeat(4, axis=1).repeat(4, axis=2).astype(np.float64)
    expected = np.array([[upsampled[c][labels == k].sum() for c in range(2)] for k in range(1, 6)])
    assert list(result.label_ids) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(result.values, expected, rtol=1e-6)
    np.testing.assert_allclose(result.covered_um2, result.area_um2, rtol=1e-12)
    # a mirrored placement (negative determinant) reverses edge orientation; areas must stay positive
    mirror = np.array([[-1 / MAP_UM, 0.0, 11.0], [0.0, 1 / MAP_UM, 0.0], [0.0, 0.0, 1.0]])
    mirrored = integrate_labels(values[:, :, ::-1].copy(), labels, mirror, um_per_px=MAP_UM, progress=False)
    np.testing.assert_allclose(mirrored.values, expected, rtol=1e-6)


def test_aggregate_refuses_overwrite_then_replaces():
    sdata, _ = build_sdata()
    first = aggregate(sdata, shapes="cells")
    with pytest.raises(PixgeneInputError, match="already exists"):
        aggregate(sdata, shapes="cells")
    assert sdata.tables["cells_pixgene"] is first
    second = aggregate(sdata, shapes="cells", overwrite=True)
    assert sdata.tables["cells_pixgene"] is second
    np.testing.assert_array_equal(second.X, first.X)


def test_aggregate_errors_are_clear():
    sdata, _ = build_sdata()
    with pytest.raises(PixgeneInputError, match="'nuclei'.*not found.*'cells'"):
        aggregate(sdata, shapes="nuclei")
    with pytest.raises(PixgeneInputError, match="ellipses"):
        aggregate(sdata, shapes="stretched")
    with pytest.raises(PixgeneInputError, match="'missing_pixgene'"):
        aggregate(sdata, shapes="cells", dense_key="missing_pixgene")
    with pytest.raises(PixgeneInputError, match="no dense map was made from image 'other'"):
        aggregate(sdata, shapes="cells", image_key="other")
    ambiguous, _ = build_sdata(second_map=True)
    with pytest.raises(PixgeneInputError, match="'he_pixgene', 'other_pixgene'"):
        aggregate(ambiguous, shapes="cells")
    assert aggregate(ambiguous, shapes="cells", image_key="he").uns[UNS_KEY]["dense_key"] == "he_pixgene"
    assert not any(key.endswith("_pixgene") and key != "cells_pixgene" for key in sdata.tables)


def test_aggregate_writes_table_to_backed_store(tmp_path):
    import spatialdata as sd

    sdata, _ = build_sdata()
    sdata.write(tmp_path / "slide.zarr")
    backed = sd.read_zarr(tmp_path / "slide.zarr")
    assert backed.attrs[UNS_KEY]["um_per_px"]["he_pixgene"] == MAP_UM
    adata = aggregate(backed, shapes="cells")
    on_disk = sd.read_zarr(tmp_path / "slide.zarr").tables["cells_pixgene"]
    np.testing.assert_array_equal(on_disk.X, adata.X)
    assert on_disk.uns[UNS_KEY]["params"]["image_key"] is None
    with pytest.raises(PixgeneInputError, match="already exists"):
        aggregate(backed, shapes="cells")


def normalised_readout():
    import scanpy as sc

    sdata, _ = build_sdata()
    adata = aggregate(sdata, shapes="cell_labels")
    counts = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=100.0)
    sc.pp.log1p(adata)
    return adata, counts


def test_readout_feeds_scanpy_normalisation():
    adata, counts = normalised_readout()
    expected = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 100.0)
    np.testing.assert_allclose(adata.X, expected, rtol=1e-5)


@pytest.mark.slow
def test_readout_feeds_scanpy_neighbors():
    import scanpy as sc

    adata, _ = normalised_readout()
    sc.pp.neighbors(adata, n_neighbors=2, use_rep="X")
    distances = adata.obsp["distances"].toarray()
    nearest = np.argsort(np.linalg.norm(adata.X[:, None] - adata.X[None], axis=-1), axis=1)[:, 1]
    assert np.all(distances[np.arange(adata.n_obs), nearest] > 0)


def test_map_scale_derived_from_the_image_when_not_recorded():
    sdata, values = build_sdata()
    del sdata.attrs[UNS_KEY]["um_per_px"]["he_pixgene"]
    with pytest.raises(PixgeneInputError, match="microns per pixel are not recorded"):
        aggregate(sdata, shapes="cells", inplace=False)
    derived = aggregate(sdata, shapes="cells", image_key="he", inplace=False)  # 1 um/px x Scale(4)
    sdata.attrs[UNS_KEY]["dense"]["he_pixgene"]["image_key"] = "he"
    from_metadata = aggregate(sdata, shapes="cells", inplace=False)
    to_map = GLOBAL_TO_MAP @ CELLS_FRAME
    reference = reference_integrals(values, [transform(to_map, g) for g in CELLS], MAP_UM)
    np.testing.assert_allclose(derived.X, reference[:, :3], rtol=1e-5)
    np.testing.assert_allclose(from_metadata.X, derived.X, rtol=1e-12)
