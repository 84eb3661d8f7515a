"""Tissue mask, square / hex grids, and read-outs over grids checked against independent references."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import shapely

from pixgene._core.keys import UNS_KEY
from pixgene._core.validate import PixgeneInputError
from pixgene.data._geometry import polygon_weights
from pixgene.data._mask import block_mean, mask_fraction_in_region, tissue_mask
from pixgene.tl._aggregate import aggregate
from pixgene.tl._grid import make_grid

IMAGE_UM = 1.0
H, W = 480, 640
ELLIPSE = dict(cx=300.0, cy=230.0, rx=210.0, ry=160.0)
HOLE = (250, 300, 200, 250)  # y0, y1, x0, x1: a 50 x 50 um lumen (2,500 um^2), filled as a small hole
SPECK = (40, 44, 600, 604)  # a 4 x 4 um speck of stain on the glass, removed


def in_ellipse(x, y) -> np.ndarray:
    e = ELLIPSE
    return ((x - e["cx"]) / e["rx"]) ** 2 + ((y - e["cy"]) / e["ry"]) ** 2 <= 1.0


def synthetic_he(seed: int = 0) -> np.ndarray:
    """White glass with an elliptical section: pale pink stroma on the left, nuclei-rich on the right."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    image = np.empty((H, W, 3))
    image[:] = (0.94, 0.94, 0.95)
    tissue = in_ellipse(xx, yy)
    pale = tissue & (xx < ELLIPSE["cx"])
    image[pale] = (0.93, 0.80, 0.88)  # pale eosin: bright, saturation ~0.14
    image[tissue & ~pale] = (0.80, 0.55, 0.75)
    nuclei = tissue & (rng.random((H, W)) < 0.08)
    image[nuclei] = (0.35, 0.25, 0.55)
    y0, y1, x0, x1 = HOLE
    image[y0:y1, x0:x1] = (0.94, 0.94, 0.95)
    y0, y1, x0, x1 = SPECK
    image[y0:y1, x0:x1] = (0.5, 0.2, 0.5)
    image += rng.normal(0, 0.015, image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def build_sdata(*, scale_factors=None, with_map: bool = False):
    import spatialdata as sd
    from spatialdata.models import Image2DModel, ShapesModel
    from spatialdata.transformations import Affine, Identity, Scale

    from pixgene._core.coords import transformations_of
    from pixgene._core.units import record_um_per_px

    he = Image2DModel.parse(
        synthetic_he().transpose(2, 0, 1),
        dims=("c", "y", "x"),
        transformations={"global": Identity()},
        scale_factors=scale_factors,
        chunks=(3, 128, 128),
    )
    matrix = np.array([[0.0, -2.0, 400.0], [2.0, 0.0, 100.0], [0.0, 0.0, 1.0]])  # rotate 90 degrees, scale 2
    spots = ShapesModel.parse(
        np.array([[30.0, 40.0], [60.0, 20.0]]),
        geometry=0,
        radius=np.array([25.0, 12.0]),
        transformations={"global": Affine(matrix, input_axes=("x", "y"), output_axes=("x", "y"))},
    )
    images = {"he": he}
    if with_map:
        rng = np.random.default_rng(5)
        images["he_pixgene"] = Image2DModel.parse(
            rng.gamma(2.0, 0.3, (2, H // 4, W // 4)).astype(np.float32),
            dims=("c", "y", "x"),
            c_coords=["G1", "G2"],
            transformations={"global": Scale([4.0, 4.0], axes=("x", "y"))},
            chunks=(2, 32, 32),
        )
    sdata = sd.SpatialData(images=images, shapes={"spots": spots})
    assert transformations_of(he)
    record_um_per_px(sdata, "he", IMAGE_UM)
    if with_map:
        record_um_per_px(sdata, "he_pixgene", 4.0)
    return sdata


# ------------------------------------------------------------------------------------------------------
# tissue mask
# ------------------------------------------------------------------------------------------------------


def test_block_mean_matches_loops_with_partial_edges():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (3, 37, 50)).astype(np.uint8)
    got = block_mean(da.from_array(array, chunks=(3, 11, 13)), 4)
    expected = np.zeros((3, 10, 13))
    for i in range(10):
        for j in range(13):
            expected[:, i, j] = array[:, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def truth_fraction(factor: float, shape) -> np.ndarray:
    """Fraction of each mask pixel inside the section, holes filled, by 8 x 8 supersampling."""
    sub = (np.arange(8) + 0.5) / 8 * factor
    ys = (np.arange(shape[0])[:, None] * factor + sub).ravel()
    xs = (np.arange(shape[1])[:, None] * factor + sub).ravel()
    inside = in_ellipse(xs[None, :], ys[:, None]) & (ys[:, None] < H) & (xs[None, :] < W)
    return inside.reshape(shape[0], 8, shape[1], 8).mean(axis=(1, 3))


@pytest.mark.parametrize("scale_factors", [None, [2, 2]])
def test_tissue_mask_finds_the_section_pale_stroma_included(scale_factors):
    sdata = build_sdata(scale_factors=scale_factors)
    mask, factor = tissue_mask(sdata, "he", um_per_px_mask=16.0)
    assert factor == 16.0
    assert mask.shape == (H // 16, W // 16)
    from scipy import ndimage

    truth = truth_fraction(factor, mask.shape)
    # one mask pixel (16 um) of slack along the section's edge, where smoothing may go either way
    inside = ndimage.binary_erosion(truth == 1.0)
    outside = ~ndimage.binary_dilation(truth > 0.0)
    assert mask[inside].all(), "every mask pixel wholly inside the section (pale stroma, lumen) is tissue"
    assert not mask[outside].any(), "glass and the stain speck are background"
    # conservative along the edge: a mask pixel with any tissue in it counts as tissue
    assert mask[truth > 0.5].all()
    assert (mask == (truth > 0.0)).mean() > 0.98


def test_mask_fraction_in_region_matches_upsampled_mask():
    rng = np.random.default_rng(2)
    mask = rng.random((12, 15)) > 0.5
    factor = 4.0
    upsampled = np.kron(mask, np.ones((4, 4))).astype(float)
    padded = np.zeros((80, 90))
    padded[:48, :60] = upsampled
    for _ in range(20):
        x0, y0 = rng.integers(0, 70), rng.integers(0, 60)
        x1, y1 = x0 + rng.integers(1, 20), y0 + rng.integers(1, 20)
        expected = padded[y0:y1, x0:x1].mean()
        assert mask_fraction_in_region(mask, factor, x0, y0, x1, y1) == pytest.approx(expected, abs=1e-12)
    # fractional coordinates: half of mask pixel (0, 0) and half of (0, 1)
    half = np.array([[True, False]])
    assert mask_fraction_in_region(half, 2.0, 1.0, 0.0, 3.0, 2.0) == pytest.approx(0.5)
    assert mask_fraction_in_region(half, 2.0, 10.0, 10.0, 12.0, 12.0) == 0.0


# ------------------------------------------------------------------------------------------------------
# grids
# ------------------------------------------------------------------------------------------------------


def test_square_bins_tile_the_image_exactly():
    sdata = build_sdata()
    bins = make_grid(sdata, bin_um=24.0, within=None)
    side = 24.0
    n_rows, n_cols = int(np.ceil(H / side)), int(np.ceil(W / side))
    assert len(bins) == n_rows * n_cols and "bins_24um" in sdata.shapes
    areas = shapely.area(bins.geometry.values)
    np.testing.assert_allclose(areas, side**2, rtol=1e-12)
    union = shapely.union_all(bins.geometry.values)
    assert union.area == pytest.approx(areas.sum(), rel=1e-12)  # no overlaps
    assert union.equals(shapely.box(0, 0, n_cols * side, n_rows * side))  # no gaps
    first = bins.iloc[n_cols + 2]
    assert bins.index[n_cols + 2] == "bin_1_2" and (first.array_row, first.array_col) == (1, 2)
    assert first.geometry.bounds == (48.0, 24.0, 72.0, 48.0)
    from spatialdata.transformations import get_transformation

    for system, image_transform in get_transformation(sdata.images["he"], get_all=True).items():
        bins_transform = get_transformation(bins, to_coordinate_system=system)
        np.testing.assert_array_equal(
            bins_transform.to_affine_matrix(("x", "y"), ("x", "y")),
            image_transform.to_affine_matrix(("x", "y"), ("x", "y")),
        )
    assert sdata.attrs[UNS_KEY]["grids"]["bins_24um"]["bin_px"] == 24.0
    # every pixel of the image is covered exactly once
    coverage = np.asarray(polygon_weights(bins.geometry.values, (H, W)).sum(axis=0)).ravel()
    np.testing.assert_allclose(coverage, 1.0, atol=1e-12)


def test_two_by_two_small_bins_are_one_large_bin():
    sdata = build_sdata()
    from pixgene._core.units import record_um_per_px

    record_um_per_px(sdata, "he", 0.37)  # bin sizes in pixels become irrational-looking
    small = make_grid(sdata, bin_um=4.0, within=None)
    large = make_grid(sdata, bin_um=8.0, within=None)
    small_bounds = {name: g.bounds for name, g in zip(small.index, small.geometry)}
    # bins on the last row / column overhang the image; their children beyond it are not made
    interior = (large.array_row < large.array_row.max()) & (large.array_col < large.array_col.max())
    assert interior.sum() > 200
    for name, geom in zip(large.index[interior], large.geometry[interior]):
        r, c = map(int, name.split("_")[1:])
        children = [small_bounds[f"bin_{2 * r + dr}_{2 * c + dc}"] for dr in (0, 1) for dc in (0, 1)]
        x0 = min(b[0] for b in children)
        y0 = min(b[1] for b in children)
        x1 = max(b[2] for b in children)
        y1 = max(b[3] for b in children)
        assert (x0, y0, x1, y1) == geom.bounds  # equal to the last bit
        assert children[0][2] == children[1][0] and children[0][3] == children[2][1]


def test_hex_bins_tile_without_overlaps_or_gaps():
    sdata = build_sdata()
    bins = make_grid(sdata, bin_um=30.0, shape="hex", within=None)
    assert "hexbins_30um" in sdata.shapes
    geoms = bins.geometry.values
    np.testing.assert_allclose(shapely.area(geoms), np.sqrt(3) / 2 * 30.0**2, rtol=1e-12)
    tree = shapely.STRtree(geoms)
    left, right = tree.query(geoms, predicate="intersects")
    pairs = left < right
    overlap = shapely.area(shapely.intersection(geoms[left[pairs]], geoms[right[pairs]]))
    assert overlap.max() < 1e-9
    image_box = shapely.box(0, 0, W, H)
    assert image_box.difference(shapely.union_all(geoms)).area < 1e-6
    centres = shapely.get_coordinates(shapely.centroid(geoms))
    odd = bins.array_row.to_numpy() % 2 == 1
    np.testing.assert_allclose(centres[:, 0], (bins.array_col + 0.5 * odd) * 30.0, atol=1e-9)
    np.testing.assert_allclose(centres[:, 1], bins.array_row * 30.0 * np.sqrt(3) / 2, atol=1e-9)


def test_bins_within_tissue_and_within_shapes():
    sdata = build_sdata()
    bins = make_grid(sdata, bin_um=16.0, within="tissue")
    centres = shapely.get_coordinates(shapely.centroid(bins.geometry.values))
    everything = make_grid(sdata, bin_um=16.0, within=None, key_added="all_bins")
    all_centres = shapely.get_coordinates(shapely.centroid(everything.geometry.values))
    assert (all_centres < [W, H]).all()
    mask, factor = tissue_mask(sdata, "he")
    looked_up = mask[(all_centres[:, 1] // factor).astype(int), (all_centres[:, 0] // factor).astype(int)]
    assert set(bins.index) == set(everything.index[looked_up])
    near_section = ((centres[:, 0] - ELLIPSE["cx"]) / (ELLIPSE["rx"] + 16)) ** 2 + (
        (centres[:, 1] - ELLIPSE["cy"]) / (ELLIPSE["ry"] + 16)
    ) ** 2 <= 1
    assert near_section.all()
    deep_inside = (
        ((all_centres[:, 0] - ELLIPSE["cx"]) / (ELLIPSE["rx"] - 24)) ** 2
        + ((all_centres[:, 1] - ELLIPSE["cy"]) / (ELLIPSE["ry"] - 24)) ** 2
    ) <= 1
    assert set(everything.index[deep_inside]) <= set(bins.index)

    # spots: circles in a rotated, scaled frame; x' = -2y + 400, y' = 2x + 100, radius x 2
    in_spots = make_grid(sdata, bin_um=8.0, within="spots", key_added="near_spots")
    disks = [
        shapely.Point(320.0, 160.0).buffer(50.0, quad_segs=256),
        shapely.Point(360.0, 220.0).buffer(24.0, quad_segs=256),
    ]
    everything8 = make_grid(sdata, bin_um=8.0, within=None, key_added="all_8")
    centres8 = shapely.points(shapely.get_coordinates(shapely.centroid(everything8.geometry.values)))
    expected = shapely.contains(disks[0], centres8) | shapely.contains(disks[1], centres8)
    assert set(in_spots.index) == set(everything8.index[expected])


def test_make_grid_refuses_overwrite_and_bad_arguments():
    sdata = build_sdata()
    make_grid(sdata, bin_um=32.0, within=None)
    with pytest.raises(PixgeneInputError, match="already exists"):
        make_grid(sdata, bin_um=32.0, within=None)
    replaced = make_grid(sdata, bin_um=32.0, within=None, overwrite=True)
    assert sdata.shapes["bins_32um"] is replaced
    with pytest.raises(PixgeneInputError, match="shape='square' or shape='hex'"):
        make_grid(sdata, bin_um=8.0, shape="triangle")
    with pytest.raises(PixgeneInputError, match="'nowhere'"):
        make_grid(sdata, bin_um=8.0, within="nowhere")
    with pytest.raises(PixgeneInputError, match="bin_um"):
        make_grid(sdata, bin_um=-1.0)


def test_aggregate_over_bins_partitions_the_map():
    sdata = build_sdata(with_map=True)
    values = sdata.images["he_pixgene"].values.astype(np.float64)
    for bin_um in (8.0, 16.0):
        make_grid(sdata, bin_um=bin_um, within=None)
    fine = aggregate(sdata, shapes="bins_8um", block_px=40)
    coarse = aggregate(sdata, shapes="bins_16um", block_px=40)
    # the bins cover the map, so their read-outs add up to the map's integral (4 x 4 um pixels)
    map_integral = values.sum(axis=(1, 2)) * 16.0
    np.testing.assert_allclose(fine.X.sum(axis=0, dtype=np.float64), map_integral, rtol=1e-5)
    np.testing.assert_allclose(coarse.X.sum(axis=0, dtype=np.float64), map_integral, rtol=1e-5)
    # and a 2 x 2 block of 8 um bins reads out exactly what the 16 um bin does
    grid = sdata.shapes["bins_8um"].loc[fine.obs_names]
    parent = [f"bin_{r // 2}_{c // 2}" for r, c in zip(grid.array_row, grid.array_col, strict=True)]
    summed = fine.to_df().groupby(parent).sum()
    np.testing.assert_allclose(summed.loc[coarse.obs_names].to_numpy(), coarse.X, rtol=1e-5)
    np.testing.assert_allclose(coarse.X[0], values[:, 0:4, 0:4].sum(axis=(1, 2)) * 16.0, rtol=1e-5)
