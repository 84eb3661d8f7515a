"""How sure the map is: the members' maps beside the mean (predict_dense(uncertainty=True)), their exact spread
per shape and count intervals (aggregate), the spread drawn (pl.uncertainty); each against a reference
computed another way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pixgene as pg
from pixgene._core.keys import SD_LAYER, TOTAL_SD_OBS, member_channel, member_layer, quantile_layer
from pixgene._core.raster import full_resolution
from pixgene._core.validate import PixgeneInputError

#: small chunks and a fixed halo: the comparisons are between runs of the same settings
FAST = {"chunk_px": 40, "halo_px": 64, "progress": False}
GENES = ["GENE00", "GENE01", "GENE02"]
THETA = [[5.0, 2.0, 8.0, 20.0], [6.0, 3.0, 7.0, 25.0], [4.0, 2.5, 9.0, 22.0]]


def _values(element) -> np.ndarray:
    return np.asarray(full_resolution(element).values)


def _ensemble(members: int = 3, seed: int = 0):
    """An untrained PixNet of ``members`` conv decoders (their own random weights: they disagree), outputs near
    1e-2 counts per um^2, with a negative-binomial theta per member recorded as fit records it."""
    import torch

    from pixgene.model._pixnet import PixNet, build_module
    from pixgene.nn import build_encoder

    encoder = build_encoder("efficientnet_lite0", weights="default")
    config = encoder.config()
    decoder = {"width": 8, "out_stride": 4, "block": "conv", "members": members}
    torch.manual_seed(seed)
    n = len(GENES) + 1
    module = build_module(config, "default", n_outputs=n, decoder_config=decoder, encoder=encoder)
    for _, head in module.pairs():
        head.set_scale(torch.full((n,), 1e-2))
    theta = THETA[:members]
    training = {"params": {"likelihood": "nb"}, "theta": theta[0], "members": [{"theta": t} for t in theta]}
    return PixNet(module, genes=GENES, encoder_config=config, encoder_weights="default", decoder_config=decoder,
                  training=training)


@pytest.fixture(scope="module")
def ensemble():
    return _ensemble()


@pytest.fixture(scope="module")
def fitted_maps(fitted_session):
    """The session's fitted five-member model predicted without and with uncertainty, and each member alone."""
    from spatialdata import deepcopy

    sdata, model = fitted_session
    sdata = deepcopy(sdata)
    pg.tl.predict_dense(sdata, model, key_added="plain", **FAST)
    pg.tl.predict_dense(sdata, model, key_added="unc", uncertainty=True, **FAST)
    for k in range(model.n_members):
        pg.tl.predict_dense(sdata, model.member(k), key_added=f"alone{k}", **FAST)
    return sdata, model


def test_mean_map_is_the_same_to_the_bit_with_uncertainty(fitted_maps):
    sdata, model = fitted_maps
    assert model.n_members == 5
    plain, unc = _values(sdata.images["plain"]), _values(sdata.images["unc"])
    assert plain.dtype == unc.dtype == np.float32
    np.testing.assert_array_equal(plain, unc)
    record = sdata.attrs["pixgene"]["dense"]
    assert record["unc"]["uncertainty"] == {"members_key": "unc_members", "n_members": 5}
    assert "uncertainty" not in record["plain"] and "plain_members" not in sdata.images
    # the fitted theta of every member is recorded with the map (the intervals' dispersion)
    members = model.training["members"]
    np.testing.assert_array_equal(record["unc"]["nb_theta"], [m["theta"] for m in members])


def test_members_maps_are_the_members_predicted_alone(fitted_maps):
    sdata, model = fitted_maps
    element = full_resolution(sdata.images["unc_members"])
    outputs = model.outputs
    assert list(element.coords["c"].values) == [member_channel(k, o) for k in range(5) for o in outputs]
    assert element.dims == ("c", "y", "x")
    members = _values(sdata.images["unc_members"]).reshape(5, len(outputs), *element.shape[1:])
    for k in range(5):
        alone = _values(sdata.images[f"alone{k}"])
        np.testing.assert_allclose(members[k], alone, rtol=1e-6, atol=1e-6 * alone.max())
    mean = _values(sdata.images["unc"])
    np.testing.assert_allclose(members.mean(axis=0), mean, rtol=1e-5, atol=1e-6 * mean.max())
    # the pyramid levels overlay the mean map's
    assert len(sdata.images["unc_members"]) == len(sdata.images["unc"])


