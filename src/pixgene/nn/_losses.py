"""Losses on measured spots: count likelihood on expected counts, MSE and Pearson on log-normalised values."""

from __future__ import annotations

import torch

from .._core.normalize import NORMALIZE_TARGET


def log_normalize(counts: torch.Tensor, totals: torch.Tensor) -> torch.Tensor:
    """log1p(1e4 * counts / total) per spot, as ``sc.pp.normalize_total`` + ``sc.pp.log1p`` would give."""
    return torch.log1p(NORMALIZE_TARGET * counts / totals.clamp_min(1e-8)[:, None])


def poisson_nll(mu: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    mu = mu.clamp_min(1e-8)
    return mu - counts * torch.log(mu) + torch.lgamma(counts + 1)


def negative_binomial_nll(mu: torch.Tensor, counts: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """NB with mean ``mu`` and inverse dispersion ``theta`` per gene (scvi-tools' parameterisation)."""
    theta = log_theta.exp()
    mu = mu.clamp_min(1e-8)
    log_theta_mu = torch.log(theta + mu)
    return -(
        theta * (torch.log(theta) - log_theta_mu)
        + counts * (torch.log(mu) - log_theta_mu)
        + torch.lgamma(counts + theta)
        - torch.lgamma(theta)
        - torch.lgamma(counts + 1)
    )


def pearson_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean over genes of the Pearson correlation across spots (genes constant in the batch skipped)."""
    if pred.shape[0] < 3:
        return pred.new_zeros(())
    p = pred - pred.mean(0, keepdim=True)
    t = target - target.mean(0, keepdim=True)
    denom = p.norm(dim=0) * t.norm(dim=0)
    valid = denom > 1e-8
    if not bool(valid.any()):
        return pred.new_zeros(())
    r = (p * t).sum(0)[valid] / denom[valid]
    return 1.0 - r.mean()
