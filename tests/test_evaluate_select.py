"""Scores and gene selection against references computed another way (scipy, scanpy directly)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import scipy.stats

import pixgene as pg
from pixgene._core.validate import PixgeneInputError
from pixgene.tl._evaluate import score_matrices


def test_scores_match_scipy_pearson_and_quantiles():
    rng = np.random.default_rng(0)
    true = rng.random((50, 6))
    pred = true + rng.normal(0, [0.05, 0.2, 0.5, 1.0, 2.0, 0.1], size=(50, 6))
    pred[:, 5] = 3.0  # constant: no correlation defined
    s = score_matrices(pred, true, list("abcdef"))
    ref = np.array([scipy.stats.pearsonr(pred[:, g], true[:, g])[0] for g in range(5)])
    np.testing.assert_allclose(s.per_gene["pearson"].to_numpy()[:5], ref, rtol=1e-10)
    assert np.isnan(s.per_gene.loc["f", "pearson"])
    assert s.summary["PCC@F"] == pytest.approx(np.quantile(ref, 0.25))
    assert s.summary["PCC@S"] == pytest.approx(np.median(ref))
    assert s.summary["PCC@M"] == pytest.approx(ref.mean())
    assert s.summary["MSE"] == pytest.approx(((pred - true) ** 2).mean())
    assert s.summary["MAE"] == pytest.approx(np.abs(pred - true).mean())
    assert s.summary["n_genes_scored"] == 5


def test_select_genes_mean_and_hvg_match_scanpy(synthetic_small):
    import scanpy as sc

    table = synthetic_small.tables["table"]
    genes = pg.pp.select_genes(synthetic_small, n_top=5, flavor="mean", min_fraction=0.0)
    ref = table.copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    mean = np.asarray(ref.X.mean(0)).ravel()
    assert genes == ref.var_names[np.argsort(-mean, kind="stable")[:5]].tolist()
    assert table.var["pixgene_selected"].sum() == 5
    assert table.uns["pixgene"]["select_genes"]["genes"] == genes

    hvg = pg.pp.select_genes(synthetic_small, n_top=8, flavor="hvg", min_fraction=0.0)
    sc.pp.highly_variable_genes(ref, flavor="seurat", n_top_genes=8)
    # scanpy flags every gene tied at the cut-off; pixgene keeps exactly n_top of them
    scanpy_set = set(ref.var_names[ref.var["highly_variable"]])
    cut = np.sort(ref.var["dispersions_norm"].to_numpy())[::-1][7]
    assert len(hvg) == 8 and set(hvg) <= scanpy_set
    assert set(ref.var_names[ref.var["dispersions_norm"] > cut]) <= set(hvg)


def test_select_genes_on_several_slides_uses_shared_genes(synthetic_small):
    from spatialdata import deepcopy

    other = deepcopy(synthetic_small)
    t = other.tables["table"]
    other.tables["table"] = t[:, t.var_names != "GENE00"].copy()
    genes = pg.pp.select_genes([synthetic_small, other], n_top=10, flavor="hvg", min_fraction=0.0)
    assert "GENE00" not in genes and len(genes) == 10


def test_select_genes_rejects_bad_arguments(synthetic_small):
    with pytest.raises(PixgeneInputError, match="flavor"):
        pg.pp.select_genes(synthetic_small, flavor="variance")
    with pytest.raises(PixgeneInputError, match="n_top"):
        pg.pp.select_genes(synthetic_small, n_top=10_000)


def _spots_readout(sdata, model, key: str):
    """The fitted model's dense map (predicted once per session) read out over the spots as table ``key``."""
    if "he_pixgene" not in sdata.images:
        pg.tl.predict_dense(sdata, model, progress=False)
    return pg.tl.aggregate(sdata, shapes="spots", dense_key="he_pixgene", key_added=key, overwrite=True,
                           progress=False)


def test_evaluate_against_measured_normalises_like_scanpy(fitted_session):
    import anndata as ad
    import scanpy as sc

    sdata, model = fitted_session
    pred = _spots_readout(sdata, model, "spots_eval")
    scores = pg.tl.evaluate(sdata, predicted="spots_eval", measured="table", genes=model.genes,
                            normalize="predicted_total")
    measured = sdata.tables["table"]
    m = measured.copy()
    sc.pp.normalize_total(m, target_sum=1e4)
    sc.pp.log1p(m)
    p = ad.AnnData(pred[:, model.genes].X.copy(), obs=pd.DataFrame(index=pred.obs_names))
    p.X = p.X * (1e4 / pred.obs["pixgene_total_counts"].to_numpy()[:, None])
    sc.pp.log1p(p)
    order = pd.Index(measured.obs["instance_id"].astype(str)).get_indexer(pred.obs["instance_id"].astype(str))
    mt = np.asarray(m[order][:, model.genes].X.todense() if hasattr(m.X, "todense") else m[order][:, model.genes].X)
    ref = [scipy.stats.pearsonr(p.X[:, g], mt[:, g])[0] for g in range(len(model.genes))]
    np.testing.assert_allclose(scores.per_gene["pearson"].to_numpy(), ref, rtol=1e-6)
    assert sdata.tables["spots_eval"].uns["pixgene"]["evaluation"]["measured:table"]["PCC@M"] == scores.summary["PCC@M"]