@pytest.mark.parametrize("shapes", ["spots", "cells"])
def test_readout_sd_is_the_sd_of_the_members_own_readouts(fitted_maps, shapes):
    """layers["pixgene_sd"] against each member predicted alone, read out alone, and np.std (ddof 0)."""
    sdata, model = fitted_maps
    table = pg.tl.aggregate(sdata, shapes=shapes, dense_key="unc", key_added=f"{shapes}_unc", keep_members=True,
                            progress=False)
    plain = pg.tl.aggregate(sdata, shapes=shapes, dense_key="plain", key_added=f"{shapes}_plain", progress=False)
    alone = [pg.tl.aggregate(sdata, shapes=shapes, dense_key=f"alone{k}", key_added=f"{shapes}_a{k}",
                             progress=False) for k in range(5)]
    X = np.stack([np.asarray(a.X, dtype=np.float64) for a in alone])
    totals = np.stack([a.obs["pixgene_total_counts"].to_numpy() for a in alone])
    scale = float(X.max())
    np.testing.assert_allclose(table.layers[SD_LAYER], X.std(axis=0, ddof=0), rtol=1e-4, atol=1e-6 * scale)
    np.testing.assert_allclose(table.obs[TOTAL_SD_OBS], totals.std(axis=0, ddof=0), rtol=1e-4,
                               atol=1e-6 * totals.max())
    for k in range(5):
        np.testing.assert_allclose(table.layers[member_layer(k)], X[k], rtol=1e-5, atol=1e-6 * scale)
    # X and every other column are what the plain map gives, to the bit
    np.testing.assert_array_equal(table.X, plain.X)
    assert (table.layers[SD_LAYER] > 0).all()
    assert table.uns["pixgene"]["uncertainty"] == {"members_key": "unc_members", "n_members": 5, "ddof": 0}
    # not an integral of a per-pixel spread: that is larger wherever members disagree differently in a shape
    assert "pixgene_sd" not in plain.layers


def test_interval_layers_are_negative_binomial_quantiles(fitted_maps):
    from scipy.stats import nbinom

    sdata, model = fitted_maps
    table = pg.tl.aggregate(sdata, shapes="spots", dense_key="unc", key_added="spots_q", interval=(0.5, 0.9),
                            progress=False)
    n_genes = len(model.genes)
    theta = np.exp(np.log([m["theta"] for m in model.training["members"]]).mean(axis=0))[:n_genes]
    mu = np.asarray(table.X, dtype=np.float64)
    for q in (0.05, 0.25, 0.75, 0.95):
        expected = nbinom.ppf(q, theta[None, :], theta[None, :] / (theta[None, :] + mu))
        np.testing.assert_array_equal(table.layers[quantile_layer(q)], expected)
    assert [quantile_layer(q) for q in (0.05, 0.95)] == ["pixgene_q05", "pixgene_q95"]
    lo, hi = table.layers["pixgene_q05"], table.layers["pixgene_q95"]
    assert (lo <= table.layers["pixgene_q25"]).all() and (table.layers["pixgene_q75"] <= hi).all()
    assert (hi > lo).any()
    info = table.uns["pixgene"]["interval"]
    assert info["kind"] == "nb" and list(info["levels"]) == [0.5, 0.9]
    np.testing.assert_allclose(info["theta"], theta)


def test_mixture_interval_is_the_quantile_of_the_members_mixture(ensemble, synthetic_small):
    """interval_kind="mixture" against the mixture's CDF summed over every count."""
    from scipy.stats import nbinom

    pg.tl.predict_dense(synthetic_small, ensemble, uncertainty=True, **FAST)
    table = pg.tl.aggregate(synthetic_small, shapes="spots", interval=0.9, interval_kind="mixture",
                            keep_members=True, progress=False)
    mu = np.stack([np.asarray(table.layers[member_layer(k)], np.float64) for k in range(3)], axis=1)
    theta = np.asarray(THETA)[:, : len(GENES)]
    counts = np.arange(0, 400)
    p = theta / (theta + mu)  # (n, M, G)
    cdf = nbinom.cdf(counts[:, None, None, None], theta[None, None], p[None]).mean(axis=2)  # (x, n, G)
    for q in (0.05, 0.95):
        expected = np.argmax(cdf >= q, axis=0)
        np.testing.assert_array_equal(table.layers[quantile_layer(q)], expected)
    # the mixture is at least as wide as the interval of one NB at the mean, with the pooled theta
    nb = pg.tl.aggregate(synthetic_small, shapes="spots", interval=0.9, key_added="nb", progress=False)
    assert (table.layers["pixgene_q95"] - table.layers["pixgene_q05"]).mean() >= (
        nb.layers["pixgene_q95"] - nb.layers["pixgene_q05"]).mean()


