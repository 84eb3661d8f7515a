"""``pg.pp.log_normalize``: a read-out table log-normalised by its predicted library size."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import scipy.sparse as sp

from .._core.keys import TOTAL_OBS
from .._core.normalize import NORMALIZE_TARGET, log_normalize_np, normalize_readout, row_scale
from .._core.validate import fail

logger = logging.getLogger(__name__)

LOGNORM_LAYER = "pixgene_lognorm"


def log_normalize(
    adata: Any,
    *,
    total: str | None = TOTAL_OBS,
    depth: str | None = None,
    layer: str | None = None,
    target_sum: float = NORMALIZE_TARGET,
    layer_added: str = LOGNORM_LAYER,
    overwrite: bool = False,
    inplace: bool = True,
) -> np.ndarray | sp.csr_matrix | None:
    """``log1p(target_sum * x / total)`` per row, with each row's library size taken from ``obs[total]``.

    A read-out table of :func:`pixgene.tl.aggregate` holds expected counts of the modelled genes only, so
    scanpy's ``sc.pp.normalize_total`` would divide them by their own sum, which is not a library size.
    Its ``obs["pixgene_total_counts"]`` is the model's predicted library size, the normaliser the model was
    trained with: the values are the predicted composition, for clustering and plotting a read-out. It scores
    higher than the genes' own sum (``benchmarks/results/library_size.md``: on a section the model had not
    seen, PCC@M 0.503 against 0.460 on st_mob, 0.176 against 0.147 on her2st). It is a normaliser, not a
    calibrated count (docs/concepts.md).

    To set a read-out beside measured counts of the same shapes, pass their library sizes as ``depth``: the
    values are then what the measurement would read at that depth (the ``"measured_depth"`` rule of
    :func:`pixgene.tl.evaluate`, which compares that way by default). On shallow measurements, a few hundred
    counts per spot, this is the only reading that matches theirs: the composition loses most of its
    correlation with them (``benchmarks/results/library_size_thinned.md``).

    Parameters
    ----------
    adata
        An AnnData: a read-out table, or a table of measured counts with ``total=None``.
    total
        ``obs`` column with each row's library size (default the read-out's predicted one). ``None``: the row
        sums of ``X`` (a table of raw counts over all its genes, as scanpy would normalise it).
    depth
        ``obs`` column with each row's *measured* library size, for a read-out over measured shapes: the mean
        of ``log1p(target_sum * X / D)`` for a Poisson count ``X`` of mean ``D * x / total``. Dense output.
    layer
        Layer holding the values to normalise; default ``X``. E.g. the posterior of
        :func:`pixgene.tl.denoise`: ``layer="pixgene_posterior", total="pixgene_posterior_total_counts"``.
    target_sum
        Counts per row after scaling (1e4, as in training and :func:`pixgene.tl.evaluate`).
    layer_added
        Layer that receives the values.
    overwrite
        Replace an existing layer ``layer_added``.
    inplace
        Write ``adata.layers[layer_added]`` and return None; otherwise return the values only.

    Returns
    -------
    None, or with ``inplace=False`` the float32 values (sparse CSR when ``X`` is sparse). Rows whose library
    size is zero (shapes entirely off the map) stay zero; a warning gives their number.
    """
    if layer is not None and layer not in adata.layers:
        have = ", ".join(map(repr, adata.layers)) or "none"
        fail(f"layer {layer!r}", f"not found (the table's layers are: {have})",
             "Pass layer=None to normalise X, or the name of a layer of counts")
    x = adata.X if layer is None else adata.layers[layer]
    if total is None:
        totals = np.asarray(x.sum(1), dtype=np.float64).ravel()
        where = "the row sums of X" if layer is None else f"the row sums of layer {layer!r}"
        if not np.isfinite(totals).all() or (totals < 0).any():
            fail(where, "holds negative or non-finite library sizes", "Pass non-negative totals")
    else:
        totals = _library_sizes(adata, total, "Pass a read-out table of pg.tl.aggregate from a map with the "
                                "total channel, or total=None to normalise raw counts by their row sums")
        where = f"obs[{total!r}]"
    if depth is not None:
        depths = _library_sizes(adata, depth, "Copy the measured library sizes into the read-out's obs first, "
                                "e.g. readout.obs['measured_total'] = measured[readout.obs_names].X.sum(1)")
    if not (np.isfinite(target_sum) and target_sum > 0):
        fail("target_sum", f"{target_sum!r} is not a positive number", "Pass e.g. 1e4")
    if inplace and layer_added in adata.layers and not overwrite:
        fail(f"layer {layer_added!r}", "already exists and would be replaced",
             "Pass overwrite=True to replace it, or choose another layer_added")
    empty = int((totals == 0).sum())
    if empty:
        logger.warning("%d of %d rows have a library size of 0 in %s (shapes off the map); they stay 0. Drop "
                       "them first, e.g. adata[adata.obs['pixgene_coverage'] > 0]", empty, len(totals), where)
    if depth is not None:
        x = x.toarray() if sp.issparse(x) else np.asarray(x)
        values = normalize_readout(x, totals, "measured_depth", measured_total=depths,
                                   target_sum=target_sum).astype(np.float32)
    elif sp.issparse(x):
        values = sp.csr_matrix(x, dtype=np.float64, copy=True)
        values.data *= np.repeat(row_scale(totals, target_sum), np.diff(values.indptr))
        np.log1p(values.data, out=values.data)
        values = values.astype(np.float32)
    else:
        values = log_normalize_np(np.asarray(x, dtype=np.float64), totals, target_sum).astype(np.float32)
    if not inplace:
        return values
    adata.layers[layer_added] = values
    return None


def _library_sizes(adata: Any, column: str, fix: str) -> np.ndarray:
    """``obs[column]`` as float64, checked: present, finite and non-negative."""
    if column not in adata.obs:
        have = ", ".join(map(repr, adata.obs.columns)) or "none"
        fail(f"obs column {column!r}", f"not found (the table's obs columns are: {have})", fix)
    sizes = np.asarray(adata.obs[column], dtype=np.float64)
    if not np.isfinite(sizes).all() or (sizes < 0).any():
        fail(f"obs[{column!r}]", "holds negative or non-finite library sizes", "Pass non-negative totals")
    return sizes
