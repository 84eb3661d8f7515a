"""The whole job on a small synthetic slide: fit -> predict_dense -> aggregate -> scanpy, and its invariants."""

from __future__ import annotations

import numpy as np
import pytest

import pixgene as pg
from pixgene._core.coords import affine_between
from pixgene._core.raster import full_resolution


@pytest.fixture(scope="module")
def predicted(fitted_session):
    sdata, model = fitted_session
    if "he_pixgene" not in sdata.images:
        pg.tl.predict_dense(sdata, progress=False)  # the model fitted on this object is remembered
    return sdata, model


def test_dense_map_overlays_the_image_and_records_units(predicted):
    sdata, model = predicted
    dense = full_resolution(sdata.images["he_pixgene"])
    assert list(dense.coords["c"].values) == [*model.genes, "pixgene_total_counts"]
    np.testing.assert_allclose(affine_between(sdata, "he_pixgene", "he"), np.diag([4.0, 4.0, 1.0]), atol=1e-12)
    assert sdata.attrs["pixgene"]["um_per_px"]["he_pixgene"] == 4.0
    assert sdata.attrs["pixgene"]["dense"]["he_pixgene"]["model_id"] == model.model_id
    assert dense.shape[1:] == (160, 160)
    assert float(dense.min()) >= 0


def test_spot_read_out_equals_a_brute_force_integral(predicted):
    """Expected counts of each spot vs counting 1/8-pixel sub-samples of the map inside the disk."""
    sdata, model = predicted
    table = pg.tl.aggregate(sdata, shapes="spots", inplace=False, progress=False)
    lam = np.asarray(full_resolution(sdata.images["he_pixgene"]).values)  # (C, 160, 160) per um^2, 4 um px
    sub = 8
    fine = lam.repeat(sub, 1).repeat(sub, 2)
    ys, xs = (np.mgrid[0 : fine.shape[1], 0 : fine.shape[2]] + 0.5) * (4.0 / sub)  # um == image px here
    spots = sdata.shapes["spots"]
    for i in range(0, len(spots), 7):
        cx, cy, r = spots.geometry.x.iloc[i], spots.geometry.y.iloc[i], spots["radius"].iloc[i]
        inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
        ref = fine[:, inside].sum(1) * (4.0 / sub) ** 2
        row = table[table.obs["instance_id"].astype(str) == str(spots.index[i])]
        np.testing.assert_allclose(np.asarray(row.X).ravel(), ref[:-1], rtol=2e-2)
        assert row.obs["pixgene_total_counts"].iloc[0] == pytest.approx(ref[-1], rel=2e-2)


def test_bins_partition_the_map_and_feed_scanpy(predicted):
    import scanpy as sc

    sdata, _ = predicted
    pg.tl.make_grid(sdata, bin_um=8.0, within=None, key_added="bins_8", overwrite=True)
    bins = pg.tl.aggregate(sdata, shapes="bins_8", overwrite=True, progress=False)
    lam = np.asarray(full_resolution(sdata.images["he_pixgene"]).values)
    np.testing.assert_allclose(np.asarray(bins.X.sum(0)).ravel(), lam[:-1].sum((1, 2)) * 16.0, rtol=1e-4)
    assert np.allclose(bins.obs["pixgene_area_um2"], 64.0)
    keep = bins[bins.obs["pixgene_total_counts"] > 1e-3].copy()
    pg.pp.log_normalize(keep)  # the README's route: by the predicted library size
    sc.pp.pca(keep, n_comps=3, layer="pixgene_lognorm")
    sc.pp.neighbors(keep, n_neighbors=10)
    sc.tl.leiden(keep, flavor="igraph", n_iterations=2, directed=False)
    assert keep.obs["leiden"].nunique() >= 2


def test_backed_store_receives_the_map_and_tables(fitted_session, tmp_path):
    import spatialdata as sd

    sdata, model = fitted_session
    store = tmp_path / "slide.zarr"
    fresh = pg.datasets.synthetic(seed=3, size_um=640)
    fresh.write(store)
    backed = sd.read_zarr(store)
    pg.tl.predict_dense(backed, model, progress=False)
    pg.tl.aggregate(backed, shapes="spots", progress=False)
    again = sd.read_zarr(store)
    assert "he_pixgene" in again.images and "spots_pixgene" in again.tables
    assert again.attrs["pixgene"]["um_per_px"]["he_pixgene"] == 4.0
    np.testing.assert_allclose(
        np.asarray(full_resolution(again.images["he_pixgene"]).values),
        np.asarray(full_resolution(backed.images["he_pixgene"]).values),
    )
    assert not (tmp_path / "slide.zarr.pixgene-partial").exists()


def test_predict_dense_standardises_with_the_predicted_slides_own_statistics(fitted_session):
    """A darker copy of the slide: predict_dense takes its statistics from it, not from the training slide."""
    from spatialdata import deepcopy

    from pixgene._core.units import resolve_um_per_px
    from pixgene.data._reader import SlideReader
    from pixgene.model._standardize import slide_feature_stats

    sdata, model = fitted_session
    assert model.slide_standardized
    dark = deepcopy(sdata)
    he = dark.images["he"]
    dark.images["he"] = he.copy(data=(he.data * 0.8).astype(he.dtype))
    fitted_id = model.model_id

    def dense(m, key):
        pg.tl.predict_dense(dark, m, key_added=key, scale_factors=None, progress=False)
        return np.asarray(full_resolution(dark.images[key]).values)

    own = dense(model, "own")
    assert model.model_id == fitted_id  # the fitted model is left as it was
    assert dark.attrs["pixgene"]["dense"]["own"]["model_id"] == fitted_id
    reader = SlideReader(dark.images["he"], image_um=resolve_um_per_px(dark, "he"), target_um=model.encoder_um_per_px)
    by_hand = model.with_feature_stats(*slide_feature_stats(dark, "he", reader, model.module))
    by_hand.decoder_config = {**by_hand.decoder_config, "standardize": True}  # take its statistics as they are
    np.testing.assert_allclose(own, dense(by_hand, "by_hand"), rtol=1e-5, atol=1e-7 * own.max())
    # the same weights with the training slide's statistics (the saved buffers) give another map
    training = pg.tl.PixNet(model.module, genes=model.genes, encoder_config=model.encoder_config,
                            encoder_weights=model.encoder_weights,
                            decoder_config={**model.decoder_config, "standardize": True})
    assert np.abs(dense(training, "training") - own).max() > 1e-3 * own.max()