@pytest.mark.parametrize("tta", [1, 2])
def test_predict_members_is_one_encoding_of_the_mean_and_each_member(ensemble, tta):
    """On raw tiles: the mean equals predict_intensity to the bit, each member its own predict_intensity."""
    from pixgene.infer._chunks import predict_members
    from pixgene.infer._tiling import probe_texture

    tiles = np.stack([probe_texture(128, 96, seed=s) for s in (1, 2)])
    mean, members = predict_members(ensemble, tiles, tta)
    np.testing.assert_array_equal(mean, ensemble.predict_intensity(tiles, tta))
    assert members.shape == (2, 3, *mean.shape[1:])
    for k in range(3):
        np.testing.assert_allclose(members[:, k], ensemble.member(k).predict_intensity(tiles, tta), rtol=1e-6,
                                   atol=1e-9)
    assert np.abs(members - mean[:, None]).max() > 1e-4 * mean.max()  # the untrained members do disagree


def test_one_member_model_is_refused(ensemble, synthetic_small):
    with pytest.raises(PixgeneInputError, match="needs a model of several members.*n_members >= 2"):
        pg.tl.predict_dense(synthetic_small, ensemble.member(0), uncertainty=True, **FAST)
    with pytest.raises(PixgeneInputError, match="not a list of 2 models"):
        pg.tl.predict_dense(synthetic_small, [ensemble, ensemble], uncertainty=True, **FAST)
    assert "he_pixgene" not in synthetic_small.images  # refused before any work


def test_aggregate_asks_for_what_it_needs(ensemble, synthetic_small):
    pg.tl.predict_dense(synthetic_small, ensemble.member(0), key_added="one", **FAST)
    with pytest.raises(PixgeneInputError, match="has no members' maps"):
        pg.tl.aggregate(synthetic_small, shapes="spots", dense_key="one", uncertainty=True, progress=False)
    with pytest.raises(PixgeneInputError, match="keep_members=True"):
        pg.tl.aggregate(synthetic_small, shapes="spots", dense_key="one", keep_members=True, progress=False)
    with pytest.raises(PixgeneInputError, match="interval"):
        pg.tl.aggregate(synthetic_small, shapes="spots", dense_key="one", interval=1.5, progress=False)
    # a map without uncertainty reads out as before: no spread, no intervals unless asked
    table = pg.tl.aggregate(synthetic_small, shapes="spots", dense_key="one", progress=False)
    assert not table.layers and TOTAL_SD_OBS not in table.obs
    del synthetic_small.attrs["pixgene"]["dense"]["one"]["nb_theta"]
    with pytest.raises(PixgeneInputError, match="no negative-binomial dispersion"):
        pg.tl.aggregate(synthetic_small, shapes="spots", dense_key="one", key_added="t2", interval=0.9,
                        progress=False)


