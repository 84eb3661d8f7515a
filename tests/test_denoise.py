"""``pg.tl.denoise``: spatial folds, out-of-fold predictions, resuming, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIT_GENES

import pixgene as pg
from pixgene._core.validate import PixgeneInputError
from pixgene.tl._denoise import gamma_poisson_posterior, spatial_folds, spot_pitch_um

#: tiny fits: plumbing, not accuracy
FAST = dict(max_epochs=1, n_members=1, decoder=pg.tl.DecoderConfig(width=8), training=pg.tl.TrainConfig(n_views=1))


def test_spatial_folds_deal_whole_blocks_and_balance_the_folds():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 3000, size=(2000, 2))
    fold, block = spatial_folds(xy, 5, 250.0, np.random.default_rng(1))
    # blocks, computed another way: two spots share a block iff they share the 250 um grid cell
    cell = [tuple(c) for c in np.floor((xy - xy.min(0)) / 250.0).astype(int)]
    first = {}
    for i, c in enumerate(cell):
        first.setdefault(c, block[i])
        assert block[i] == first[c]
    assert len(first) == len(np.unique(block))
    for b in np.unique(block):  # a block lies in one fold
        assert len(np.unique(fold[block == b])) == 1
    sizes = np.bincount(fold, minlength=5)
    assert sizes.sum() == 2000 and sizes.max() - sizes.min() <= np.bincount(block).max()
    again, _ = spatial_folds(xy, 5, 250.0, np.random.default_rng(1))
    other, _ = spatial_folds(xy, 5, 250.0, np.random.default_rng(2))
    assert np.array_equal(fold, again) and not np.array_equal(fold, other)
    with pytest.raises(PixgeneInputError, match="fewer than n_folds"):
        spatial_folds(xy, 5, 5000.0, np.random.default_rng(1))


def test_spot_pitch_is_the_median_nearest_neighbour_distance():
    xs, ys = np.meshgrid(np.arange(10) * 100.0, np.arange(8) * 100.0)
    assert spot_pitch_um(np.c_[xs.ravel(), ys.ravel()]) == pytest.approx(100.0)


def _refuse_fits(monkeypatch, why: str) -> None:
    """Make the training engine fail the test if it runs (denoise's folds train through it, not pg.tl.fit)."""
    import pixgene.train

    monkeypatch.setattr(pixgene.train, "fit_model", lambda *a, **k: pytest.fail(why))


def test_denoise_predicts_each_spot_with_a_model_fitted_without_its_fold(synthetic_small, tmp_path, monkeypatch):
    """Fold k's values are those of a model fitted, with the same settings, on the other fold's spots (built
    here by dropping rows from the SpatialData) and the further slide: the same model id and the same read-out
    over fold k's spots. Called again with the checkpoint directory, nothing is fitted and the table is the
    same; a run with other settings refuses the directory."""
    genes = FIT_GENES[:3]
    other = pg.datasets.synthetic(seed=5, size_um=320.0)  # a further slide that trains every fold
    table = pg.tl.denoise(synthetic_small, genes=genes, n_folds=2, random_state=4, progress=False,
                          train_with=other, checkpoint_dir=tmp_path / "ck", **FAST)
    spots = synthetic_small.shapes["spots"]
    assert list(table.obs_names) == [str(i) for i in spots.index]  # every spot has counts here
    assert synthetic_small.tables["spots_denoised"] is table
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == "spots" and list(table.obs[attrs["instance_key"]]) == list(spots.index)
    # the folds are spatial_folds' of the spot centres in microns (1 um per pixel on this slide)
    xy = np.c_[spots.geometry.x, spots.geometry.y]
    fold, _ = spatial_folds(xy, 2, table.uns["pixgene"]["params"]["block_um"], np.random.default_rng(4))
    assert np.array_equal(table.obs["pixgene_fold"].to_numpy(), fold)
    assert table.uns["pixgene"]["params"]["block_um"] == pytest.approx(4 * spot_pitch_um(xy))

    # the posterior layer: the measured counts (matched by instance id) and X, on the slide's depth
    t = synthetic_small.tables["table"]
    ids = t.obs[t.uns["spatialdata_attrs"]["instance_key"]].astype(str).tolist()
    measured = t[[ids.index(i) for i in table.obs_names]]
    X = measured[:, genes].X
    y = np.column_stack([X.toarray() if hasattr(X, "toarray") else X, np.asarray(measured.X.sum(1)).ravel()])
    mu = np.column_stack([table.X, table.obs["pixgene_total_counts"]])
    post, _ = gamma_poisson_posterior(y, mu * y[:, -1].sum() / mu[:, -1].sum())
    np.testing.assert_allclose(table.layers["pixgene_posterior"], post[:, :-1], rtol=1e-5)
    np.testing.assert_allclose(table.obs["pixgene_posterior_total_counts"], post[:, -1], rtol=1e-9)

    held = np.flatnonzero(fold == 1)
    train = synthetic_small.subset(["he", "spots", "table"])
    keep = spots.index[fold == 0]
    train.shapes["spots"] = spots.loc[keep]
    t = synthetic_small.tables["table"]
    train.tables["table"] = t[t.obs[t.uns["spatialdata_attrs"]["instance_key"]].isin(keep).to_numpy()].copy()
    model = pg.tl.fit([train, other], genes=genes, random_state=4, progress=False, **FAST)
    assert model.model_id == table.uns["pixgene"]["folds"]["1"]["model_id"]
    assert table.uns["pixgene"]["folds"]["1"]["n_train_spots"] == len(keep)
    assert table.uns["pixgene"]["folds"]["1"]["n_train_spots_other_slides"] == len(other.shapes["spots"])
    pg.tl.predict_dense(synthetic_small, model, key_added="fold1_map", progress=False)
    ref = pg.tl.aggregate(synthetic_small, shapes="spots", dense_key="fold1_map", inplace=False, progress=False)
    np.testing.assert_allclose(table.X[held], ref[:, genes].X[held], rtol=1e-5)
    np.testing.assert_allclose(table.obs["pixgene_total_counts"].to_numpy()[held],
                               ref.obs["pixgene_total_counts"].to_numpy()[held], rtol=1e-5)
    assert not np.allclose(table.X[fold == 0], ref[:, genes].X[fold == 0], rtol=1e-3)  # fold 0: another model

    # resumed: both folds are read back, nothing is fitted, the same values
    _refuse_fits(monkeypatch, "fit ran on a resumed denoise")
    again = pg.tl.denoise(synthetic_small, genes=genes, n_folds=2, random_state=4, progress=False,
                          train_with=other, checkpoint_dir=tmp_path / "ck", key_added="again", **FAST)
    np.testing.assert_array_equal(again.X, table.X)
    assert again.uns["pixgene"]["model_ids"] == table.uns["pixgene"]["model_ids"]
    # another seed deals other folds: the directory holds another run's folds and is left alone
    before = (tmp_path / "ck" / "fold_0" / "denoised.h5ad").read_bytes()
    with pytest.raises(PixgeneInputError, match=r"checkpoint_dir .*ck.* fold 0 of another denoise run"):
        pg.tl.denoise(synthetic_small, genes=genes, n_folds=2, random_state=5, progress=False,
                      train_with=other, checkpoint_dir=tmp_path / "ck", key_added="other", **FAST)
    assert (tmp_path / "ck" / "fold_0" / "denoised.h5ad").read_bytes() == before


def test_denoise_refuses_bad_input_before_any_work(synthetic_small, monkeypatch):
    _refuse_fits(monkeypatch, "fit ran on bad input")
    genes = FIT_GENES[:3]
    with pytest.raises(PixgeneInputError, match="n_folds"):
        pg.tl.denoise(synthetic_small, genes=genes, n_folds=1)
    with pytest.raises(PixgeneInputError, match="does not pass on to its fits: epochs"):
        pg.tl.denoise(synthetic_small, genes=genes, epochs=3)
    with pytest.raises(PixgeneInputError, match="feature_cache.*denoise sets the slides, keys"):
        pg.tl.denoise(synthetic_small, genes=genes, feature_cache="x")
    with pytest.raises(PixgeneInputError, match="fewer than n_folds"):
        pg.tl.denoise(synthetic_small, genes=genes, block_um=5000.0)
    with pytest.raises(PixgeneInputError, match="NOT_A_GENE"):
        pg.tl.denoise(synthetic_small, genes=["NOT_A_GENE"])
    synthetic_small.tables["spots_denoised"] = synthetic_small.tables["table"].copy()
    with pytest.raises(PixgeneInputError, match="already exists"):
        pg.tl.denoise(synthetic_small, genes=genes)


def test_gamma_poisson_posterior_matches_numerical_integration_and_shrinks_the_error():
    from scipy import integrate, stats

    rng = np.random.default_rng(0)
    n, a = 4000, np.array([2.0, 20.0])
    mu = rng.uniform(1, 30, size=(n, 2))
    lam = rng.gamma(a, mu / a)  # mean mu, shape a
    y = rng.poisson(lam)
    post, inv_a = gamma_poisson_posterior(y, mu)
    np.testing.assert_allclose(inv_a, 1 / a, rtol=0.15)  # the moment estimate of 1 / shape
    for i, g in [(0, 0), (1, 1), (2, 0)]:  # E[lambda | y] by quadrature under the estimated prior
        prior = stats.gamma(1 / inv_a[g], scale=mu[i, g] * inv_a[g])
        num = integrate.quad(lambda t: t * prior.pdf(t) * stats.poisson.pmf(y[i, g], t), 0, 400)[0]
        den = integrate.quad(lambda t: prior.pdf(t) * stats.poisson.pmf(y[i, g], t), 0, 400)[0]
        assert post[i, g] == pytest.approx(num / den, rel=1e-6)
    for g in range(2):  # closer to the truth than either the counts or the prediction alone
        err = lambda x: np.mean((x[:, g] - lam[:, g]) ** 2)  # noqa: E731
        assert err(post) < min(err(y), err(mu))
    # a prediction the counts only scatter around by Poisson noise is (nearly) kept as it is
    exact, inv = gamma_poisson_posterior(rng.poisson(mu[:, :1]), mu[:, :1])
    assert inv[0] < 0.01 and np.abs(exact / mu[:, :1] - 1).max() < 0.2


def test_denoise_never_changes_the_model_a_slide_remembers_and_frees_its_fold_models(monkeypatch):
    """After ``denoise(a, train_with=[b])``, ``predict_dense(b)`` uses the model the user fitted on ``b`` (a slide
    the user never fitted on refuses, naming the fix), and the folds' models are gone once collected."""
    import gc
    import weakref

    import pixgene.train

    genes = FIT_GENES[:2]
    quick = {"max_epochs": 1, "n_members": 1, "decoder": pg.tl.DecoderConfig(width=8),
             "training": pg.tl.TrainConfig(n_views=1, tile_context_px=0)}
    a = pg.datasets.synthetic(seed=3, size_um=320.0)
    b = pg.datasets.synthetic(seed=5, size_um=320.0)
    c = pg.datasets.synthetic(seed=6, size_um=320.0)
    own = pg.tl.fit(b, genes=genes, progress=False, random_state=11, **quick)
    folds, engine = [], pixgene.train.fit_model

    def recorded(*args, **kwargs):
        model = engine(*args, **kwargs)
        folds.append(weakref.ref(model))
        return model

    monkeypatch.setattr(pixgene.train, "fit_model", recorded)
    pg.tl.denoise(a, genes=genes, n_folds=2, block_um=100.0, train_with=[b, c], progress=False, **quick)
    assert len(folds) == 2 and own.model_id not in {r().model_id for r in folds if r() is not None}
    pg.tl.predict_dense(b, um_per_px=8.0, progress=False)
    assert b.attrs["pixgene"]["dense"]["he_pixgene"]["model_id"] == own.model_id
    with pytest.raises(PixgeneInputError, match="none was fitted on this SpatialData"):
        pg.tl.predict_dense(c, um_per_px=8.0, progress=False)
    gc.collect()
    assert [r() for r in folds] == [None, None]
    # a remembered model lives as long as its slide, no longer
    mine = weakref.ref(own)
    del own, b
    gc.collect()
    assert mine() is None
