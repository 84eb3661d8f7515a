"""``pg.tl.denoise`` on the synthetic slide (truth known) and on a real section, against what users have without it.

Synthetic (``pg.datasets.synthetic(seed)``, its truth map integrated over the spots is the reference): the
measured counts themselves, the spots read out of a model fitted on every spot (``pg.tl.fit`` ->
``predict_dense`` -> ``aggregate``: each spot's own counts trained the model that predicts it), the denoised
spots (each predicted by a model fitted without its spatial block) and their posterior layer (the measured
counts and that prediction together). Scores: per-gene Pearson of log1p(1e4 x / total) across spots
(PCC@F/S/M), every row against the truth.

Real (her2st section, default C2): there is no truth, so each prediction is scored against the measured counts:
the denoised spots (out-of-fold: what the image predicts for spots no model saw) and the in-sample read-out
(the spots trained the model that predicts them, an optimistic score).

Genes: the top highly variable genes of the slide (``pg.pp.select_genes``). Every fit gets the same settings
(``--n-members``; the rest pixgene's defaults). Prints a table and writes ``benchmarks/results/denoise.{json,md}``.

With ``her2st_cohort`` the section is denoised again with every fold's model also trained on the other three
sections (``train_with``), and the in-sample model fitted on all four.

    python benchmarks/denoise.py [--n-folds 5] [--n-members 1] [--section C2] [--runs synthetic her2st ...]
    python benchmarks/denoise.py --runs her2st_cohort --merge     # add one run to the existing results
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from pathlib import Path

import _report
import numpy as np

import pixgene as pg

log = logging.getLogger("denoise")


def log_norm(x: np.ndarray, total: np.ndarray) -> np.ndarray:
    from pixgene._bench import log_normalize_np

    return log_normalize_np(np.asarray(x, dtype=np.float64), np.asarray(total, dtype=np.float64))


def scores(pred: np.ndarray, ref: np.ndarray, genes: list[str]) -> dict:
    from pixgene._bench import score_matrices

    s = score_matrices(pred, ref, genes).summary
    return {k: round(float(s[k]), 4) for k in ("PCC@F", "PCC@S", "PCC@M", "MSE", "MAE")}


def measured_matrix(sdata, genes: list[str], order: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Raw counts of ``genes`` and all-gene totals of the measured table, rows in ``order`` (instance ids)."""
    import pandas as pd

    t = sdata.tables["table"]
    ids = t.obs[t.uns["spatialdata_attrs"]["instance_key"]].astype(str).to_numpy()
    rows = pd.Series(np.arange(len(ids)), index=ids).loc[order].to_numpy()
    X = t[rows][:, genes].X
    X = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
    return X, np.asarray(t[rows].X.sum(1)).ravel()


