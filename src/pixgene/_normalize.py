"""Numpy versions of the normalisations the losses use, for scoring without importing torch."""

from __future__ import annotations

import numpy as np

NORMALIZE_TARGET = 1e4


def log_normalize_np(counts: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """log1p(1e4 * counts / total) per row; rows with a zero total stay zero."""
    totals = np.asarray(totals, dtype=np.float64)
    scale = np.divide(NORMALIZE_TARGET, totals, out=np.zeros_like(totals), where=totals > 0)
    return np.log1p(counts * scale[:, None])
