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

``--thinned``: shallow, depth-varying test sections, as a new patient from another lab or run brings them
(results/library_size_thinned.json and .md). Per fold (training sections -> test section, the folds of
``benchmarks/accuracy.py``) the default fit with one decoder models the union of two gene sets chosen on the
training sections (the top 50 by mean log-normalised expression, ``flavor="mean"``, and the top 50 HVG) and is
read out over the test section's spots. The test section's measured counts are then thinned binomially to a
fraction of their depth (5 % and 10 %), each spot's fraction multiplied by a log-normal capture factor (mean 1,
coefficient of variation 1.8), and every read-out normalisation that ``pg.tl.evaluate`` offers is scored against
``log1p(1e4 x / total)`` of the thinned counts (PCC@M and PCC@S per gene set, mean over ``--repeats`` draws of
the thinning); depth 100 % is the section unthinned. Fitted models and read-outs are kept in ``--cache``.

    python benchmarks/library_size.py --thinned --cache /tmp/library_size_cache
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

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


def fit_and_read_out(train_sdatas: list, new, genes: list[str], seed: int):
    """The default fit with one decoder on ``train_sdatas``, read out over ``new``'s spots: (model, fit seconds,
    expected counts of ``genes`` and predicted totals, both in the order of ``new``'s measured table)."""
    from accuracy import _align

    import pixgene as pg

    t0 = time.perf_counter()
    model = pg.tl.fit(train_sdatas, genes=genes, n_members=1, random_state=seed, progress=False)
    fit_s = time.perf_counter() - t0
    pg.tl.predict_dense(new, model, key_added="he_pixgene", overwrite=True, progress=False)
    table = pg.tl.aggregate(new, shapes="spots", dense_key="he_pixgene", key_added="spots_pixgene",
                            overwrite=True, progress=False)
    order = _align(table, new.tables["table"])
    pred = np.asarray(table[:, genes].X, dtype=np.float64)[order]
    return model, fit_s, pred, table.obs["pixgene_total_counts"].to_numpy(dtype=np.float64)[order]


def run_pair(pair: str, seed: int) -> dict:
    from accuracy import load_section

    import pixgene as pg
    from pixgene._bench import log_normalize_np

    dataset, train, test = pair.split(":")
    train_sdatas = [load_section(dataset, s) for s in train.split("+")]
    new = load_section(dataset, test)
    genes = pg.pp.select_genes(train_sdatas, n_top=N_GENES, inplace=False)
    model, fit_s, pred, pred_total = fit_and_read_out(train_sdatas, new, genes, seed)
    measured = new.tables["table"]
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


#: dataset:training sections:test section, the folds of benchmarks/accuracy.py (two per dataset)
FOLDS = ("st_mob:MOB2+MOB3:MOB1", "st_mob:MOB1+MOB2:MOB3", "her2st:C2+C3+C4:C5", "her2st:C3+C4+C5:C2")
DEPTHS = (1.0, 0.10, 0.05)
CAPTURE_CV = 1.8


