"""Per-gene evaluation scores and training curves."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._core.validate import fail
from ._utils import finish, new_axes

logger = logging.getLogger(__name__)

__all__ = ["gene_scores", "training_curves"]

#: genes beyond this many are drawn as a rank plot without per-gene tick labels
MAX_LABELLED_GENES = 60


def summary_marks(values: np.ndarray, metric: str) -> list[tuple[str, float]]:
    """First quartile, median and mean over genes: PCC@F / PCC@S / PCC@M when the metric is Pearson's r."""
    q1, median, mean = np.quantile(values, 0.25), np.quantile(values, 0.5), float(np.mean(values))
    if metric.lower() in {"pearson", "pcc"}:
        names = ["PCC@F (Q1)", "PCC@S (median)", "PCC@M (mean)"]
    else:
        names = [f"Q1 {metric}", f"median {metric}", f"mean {metric}"]
    return list(zip(names, [float(q1), float(median), mean], strict=True))


def gene_scores(
    scores: pd.DataFrame,
    *,
    metric: str = "pearson",
    n_top: int | None = None,
    kind: str = "bar",
    color: str = "#4c72b0",
    title: str | None = None,
    ax: Any = None,
    save: str | None = None,
    show: bool | None = None,
) -> Any:
    """Per-gene scores, best first, with the first quartile, median and mean over all genes marked.

    For ``metric="pearson"`` the marks are the PCC@F, PCC@S and PCC@M of PixNet's evaluation.

    Parameters
    ----------
    scores
        One row per gene (index = gene names), e.g. from ``pg.tl.evaluate``; must have a ``metric`` column.
    metric
        The column to plot.
    n_top
        Draw only the ``n_top`` best genes; the marks still summarise all genes with a finite score.
    kind
        ``"bar"`` (genes ranked, best first) or ``"strip"`` (one jittered column of points).
    color
        Colour of bars / points.
    title
        Replaces the default title.
    ax, save, show
        Axes to draw into; path to save the figure to; whether to show it (default: only on an interactive
        backend when not saving).

    Returns
    -------
    The matplotlib Axes; the three marks are horizontal lines labelled with their name, at their value.
    """
    if not isinstance(scores, pd.DataFrame):
        fail("scores", f"is a {type(scores).__name__}, not a DataFrame", "Pass pg.tl.evaluate's DataFrame")
    if metric not in scores.columns:
        fail("scores", f"has no column {metric!r} (it has {list(scores.columns)})", "Pass metric=<a column>")
    if kind not in {"bar", "strip"}:
        fail("scores", f"kind={kind!r} is not 'bar' or 'strip'", "Pass kind='bar' or kind='strip'")
    if n_top is not None and n_top < 1:
        fail("scores", f"n_top={n_top} is not a positive integer", "Pass n_top >= 1 or None for all genes")
    values = pd.to_numeric(scores[metric], errors="coerce").astype(float)
    finite = values[np.isfinite(values.to_numpy())]
    if finite.empty:
        fail("scores", f"column {metric!r} has no finite value", "Evaluate on spots where genes vary")
    if len(finite) < len(values):
        logger.info("%d gene(s) without a finite %s left out (constant in measured or predicted)",
                    len(values) - len(finite), metric)
    ranked = finite.sort_values(ascending=False)
    shown = ranked if n_top is None else ranked.iloc[:n_top]

    fig, ax = new_axes(ax, (max(4.0, min(16.0, 0.18 * len(shown) + 2.0)) if kind == "bar" else 3.5, 4.0))
    if kind == "bar":
        positions = np.arange(len(shown))
        ax.bar(positions, shown.to_numpy(), color=color, width=0.85)
        if len(shown) <= MAX_LABELLED_GENES:
            ax.set_xticks(positions, [str(g) for g in shown.index], rotation=90, fontsize=7)
        else:
            ax.set_xlabel(f"genes ranked by {metric}")
        ax.set_xlim(-0.6, len(shown) - 0.4)
    else:
        jitter = np.random.default_rng(0).uniform(-0.25, 0.25, len(shown))
        ax.scatter(jitter, shown.to_numpy(), s=10, color=color, alpha=0.7, linewidths=0)
        ax.set_xlim(-0.6, 0.6)
        ax.set_xticks([])
    styles = [":", "--", "-"]
    for (name, value), style in zip(summary_marks(finite.to_numpy(), metric), styles, strict=True):
        ax.axhline(value, color="#c44e52", linestyle=style, linewidth=1.2, label=f"{name} = {value:.3f}")
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_ylabel(metric)
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    default = f"{metric} per gene ({len(finite)} genes)"
    if n_top is not None and n_top < len(finite):
        default = f"{metric}: top {len(shown)} of {len(finite)} genes"
    ax.set_title(default if title is None else title)
    finish(fig, save=save, show=show)
    return ax


