"""A fitted model's negative-binomial dispersions, as its training summary recorded them."""

from __future__ import annotations

from typing import Any


def nb_dispersion(model: Any) -> list[list[float]] | None:
    """Each member's fitted negative-binomial inverse dispersion ``theta`` per output (genes, then the total),
    from the model's training summary (``training["theta"]``, and ``training["members"][k]["theta"]`` for an
    ensemble); None for a model fitted with the Poisson likelihood or without a recorded ``theta``.

    ``theta`` was fitted with the training loss (``pixgene.nn._losses.negative_binomial_nll``) on each
    training spot's expected counts times its slide's capture efficiency: variance = mu + mu^2 / theta.
    """
    training = getattr(model, "training", None) or {}
    if (training.get("params") or {}).get("likelihood", "nb") != "nb":
        return None
    n_out = len(model.outputs)
    members = training.get("members") or [training]
    thetas = [m.get("theta") for m in members]
    if not thetas or any(t is None or len(t) != n_out for t in thetas):
        return None
    return [[float(v) for v in t] for t in thetas]