def fold_readout(fold: str, seed: int, cache: Path | None) -> dict:
    """The fold's gene sets, its model's read-out over the test spots (expected counts of the union of the gene
    sets, predicted totals) and the test section's measured counts (all genes, CSR); cached in ``cache``."""
    import scipy.sparse as sp
    from accuracy import load_section

    import pixgene as pg

    dataset, train, test = fold.split(":")
    path = None if cache is None else cache / f"{dataset}_{train}_{test}_seed{seed}.npz"
    if path is not None and path.is_file():
        z = np.load(path, allow_pickle=False)
        counts = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
        return {"genes_mean": list(z["genes_mean"]), "genes_hvg": list(z["genes_hvg"]), "genes": list(z["genes"]),
                "pred": z["pred"], "pred_total": z["pred_total"], "counts": counts, "measured_genes": list(z["var"]),
                "fit_s": float(z["fit_s"]), "model_id": str(z["model_id"])}
    train_sdatas = [load_section(dataset, s) for s in train.split("+")]
    new = load_section(dataset, test)
    genes_mean = pg.pp.select_genes(train_sdatas, n_top=N_GENES, flavor="mean", inplace=False)
    genes_hvg = pg.pp.select_genes(train_sdatas, n_top=N_GENES, inplace=False)
    genes = list(dict.fromkeys([*genes_mean, *genes_hvg]))
    model, fit_s, pred, pred_total = fit_and_read_out(train_sdatas, new, genes, seed)
    measured = new.tables["table"]
    counts = sp.csr_matrix(measured.X, dtype=np.float64)
    out = {"genes_mean": genes_mean, "genes_hvg": genes_hvg, "genes": genes, "pred": pred,
           "pred_total": pred_total, "counts": counts, "measured_genes": list(measured.var_names),
           "fit_s": fit_s, "model_id": model.model_id}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, genes_mean=np.array(genes_mean), genes_hvg=np.array(genes_hvg), genes=np.array(genes),
                 pred=pred, pred_total=pred_total, data=counts.data, indices=counts.indices, indptr=counts.indptr,
                 shape=np.array(counts.shape), var=np.array(out["measured_genes"]), fit_s=fit_s,
                 model_id=model.model_id)
    log.info("%s: fitted %s in %.0f s", fold, model.model_id, fit_s)
    return out


def thin(counts, fraction: float, rng: np.random.Generator, cv: float = CAPTURE_CV):
    """Binomial thinning of each spot's counts to ``fraction`` of their depth times a log-normal capture factor
    (mean 1, coefficient of variation ``cv``; probabilities capped at 1). ``fraction=1``: the counts unchanged."""
    if fraction >= 1.0:
        return counts.copy()
    sigma2 = np.log1p(cv ** 2)
    factor = rng.lognormal(-sigma2 / 2, np.sqrt(sigma2), size=counts.shape[0])
    prob = np.minimum(1.0, fraction * factor)
    out = counts.copy()
    out.data = rng.binomial(out.data.astype(np.int64), np.repeat(prob, np.diff(out.indptr))).astype(np.float64)
    out.eliminate_zeros()
    return out


def run_thinned(folds: list[str], seed: int, repeats: int, cache: Path | None) -> dict:
    from pixgene._bench import READOUT_RULES, depth_only_readout, log_normalize_np, normalize_readout

    t0 = time.perf_counter()
    rows = []
    for fold in folds:
        r = fold_readout(fold, seed, cache)
        col = {g: i for i, g in enumerate(r["measured_genes"])}
        for depth in DEPTHS:
            rng = np.random.default_rng(seed)
            draws = 1 if depth >= 1.0 else repeats
            acc: dict = {}
            stats = []
            for _ in range(draws):
                thinned = thin(r["counts"], depth, rng)
                total = np.asarray(thinned.sum(1)).ravel()
                keep = total > 0
                stats.append((float(np.median(total[keep])), float(total[keep].std() / total[keep].mean())))
                for set_name in ("mean", "hvg"):
                    genes = r[f"genes_{set_name}"]
                    gi = [r["genes"].index(g) for g in genes]
                    x = thinned[:, [col[g] for g in genes]].toarray()[keep]
                    pred = r["pred"][keep][:, gi]
                    truth = log_normalize_np(x, total[keep])
                    values = {rule: normalize_readout(pred, r["pred_total"][keep], rule, measured_total=total[keep])
                              for rule in READOUT_RULES}
                    # depth alone: every spot given the section's mean predicted composition
                    values["depth_only"] = depth_only_readout(pred, r["pred_total"][keep], total[keep])
                    for rule, v in values.items():
                        acc.setdefault((set_name, rule), []).append(_pcc(v, truth, genes))
                    # beyond depth: the measured-depth reading and the measurement, both less depth alone
                    acc.setdefault((set_name, "beyond_depth"), []).append(
                        _pcc(values["measured_depth"] - values["depth_only"], truth - values["depth_only"], genes))
            row = {"fold": fold, "depth": depth, "spots": int(r["counts"].shape[0]),
                   "median_total": round(float(np.mean([a for a, _ in stats])), 1),
                   "cv_total": round(float(np.mean([b for _, b in stats])), 2), "draws": draws,
                   "model_id": r["model_id"], "fit_s": round(r["fit_s"], 1),
                   "scores": {f"{k[0]}:{k[1]}": [round(float(np.mean([v[0] for v in vals])), 4),
                                                  round(float(np.mean([v[1] for v in vals])), 4)]
                              for k, vals in acc.items()}}
            log.info("%s depth %.2f: %s", fold, depth, row["scores"])
            rows.append(row)
    return {"seed": seed, "n_genes": N_GENES, "repeats": repeats, "capture_cv": CAPTURE_CV, "rows": rows,
            "total_s": round(time.perf_counter() - t0, 1)}