def readout(table, genes: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    X = table[:, genes].X
    ids = table.obs[table.uns["spatialdata_attrs"]["instance_key"]].astype(str).tolist()
    return np.asarray(X, dtype=np.float64), table.obs["pixgene_total_counts"].to_numpy(float), ids


def in_sample(sdatas: list, genes: list[str], seed: int, n_members: int) -> tuple[object, float]:
    """The first slide's spots read out of a model fitted on every spot of ``sdatas``."""
    t0 = time.perf_counter()
    sdata = sdatas[0]
    model = pg.tl.fit(sdatas, genes=genes, random_state=seed, n_members=n_members, progress=False)
    pg.tl.predict_dense(sdata, model, key_added="he_insample", progress=False)
    table = pg.tl.aggregate(sdata, shapes="spots", dense_key="he_insample", inplace=False, progress=False)
    return table, time.perf_counter() - t0


def run_slide(name: str, sdata, genes: list[str], args, truth: bool, train_with: list | None = None) -> dict:
    t0 = time.perf_counter()
    den = pg.tl.denoise(sdata, genes=genes, n_folds=args.n_folds, random_state=args.seed, train_with=train_with,
                        n_members=args.n_members, progress=False)
    t_denoise = time.perf_counter() - t0
    ins, t_insample = in_sample([sdata, *(train_with or [])], genes, args.seed, args.n_members)
    d_X, d_tot, ids = readout(den, genes)
    i_X, i_tot, i_ids = readout(ins, genes)
    pos = {k: i for i, k in enumerate(i_ids)}
    sel = [pos[k] for k in ids]
    i_X, i_tot = i_X[sel], i_tot[sel]
    m_X, m_tot = measured_matrix(sdata, genes, ids)
    rows = {}
    if truth:
        ref_table = pg.tl.aggregate(sdata, shapes="spots", dense_key="truth", inplace=False, progress=False)
        t_X, t_tot, t_ids = readout(ref_table, genes)
        tpos = {k: i for i, k in enumerate(t_ids)}
        ts = [tpos[k] for k in ids]
        ref = log_norm(t_X[ts], t_tot[ts])
        rows["measured counts"] = scores(log_norm(m_X, m_tot), ref, genes)
        post = np.asarray(den[:, genes].layers["pixgene_posterior"], dtype=np.float64)
        rows["posterior (measured counts and out-of-fold prediction)"] = scores(
            log_norm(post, den.obs["pixgene_posterior_total_counts"].to_numpy(float)), ref, genes)
        reference = "truth"
    else:
        ref = log_norm(m_X, m_tot)
        reference = "measured counts"
    rows["in-sample read-out (model fitted on every spot)"] = scores(log_norm(i_X, i_tot), ref, genes)
    rows["denoised (out-of-fold)"] = scores(log_norm(d_X, d_tot), ref, genes)
    info = den.uns["pixgene"]
    folds = info["folds"]
    log.info("%s: %s", name, rows)
    return {
        "slide": name, "reference": reference, "train_with": info["params"]["train_with"], "n_spots": int(den.n_obs), "n_genes": len(genes), "genes": genes,
        "block_um": round(float(info["params"]["block_um"]), 1), "spot_pitch_um": round(info["spot_pitch_um"], 1),
        "fold_sizes": [int(folds[str(k)]["n_spots"]) for k in range(args.n_folds)],
        "model_ids": info["model_ids"], "rows": rows,
        "time_s": {"denoise": round(t_denoise, 1), "in_sample_fit_predict": round(t_insample, 1)},
    }


def run(args) -> dict:
    slides = []
    if "synthetic" in args.runs:
        syn = pg.datasets.synthetic(seed=args.seed)
        genes = pg.pp.select_genes(syn, n_top=min(args.n_genes, syn.tables["table"].n_vars), flavor="hvg")
        slides.append(run_slide(f"synthetic (seed {args.seed})", syn, genes, args, truth=True))
    if "her2st" in args.runs or "her2st_cohort" in args.runs:
        sec = pg.datasets.her2st(args.section)
        genes = pg.pp.select_genes(sec, n_top=args.n_genes, flavor="hvg")  # the section's own, either way
    if "her2st" in args.runs:
        slides.append(run_slide(f"her2st {args.section}", sec, genes, args, truth=False))
    if "her2st_cohort" in args.runs:
        others = [s for s in ("C2", "C3", "C4", "C5") if s != args.section]
        slides.append(run_slide(f"her2st {args.section}, every fold also trained on {' + '.join(others)}",
                                pg.datasets.her2st(args.section), genes, args, truth=False,
                                train_with=[pg.datasets.her2st(s) for s in others]))
    result = {"n_folds": args.n_folds, "n_members": args.n_members, "seed": args.seed, "slides": slides,
              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}
    path = Path(args.out) / "denoise.json"
    if args.merge and path.is_file():  # the earlier runs' slides that this run did not redo, first
        old = json.loads(path.read_text())
        done = {s["slide"] for s in slides}
        kept = [s for s in old["slides"] if s["slide"] not in done]
        for s in kept:
            s.setdefault("run", {k: old.get(k) for k in ("command", "started", "machine", "peak_rss_gb")})
        result["slides"] = kept + slides
    return result


def render(r: dict) -> str:
    lines = [
        "# Denoising measured spots: `pg.tl.denoise`", "",
        f"Each spot predicted by a model fitted without its spatial block ({r['n_folds']} folds of whole blocks, "
        f"{r['n_members']} decoder{'s' if r['n_members'] > 1 else ''} a fit, otherwise pixgene's defaults), "
        "against the measured counts and against a model fitted on every spot. Scores: per-gene Pearson of "
        "log1p(1e4 x / total) across spots, mean (PCC@M), median (PCC@S) and first quartile (PCC@F).", "",
    ]
    for s in r["slides"]:
        run = s.get("run")
        lines += [
            f"## {s['slide']}: {s['n_spots']} spots, {s['n_genes']} genes, scored against the {s['reference']}", "",
            *([f"From `{run['command']}`, started {run['started']}; {run['machine']}; peak RSS "
               f"{run['peak_rss_gb']} GB.", ""] if run else []),
            f"Blocks of {s['block_um']} um ({s['spot_pitch_um']} um spot pitch); spots per fold "
            f"{', '.join(map(str, s['fold_sizes']))}. Time: denoise {s['time_s']['denoise']:.0f} s "
            f"({r['n_folds']} fits and predictions), the in-sample fit and prediction "
            f"{s['time_s']['in_sample_fit_predict']:.0f} s.", "",
            "| spots | PCC@F | PCC@S | PCC@M | MSE | MAE |", "|---|---|---|---|---|---|",
        ]
        for name, v in s["rows"].items():
            lines.append(f"| {name} | {v['PCC@F']:.3f} | {v['PCC@S']:.3f} | {v['PCC@M']:.3f} | {v['MSE']:.3f} "
                         f"| {v['MAE']:.3f} |")
        lines.append("")
    lines += [f"{'The other slides: ' if any(s.get('run') for s in r['slides']) else ''}`{r.get('command', '')}` "
              f"started {r.get('started', '?')}; {r.get('machine', '')}; peak RSS {r['peak_rss_gb']} GB."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-folds", type=int, default=5)
    parser.add_argument("--n-members", type=int, default=1)
    parser.add_argument("--n-genes", type=int, default=50)
    parser.add_argument("--section", default="C2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", nargs="+", default=["synthetic", "her2st", "her2st_cohort"],
                        choices=["synthetic", "her2st", "her2st_cohort"],
                        help="her2st_cohort: the section again, each fold also trained on the other three")
    parser.add_argument("--merge", action="store_true", help="keep the other slides of the existing JSON")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the existing .json")
    if "--render" in __import__("sys").argv:
        path = _report.RESULTS / "denoise.json"
        (_report.RESULTS / "denoise.md").write_text(render(json.loads(path.read_text())))
        return
    _report.main("denoise", parser, run, render)


if __name__ == "__main__":
    main()
