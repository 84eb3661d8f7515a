"""The whole job on a small synthetic slide: fit -> predict_dense -> aggregate -> scanpy, and its invariants."""

from __future__ import annotations

import numpy as np
import pytest

import pixgene as pg
from pixgene._coords import affine_between
from pixgene._raster import full_resolution


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
    sc.pp.normalize_total(keep)
    sc.pp.log1p(keep)
    sc.pp.pca(keep, n_comps=3)
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
