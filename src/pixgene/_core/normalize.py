"""Numpy versions of the normalisations the losses use, for scoring without importing torch."""

from __future__ import annotations

import numpy as np

NORMALIZE_TARGET = 1e4


def log_normalize_np(counts: np.ndarray, totals: np.ndarray,
                     target_sum: float = NORMALIZE_TARGET) -> np.ndarray:
    """log1p(target_sum * counts / total) per row; rows with a zero total stay zero."""
    return np.log1p(counts * row_scale(totals, target_sum)[:, None])


def row_scale(totals: np.ndarray, target_sum: float = NORMALIZE_TARGET) -> np.ndarray:
    """target_sum / total per row, 0 where the total is 0."""
    totals = np.asarray(totals, dtype=np.float64)
    return np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
