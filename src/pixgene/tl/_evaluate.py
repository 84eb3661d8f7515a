"""``pg.tl.evaluate``: per-gene Pearson and PCC@F/S/M, MSE, MAE against measurements or a ground-truth map."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._core.keys import TOTAL_OBS, UNS_KEY
from .._core.normalize import READOUT_RULES, depth_only_readout, log_normalize_np, normalize_readout
from .._core.validate import fail, require_element

logger = logging.getLogger(__name__)


@dataclass
class Scores:
    """Per-gene scores and the summary (``PCC@F``, ``PCC@S``, ``PCC@M``, ``MSE``, ``MAE``, counts)."""

    per_gene: pd.DataFrame
    summary: dict = field(default_factory=dict)
    #: with several normalisations asked for (``evaluate(normalize=[...])``): each one's scores, by rule name
    by_rule: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        s = self.summary
        rule = f", {s['normalize']}" if isinstance(s.get("normalize"), str) else ""
        floor = f" (depth alone {s['depth_only PCC@M']:.3f})" if "depth_only PCC@M" in s else ""
        return (
            f"Scores({s.get('n_genes')} genes x {s.get('n_shapes')} shapes{rule}: PCC@F {s['PCC@F']:.3f}, "
            f"PCC@S {s['PCC@S']:.3f}, PCC@M {s['PCC@M']:.3f}{floor}, MSE {s['MSE']:.4f}, MAE {s['MAE']:.4f})"
        )


def pearson_per_column(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each column of ``a`` with the same column of ``b``; NaN where either is constant."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    denom = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(0) / denom
    r[denom <= 1e-12] = np.nan
    return r


def score_matrices(pred: np.ndarray, true: np.ndarray, genes: list[str]) -> Scores:
    """Scores of already-transformed matrices (shapes x genes)."""
    r = pearson_per_column(pred, true)
    per_gene = pd.DataFrame(
        {"pearson": r, "mse": ((pred - true) ** 2).mean(0), "mae": np.abs(pred - true).mean(0),
         "mean_true": true.mean(0), "mean_pred": pred.mean(0)},
        index=pd.Index(genes, name="gene"),
    )
    valid = r[np.isfinite(r)]
    summary = {
        "PCC@F": float(np.quantile(valid, 0.25)) if valid.size else float("nan"),
        "PCC@S": float(np.median(valid)) if valid.size else float("nan"),
        "PCC@M": float(valid.mean()) if valid.size else float("nan"),
        "MSE": float(((pred - true) ** 2).mean()),
        "MAE": float(np.abs(pred - true).mean()),
        "n_genes": int(len(genes)),
        "n_genes_scored": int(valid.size),
        "n_shapes": int(pred.shape[0]),
    }
    return Scores(per_gene, summary)


def _dense(x) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


PCC_KEYS = ("PCC@F", "PCC@S", "PCC@M")


def _pcc_summary(scores: Scores) -> dict:
    return {k: scores.summary[k] for k in (*PCC_KEYS, "MSE", "MAE")}


def _rules(normalize: bool | str | Sequence[str], reference: str) -> list[str | None]:
    """The normalisation rules asked for, checked: None stands for raw counts (``normalize=False``)."""
    if normalize is False:
        return [None]
    if normalize is True:
        return ["measured_depth" if reference == "measured" else "predicted_total"]
    rules = [normalize] if isinstance(normalize, str) else list(normalize)
    bad = [r for r in rules if r not in READOUT_RULES]
    if bad or not rules:
        fail("normalize", f"{bad or rules!r}: not a normalisation rule",
             f"Pass True (the default rule), False (raw counts), or one or more of {READOUT_RULES}")
    if reference == "truth" and "measured_depth" in rules:
        fail("normalize", "'measured_depth' needs measured counts, and the reference is a ground-truth map",
             "Score against a map with 'predicted_total' or 'global', or pass measured=<table key>")
    return list(dict.fromkeys(rules))


def evaluate(
    sdata: Any,
    *,
    predicted: str,
    measured: str | None = None,
    truth: str | None = None,
    genes: list[str] | None = None,
    normalize: bool | str | Sequence[str] = True,
    inplace: bool = True,
) -> Scores:
    """Score a read-out table against measured counts on the same shapes or against a ground-truth map.

    Parameters
    ----------
    sdata
        The SpatialData.
    predicted
        A read-out table from :func:`pixgene.tl.aggregate` (X = expected counts).
    measured
        A table of raw counts annotating the same shapes (matched by instance id).
    truth
        Instead of ``measured``: a ground-truth intensity map (e.g. ``"truth"`` of the synthetic data); it is
        integrated exactly over the same shapes as ``predicted``.
    genes
        Genes to score; default: all genes of ``predicted`` present in the reference.
    normalize
        How the read-out is put on the scale of the reference, which is always ``log1p(1e4 * x / total)`` per
        shape (measured total = all genes of the table; a ground-truth map's total = its
        ``pixgene_total_counts``). The read-out, with ``T`` its predicted library size (``pixgene_total_counts``;
        where the table lacks it, the sum of the scored genes, with a warning), by rule:

        - ``"predicted_total"``: ``log1p(1e4 * x / T)``, the predicted composition, as
          :func:`pixgene.pp.log_normalize` gives it.
        - ``"global"``: ``log1p(1e4 * x / mean(T))``, one constant for the table: the predicted counts with
          their predicted depth.
        - ``"measured_depth"``: what the measurement would read at each shape's own measured library size
          ``D`` had the prediction been its composition: the mean of ``log1p(1e4 * X / D)`` for a Poisson
          count ``X`` of mean ``D * x / T`` (measured references only).

        ``True`` (default): ``"measured_depth"`` against measured counts, ``"predicted_total"`` against a
        ground-truth map. Measured log-normalised values depend on depth as well as on composition: at a
        few hundred counts per spot a gene's value is mostly 0 or one count's ``log1p(1e4 / D)``, so it rises
        with the spot's depth, and spot-to-spot depth differences then dominate its variation. Only
        ``"measured_depth"`` puts the prediction through the same sampling; the other two rules lose most
        of their correlation on shallow sections (docs/concepts.md, "Normalise after the read-out"). Because
        depth alone now predicts part of the measurement, the summary also gives ``"depth_only PCC@M"`` (and
        F, S): the scores of a read-out holding the table's mean predicted composition in every shape, the
        floor a prediction has to clear. A list scores every rule in it: the returned scores are the
        first's, each rule's are in ``Scores.by_rule``. ``False`` compares the raw expected counts.
    inplace
        Store the summary under ``sdata.tables[predicted].uns["pixgene"]["evaluation"]``.

    Returns
    -------
    :class:`Scores` with ``per_gene`` (pearson, mse, mae, means) and ``summary`` (PCC@F/S/M: first quartile,
    median and mean of the per-gene Pearson across shapes; MSE and MAE over shapes and genes; ``normalize``:
    the rule used; with ``"measured_depth"``, the ``depth_only`` scores; with several rules, ``by_rule``: each
    rule's PCC@F/S/M, MSE and MAE).
    """
    if (measured is None) == (truth is None):
        fail("evaluate", "exactly one reference is needed", "Pass measured=<table key> or truth=<dense map key>")
    rules = _rules(normalize, "measured" if measured is not None else "truth")
    pred_table = require_element(sdata, predicted, "tables")
    attrs = pred_table.uns.get("spatialdata_attrs", {})
    instance_key = attrs.get("instance_key")
    if measured is not None:
        ref = require_element(sdata, measured, "tables")
        ref_attrs = ref.uns.get("spatialdata_attrs", {})
        if ref_attrs.get("region") != attrs.get("region"):
            fail(f"table {measured!r}", f"annotates {ref_attrs.get('region')!r}, not {attrs.get('region')!r}",
                 "Aggregate the dense map over the measured spots first (pg.tl.aggregate(shapes=...))")
        ref_ids = ref.obs[ref_attrs.get("instance_key")].astype(str)
        pos = pd.Series(np.arange(len(ref)), index=ref_ids.to_numpy())
        pos = pos[~pos.index.duplicated()]
        idx = pos.reindex(pred_table.obs[instance_key].astype(str).to_numpy()).to_numpy()
        keep = ~np.isnan(idx)
        if not keep.any():
            fail(f"table {measured!r}", "shares no instance ids with the predicted table", "Score the same shapes")
        ref_rows = ref[idx[keep].astype(int)]
        ref_total = np.asarray(ref_rows.X.sum(1)).ravel()
        pred_rows = pred_table[keep]
        label = f"measured:{measured}"
    else:
        from ._aggregate import aggregate

        region = attrs.get("region")
        ref_rows = aggregate(sdata, shapes=region, dense_key=truth, inplace=False, progress=False)
        ref_total = ref_rows.obs[TOTAL_OBS].to_numpy() if TOTAL_OBS in ref_rows.obs else None
        pred_rows = pred_table
        label = f"truth:{truth}"
    if genes is None:
        genes = [g for g in pred_rows.var_names if g in set(ref_rows.var_names)]
    missing = [g for g in genes if g not in set(ref_rows.var_names) or g not in set(pred_rows.var_names)]
    if missing or not genes:
        fail("genes", f"not in both tables: {missing[:10]}", "Score genes that were predicted and measured")
    p = _dense(pred_rows[:, genes].X).astype(np.float64)
    t = _dense(ref_rows[:, genes].X).astype(np.float64)
    if rules != [None]:
        if TOTAL_OBS in pred_rows.obs:
            p_total = pred_rows.obs[TOTAL_OBS].to_numpy(float)
        else:
            logger.warning("table %r has no %r column: its rows are normalised by the sum of the %d scored genes "
                           "instead (read-outs of pg.tl.aggregate carry it)", predicted, TOTAL_OBS, len(genes))
            p_total = p.sum(1)
        if ref_total is None:
            logger.warning("%s has no %r channel: its rows are normalised by the sum of the %d scored genes",
                           label, TOTAL_OBS, len(genes))
            ref_total = t.sum(1)
        ref_total = np.asarray(ref_total, float)
        t = log_normalize_np(t, ref_total)
    by_rule = {}
    for rule in rules:
        values = p if rule is None else normalize_readout(p, p_total, rule, measured_total=ref_total)
        by_rule[rule] = score_matrices(values, t, list(genes))
        by_rule[rule].summary.update(reference=label, normalize=rule if rule is not None else False)
    if "measured_depth" in by_rule:
        floor_scores = score_matrices(depth_only_readout(p, p_total, ref_total), t, list(genes)).summary
        by_rule["measured_depth"].summary.update({f"depth_only {k}": floor_scores[k] for k in PCC_KEYS})
    scores = by_rule[rules[0]]
    if len(rules) > 1:
        scores.by_rule = by_rule
        scores.summary["by_rule"] = {r: _pcc_summary(sc) for r, sc in by_rule.items()}
    if inplace:
        info = dict(pred_table.uns.get(UNS_KEY, {}))
        evals = dict(info.get("evaluation", {}))
        evals[label] = scores.summary
        info["evaluation"] = evals
        pred_table.uns[UNS_KEY] = info
    logger.info("%s vs %s (%s): %r", predicted, label, scores.summary["normalize"], scores)
    return scores