def training_curves(
    history: Sequence[Mapping[str, Any]] | pd.DataFrame,
    *,
    member: int | None = None,
    terms: Sequence[str] | None = None,
    log_y: bool = False,
    title: str | None = None,
    ax: Any = None,
    save: str | None = None,
    show: bool | None = None,
) -> Any:
    """Losses per epoch, with the best epoch (lowest validation loss) marked.

    Parameters
    ----------
    history
        One dict per epoch with ``"epoch"``, ``"train_loss"`` and ``"val_loss"`` (missing or None when an
        epoch was not validated), optionally per-term losses, e.g. ``"train_mse"``, ``"val_pearson"``, and
        ``"member"`` for a model of several decoders (``model.history`` of ``fit(n_members > 1)``).
    member
        With members in the history: draw only this one (as a single model's history is drawn); default:
        every member's training and validation losses, each member in its own colour with its best epoch.
    terms
        Per-term columns to draw thin (dashed for validation); default every other numeric
        ``train_*`` / ``val_*`` column (none when several members are drawn).
    log_y
        Logarithmic loss axis.
    title
        Replaces the default title.
    ax, save, show
        Axes to draw into; path to save the figure to; whether to show it (default: only on an interactive
        backend when not saving).

    Returns
    -------
    The matplotlib Axes; the best epoch is a vertical line labelled with it (by the training loss when no
    epoch has a validation loss).
    """
    frame = pd.DataFrame(list(history) if not isinstance(history, pd.DataFrame) else history)
    if frame.empty:
        fail("history", "is empty", "Pass the list of per-epoch dicts returned by training")
    for column in ("epoch", "train_loss"):
        if column not in frame.columns:
            fail("history", f"has no {column!r} entries (keys: {list(frame.columns)})", "Give it per epoch")
    members = sorted(frame["member"].dropna().astype(int).unique()) if "member" in frame.columns else []
    if member is not None:
        if member not in members:
            fail("member", f"{member!r} is not a member in the history (members: {members or 'none'})",
                 f"Pass one of {members}" if members else "Leave member=None for a single model's history")
        frame = frame[frame["member"] == member]
    main = [c for c in ("train_loss", "val_loss") if c in frame.columns]
    several = member is None and len(members) > 1
    if terms is None:
        terms = [] if several else [
            c
            for c in frame.columns
            if c not in main
            and str(c).startswith(("train_", "val_"))
            and pd.api.types.is_numeric_dtype(frame[c])
        ]
    else:
        missing = [t for t in terms if t not in frame.columns]
        if missing:
            fail("history", f"has no column(s) {missing}", f"Choose terms from {list(frame.columns)}")

    fig, ax = new_axes(ax, (6.0, 4.0))
    if several:
        for k in members:
            part = frame[frame["member"] == k].sort_values("epoch")
            colour = f"C{k % 10}"
            _draw_losses(ax, part, main, [], {"train_loss": colour, "val_loss": colour}, f" (member {k})")
    else:
        _draw_losses(ax, frame.sort_values("epoch"), main, terms, {"train_loss": "#4c72b0", "val_loss": "#dd8452"},
                     "")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8, frameon=False)
    ax.set_title("training curves" if title is None else title)
    finish(fig, save=save, show=show)
    return ax


def _draw_losses(ax: Any, frame: pd.DataFrame, main: list[str], terms: Sequence[str], palette: dict,
                 suffix: str) -> None:
    """One model's (or member's) loss curves, validation dashed when it shares its colour, and its best epoch."""
    epochs = frame["epoch"].to_numpy(dtype=float)
    shared = palette["train_loss"] == palette["val_loss"]
    for column in main:
        y = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)
        ok = np.isfinite(y)
        ax.plot(epochs[ok], y[ok], marker="o", markersize=3, linewidth=1.8, color=palette[column],
                linestyle="--" if shared and column == "val_loss" else "-", label=column + suffix)
    term_colors: dict[str, Any] = {}
    for column in terms:
        y = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)
        ok = np.isfinite(y)
        name = str(column).split("_", 1)[-1]
        # a term keeps one colour for its train and val curves; val is dashed
        color = term_colors.setdefault(name, f"C{2 + len(term_colors) % 8}")
        style = "--" if str(column).startswith("val_") else "-"
        ax.plot(epochs[ok], y[ok], linestyle=style, linewidth=1.0, color=color, label=str(column))

    by = "val_loss" if "val_loss" in frame.columns else "train_loss"
    best_of = pd.to_numeric(frame[by], errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(best_of).any():
        by, best_of = "train_loss", pd.to_numeric(frame["train_loss"], errors="coerce").to_numpy(dtype=float)
    if np.isfinite(best_of).any():
        best = int(np.nanargmin(np.where(np.isfinite(best_of), best_of, np.nan)))
        colour = palette["val_loss"] if suffix else "black"
        ax.axvline(
            epochs[best], color=colour, linestyle=":", linewidth=1.0,
            label=f"best epoch {epochs[best]:g}{suffix} ({by} {best_of[best]:.4g})",
        )
        ax.plot([epochs[best]], [best_of[best]], marker="*", markersize=12, color=colour, linestyle="none")
