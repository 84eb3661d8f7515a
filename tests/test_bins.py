"""Training on polygon spots (Visium HD's square bins, any other shape) and planning tiles over many spots."""

from __future__ import annotations

import numpy as np
import pytest


def plan_tiles_reference(centers, radius, tile, margin):
    """The greedy set cover written out with Python sets: every candidate corner's set of spots, then the
    candidate that adds most (the first in row-major order on ties) until nothing is left to add."""
    from pixgene.data._training import spots_inside

    step = max(8, int((tile - 2 * margin - 2 * radius) // 2))
    lo, hi = np.floor(centers.min(0) - tile).astype(int), np.ceil(centers.max(0)).astype(int)
    corners = [(x, y) for y in range(lo[1], hi[1] + 1, step) for x in range(lo[0], hi[0] + 1, step)]
    holds = [set(np.flatnonzero(row)) for row in spots_inside(np.array(corners), centers, radius, tile, margin)]
    covered: set = set()
    chosen = []
    while True:
        gains = [len(h - covered) for h in holds]
        best = max(range(len(gains)), key=lambda i: (gains[i], -i))
        if gains[best] == 0:
            return np.array(chosen, dtype=int).reshape(-1, 2)
        chosen.append(corners[best])
        covered |= holds[best]


def test_plan_tiles_gives_the_dense_set_cover_and_covers_spots_of_any_extent():
    from pixgene.data._training import plan_tiles, spots_inside

    rng = np.random.default_rng(0)
    for trial in range(24):
        n = int(rng.integers(1, 300))
        centers = rng.uniform(0, rng.uniform(50, 2500), (n, 2))
        if trial % 3 == 0:
            centers = np.round(centers)  # spots exactly on a candidate's edge: the same comparison decides
        radius = float(rng.choice([4.0, 27.5, 55.5, 80.0]))
        np.testing.assert_array_equal(plan_tiles(centers, radius, 256, 16),
                                      plan_tiles_reference(centers, radius, 256, 16))
        radii = rng.uniform(2, 70, n)  # polygons: each its own half extent
        corners = plan_tiles(centers, radii, 256, 16)
        inside = spots_inside(corners, centers, radii, 256, 16)
        assert inside.any(0).all()
        # greedy: every tile brings spots no earlier tile covered
        seen = np.zeros(n, bool)
        for row in inside:
            assert (row & ~seen).any()
            seen |= row
    with pytest.raises(ValueError, match="do not fit"):
        plan_tiles(np.zeros((2, 2)), np.array([5.0, 120.0]), 256, 16)


def _squares(xy, side):
    import shapely

    x, y = np.asarray(xy, float).T
    return shapely.box(x - side / 2, y - side / 2, x + side / 2, y + side / 2)


def test_polygon_operator_of_a_view_is_the_exact_overlap_with_its_output_pixels():
    """A view at scale s, corner (x0, y0): each output pixel covers s * stride encoder px; the areas are
    checked against shapely intersections of the spot with every pixel square."""
    import shapely

    from pixgene.data._training import SlideSpots

    rng = np.random.default_rng(1)
    centers = rng.uniform(80, 200, (6, 2))
    polys = _squares(centers, 16.0)
    polys[2] = shapely.Polygon([(100, 100), (130, 104), (118, 131), (97, 120)])  # any polygon, not only squares
    slide = SlideSpots("s", None, centers, np.full(6, 8.0), np.ones((6, 2), np.float32), np.ones(6, bool),
                       polygons=np.asarray(polys, dtype=object))
    ids, scale, corner, stride, n_out = np.array([0, 2, 5]), 1.25, (37, 41), 4, 64
    op = slide.area_operator(ids, scale, corner, stride, n_out).toarray()
    px = scale * stride
    for k, i in enumerate(ids):
        expected = np.zeros(n_out * n_out)
        x0, y0, x1, y1 = shapely.bounds(polys[i])
        rows = range(int((y0 / scale - corner[1]) // stride) - 1, int((y1 / scale - corner[1]) // stride) + 2)
        cols = range(int((x0 / scale - corner[0]) // stride) - 1, int((x1 / scale - corner[0]) // stride) + 2)
        for r in rows:
            for c in cols:
                cell = shapely.box((corner[0] + c * stride) * scale, (corner[1] + r * stride) * scale,
                                   (corner[0] + (c + 1) * stride) * scale, (corner[1] + (r + 1) * stride) * scale)
                expected[r * n_out + c] = shapely.area(shapely.intersection(polys[i], cell)) / px**2
        np.testing.assert_allclose(op[k], expected, atol=1e-9)
        assert op[k].sum() == pytest.approx(shapely.area(polys[i]) / px**2)


def test_spots_in_image_takes_polygons_and_refuses_mixed_or_degenerate_shapes(synthetic_small):
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Scale, Sequence, get_transformation

    from pixgene._core.validate import PixgeneInputError
    from pixgene.data._slides import spots_in_image

    spots = synthetic_small.shapes["spots"]
    xy = np.column_stack([spots.geometry.x, spots.geometry.y])
    # squares given in a coordinate system of half the image's pixels: carried into image pixels
    half = _squares(xy / 2, 10.0)
    tr = get_transformation(spots, get_all=True)
    scaled = {cs: Sequence([Scale([2.0, 2.0], axes=("x", "y")), t]) for cs, t in tr.items()}
    synthetic_small.shapes["squares"] = ShapesModel.parse(gpd.GeoDataFrame(geometry=half, index=spots.index),
                                                          transformations=scaled)
    centers, radius, polygons = spots_in_image(synthetic_small, "squares", "he")
    np.testing.assert_allclose(centers, xy, atol=1e-9)
    np.testing.assert_allclose(radius, 10.0)
    np.testing.assert_allclose(shapely.area(polygons), 400.0)

    mixed = gpd.GeoDataFrame(geometry=[*_squares(xy[:3], 10.0), *shapely.points(xy[3:6])], index=spots.index[:6])
    synthetic_small.shapes["mixed"] = ShapesModel.parse(mixed, transformations=tr)
    with pytest.raises(PixgeneInputError, match="shapes 'mixed': mixes 3 circles and 3 polygons"):
        spots_in_image(synthetic_small, "mixed", "he")
    flat = gpd.GeoDataFrame(geometry=[shapely.Polygon([(0, 0), (5, 5), (10, 10)]), *_squares(xy[1:3], 10.0)],
                            index=spots.index[:3])
    synthetic_small.shapes["flat"] = ShapesModel.parse(flat, transformations=tr)
    with pytest.raises(PixgeneInputError, match="shapes 'flat': has polygons of zero area"):
        spots_in_image(synthetic_small, "flat", "he")


def test_synthetic_bins_count_the_truth_over_each_square_and_leave_the_spots_unchanged():
    import pixgene as pg

    plain = pg.datasets.synthetic(seed=5, size_um=512.0)
    sdata = pg.datasets.synthetic(seed=5, size_um=512.0, bins_um=16.0)
    np.testing.assert_array_equal(plain.tables["table"].X.toarray(), sdata.tables["table"].X.toarray())
    bins = sdata.tables["bins_table"]
    assert bins.n_obs == len(sdata.shapes["bins"]) > 100
    # the Poisson means are the truth integrated over each square: read the truth out over the bins
    truth = pg.tl.aggregate(sdata, shapes="bins", dense_key="truth", inplace=False, progress=False)
    genes = list(bins.var_names)
    order = truth.obs["instance_id"].astype(str).to_numpy()
    expected = bins[order].layers["expected"]
    np.testing.assert_allclose(expected, np.asarray(truth[:, genes].X), rtol=1e-4, atol=1e-4)
    counts = bins.X.toarray()
    assert np.array_equal(counts, np.round(counts))
    # Poisson: the counts' total is the means' total within a few standard deviations
    assert abs(counts.sum() - bins.layers["expected"].sum()) < 5 * np.sqrt(bins.layers["expected"].sum())


def test_fit_on_polygons_equal_to_the_circles_learns_what_the_circles_teach(synthetic_small):
    """The same spots as 96-gons (0.07 % less area than their circles) and as circles: the same tiles, views
    and draws, so two fits differ only by the operators' tiny area difference; their read-outs agree."""
    import geopandas as gpd
    import shapely
    from conftest import FIT_GENES
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import get_transformation

    import pixgene as pg

    spots = synthetic_small.shapes["spots"]
    angles = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    ring = np.stack([np.cos(angles), np.sin(angles)], 1)
    polys = [shapely.Polygon(np.array([x, y]) + r * ring)
             for x, y, r in zip(spots.geometry.x, spots.geometry.y, spots["radius"], strict=True)]
    poly_sd = pg.datasets.synthetic(seed=3, size_um=640.0)
    poly_sd.shapes["spots"] = ShapesModel.parse(gpd.GeoDataFrame(geometry=polys, index=spots.index),
                                                transformations=get_transformation(spots, get_all=True))
    tables = []
    for sd in (synthetic_small, poly_sd):
        model = pg.tl.fit(sd, genes=FIT_GENES, max_epochs=2, n_members=1, progress=False, decoder=pg.tl.DecoderConfig(width=16), training=pg.tl.TrainConfig(n_views=2))
        assert model.training["n_tiles"] > 0
        pg.tl.predict_dense(sd, model, progress=False)
        tables.append(pg.tl.aggregate(sd, shapes="spots", inplace=False, progress=False))
    a, b = (np.asarray(t[:, FIT_GENES].X, dtype=float) for t in tables)
    for g in range(len(FIT_GENES)):
        assert np.corrcoef(a[:, g], b[:, g])[0, 1] > 0.99
    np.testing.assert_allclose(a.sum(0), b.sum(0), rtol=0.02)


def test_fit_on_square_bins_predicts_the_truth_at_a_finer_scale():
    """Visium HD-like 16 um bins train a model whose map, read out over 8 um bins, follows the truth there."""
    import pixgene as pg

    sdata = pg.datasets.synthetic(seed=2, size_um=768.0, bins_um=16.0)
    genes = ["GENE00", "GENE01", "GENE02", "GENE03"]
    model = pg.tl.fit(sdata, shapes_key='bins', table_key='bins_table', genes=genes, max_epochs=3, n_members=1, progress=False, decoder=pg.tl.DecoderConfig(width=16), training=pg.tl.TrainConfig(n_views=2))
    assert model.training["slides"][0]["n_spots"] == sdata.tables["bins_table"].n_obs
    assert model.training["slides"][0]["spot_diameter_um"] == pytest.approx(16.0)
    pg.tl.predict_dense(sdata, model, progress=False)
    pg.tl.make_grid(sdata, bin_um=8.0)
    pg.tl.aggregate(sdata, shapes="bins_8um", progress=False)
    scores = pg.tl.evaluate(sdata, predicted="bins_8um_pixgene", truth="truth", genes=genes)
    assert scores.summary["PCC@M"] > 0.3


def test_denoise_runs_over_square_bins_with_folds_of_their_centres():
    """Visium HD-like bins denoised: the folds are spatial_folds' of the squares' centres (microns), every bin
    gets an out-of-fold value, and the posterior layer combines its counts with it."""
    import pixgene as pg
    from pixgene.tl._denoise import spatial_folds, spot_pitch_um

    sdata = pg.datasets.synthetic(seed=4, size_um=384.0, bins_um=16.0)
    genes = ["GENE00", "GENE01", "GENE02"]
    table = pg.tl.denoise(sdata, shapes_key='bins', table_key='bins_table', genes=genes, n_folds=2, random_state=1, progress=False, max_epochs=1, n_members=1, decoder=pg.tl.DecoderConfig(width=8), training=pg.tl.TrainConfig(n_views=1))
    assert sdata.tables["bins_denoised"] is table
    bins = sdata.shapes["bins"]
    assert list(table.obs_names) == [str(i) for i in bins.index]
    xy = np.c_[bins.geometry.centroid.x, bins.geometry.centroid.y]  # 1 um per pixel
    assert spot_pitch_um(xy) == pytest.approx(16.0)
    fold, _ = spatial_folds(xy, 2, 64.0, np.random.default_rng(1))
    assert table.uns["pixgene"]["params"]["block_um"] == pytest.approx(64.0)
    assert np.array_equal(table.obs["pixgene_fold"].to_numpy(), fold)
    assert np.isfinite(table.X).all() and (table.X >= 0).all() and table.X.sum() > 0
    counts = sdata.tables["bins_table"][:, genes].X.toarray()
    post = table.layers["pixgene_posterior"]
    assert post.shape == counts.shape and not np.allclose(post, counts) and not np.allclose(post, table.X)


def test_slide_area_operator_of_polygons_matches_the_circles_they_approximate():
    """SpotSlide.area_operator (colour_control's spot integrals) on a coarser grid: 256-gons give the areas
    their circles give, pixel by pixel, to the polygons' 0.01 % of missing area."""
    import shapely

    from pixgene.data._slides import SpotSlide

    centers = np.array([[103.0, 97.5], [260.2, 181.9], [40.0, 300.0]])
    radius = np.array([27.5, 27.5, 40.0])
    angles = np.linspace(0, 2 * np.pi, 256, endpoint=False)
    polys = np.array([shapely.Polygon(c + r * np.c_[np.cos(angles), np.sin(angles)])
                      for c, r in zip(centers, radius, strict=True)], dtype=object)
    circles = SpotSlide(None, "he", "spots", "table", 1.0, centers, radius, None)
    polygons = SpotSlide(None, "he", "spots", "table", 1.0, centers, radius, None, polys)
    a = circles.area_operator(4.0, (100, 100)).toarray()
    b = polygons.area_operator(4.0, (100, 100)).toarray()
    np.testing.assert_allclose(b.sum(1), np.pi * radius**2 / 16, rtol=2e-4)
    np.testing.assert_allclose(b, a, atol=2e-3)
    np.testing.assert_allclose(polygons.area_px, np.pi * radius**2, rtol=2e-4)
    assert not np.array_equal(polygons.footprint(), circles.footprint())