def test_interrupted_uncertainty_run_resumes_to_the_same_maps(ensemble, synthetic_small, tmp_path, monkeypatch):
    import spatialdata as sd

    from pixgene.infer import _chunks

    reference = sd.deepcopy(synthetic_small)
    pg.tl.predict_dense(reference, ensemble, uncertainty=True, **FAST)
    path = tmp_path / "slide.zarr"
    sd.deepcopy(synthetic_small).write(path)
    backed = sd.read_zarr(path)
    original, calls = _chunks.predict_members, []

    def failing(model, tiles, tta=1):
        if len(calls) == 3:
            raise RuntimeError("interrupted on purpose")
        calls.append(1)
        return original(model, tiles, tta)

    monkeypatch.setattr(_chunks, "predict_members", failing)
    with pytest.raises(RuntimeError, match="on purpose"):
        pg.tl.predict_dense(backed, ensemble, uncertainty=True, **FAST)
    partial = Path(str(path) + ".pixgene-partial") / "he_pixgene"
    assert (partial / "members.zarr").is_dir() and len(list((partial / "done").iterdir())) == 3

    def counting(model, tiles, tta=1):
        calls.append(1)
        return original(model, tiles, tta)

    calls.clear()
    monkeypatch.setattr(_chunks, "predict_members", counting)
    backed = sd.read_zarr(path)
    pg.tl.predict_dense(backed, ensemble, uncertainty=True, **FAST)
    n_tissue = backed.attrs["pixgene"]["dense"]["he_pixgene"]["chunks"]["tissue"]
    assert len(calls) == n_tissue - 3
    assert not partial.exists()
    for key in ("he_pixgene", "he_pixgene_members"):
        np.testing.assert_array_equal(_values(backed.images[key]), _values(reference.images[key]))
    # written into the store and read back lazily, aggregate reads them from there
    again = sd.read_zarr(path)
    table = pg.tl.aggregate(again, shapes="spots", progress=False)
    assert SD_LAYER in table.layers


def test_overwriting_in_a_store_replaces_the_members_or_drops_them(ensemble, synthetic_small, tmp_path):
    import spatialdata as sd

    path = tmp_path / "slide.zarr"
    synthetic_small.write(path)
    backed = sd.read_zarr(path)
    pg.tl.predict_dense(backed, ensemble, uncertainty=True, **FAST)
    first = _values(backed.images["he_pixgene_members"])
    with pytest.raises(PixgeneInputError, match="already exists"):
        pg.tl.predict_dense(backed, ensemble, uncertainty=True, **FAST)
    pg.tl.predict_dense(backed, ensemble, uncertainty=True, overwrite=True, **FAST)
    np.testing.assert_array_equal(_values(sd.read_zarr(path).images["he_pixgene_members"]), first)
    # a plain map replacing it takes the members with it, in memory and in the store
    pg.tl.predict_dense(backed, ensemble, overwrite=True, **FAST)
    for sdata in (backed, sd.read_zarr(path)):
        assert "he_pixgene_members" not in sdata.images
        assert "uncertainty" not in sdata.attrs["pixgene"]["dense"]["he_pixgene"]
    assert SD_LAYER not in pg.tl.aggregate(backed, shapes="spots", progress=False).layers


@pytest.mark.parametrize("measure", ["sd", "cv"])
def test_uncertainty_plot_draws_the_members_spread_beside_the_mean(ensemble, synthetic_small, measure):
    import matplotlib.pyplot as plt

    pg.tl.predict_dense(synthetic_small, ensemble, uncertainty=True, scale_factors=None, **FAST)
    fig = pg.pl.uncertainty(synthetic_small, ["GENE01", "GENE02"], measure=measure, max_px=10_000, vmax=None)
    try:
        panels = fig.axes[:4]
        assert [a.get_title() for a in panels] == ["GENE01", f"GENE01: {measure.upper()}", "GENE02",
                                                   f"GENE02: {measure.upper()}"]
        members = _values(synthetic_small.images["he_pixgene_members"]).reshape(3, 4, 160, 160)
        mean = _values(synthetic_small.images["he_pixgene"])
        for gene, (mean_ax, spread_ax) in zip((1, 2), (panels[:2], panels[2:]), strict=True):
            expected = members[:, gene].std(axis=0, dtype=np.float64)
            if measure == "cv":
                m = members[:, gene].mean(axis=0, dtype=np.float64)
                expected = np.where(m > 0, expected / np.where(m > 0, m, 1), 0)
            drawn = spread_ax.get_images()[-1].get_array()
            np.testing.assert_allclose(drawn, expected, rtol=1e-5, atol=1e-9)
            np.testing.assert_array_equal(mean_ax.get_images()[-1].get_array(), mean[gene])
    finally:
        plt.close(fig)
    with pytest.raises(PixgeneInputError, match="measure"):
        pg.pl.uncertainty(synthetic_small, "GENE01", measure="var")


def test_uncertainty_plot_needs_the_members_maps(ensemble, synthetic_small):
    pg.tl.predict_dense(synthetic_small, ensemble, **FAST)
    with pytest.raises(PixgeneInputError, match="uncertainty=True"):
        pg.pl.uncertainty(synthetic_small, "GENE01")