def run(pairs: list[str], seed: int) -> dict:
    t0 = time.perf_counter()
    rows = [run_pair(p, seed) for p in pairs]
    return {"seed": seed, "n_genes": N_GENES, "rows": rows, "total_s": round(time.perf_counter() - t0, 1)}


def render(r: dict) -> str:
    if "capture_cv" in r:  # a --thinned run
        return render_thinned(r)
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


RULE_NAMES = {"predicted_total": "predicted library size", "global": "one global scale",
              "measured_depth": "at the measured depth", "depth_only": "depth alone (no prediction)",
              "beyond_depth": "beyond depth"}


def render_thinned(r: dict) -> str:
    rules = [k for k in RULE_NAMES if any(f"mean:{k}" in w["scores"] for w in r["rows"])]
    lines = ["# Read-out normalisations on shallow, depth-varying sections", "",
             f"`{r['command']}`, {r['started']}, {r['machine']}, {r['total_s']:.0f} s. Per fold the default fit "
             f"with one decoder (seed {r['seed']}) of the union of the top {r['n_genes']} genes by mean and the top "
             f"{r['n_genes']} HVG of the training sections, read out over the test section's spots; the test counts "
             f"thinned binomially to the depth shown with a log-normal capture factor per spot (CV "
             f"{r['capture_cv']}), {r['repeats']} draws averaged (see the script's docstring). PCC@M / PCC@S "
             "against the thinned counts' `log1p(1e4 x / total)`. *Beyond depth*: the measured-depth reading and "
             "the measurement, each less the depth-alone reading, correlated: what the prediction adds to depth.",
             "", "Fits (read-outs kept in `--cache`, the run's time is the scoring's when they were there): "
             + ", ".join(dict.fromkeys(f"{w['fold']} {w['fit_s']:.0f} s (model {w['model_id']})"
                                       for w in r["rows"])) + ".", ""]
    for set_name, title in (("mean", "top genes by mean"), ("hvg", "top HVG")):
        lines += [f"## {title}", "",
                  "| fold | depth | median total | CV total | " + " | ".join(RULE_NAMES[k] for k in rules) + " |",
                  "|---|---|---|---|" + "---|" * len(rules)]
        for w in r["rows"]:
            cells = [f"{w['scores'][f'{set_name}:{k}'][0]:.3f} / {w['scores'][f'{set_name}:{k}'][1]:.3f}"
                     for k in rules]
            lines.append(f"| {w['fold']} | {w['depth']:.0%} | {w['median_total']:.0f} | {w['cv_total']:.2f} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    import _report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), help="dataset:train[+train...]:new")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--thinned", action="store_true", help="the shallow, depth-varying evaluation instead")
    parser.add_argument("--folds", nargs="+", default=list(FOLDS), help="with --thinned: dataset:train[+...]:test")
    parser.add_argument("--repeats", type=int, default=5, help="with --thinned: draws of the thinning per depth")
    parser.add_argument("--cache", default=None, help="with --thinned: keep fitted read-outs here")
    if "--thinned" in sys.argv:
        _report.main("library_size_thinned", parser, lambda a: run_thinned(
            a.folds, a.seed, a.repeats, None if a.cache is None else Path(a.cache)), render_thinned,
                     script="library_size.py")
    else:
        _report.main("library_size", parser, lambda a: run(a.pairs, a.seed), render)


if __name__ == "__main__":
    main()