def test_evaluate_without_library_size_warns_and_uses_the_gene_sum(fitted_session, caplog):
    sdata, model = fitted_session
    pred = _spots_readout(sdata, model, "spots_nototal")
    del pred.obs["pixgene_total_counts"]
    with caplog.at_level(logging.WARNING, logger="pixgene"):
        scores = pg.tl.evaluate(sdata, predicted="spots_nototal", measured="table", genes=model.genes,
                                inplace=False, normalize="predicted_total")
    assert any("no 'pixgene_total_counts' column" in r.getMessage() for r in caplog.records)
    measured = sdata.tables["table"]
    order = pd.Index(measured.obs["instance_id"].astype(str)).get_indexer(pred.obs["instance_id"].astype(str))
    x = np.asarray(measured.X.todense() if hasattr(measured.X, "todense") else measured.X, dtype=float)[order]
    t = np.log1p(1e4 * x[:, [measured.var_names.get_loc(g) for g in model.genes]] / x.sum(1, keepdims=True))
    p = np.asarray(pred[:, model.genes].X, dtype=float)
    p = np.log1p(1e4 * p / p.sum(1, keepdims=True))
    ref = [scipy.stats.pearsonr(p[:, g], t[:, g])[0] for g in range(len(model.genes))]
    np.testing.assert_allclose(scores.per_gene["pearson"].to_numpy(), ref, rtol=1e-6)


def test_evaluate_needs_exactly_one_reference(fitted_session):
    sdata, _ = fitted_session
    with pytest.raises(PixgeneInputError, match="exactly one reference"):
        pg.tl.evaluate(sdata, predicted="table")


def test_log_normalize_matches_scanpy_and_evaluate(fitted_session, caplog):
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    sdata, model = fitted_session
    pred = _spots_readout(sdata, model, "spots_lognorm")
    # measured raw counts, sparse, by their own row sums: scanpy's normalize_total + log1p
    measured = sdata.tables["table"].copy()
    measured.X = sp.csr_matrix(measured.X)
    pg.pp.log_normalize(measured, total=None)
    ref = measured.copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    assert sp.issparse(measured.layers["pixgene_lognorm"])
    np.testing.assert_allclose(measured.layers["pixgene_lognorm"].toarray(), ref.X.toarray(), rtol=1e-5, atol=1e-6)
    # a read-out by its predicted library size: scanpy's log1p of X scaled row by row by hand
    pg.pp.log_normalize(pred)
    by_hand = ad.AnnData(pred.X * (1e4 / pred.obs["pixgene_total_counts"].to_numpy()[:, None]))
    sc.pp.log1p(by_hand)
    np.testing.assert_allclose(pred.layers["pixgene_lognorm"], by_hand.X, rtol=1e-5, atol=1e-6)
    # Pearson of the two layers per gene is what pg.tl.evaluate reports
    scores = pg.tl.evaluate(sdata, predicted="spots_lognorm", measured="table", genes=model.genes, inplace=False,
                            normalize="predicted_total")
    order = pd.Index(measured.obs["instance_id"].astype(str)).get_indexer(pred.obs["instance_id"].astype(str))
    mt = measured[order][:, model.genes].layers["pixgene_lognorm"].toarray()
    pt = pred[:, model.genes].layers["pixgene_lognorm"]
    ref_r = [scipy.stats.pearsonr(pt[:, g], mt[:, g])[0] for g in range(len(model.genes))]
    np.testing.assert_allclose(scores.per_gene["pearson"].to_numpy(), ref_r, rtol=1e-4)
    # nothing is replaced unless asked; inplace=False only returns
    with pytest.raises(PixgeneInputError, match="already exists"):
        pg.pp.log_normalize(pred)
    again = pg.pp.log_normalize(pred, target_sum=100.0, inplace=False)
    np.testing.assert_allclose(again, np.log1p(pred.X * (100.0 / pred.obs["pixgene_total_counts"].to_numpy()[:, None])),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred.layers["pixgene_lognorm"], by_hand.X, rtol=1e-5, atol=1e-6)
    # rows off the map stay zero, with a warning; bad input fails before any work
    off = pred.copy()
    off.obs.loc[off.obs_names[0], "pixgene_total_counts"] = 0.0
    with caplog.at_level("WARNING", logger="pixgene"):
        out = pg.pp.log_normalize(off, inplace=False)
    assert not out[0].any() and "1 of" in caplog.text
    with pytest.raises(PixgeneInputError, match="obs column 'library'"):
        pg.pp.log_normalize(pred, total="library")
    off.obs.loc[off.obs_names[0], "pixgene_total_counts"] = -1.0
    with pytest.raises(PixgeneInputError, match="negative or non-finite"):
        pg.pp.log_normalize(off, overwrite=True)
    with pytest.raises(PixgeneInputError, match="target_sum"):
        pg.pp.log_normalize(pred, target_sum=0, inplace=False)
    # a layer instead of X (with its own totals column, or its row sums)
    pred.layers["doubled"] = pred.X * 2.0
    pred.obs["doubled_total"] = pred.obs["pixgene_total_counts"] * 2.0
    np.testing.assert_allclose(pg.pp.log_normalize(pred, layer="doubled", total="doubled_total", inplace=False),
                               by_hand.X, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pg.pp.log_normalize(pred, layer="doubled", total=None, inplace=False),
                               pg.pp.log_normalize(pred, total=None, inplace=False), rtol=1e-5, atol=1e-6)
    with pytest.raises(PixgeneInputError, match="layer 'missing'"):
        pg.pp.log_normalize(pred, layer="missing", inplace=False)


