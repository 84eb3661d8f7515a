"""Negative-binomial count intervals: quantiles of one NB, of a mixture of the members' NBs, and the members'
dispersions pooled (numpy and scipy only)."""

from __future__ import annotations

import numpy as np


def nb_quantiles(mu: np.ndarray, theta: np.ndarray, q: float) -> np.ndarray:
    """The ``q`` quantile of counts ~ negative binomial of mean ``mu`` and inverse dispersion ``theta``
    (variance ``mu + mu^2 / theta``; scipy's ``nbinom(n=theta, p=theta / (theta + mu))``), broadcast."""
    from scipy.stats import nbinom

    mu = np.asarray(mu, dtype=np.float64)
    theta = np.asarray(theta, dtype=np.float64)
    return nbinom.ppf(q, theta, theta / (theta + np.maximum(mu, 0.0)))



def nb_mixture_quantiles(mu: np.ndarray, theta: np.ndarray, q: float) -> np.ndarray:
    """The ``q`` quantile of the equal mixture of negative binomials: ``mu`` (n, M, G) the members' means,
    ``theta`` (M, G) their inverse dispersions; returns (n, G) whole counts.

    The mixture's quantile lies between its components' smallest and largest; it is found there by bisection
    over whole counts on the mixture's CDF (the mean of the components' CDFs).
    """
    from scipy.stats import nbinom

    mu = np.maximum(np.asarray(mu, dtype=np.float64), 0.0)
    theta = np.broadcast_to(np.asarray(theta, dtype=np.float64), mu.shape[1:])
    p = theta / (theta + mu)
    parts = nbinom.ppf(q, theta, p)
    lo, hi = parts.min(axis=1), parts.max(axis=1)
    todo = np.flatnonzero(lo < hi)
    rows, cols = np.unravel_index(todo, lo.shape)
    lo_t, hi_t = lo.ravel()[todo], hi.ravel()[todo]
    theta_t = theta[:, cols].T  # (k, M)
    p_t = p[rows, :, cols]  # (k, M)
    while len(lo_t) and np.any(lo_t < hi_t):
        mid = np.floor((lo_t + hi_t) / 2)
        cdf = nbinom.cdf(mid[:, None], theta_t, p_t).mean(axis=1)
        above = cdf >= q
        hi_t = np.where(above, mid, hi_t)
        lo_t = np.where(above, lo_t, mid + 1)
    out = lo.copy()
    out.ravel()[todo] = lo_t
    return out



def pooled_theta(theta: np.ndarray) -> np.ndarray:
    """One inverse dispersion per output from the members' (M, C): their geometric mean."""
    theta = np.asarray(theta, dtype=np.float64)
    return np.exp(np.log(theta).mean(axis=0))
