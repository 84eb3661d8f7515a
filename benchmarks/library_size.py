"""What the predicted library size (`pixgene_total_counts`) is on a new section: a count estimate or a normaliser.

For each pair (training sections -> a section the model has not seen) the default fit with one decoder
(`n_members=1`, 50 HVG of the training sections) is read out over the new section's spots, and its read-out is
compared with the measured counts there:

- ``total / depth``: the read-out's mean total over the measured mean total, divided by the depth ratio (the
  training sections' measured mean total per spot over the new section's): 1 for a library size calibrated to
  the depth it was trained on. ``genes / depth``: the same for the sum of the 50 genes (training sections' mean
  gene sum per spot over the new section's).
- ``r total``: Pearson r of the read-out totals with the measured totals across spots.
- PCC@M / PCC@S of the read-out genes against the measured log-normalised values (``log1p(1e4 x / total)``),
  with the read-out genes normalised by the predicted total (what ``pg.tl.evaluate`` and the accuracy benchmark
  do), by the measured total, and by their own sum.

    python benchmarks/library_size.py            # prints a table, writes results/library_size.json and .md
    python benchmarks/library_size.py --pairs st_mob:MOB2:MOB3
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np

log = logging.getLogger("library_size")

#: dataset:training sections (+-joined):new section; each pair inside one fold's training sections of
#: benchmarks/accuracy.py (st_mob MOB1 fold, her2st C5 fold)
PAIRS = ("st_mob:MOB2:MOB3", "st_mob:MOB3:MOB2", "her2st:C2+C3:C4")
N_GENES = 50


def _counts(table, genes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(spots, genes) counts of ``genes`` and every spot's total over all genes of the table, float64."""
    import scipy.sparse as sp

    x = table[:, genes].X
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    return x.astype(np.float64), np.asarray(table.X.sum(1), dtype=np.float64).ravel()


def _pcc(pred: np.ndarray, truth: np.ndarray, genes: list[str]) -> list[float]:
    from pixgene._bench import score_matrices

    s = score_matrices(pred, truth, genes).summary
    return [round(float(s["PCC@M"]), 4), round(float(s["PCC@S"]), 4)]


def run_pair(pair: str, seed: int) -> dict:
    from accuracy import _align, load_section

    import pixgene as pg
    from pixgene._bench import log_normalize_np

    dataset, train, test = pair.split(":")
    train_sdatas = [load_section(dataset, s) for s in train.split("+")]
    new = load_section(dataset, test)
    genes = pg.pp.select_genes(train_sdatas, n_top=N_GENES, inplace=False)
    t0 = time.perf_counter()
    model = pg.tl.fit(train_sdatas, genes=genes, n_members=1, random_state=seed, progress=False)
    fit_s = time.perf_counter() - t0
    pg.tl.predict_dense(new, model, key_added="he_pixgene", overwrite=True, progress=False)
    table = pg.tl.aggregate(new, shapes="spots", dense_key="he_pixgene", key_added="spots_pixgene",
                            overwrite=True, progress=False)
    measured = new.tables["table"]
    order = _align(table, measured)
    pred = np.asarray(table[:, genes].X, dtype=np.float64)[order]
    pred_total = table.obs["pixgene_total_counts"].to_numpy(dtype=np.float64)[order]
    x, total = _counts(measured, genes)
    train_counts = [_counts(s.tables["table"], genes) for s in train_sdatas]
    depth_total = np.concatenate([t for _, t in train_counts]).mean() / total.mean()
    depth_genes = np.concatenate([g.sum(1) for g, _ in train_counts]).mean() / x.sum(1).mean()
    y = log_normalize_np(x, total)
    row = {
        "pair": f"{dataset} {train} -> {test}", "spots": int(len(total)), "model_id": model.model_id,
        "fit_s": round(fit_s, 1),
        "depth_ratio": round(float(depth_total), 3),
        "total_over_depth": round(float(pred_total.mean() / total.mean() / depth_total), 3),
        "genes_over_depth": round(float(pred.sum(1).mean() / x.sum(1).mean() / depth_genes), 3),
        "r_total": round(float(np.corrcoef(pred_total, total)[0, 1]), 3),
        "by_predicted_total": _pcc(log_normalize_np(pred, pred_total), y, genes),
        "by_measured_total": _pcc(log_normalize_np(pred, total), y, genes),
        "by_gene_sum": _pcc(log_normalize_np(pred, pred.sum(1)), y, genes),
    }
    log.info("%s", row)
    return row


def run(pairs: list[str], seed: int) -> dict:
    t0 = time.perf_counter()
    rows = [run_pair(p, seed) for p in pairs]
    return {"seed": seed, "n_genes": N_GENES, "rows": rows, "total_s": round(time.perf_counter() - t0, 1)}


def render(r: dict) -> str:
    lines = ["# The predicted library size on a section the model has not seen", "",
             f"`{r['command']}`, {r['started']}, {r['machine']}, {r['total_s']:.0f} s. The default fit with "
             f"one decoder, seed {r['seed']}, {r['n_genes']} HVG of the training sections; read out over the new "
             "section's spots (see the script's docstring).", "",
             "| pair | spots | depth ratio | total / depth | genes / depth | r total | PCC@M / PCC@S by predicted "
             "total | by measured total | by gene sum | fit s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for w in r["rows"]:
        pcc = [f"{w[k][0]:.3f} / {w[k][1]:.3f}" for k in ("by_predicted_total", "by_measured_total", "by_gene_sum")]
        lines.append(f"| {w['pair']} | {w['spots']} | {w['depth_ratio']:.3f} | {w['total_over_depth']:.2f} | "
                     f"{w['genes_over_depth']:.2f} | {w['r_total']:.2f} | {' | '.join(pcc)} | {w['fit_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import _report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), help="dataset:train[+train...]:new")
    parser.add_argument("--seed", type=int, default=0)
    _report.main("library_size", parser, lambda a: run(a.pairs, a.seed), render)


if __name__ == "__main__":
    main()