def test_expected_log_normalized_matches_the_poisson_sum():
    from pixgene._core.normalize import expected_log_normalized

    means = np.array([0.0, 1e-3, 0.5, 5.0, 29.9, 30.1, 45.0, 200.0, 5000.0])
    for depth in (50.0, 648.0, 1e4):
        got = expected_log_normalized((means / depth)[None, :], np.array([depth]))[0]
        ref = []
        for m in means:
            k = np.arange(int(m + 40 * np.sqrt(m + 1) + 50))
            ref.append((scipy.stats.poisson.pmf(k, m) * np.log1p(1e4 * k / depth)).sum())
        np.testing.assert_allclose(got, ref, atol=5e-5)
    # a row of depth 0 reads 0
    assert expected_log_normalized(np.full((1, 2), 0.1), np.zeros(1)).tolist() == [[0.0, 0.0]]


def test_evaluate_rules_against_values_computed_by_hand(fitted_session):
    sdata, model = fitted_session
    pred = _spots_readout(sdata, model, "spots_rules")
    scores = pg.tl.evaluate(sdata, predicted="spots_rules", measured="table", genes=model.genes, inplace=False,
                            normalize=["global", "predicted_total", "measured_depth"])
    assert scores.summary["normalize"] == "global"
    # the default against measured counts is the measured-depth rule, with the floor of depth alone
    default = pg.tl.evaluate(sdata, predicted="spots_rules", measured="table", genes=model.genes, inplace=False)
    assert default.summary["normalize"] == "measured_depth"
    assert default.summary["PCC@M"] == scores.by_rule["measured_depth"].summary["PCC@M"]
    shown = repr(default)
    assert ", measured_depth: " in shown and f"(depth alone {default.summary['depth_only PCC@M']:.3f})" in shown
    assert set(scores.by_rule) == {"global", "predicted_total", "measured_depth"}
    assert scores.summary["by_rule"]["measured_depth"]["PCC@M"] == scores.by_rule["measured_depth"].summary["PCC@M"]
    measured = sdata.tables["table"]
    order = pd.Index(measured.obs["instance_id"].astype(str)).get_indexer(pred.obs["instance_id"].astype(str))
    x = np.asarray(measured.X.todense() if hasattr(measured.X, "todense") else measured.X, dtype=float)[order]
    depth = x.sum(1)
    t = np.log1p(1e4 * x[:, [measured.var_names.get_loc(g) for g in model.genes]] / depth[:, None])
    p = np.asarray(pred[:, model.genes].X, dtype=float)
    total = pred.obs["pixgene_total_counts"].to_numpy(float)
    by_hand = {"global": np.log1p(1e4 * p / total.mean()), "predicted_total": np.log1p(1e4 * p / total[:, None])}
    # the measured-depth rule: the Poisson expectation at each spot's measured depth, summed term by term
    def expected(share):
        mean = depth[:, None] * share
        k = np.arange(int(mean.max() + 40 * np.sqrt(mean.max() + 1) + 50))
        pmf = scipy.stats.poisson.pmf(k, mean[..., None])
        return (pmf * np.log1p(1e4 * k / depth[:, None, None])).sum(-1)

    by_hand["measured_depth"] = expected(p / total[:, None])
    floor = expected(np.broadcast_to((p / total[:, None]).mean(0), p.shape))
    # pg.pp.log_normalize(depth=...) gives the same values for a table
    sub = pred[:, model.genes].copy()
    sub.obs["measured_total"] = depth
    np.testing.assert_allclose(pg.pp.log_normalize(sub, depth="measured_total", inplace=False),
                               by_hand["measured_depth"], atol=1e-4)
    for rule, values in by_hand.items():
        ref = [scipy.stats.pearsonr(values[:, g], t[:, g])[0] for g in range(len(model.genes))]
        np.testing.assert_allclose(scores.by_rule[rule].per_gene["pearson"].to_numpy(), ref, atol=1e-4)
    ref = np.mean([scipy.stats.pearsonr(floor[:, g], t[:, g])[0] for g in range(len(model.genes))])
    assert default.summary["depth_only PCC@M"] == pytest.approx(ref, abs=1e-4)
    with pytest.raises(PixgeneInputError, match="needs measured counts"):
        pg.tl.evaluate(sdata, predicted="spots_rules", truth="truth", normalize="measured_depth")
    with pytest.raises(PixgeneInputError, match="not a normalisation rule"):
        pg.tl.evaluate(sdata, predicted="spots_rules", measured="table", normalize="scanpy")
