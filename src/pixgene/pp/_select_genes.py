"""``pg.pp.select_genes``: choose the genes to model, on the training slides only."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._core.keys import TABLE_KEY, UNS_KEY
from .._core.validate import check_raw_counts, fail, require_element

logger = logging.getLogger(__name__)

SELECTED_VAR = "pixgene_selected"
#: genes selected when ``n_top`` is not given (fewer when fewer are eligible)
DEFAULT_N_TOP = 50


def select_genes(
    sdata: Any,
    *,
    table_key: str = TABLE_KEY,
    n_top: int | None = None,
    flavor: str = "hvg",
    min_fraction: float = 0.1,
    key_added: str = SELECTED_VAR,
    inplace: bool = True,
) -> list[str]:
    """Select ``n_top`` genes from one slide or jointly from several (genes present in all of them).

    Parameters
    ----------
    sdata
        A SpatialData or a list of them (the training slides: never include a test slide).
    table_key
        Table of raw counts.
    n_top
        Number of genes; default 50, or every eligible gene when fewer than 50 are (a small panel).
    flavor
        ``"hvg"``: highly variable genes of log-normalised expression (scanpy's ``seurat`` flavour, slides as
        batches); ``"mean"``: highest mean log-normalised expression.
    min_fraction
        Only genes detected in at least this fraction of spots (pooled) are eligible.
    key_added
        Boolean ``var`` column marking the selection in each table.
    inplace
        Write ``var[key_added]`` and ``uns["pixgene"]["select_genes"]`` (the parameters and the genes).

    Returns
    -------
    The selected gene names, in descending order of the score.
    """
    import anndata as ad
    import scanpy as sc

    if flavor not in ("hvg", "mean"):
        fail("flavor", f"{flavor!r} is not supported", "Use 'hvg' or 'mean'")
    sdatas = list(sdata) if isinstance(sdata, list | tuple) else [sdata]
    tables = [require_element(s, table_key, "tables") for s in sdatas]
    for t in tables:
        check_raw_counts(t.X, f"table {table_key!r}")
    common = tables[0].var_names
    for t in tables[1:]:
        common = common.intersection(t.var_names)
    if len(common) == 0:
        fail(f"tables {table_key!r}", "the slides share no gene names", "Use slides of one species and id type")
    if n_top is not None and not 0 < n_top <= len(common):
        fail("n_top", f"{n_top} is not between 1 and the {len(common)} shared genes", "Choose a smaller n_top")
    parts = []
    for t in tables:
        # normalise by each spot's total over ALL its genes (scanpy's own route), then keep the shared genes
        part = ad.AnnData(X=sp.csr_matrix(t.X, dtype=np.float32), var=pd.DataFrame(index=t.var_names))
        sc.pp.normalize_total(part, target_sum=1e4)
        sc.pp.log1p(part)
        parts.append(part[:, common])
    pooled = ad.concat(parts, label="slide", index_unique="-")
    detected = np.asarray((sp.csr_matrix(pooled.X) > 0).mean(0)).ravel()
    eligible = detected >= min_fraction
    if n_top is None:
        n_top = int(min(DEFAULT_N_TOP, eligible.sum())) or DEFAULT_N_TOP
    if eligible.sum() < n_top:
        fail("min_fraction", f"only {int(eligible.sum())} genes are detected in {min_fraction:.0%} of spots",
             "Lower min_fraction or n_top")
    if flavor == "hvg":
        sub = pooled[:, eligible].copy()
        batch = "slide" if len(tables) > 1 else None
        sc.pp.highly_variable_genes(sub, flavor="seurat", n_top_genes=n_top, batch_key=batch)
        score_col = "dispersions_norm"
        ranked = sub.var.sort_values(["highly_variable", score_col], ascending=False)
        genes = ranked.index[:n_top].tolist()
    else:
        mean = np.asarray(pooled.X.mean(0)).ravel()
        mean[~eligible] = -np.inf
        genes = common[np.argsort(-mean, kind="stable")[:n_top]].tolist()
    if inplace:
        for t in tables:
            t.var[key_added] = t.var_names.isin(genes)
            info = dict(t.uns.get(UNS_KEY, {}))
            info["select_genes"] = {
                "params": {"n_top": n_top, "flavor": flavor, "min_fraction": min_fraction, "n_slides": len(tables)},
                "genes": genes,
            }
            t.uns[UNS_KEY] = info
    logger.info("selected %d genes (%s) from %d slide(s), %d spots", len(genes), flavor, len(tables), pooled.n_obs)
    return genes