def test_fit_without_genes_chooses_what_select_genes_chooses_and_marks_them(synthetic_small):
    """No genes given and none selected: fit picks pg.pp.select_genes' defaults on its training slides, marks
    them in the table as select_genes would, and says so in the log."""
    from spatialdata import deepcopy

    reference = deepcopy(synthetic_small)
    want = pg.pp.select_genes(reference)
    assert "pixgene_selected" not in synthetic_small.tables["table"].var
    model = pg.tl.fit(synthetic_small, max_epochs=1, n_members=1, progress=False,
                      decoder=pg.tl.DecoderConfig(width=8), training=pg.tl.TrainConfig(n_views=1, tile_context_px=0))
    assert model.genes == want and len(want) == 40  # every gene of this small panel is detected
    var = synthetic_small.tables["table"].var
    assert var.index[var["pixgene_selected"]].tolist() == reference.tables["table"].var.index[
        reference.tables["table"].var["pixgene_selected"]].tolist()
    assert synthetic_small.attrs["pixgene"]["model"]["genes"] == want


def cell_integrals_by_overlap(sdata, dense_key: str, cells_key: str, ids) -> np.ndarray:
    """Each cell's expected counts as the sum over the map's pixels of the pixel's intensity times the area that
    shapely's polygon intersection gives the cell inside that pixel (in the map's own pixels; outside the map,
    nothing), times the pixel's area in um^2."""
    import shapely

    from pixgene._core.units import recorded_um_per_px

    lam = np.asarray(full_resolution(sdata.images[dense_key]).values)
    height, width = lam.shape[1:]
    um = recorded_um_per_px(sdata, dense_key)
    to_map = np.linalg.inv(affine_between(sdata, dense_key, cells_key))
    out = []
    for poly in sdata.shapes[cells_key].geometry.loc[list(ids)]:
        poly = shapely.affinity.affine_transform(poly, [*to_map[:2, :2].ravel(), *to_map[:2, 2]])
        bx0, by0, bx1, by1 = poly.bounds
        x0, y0 = max(0, int(np.floor(bx0))), max(0, int(np.floor(by0)))
        x1, y1 = min(width, int(np.ceil(bx1))), min(height, int(np.ceil(by1)))
        ys, xs = (a.ravel() for a in np.mgrid[y0:y1, x0:x1])
        overlap = shapely.area(shapely.intersection(shapely.box(xs, ys, xs + 1, ys + 1), poly))
        out.append((lam[:, ys, xs] * overlap).sum(1) * um**2)
    return np.array(out)


@pytest.mark.slow
def test_the_design_cards_calls_run_verbatim_on_a_fresh_synthetic_slide():
    """``fit(sdata)``, ``predict_dense(sdata)``, ``aggregate(sdata, shapes="cells")`` with no other argument:
    finite read-outs that equal the map's integral over the cells (pixel by pixel, by polygon overlap)."""
    sdata = pg.datasets.synthetic(seed=1, size_um=640.0)
    pg.tl.fit(sdata)
    pg.tl.predict_dense(sdata)
    cells = pg.tl.aggregate(sdata, shapes="cells")
    X = np.asarray(cells.X)
    assert np.isfinite(X).all() and (X >= 0).all() and cells.n_vars == len(sdata.attrs["pixgene"]["model"]["genes"])
    ids = cells.obs["instance_id"].to_numpy()[:: max(1, cells.n_obs // 25)]
    want = cell_integrals_by_overlap(sdata, "he_pixgene", "cells", ids)
    got = X[:: max(1, cells.n_obs // 25)]
    np.testing.assert_allclose(got, want[:, : cells.n_vars], rtol=1e-3, atol=1e-6)


@pytest.mark.slow
@pytest.mark.data
def test_the_design_cards_calls_run_verbatim_on_a_her2st_section():
    """On a real section, with cells from the embedded segmentation: the same calls, no other argument."""
    from conftest import data_dir

    if data_dir() is None:
        pytest.skip("the real data (../shared/data or $PIXGENE_DATA_DIR) are not here")
    sdata = pg.datasets.her2st("C2")
    pg.tl.fit(sdata)
    pg.tl.predict_dense(sdata)
    pg.tl.segment_cells(sdata)
    cells = pg.tl.aggregate(sdata, shapes="cells")
    X = np.asarray(cells.X)
    assert np.isfinite(X).all() and (X >= 0).all() and cells.n_obs > 10_000
    step = max(1, cells.n_obs // 25)
    want = cell_integrals_by_overlap(sdata, "he_pixgene", "cells", cells.obs["instance_id"].to_numpy()[::step])
    np.testing.assert_allclose(X[::step], want[:, : cells.n_vars], rtol=1e-3, atol=1e-6)
