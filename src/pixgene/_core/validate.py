"""Uniform checks on user input.

Every message names the element, the problem and the fix, and every check runs before any work starts.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


class PixgeneInputError(ValueError):
    """Raised when input cannot be used; the message says which element, what is wrong and how to fix it."""


def fail(element: str, problem: str, fix: str) -> None:
    raise PixgeneInputError(f"{element}: {problem}. {fix}")


def require_element(sdata: Any, key: str, kind: str) -> Any:
    """Return ``sdata.<kind>[key]`` or raise naming the keys that exist."""
    container = getattr(sdata, kind)
    if key is None or key not in container:
        have = ", ".join(repr(k) for k in container) or "none"
        fail(
            f"{kind[:-1]} {key!r}",
            f"not found in the SpatialData object (its {kind} are: {have})",
            f"Pass the name of an existing {kind[:-1]} element.",
        )
    return container[key]


def check_not_exists(sdata: Any, key: str, overwrite: bool) -> None:
    """Refuse to replace an existing element or table unless ``overwrite=True``."""
    if overwrite:
        return
    for kind in ("images", "labels", "shapes", "points", "tables"):
        if key in getattr(sdata, kind):
            fail(
                f"{kind[:-1]} {key!r}",
                "already exists and would be replaced",
                "Pass overwrite=True to replace it, or choose another key_added.",
            )


def check_genes(genes: Sequence[str] | None, available: Iterable[str], where: str) -> list[str]:
    if genes is None:
        fail(where, "no genes were given", "Pass genes=[...] or run pg.pp.select_genes first.")
    genes = [str(g) for g in genes]
    if len(genes) == 0:
        fail(where, "the gene list is empty", "Pass at least one gene name.")
    if len(set(genes)) != len(genes):
        dup = sorted({g for g in genes if genes.count(g) > 1})
        fail(where, f"genes are repeated: {dup[:10]}", "Pass each gene once.")
    available = set(map(str, available))
    missing = [g for g in genes if g not in available]
    if missing:
        fail(
            where,
            f"{len(missing)} requested gene(s) are missing, e.g. {missing[:10]}",
            "Use names from the table's var_names (check the species and the id type: symbols vs Ensembl ids).",
        )
    return genes


def check_raw_counts(X: Any, where: str) -> None:
    """Counts must be finite, non-negative and not normalised (integers, or nearly so)."""
    import scipy.sparse as sp

    values = X.data if sp.issparse(X) else np.asarray(X)
    if values.size == 0:
        fail(where, "the count matrix is empty", "Give a table with at least one spot and one gene.")
    if not np.all(np.isfinite(values)):
        fail(where, "counts contain NaN or infinite values", "Give raw UMI counts (adata.X or a raw layer).")
    if np.any(values < 0):
        fail(where, "counts contain negative values", "Give raw UMI counts, not scaled or centred values.")
    sample = values.ravel()[: 1_000_000]
    if np.any(np.abs(sample - np.round(sample)) > 1e-3):
        fail(
            where,
            "counts are not integers: the table looks normalised or log-transformed",
            "Give raw UMI counts (for example adata.layers['counts'] or adata.raw) via layer=...",
        )


def check_positive(value: float | None, name: str, element: str, fix: str | None = None) -> None:
    """``None`` or a finite number above 0 (not a bool, not a string)."""
    number = isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
    if value is not None and not (number and np.isfinite(value) and value > 0):
        fail(element, f"{name}={value!r} is not a positive number", fix or f"Pass a positive {name}.")


def check_int(value: Any, name: str, *, minimum: int | None = None, allow_none: bool = False,
              fix: str | None = None) -> int | None:
    """An integer (Python or numpy, never a bool) of at least ``minimum``; returned as a Python ``int``."""
    if value is None and allow_none:
        return None
    integer = isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)
    if not integer or (minimum is not None and value < minimum):
        what = "an integer" if minimum is None else f"an integer of at least {minimum}"
        fail(name, f"{value!r} is not {what}", fix or f"Pass {name}={max(minimum or 0, 1)} or another integer")
    return int(value)


def check_fraction(value: Any, name: str, *, low: float = 0.0, high: float = 1.0, closed_low: bool = True,
                   fix: str | None = None) -> float:
    """A real number in ``[low, high)`` (``(low, high)`` with ``closed_low=False``); returned as a float."""
    number = isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
    inside = number and (low <= value if closed_low else low < value) and value < high
    if not inside:
        interval = f"{'[' if closed_low else '('}{low:g}, {high:g})"
        fail(name, f"{value!r} is not in {interval}", fix or f"Pass a number in {interval}")
    return float(value)
