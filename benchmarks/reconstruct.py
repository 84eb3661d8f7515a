"""Reconstructing unmeasured tissue: ``pg.tl.reconstruct`` against spatial interpolation, on the same spots.

Per section (one at a time), a contiguous block of the tissue's spots is kept as measured: the spots left of a
vertical line at the ``fraction`` quantile of their x (25 % and 50 % by default); every other spot of the
section is reconstructed and scored against its measured counts. Genes: the top ``--n-genes`` highly variable
genes of ``pg.pp.select_genes`` on the measured spots only (the first of its ranking present in every section
of the dataset, so that the other sections can train too). Targets: ``log1p(1e4 * counts / total)`` per spot,
total = every gene of the spot. Scores on the unmeasured spots: PCC@F/S/M (first quartile, median and mean over
genes of the per-gene Pearson r across spots), overall and by distance from the measured region (the nearest
measured spot's centre) in bands of ``--band-um`` (the farthest bands merged until the last holds at least
``--min-band-spots`` spots).

Methods, every one given the measured spots only
    nearest            each spot takes the values of its nearest measured spot
    kernel             Gaussian kernel (Nadaraya-Watson) smoothing of the measured spots' values; the bandwidth
                       chosen by cross-validation on the measured part: five vertical strips of it, each
                       predicted from the other four (mean squared error over genes and spots)
    ridge              ridge on frozen-encoder embeddings of a 224 um patch per spot, PCA to 256 dimensions,
                       penalty by cross-validation (``benchmarks/accuracy.py``'s HEST-style baseline, imported),
                       trained on the measured spots
    pixgene            ``pg.tl.reconstruct(sdata, measured=mask)``: PixNet fitted on the measured spots alone
    pixgene_with       the same, with the dataset's other sections added (``train_with``: every spot of them)

Datasets: st_mob (MOB1-MOB3) and her2st (C2-C5). pixgene runs with its defaults unless ``--n-members`` /
``--max-epochs`` say otherwise. Each run records its command, date, machine and load average; ``--merge``
keeps the runs of the existing JSON that this one did not redo (dataset, section, fraction), and the methods
of a run that this one did not redo (``--methods``), and the JSON's ``notes`` (rendered under the tables).

    python benchmarks/reconstruct.py --datasets st_mob --sections MOB3 --fractions 0.25
    python benchmarks/reconstruct.py --datasets st_mob --sections MOB3 --fractions 0.5 --merge
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

import _report
import numpy as np

import pixgene as pg

log = logging.getLogger("reconstruct")
SECTIONS = {"st_mob": ("MOB1", "MOB2", "MOB3"), "her2st": ("C2", "C3", "C4", "C5")}
METHODS = ("nearest", "kernel", "ridge", "pixgene", "pixgene_with")
INTERPOLATION = ("nearest", "kernel")
LABELS = {
    "nearest": "nearest measured spot",
    "kernel": "Gaussian kernel smoothing (bandwidth by CV)",
    "ridge": "ridge on encoder embeddings",
    "pixgene": "pixgene, measured part only",
    "pixgene_with": "pixgene, + the other sections",
}


def load_section(dataset: str, section: str):
    return pg.datasets.her2st(section) if dataset == "her2st" else pg.datasets.st_mob(section)


def log_norm(x: np.ndarray, total: np.ndarray) -> np.ndarray:
    from pixgene._bench import log_normalize_np

    return log_normalize_np(np.asarray(x, dtype=np.float64), np.asarray(total, dtype=np.float64))


def score(pred: np.ndarray, y: np.ndarray, genes: list[str]) -> dict:
    from pixgene._bench import score_matrices

    s = score_matrices(np.asarray(pred, np.float64), np.asarray(y, np.float64), genes).summary
    out = {k: (round(float(s[k]), 4) if np.isfinite(s[k]) else None) for k in ("PCC@F", "PCC@S", "PCC@M", "MSE")}
    return {**out, "n_spots": int(s["n_shapes"]), "n_genes_scored": int(s["n_genes_scored"])}


# --------------------------------------------------------------------------------------------- the split


def measured_genes(table, measured: np.ndarray, common: list[str], n: int) -> list[str]:
    """``pg.pp.select_genes`` on the measured spots only (its defaults otherwise): its first ``n`` genes present
    in every section (``common``; all of its own ``n`` when every gene is)."""
    view = SimpleNamespace(tables={"table": table[np.flatnonzero(measured)].copy()})
    eligible = set(common)
    if eligible >= set(table.var_names):
        return pg.pp.select_genes(view, n_top=n, flavor="hvg", inplace=False)
    kept: list[str] = []
    for n_top in (4 * n, 16 * n, table.n_vars):
        try:
            ranked = pg.pp.select_genes(view, n_top=min(n_top, table.n_vars), flavor="hvg", inplace=False)
        except ValueError:  # pixgene's input error: fewer genes eligible than asked for: rank them all
            ranked = pg.pp.select_genes(view, flavor="hvg", min_fraction=0.0, n_top=table.n_vars, inplace=False)
        kept = [g for g in ranked if g in eligible]
        if len(kept) >= n:
            break
    return kept[:n]


def distance_bands(d: np.ndarray, band_um: float, min_spots: int) -> tuple[np.ndarray, list[str]]:
    """Band of every distance: ``(0, band]``, ``(band, 2 band]``, ..., the farthest merged into one
    ``> x`` band until it holds at least ``min_spots`` spots. Returns the bands and their labels."""
    band = np.maximum(np.ceil(d / band_um).astype(int) - 1, 0)
    last = int(band.max())
    while last > 0 and (band >= last).sum() < min_spots:
        last -= 1
    band = np.minimum(band, last)
    labels = [f"({k * band_um:.0f}, {(k + 1) * band_um:.0f}]" for k in range(last)]
    labels.append(f"> {last * band_um:.0f}" if (d > (last + 1) * band_um).any() else
                  f"({last * band_um:.0f}, {(last + 1) * band_um:.0f}]")
    return band, labels


# --------------------------------------------------------------------------------------------- baselines


def nearest(xy_train: np.ndarray, y_train: np.ndarray, xy_test: np.ndarray) -> np.ndarray:
    from scipy.spatial import cKDTree

    _, idx = cKDTree(xy_train).query(xy_test)
    return y_train[idx]


def kernel_smooth(xy_train: np.ndarray, y_train: np.ndarray, xy_test: np.ndarray, h: float) -> np.ndarray:
    """Nadaraya-Watson with a Gaussian kernel of bandwidth ``h`` (um); weights relative to each test spot's
    nearest training spot, so that spots far beyond ``h`` still get a value (their nearest spots' mean)."""
    d2 = ((xy_test[:, None, :] - xy_train[None, :, :]) ** 2).sum(-1)
    w = np.exp(-(d2 - d2.min(1, keepdims=True)) / (2 * h * h))
    return (w @ y_train) / w.sum(1, keepdims=True)


def kernel_bandwidth(xy: np.ndarray, y: np.ndarray, n_strips: int = 5) -> tuple[float, dict]:
    """The bandwidth (um) with the lowest cross-validated MSE: the measured part cut into ``n_strips``
    vertical strips of equal numbers of spots, each predicted from the others."""
    order = np.argsort(xy[:, 0], kind="stable")
    strip = np.empty(len(xy), dtype=int)
    strip[order] = np.arange(len(xy)) * n_strips // len(xy)
    candidates = np.geomspace(25.0, 3200.0, 22)
    errors = {}
    for h in candidates:
        sq = 0.0
        for k in range(n_strips):
            test = strip == k
            sq += ((kernel_smooth(xy[~test], y[~test], xy[test], h) - y[test]) ** 2).sum()
        errors[round(float(h), 1)] = float(sq / y.size)
    best = min(errors, key=errors.get)
    return best, errors


def ridge(sdata, section: str, genes: list[str], um_per_px: float, measured: np.ndarray, seed: int) -> np.ndarray:
    """``benchmarks/accuracy.py``'s ridge baseline trained on the measured spots, predicting the others."""
    import accuracy

    from pixgene._bench import build_encoder, working_um_per_px

    encoder = build_encoder("efficientnet_lite0").eval()
    encoder.um_per_px = working_um_per_px(encoder.um_per_px, [um_per_px])
    spots = accuracy.spots_of(section, sdata, genes, encoder.um_per_px)
    part = lambda m: dataclasses.replace(spots, centers=spots.centers[m], y=spots.y[m])  # noqa: E731
    return accuracy.fit_ridge([part(measured)], part(~measured), encoder=encoder, seed=seed)


# --------------------------------------------------------------------------------------------- one run


def run_one(dataset: str, section: str, fraction: float, args, run_info: dict) -> dict:
    from scipy.spatial import cKDTree

    from pixgene._bench import prepare_spot_slide

    t_start = time.perf_counter()
    sdata = load_section(dataset, section)
    others = [s for s in SECTIONS[dataset] if s != section]
    other_sdatas = [load_section(dataset, s) for s in others]  # their genes too: the same genes either way
    slide = prepare_spot_slide(sdata, image_key="he", shapes_key="spots", table_key="table")
    xy = slide.centers * slide.um_per_px  # spots with counts, in the shapes' order; microns
    cut = float(np.quantile(xy[:, 0], fraction))
    measured = xy[:, 0] <= cut
    common = [g for g in slide.table.var_names if all(g in o.tables["table"].var_names for o in other_sdatas)]
    genes = measured_genes(slide.table, measured, common, args.n_genes)
    X = slide.table[:, genes].X
    X = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
    y = log_norm(X, np.asarray(slide.table.X.sum(1)).ravel())
    dist = cKDTree(xy[measured]).query(xy[~measured])[0]
    band, band_labels = distance_bands(dist, args.band_um, args.min_band_spots)
    log.info("%s %s, %.0f%% measured: %d measured / %d unmeasured spots (x <= %.0f um), %d bands", dataset, section,
             100 * fraction, measured.sum(), (~measured).sum(), cut, len(band_labels))
    preds, times, extra = {}, {}, {}
    shapes_pos = slide.positions
    mask = np.zeros(len(sdata.shapes["spots"]), dtype=bool)
    mask[shapes_pos[measured]] = True
    for method in args.methods:
        t0 = time.perf_counter()
        if method == "nearest":
            preds[method] = nearest(xy[measured], y[measured], xy[~measured])
        elif method == "kernel":
            h, errors = kernel_bandwidth(xy[measured], y[measured])
            extra["kernel_bandwidth_um"], extra["kernel_cv_mse"] = h, errors
            preds[method] = kernel_smooth(xy[measured], y[measured], xy[~measured], h)
        elif method == "ridge":
            preds[method] = ridge(sdata, section, genes, slide.um_per_px, measured, args.seed)
        else:
            train_with = other_sdatas if method == "pixgene_with" else None
            table = pg.tl.reconstruct(sdata, mask, genes=genes, train_with=train_with, key_added=f"rec_{method}",
                                      random_state=args.seed, progress=False, n_members=args.n_members,
                                      max_epochs=args.max_epochs)
            rows = table[shapes_pos[~measured]]
            assert not rows.obs["pixgene_measured"].any()
            preds[method] = log_norm(np.asarray(rows[:, genes].X), rows.obs["pixgene_total_counts"].to_numpy())
            extra[f"{method}_model_id"] = table.uns["pixgene"]["model_id"]
        times[method] = round(time.perf_counter() - t0, 1)
        log.info("%s: %.0f s", method, times[method])
    truth = y[~measured]
    methods = {}
    for method, p in preds.items():
        methods[method] = {
            "overall": score(p, truth, genes),
            "bands": [score(p[band == k], truth[band == k], genes) for k in range(len(band_labels))],
            "time_s": times[method], "started": run_info["started"],
        }
        log.info("%s %s %.0f%% %s: %s", dataset, section, 100 * fraction, method, methods[method]["overall"])
    return {
        "dataset": dataset, "section": section, "fraction": fraction, "cut_x_um": round(cut, 1),
        "n_measured": int(measured.sum()), "n_unmeasured": int((~measured).sum()),
        "other_sections": others if "pixgene_with" in args.methods else [], "genes": genes,
        "spot_diameter_um": round(slide.spot_diameter_um, 1), "band_um": args.band_um, "bands": band_labels,
        "band_max_distance_um": [round(float(dist[band == k].max()), 1) for k in range(len(band_labels))],
        "methods": methods, **extra, "time_s": round(time.perf_counter() - t_start, 1),
        "run": {**run_info, "load_average_at_end": round(os.getloadavg()[0], 2)},
    }


def merge_runs(old: list[dict], new: list[dict]) -> list[dict]:
    """The runs of ``old`` and ``new``, one per (dataset, section, fraction): a run of both keeps the methods
    ``new`` did not redo (the split, genes and bands are the same: the same data and seed), each method with
    the ``started`` of the command that ran it, and lists every command in ``runs``."""
    key = lambda r: (r["dataset"], r["section"], r["fraction"])  # noqa: E731
    merged = {key(r): r for r in old}
    for r in new:
        before = merged.get(key(r))
        if before is not None and before["genes"] == r["genes"] and before["bands"] == r["bands"]:
            methods = {**before["methods"], **r["methods"]}
            commands = [c for c in before.get("runs", [before["run"]]) if c["started"] != r["run"]["started"]]
            extra = {k: v for k, v in before.items() if k.endswith("_model_id") or k.startswith("kernel_")}
            r = {**extra, **r, "methods": {m: methods[m] for m in METHODS if m in methods},
                 "runs": [*commands, r["run"]], "time_s": round(before["time_s"] + r["time_s"], 1),
                 "other_sections": r["other_sections"] or before["other_sections"]}
        merged[key(r)] = r
    return [merged[k] for k in sorted(merged)]


def run(args) -> dict:
    run_info = {"command": _report.command("reconstruct.py"), "started": _report.started(),
                "machine": _report.machine(), "n_members": args.n_members, "max_epochs": args.max_epochs,
                "seed": args.seed}
    runs = []
    for dataset in args.datasets:
        sections = [s for s in (args.sections or SECTIONS[dataset]) if s in SECTIONS[dataset]]
        for section in sections:
            for fraction in args.fractions:
                runs.append(run_one(dataset, section, fraction, args, run_info))
    result = {"n_genes": args.n_genes, "band_um": args.band_um, "min_band_spots": args.min_band_spots,
              "runs": runs}
    path = Path(args.out) / "reconstruct.json"
    if args.merge and path.is_file():
        old = json.loads(path.read_text())
        result["runs"] = merge_runs(old["runs"], runs)
        result["notes"] = old.get("notes", [])
    result["sections_run"] = sorted({f"{r['dataset']} {r['section']} {r['fraction']:.0%}" for r in result["runs"]})
    return result


# --------------------------------------------------------------------------------------------- report


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def best_interpolation(r: dict, where) -> tuple[str, dict]:
    """The interpolation baseline (nearest, kernel) with the higher PCC@M on ``where(method record)``."""
    have = [m for m in INTERPOLATION if m in r["methods"]]
    name = max(have, key=lambda m: where(r["methods"][m])["PCC@M"] or -np.inf)
    return name, where(r["methods"][name])


def render(result: dict) -> str:
    lines = [
        "# Reconstructing unmeasured tissue: `pg.tl.reconstruct`", "",
        "The spots left of a vertical line at the given quantile of x are kept as measured; every other spot is "
        "predicted and scored against its counts (per-gene Pearson r of log1p(1e4 x / total) across the "
        f"unmeasured spots: mean PCC@M, median PCC@S, first quartile PCC@F; {result['n_genes']} genes chosen "
        "by `pg.pp.select_genes` on the measured spots only). Distance bands: the nearest measured spot's "
        f"centre, {result['band_um']:g} um wide, the farthest merged until one holds at least "
        f"{result['min_band_spots']} spots.", "",
        "## Summary: PCC@M on the unmeasured spots", "",
        "| section | measured | spots measured / unmeasured | all: pixgene | all: pixgene + other sections "
        "| all: best interpolation | all: ridge | farthest band (um) | far: pixgene | far: pixgene + other "
        "sections | far: best interpolation |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        m = r["methods"]
        get = lambda k, f: _f(f(m[k])["PCC@M"]) if k in m else "-"  # noqa: E731
        overall, far = (lambda x: x["overall"]), (lambda x: x["bands"][-1])
        bi_name, bi = best_interpolation(r, overall)
        bf_name, bf = best_interpolation(r, far)
        lines.append(
            f"| {r['dataset']} {r['section']} | {r['fraction']:.0%} | {r['n_measured']} / {r['n_unmeasured']} "
            f"| {get('pixgene', overall)} | {get('pixgene_with', overall)} | {_f(bi['PCC@M'])} ({bi_name}) "
            f"| {get('ridge', overall)} | {r['bands'][-1]} ({far(next(iter(m.values())))['n_spots']} spots) "
            f"| {get('pixgene', far)} | {get('pixgene_with', far)} | {_f(bf['PCC@M'])} ({bf_name}) |")
    for r in result["runs"]:
        run = r["run"]
        lines += [
            "", f"## {r['dataset']} {r['section']}, {r['fraction']:.0%} measured (x <= {r['cut_x_um']} um)", "",
            f"{r['n_measured']} measured and {r['n_unmeasured']} unmeasured spots of {r['spot_diameter_um']} um; "
            + (f"other sections: {', '.join(r['other_sections'])}; " if r["other_sections"] else "")
            + (f"kernel bandwidth {r['kernel_bandwidth_um']} um; " if "kernel_bandwidth_um" in r else "")
            + f"{r['time_s']:.0f} s in all. "
            + " ".join(f"From `{c['command']}`, started {c['started']}; {c['machine']}; load average at the end "
                       f"{c['load_average_at_end']}; pixgene n_members {c['n_members'] or 'default (5)'}, max_epochs "
                       f"{c['max_epochs'] or 'default'}." for c in r.get("runs", [run])), "",
            "| method | PCC@F | PCC@S | PCC@M | MSE | time (s) |", "|---|---|---|---|---|---|",
        ]
        for name, v in r["methods"].items():
            o = v["overall"]
            lines.append(f"| {LABELS[name]} | {_f(o['PCC@F'])} | {_f(o['PCC@S'])} | {_f(o['PCC@M'])} "
                         f"| {_f(o['MSE'])} | {v['time_s']:.0f} |")
        lines += ["", "PCC@M by distance from the measured region (um; spots per band):", "",
                  "| method | " + " | ".join(f"{b} ({n})" for b, n in zip(
                      r["bands"], [b["n_spots"] for b in next(iter(r["methods"].values()))["bands"]], strict=True))
                  + " |", "|---|" + "---|" * len(r["bands"])]
        for name, v in r["methods"].items():
            lines.append(f"| {LABELS[name]} | " + " | ".join(_f(b["PCC@M"]) for b in v["bands"]) + " |")
    lines += ["", f"Sections run: {', '.join(result['sections_run'])}."]
    lines += [f"\n{note}" for note in result.get("notes", [])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--sections", nargs="+", default=None, help="sections to run (default: all of each dataset)")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--n-genes", type=int, default=50)
    parser.add_argument("--band-um", type=float, default=200.0)
    parser.add_argument("--min-band-spots", type=int, default=20)
    parser.add_argument("--n-members", type=int, default=None, help="pixgene's decoders (default: its own, 5)")
    parser.add_argument("--max-epochs", type=int, default=None, help="pixgene's epochs (default: its own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge", action="store_true", help="keep the other runs of the existing JSON")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the existing .json")
    if "--render" in __import__("sys").argv:
        path = _report.RESULTS / "reconstruct.json"
        (_report.RESULTS / "reconstruct.md").write_text(render(json.loads(path.read_text())))
        return
    _report.main("reconstruct", parser, run, render)


if __name__ == "__main__":
    main()
