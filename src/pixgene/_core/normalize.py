"""Numpy versions of the normalisations the losses use, for scoring without importing torch."""

from __future__ import annotations

import numpy as np
from scipy.special import gammaln

NORMALIZE_TARGET = 1e4


def log_normalize_np(counts: np.ndarray, totals: np.ndarray,
                     target_sum: float = NORMALIZE_TARGET) -> np.ndarray:
    """log1p(target_sum * counts / total) per row; rows with a zero total stay zero."""
    return np.log1p(counts * row_scale(totals, target_sum)[:, None])


def row_scale(totals: np.ndarray, target_sum: float = NORMALIZE_TARGET) -> np.ndarray:
    """target_sum / total per row, 0 where the total is 0."""
    totals = np.asarray(totals, dtype=np.float64)
    return np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)


#: how a read-out (expected counts ``x`` with predicted library sizes ``T``) is put on the scale of measured
#: ``log1p(1e4 counts / total)``; see :func:`normalize_readout`
READOUT_RULES = ("predicted_total", "global", "measured_depth")


def normalize_readout(pred: np.ndarray, pred_total: np.ndarray, rule: str,
                      measured_total: np.ndarray | None = None,
                      target_sum: float = NORMALIZE_TARGET) -> np.ndarray:
    """A read-out's expected counts (shapes x genes) log-normalised by ``rule``.

    ``"predicted_total"``: ``log1p(target_sum * x / T)`` with each shape's predicted library size ``T``: the
    predicted composition. ``"global"``: ``log1p(target_sum * x / mean(T))``, one constant for the table: the
    predicted counts, with their predicted depth. ``"measured_depth"``: the expected value of
    ``log1p(target_sum * X / D)`` for a Poisson count ``X`` of mean ``D x / T``, with ``D`` each shape's measured
    library size (``measured_total``): what the measurement would read at its own depth, had the prediction been
    its composition.
    """
    pred = np.asarray(pred, dtype=np.float64)
    pred_total = np.asarray(pred_total, dtype=np.float64)
    if rule == "predicted_total":
        return log_normalize_np(pred, pred_total, target_sum)
    if rule == "global":
        mean_total = float(pred_total[pred_total > 0].mean()) if (pred_total > 0).any() else 0.0
        return log_normalize_np(pred, np.full(len(pred), mean_total), target_sum)
    if rule == "measured_depth":
        if measured_total is None:
            raise ValueError("the 'measured_depth' rule needs the measured library sizes")
        share = pred * row_scale(pred_total, 1.0)[:, None]
        return expected_log_normalized(share, np.asarray(measured_total, dtype=np.float64), target_sum)
    raise ValueError(f"unknown rule {rule!r}; one of {READOUT_RULES}")


def depth_only_readout(pred: np.ndarray, pred_total: np.ndarray, measured_total: np.ndarray,
                       target_sum: float = NORMALIZE_TARGET) -> np.ndarray:
    """The ``"measured_depth"`` reading of a read-out that holds its mean predicted composition (over shapes) in
    every shape: what depth alone predicts of the measurement, the floor a prediction has to clear."""
    share = (np.asarray(pred, dtype=np.float64) * row_scale(pred_total, 1.0)[:, None]).mean(0)
    return expected_log_normalized(np.broadcast_to(share, np.shape(pred)),
                                   np.asarray(measured_total, dtype=np.float64), target_sum)


#: Poisson means above which the expectation is taken from its expansion about the mean (the sum's truncation
#: error is below 1e-6 up to here with the terms kept)
_SUM_BELOW = 30.0
_TERMS = 96


def expected_log_normalized(share: np.ndarray, depth: np.ndarray,
                            target_sum: float = NORMALIZE_TARGET, chunk: int = 2048) -> np.ndarray:
    """E[log1p(target_sum * X / D)] for X ~ Poisson(D * share), per row's depth ``D`` (rows of depth 0 give 0).

    Means up to 30 are summed over the Poisson probabilities; larger ones use the expansion of
    ``f(k) = log1p(c k)`` (c = target_sum / D) about the mean to the fourth central moment, within 5e-5.
    """
    share = np.asarray(share, dtype=np.float64)
    depth = np.asarray(depth, dtype=np.float64)
    out = np.zeros_like(share)
    k = np.arange(_TERMS, dtype=np.float64)
    lgk = gammaln(k + 1)
    for s in range(0, len(share), chunk):
        d = depth[s:s + chunk]
        c = row_scale(d, target_sum)[:, None]
        m = share[s:s + chunk] * d[:, None]
        low = m <= _SUM_BELOW
        big = np.where(low, 0.0, m)
        # the Poisson central moments m, m, 3m^2 + m against f's derivatives -c^2/u^2, 2c^3/u^3, -6c^4/u^4
        u = 1.0 + c * big
        val = (np.log1p(c * big) - (c / u) ** 2 * big / 2.0 + (c / u) ** 3 * big / 3.0
               - (c / u) ** 4 * (3.0 * big ** 2 + big) / 4.0)
        ml = np.where(low, m, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            # (rows, genes, terms) Poisson log-probabilities; k = 0 is -m, also where m = 0
            logp = k * np.log(ml)[..., None] - ml[..., None] - lgk
        logp[..., 0] = -ml
        vals = np.log1p(c[..., None] * k)
        summed = (np.exp(logp) * vals).sum(-1)
        out[s:s + chunk] = np.where(low, summed, val)
    out[depth <= 0] = 0.0
    return out
