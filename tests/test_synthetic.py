"""The synthetic tissue: determinism, count model, ground truth, and that the learning problem is real."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import shapely
from scipy import ndimage, stats
from scipy.spatial import cKDTree

from pixgene._core.coords import affine_between
from pixgene._core.keys import TOTAL_CHANNEL
from pixgene._core.units import recorded_um_per_px
from pixgene._core.validate import PixgeneInputError
from pixgene.data._geometry import circle_weights
from pixgene.datasets._synthetic import CELL_TYPES, synthetic


@pytest.fixture(scope="module")
def sdata():
    return synthetic(0, size_um=1024.0, counts_scale=2.0)


@pytest.fixture(scope="module")
def truth(sdata):
    return np.asarray(sdata.images["truth"].values)


@pytest.fixture(scope="module")
def cell_table(sdata, truth):
    """Per cell: type, centroid (image px) and the truth intensity at a point inside it, for every channel."""
    cells = sdata.shapes["cells"]
    inside = shapely.get_coordinates(cells.geometry.representative_point())  # image px = um at 1 um/px
    rows = np.clip((inside[:, 1] / 2).astype(int), 0, truth.shape[1] - 1)
    cols = np.clip((inside[:, 0] / 2).astype(int), 0, truth.shape[2] - 1)
    return {
        "type": cells["cell_type"].to_numpy(),
        "centroid": shapely.get_coordinates(cells.geometry.centroid),
        "value": truth[:, rows, cols].T,
    }


def _gene(sdata, name):
    return list(sdata.images["truth"].c.values).index(name)


def _exact_disk_integral(values, cx, cy, r, n_vertices=1 << 16):
    """Integral of a piecewise-constant grid over a disk, from shapely polygon clipping (no circle_weights).

    The inscribed 65536-gon misses a relative 2 pi^2 / (3 n^2) ~ 1.5e-9 of the disk's area.
    """
    t = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)
    disk = shapely.Polygon(np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1))
    shapely.prepare(disk)
    cols, rows = np.arange(int(cx - r) - 1, int(cx + r) + 2), np.arange(int(cy - r) - 1, int(cy + r) + 2)
    jj, ii = np.meshgrid(cols, rows)
    jj, ii = jj.ravel(), ii.ravel()
    # nearest point of each pixel square to the centre decides "outside"; farthest corner decides "inside"
    near = np.hypot(np.clip(cx, jj, jj + 1) - cx, np.clip(cy, ii, ii + 1) - cy)
    far = np.hypot(np.maximum(abs(jj - cx), abs(jj + 1 - cx)), np.maximum(abs(ii - cy), abs(ii + 1 - cy)))
    area = np.where(far <= r * np.cos(np.pi / n_vertices), 1.0, 0.0)
    edge = (near < r) & (area == 0)
    boxes = shapely.box(jj[edge], ii[edge], jj[edge] + 1, ii[edge] + 1)
    area[edge] = shapely.area(shapely.intersection(disk, boxes))
    inside = (ii >= 0) & (ii < values.shape[0]) & (jj >= 0) & (jj < values.shape[1])
    return float(np.sum(area[inside] * values[ii[inside], jj[inside]]))


def test_same_seed_identical_and_different_seed_differs():
    kwargs = dict(size_um=512.0, um_per_px=2.0, truth_um_per_px=4.0, n_genes=14, n_noise_genes=2)
    a, b, c = synthetic(7, **kwargs), synthetic(7, **kwargs), synthetic(8, **kwargs)
    for name in ("he", "truth"):
        assert np.array_equal(a.images[name].values, b.images[name].values)
        assert not np.array_equal(a.images[name].values, c.images[name].values)
    assert np.array_equal(a.tables["table"].X.toarray(), b.tables["table"].X.toarray())
    assert a.shapes["cells"].geometry.geom_equals_exact(b.shapes["cells"].geometry, 0).all()
    assert a.shapes["spots"].index.equals(b.shapes["spots"].index)
    assert a.tables["table"].n_obs != c.tables["table"].n_obs or not np.array_equal(
        a.tables["table"].X.toarray(), c.tables["table"].X.toarray()
    )


def test_elements_overlay_and_are_recorded(sdata, truth):
    record = sdata.attrs["pixgene"]
    assert record["synthetic"]["seed"] == 0 and record["synthetic"]["counts_scale"] == 2.0
    assert recorded_um_per_px(sdata, "he") == 1.0 and recorded_um_per_px(sdata, "truth") == 2.0
    he = sdata.images["he"]
    assert he.dtype == np.uint8 and he.shape == (3, 1024, 1024)
    assert truth.dtype == np.float32 and truth.shape == (41, 512, 512)
    channels = list(sdata.images["truth"].c.values)
    assert channels[:2] == ["GENE00", "GENE01"] and channels[30:32] == ["NOISE00", "NOISE01"]
    assert channels[-1] == TOTAL_CHANNEL and len(channels) == 30 + 10 + 1
    # truth pixel (i, j) covers image pixels [2j, 2j + 2] x [2i, 2i + 2]
    np.testing.assert_allclose(affine_between(sdata, "truth", "he"), np.diag([2.0, 2.0, 1.0]), atol=1e-12)
    np.testing.assert_allclose(affine_between(sdata, "spots", "truth"), np.diag([0.5, 0.5, 1.0]), atol=1e-12)
    spots, table = sdata.shapes["spots"], sdata.tables["table"]
    np.testing.assert_allclose(spots["radius"], 27.5)
    assert table.uns["pixgene"]["platform"] == "synthetic"
    assert list(table.var_names) == channels[:-1]
    # hexagonal Visium grid: nearest neighbours exactly one pitch apart
    xy = shapely.get_coordinates(spots.geometry)
    np.testing.assert_allclose(cKDTree(xy).query(xy, k=2)[0][:, 1], 100.0, rtol=1e-9)
    cells = sdata.shapes["cells"]
    assert cells.index[0] == "cell_0" and set(cells["cell_type"].cat.categories) == set(CELL_TYPES)
    assert cells.geometry.is_valid.all() and shapely.area(cells.geometry.to_numpy()).min() > 1.0


def test_total_channel_is_the_sum_of_genes(truth):
    np.testing.assert_allclose(truth[-1], truth[:-1].astype(np.float64).sum(axis=0), rtol=1e-6, atol=1e-9)
    assert truth.min() >= 0.0


def test_circle_weights_integral_matches_polygon_clipping(sdata, truth):
    total = truth[-1].astype(np.float64)
    centres = shapely.get_coordinates(sdata.shapes["spots"].geometry) / 2.0  # image px -> truth px
    radius = 27.5 / 2.0
    weights = circle_weights(centres[:4], radius, total.shape)
    via_weights = weights @ total.ravel()
    exact = [_exact_disk_integral(total, cx, cy, radius) for cx, cy in centres[:4]]
    np.testing.assert_allclose(via_weights, exact, rtol=1e-6)
    # and the table's Poisson means are counts_scale x (that integral in um^2) for every gene
    genes = truth[:-1].reshape(truth.shape[0] - 1, -1).astype(np.float64)
    expected = 2.0 * 4.0 * (weights @ genes.T)
    np.testing.assert_allclose(sdata.tables["table"].layers["expected"][:4], expected, rtol=1e-5)


def test_spot_counts_are_poisson_around_the_truth_integral(sdata):
    table = sdata.tables["table"]
    counts = table.X.toarray().astype(np.float64)
    expected = np.asarray(table.layers["expected"], dtype=np.float64)
    assert np.array_equal(counts, np.round(counts))
    # per spot, the library size over its mean; its spread is known from the Poisson variance
    lib, mu = counts.sum(axis=1), expected.sum(axis=1)
    ratio = lib / mu
    sd_mean = np.sqrt(np.mean(1.0 / mu) / len(mu))
    assert abs(ratio.mean() - 1.0) < 4 * sd_mean
    # per gene over all spots: z-scores of Poisson sums
    z = (counts.sum(axis=0) - expected.sum(axis=0)) / np.sqrt(np.maximum(expected.sum(axis=0), 1e-12))
    assert np.all(np.abs(z[expected.sum(axis=0) > 5]) < 4.5)
    # dispersion of standardised residuals is Poisson's (about 1), not over- or under-dispersed
    big = expected > 5
    resid = (counts[big] - expected[big]) / np.sqrt(expected[big])
    assert 0.85 < resid.var() < 1.15


def test_truth_is_zero_outside_tissue(sdata, truth):
    # background: white glass connected to the image border (fat vacuoles are white too, but walled in)
    he = np.asarray(sdata.images["he"].values)
    components, _ = ndimage.label(ndimage.uniform_filter(he.min(axis=0).astype(np.float32), 3) > 240)
    edge = np.unique(np.concatenate([components[0], components[-1], components[:, 0], components[:, -1]]))
    background = np.isin(components, edge[edge > 0])
    # a pale collagen cleft at the very edge can pass for glass: keep 3 px clear of anything stained
    background = ndimage.binary_erosion(background, iterations=3, border_value=1)
    glass = background.reshape(512, 2, 512, 2).all(axis=(1, 3))
    assert glass.mean() > 0.1
    assert np.all(truth[:, glass] == 0)
    # and everything farther than a truth pixel's reach from every cell polygon
    cells = shapely.union_all(sdata.shapes["cells"].geometry.to_numpy())
    yy, xx = (np.mgrid[0:512, 0:512] + 0.5) * 2.0
    covered = shapely.contains_xy(shapely.buffer(cells, 1.5), xx, yy)
    assert np.all(truth[:, ~covered] == 0)
    # inside cells the library-size intensity is positive
    inner = shapely.contains_xy(shapely.buffer(cells, -1.5), xx, yy)
    assert np.all(truth[-1][inner] > 0)


def test_cell_type_markers_separate_cell_types(sdata, cell_table):
    programs = sdata.attrs["pixgene"]["synthetic"]["gene_programs"]
    markers = {g: p["cell_types"] for g, p in programs.items() if p["kind"] == "marker"}
    tumour_marker = next(g for g, types in markers.items() if types[0] == "tumour")
    lymph_marker = next(g for g, types in markers.items() if types == ["lymphocyte"])
    value, kind = cell_table["value"], cell_table["type"]
    tum, lym = kind == "tumour", kind == "lymphocyte"
    assert tum.sum() > 100 and lym.sum() > 100
    t = value[:, _gene(sdata, tumour_marker)]
    ly = value[:, _gene(sdata, lymph_marker)]
    assert np.median(t[tum]) > 20 * max(np.median(t[lym]), 1e-6)
    assert np.median(ly[lym]) > 20 * max(np.median(ly[tum]), 1e-6)
    assert stats.mannwhitneyu(t[tum], t[lym]).pvalue < 1e-20


def test_neighbourhood_driven_gene_follows_the_neighbourhood(sdata, cell_table):
    programs = sdata.attrs["pixgene"]["synthetic"]["gene_programs"]
    gene = next(
        g
        for g, p in programs.items()
        if p["feature"] == "lymphocyte_fraction" and "tumour" in p["feature_cell_types"]
    )
    kind, centroid = cell_table["type"], cell_table["centroid"]
    # fraction of lymphocytes among the other cells within 50 um, recomputed from the polygons
    tree = cKDTree(centroid)
    n_all = tree.query_ball_point(centroid, 50.0, return_length=True) - 1
    n_lym = cKDTree(centroid[kind == "lymphocyte"]).query_ball_point(centroid, 50.0, return_length=True)
    n_lym = n_lym - (kind == "lymphocyte")
    frac = n_lym / np.maximum(n_all, 1)
    tum = kind == "tumour"
    rho = stats.spearmanr(cell_table["value"][tum, _gene(sdata, gene)], frac[tum]).statistic
    assert rho > 0.4
    # a pure marker of the same cell type does not follow the neighbourhood
    marker = next(g for g, p in programs.items() if p["kind"] == "marker" and p["cell_types"][0] == "tumour")
    assert abs(stats.spearmanr(cell_table["value"][tum, _gene(sdata, marker)], frac[tum]).statistic) < 0.2


def test_image_does_not_determine_expression(sdata, truth):
    """A per-pixel linear regression on smoothed colour explains little of a neighbourhood-driven gene."""
    programs = sdata.attrs["pixgene"]["synthetic"]["gene_programs"]
    he = np.asarray(sdata.images["he"].values).astype(np.float32)
    rgb = np.stack([ndimage.gaussian_filter(c, 4.0) for c in he]).reshape(3, 512, 2, 512, 2).mean(axis=(2, 4))
    tissue = truth[-1] > 0
    design = np.column_stack([rgb[c][tissue] for c in range(3)] + [np.ones(tissue.sum())])
    for gene, program in programs.items():
        if program["kind"] not in ("neighbourhood", "noise"):
            continue
        y = truth[_gene(sdata, gene)][tissue].astype(np.float64)
        if y.std() == 0:
            continue
        beta, *_ = np.linalg.lstsq(design, y, rcond=None)
        r2 = 1 - np.sum((y - design @ beta) ** 2) / np.sum((y - y.mean()) ** 2)
        assert r2 < 0.5, (gene, r2)


def test_other_grids_and_zarr_round_trip(tmp_path):
    from spatialdata import read_zarr

    # truth pixels that are not a whole number of image pixels use their own sub-sampling grid
    sdata = synthetic(
        3, size_um=600.0, um_per_px=2.0, truth_um_per_px=3.0, n_genes=5, n_noise_genes=1, counts_scale=0.5
    )
    truth = np.asarray(sdata.images["truth"].values)
    assert truth.shape == (7, 200, 200) and sdata.images["he"].shape == (3, 300, 300)
    np.testing.assert_allclose(affine_between(sdata, "truth", "he"), np.diag([1.5, 1.5, 1.0]), atol=1e-12)
    np.testing.assert_allclose(truth[-1], truth[:-1].astype(np.float64).sum(axis=0), rtol=1e-6, atol=1e-9)
    centres = shapely.get_coordinates(sdata.shapes["spots"].geometry) * (2.0 / 3.0)
    weights = circle_weights(centres, 27.5 / 3.0, truth.shape[1:])
    expected = 0.5 * 9.0 * (weights @ truth[:-1].reshape(6, -1).astype(np.float64).T)
    np.testing.assert_allclose(sdata.tables["table"].layers["expected"], expected, rtol=1e-5)
    with warnings.catch_warnings():
        # anndata announces a future zarr default while writing; nothing here can act on it
        warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
        sdata.write(tmp_path / "synthetic.zarr")
    back = read_zarr(tmp_path / "synthetic.zarr")
    assert back.attrs["pixgene"]["synthetic"] == sdata.attrs["pixgene"]["synthetic"]
    assert recorded_um_per_px(back, "truth") == 3.0
    assert np.array_equal(np.asarray(back.images["truth"].values), truth)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size_um": -1.0}, "size_um"),
        ({"um_per_px": 500.0}, "um_per_px"),
        ({"n_genes": 0, "n_noise_genes": 0}, "no genes"),
        ({"spot_pitch_um": 40.0}, "overlap"),
        ({"size_um": 100.0}, "no room"),
        ({"n_genes": 2.5}, "counts"),
    ],
)
def test_bad_parameters_fail_before_work(kwargs, message):
    with pytest.raises(PixgeneInputError, match=message):
        synthetic(0, **kwargs)


@pytest.mark.slow
def test_default_slide_is_realistic():
    sdata = synthetic(0)
    table = sdata.tables["table"]
    library = np.asarray(table.X.sum(axis=1)).ravel()
    assert 200 < np.median(library) < 5000
    assert table.n_obs > 200 and len(sdata.shapes["cells"]) > 5000
    # markers vary strongly across spots (tumour vs stroma vs fat), noise genes far less
    counts = table.X.toarray()
    cv = counts.std(axis=0) / np.maximum(counts.mean(axis=0), 1e-9)
    assert cv[list(table.var_names).index("GENE00")] > 1.0
    types = set(sdata.shapes["cells"]["cell_type"])
    assert types == set(CELL_TYPES)


def test_expected_truth_is_the_truth_without_unexplained_cell_noise():
    """``truth_expected`` changes nothing else, shares the NOISE fields, and truth / expected per cell follows
    the two mean-one log-normals (size sd 0.15, cell sd 0.3) for a gene every cell expresses."""
    kwargs = dict(size_um=768.0, n_genes=14, n_noise_genes=2)
    plain, both = synthetic(5, **kwargs), synthetic(5, expected_truth=True, **kwargs)
    assert "truth_expected" not in plain.images
    for key in ("he", "truth"):
        np.testing.assert_array_equal(plain.images[key].values, both.images[key].values)
    np.testing.assert_array_equal(plain.tables["table"].X.toarray(), both.tables["table"].X.toarray())
    truth = np.asarray(both.images["truth"].values)
    expected = np.asarray(both.images["truth_expected"].values)
    assert list(both.images["truth_expected"].c.values) == list(both.images["truth"].c.values)
    assert recorded_um_per_px(both, "truth_expected") == recorded_um_per_px(both, "truth")
    np.testing.assert_array_equal(expected[14:16], truth[14:16])  # NOISE genes: the same smooth fields
    np.testing.assert_allclose(expected[-1], expected[:-1].sum(0), rtol=1e-5, atol=1e-9)
    assert ((truth > 0) <= (expected > 0)).all()  # nothing is expressed where the expectation is zero

    # GENE00 (a tumour marker with an ambient level in every cell) is expressed by every cell: per cell, the
    # ratio is size noise x cell noise, whose log is normal with mean -sd^2 / 2 (the median's standard error
    # here is about 0.012)
    cells = both.shapes["cells"]
    inside = shapely.get_coordinates(cells.geometry.representative_point())
    rows, cols = (inside[:, 1] / 2).astype(int), (inside[:, 0] / 2).astype(int)
    log_ratio = np.log(truth[0, rows, cols] / expected[0, rows, cols])
    assert len(cells) > 1000
    sd = np.hypot(0.15, 0.3)
    assert abs(np.median(log_ratio) - (-0.5 * sd**2)) < 0.04
    assert abs(stats.median_abs_deviation(log_ratio, scale="normal") - sd) < 0.05
