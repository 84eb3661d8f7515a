"""How well pixgene's uncertainty calibrates on held-out sections, and what storing the members' maps costs.

Folds
    st_mob: fit on MOB1 + MOB2, predict MOB3; her2st: fit on C3 + C4 + C5, predict C2. ``pg.tl.fit`` with its
    defaults (five members), the 50 genes ``pg.pp.select_genes`` picks on the training sections (as
    ``benchmarks/accuracy.py`` does), ``predict_dense(uncertainty=True)`` over the whole held-out section (into
    a zarr store, as a large slide would be), ``aggregate(keep_members=True)`` over its spots.

Measured counts and the predicted scale
    The read-out is in the training slides' scale (their capture efficiencies' geometric mean); the held-out
    section was sequenced to its own depth. A fair prediction of its MEASURED counts scales the expected counts
    by one number per section, c = (measured total counts of the section's spots) / (predicted library size,
    the total-count channel, summed over the same spots): the section's sequencing depth, which any method
    must be told, and nothing about any one spot. Means, members' means and standard deviations are scaled by
    c. A second variant (``"spot"``) scales each spot by its own measured over predicted library size, as the
    log-normalised scores of ``accuracy.py`` do implicitly; it leaks each spot's total, so it is a reference.

Scores (over the held-out spots, per gene, then averaged over genes)
    (a) Spearman correlation between the members' SD of a spot's expected count and its absolute error
        |measured - c * expected|; beside it the same for the expected count itself as the score (how much of
        the SD's ranking is just the expression level) and for the coefficient of variation (SD / mean) against
        the error of log-normalised values (``log1p(1e4 x / total)``, the accuracy benchmark's scale).
    (b) Coverage of the 50 % and 90 % predictive intervals of the measured counts, for the negative binomial at
        the scaled mean with the members' pooled theta (``interval_kind="nb"``) and for the mixture of the
        members' negative binomials (``"mixture"``); beside each its nominal coverage under its own
        distribution (counts are whole numbers, so an interval of quantiles holds more than its level: a
        calibrated model covers what its distribution says, not exactly 50 % / 90 %), and the mean width.
    (c) Error of the spots kept when each gene's least certain 10 / 25 / 50 % of spots (largest SD) are
        dropped, as a fraction of the error over all spots: mean absolute error of counts ranked by SD and,
        as controls, ranked by the expected count and by the true error (the best any ranking can do); and
        the mean absolute log-normalised error ranked by the CV.

Also: the time of ``predict_dense`` with and without ``uncertainty`` on the same store (alternating runs) and
the bytes of the two elements. Each dataset is one command; results merge into ``uncertainty.json``/``.md``.

    python benchmarks/uncertainty.py --datasets st_mob
    python benchmarks/uncertainty.py --datasets her2st
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import pixgene as pg  # noqa: E402

log = logging.getLogger("uncertainty")
RESULTS = Path(__file__).parent / "results"
FOLDS = {"st_mob": (("MOB1", "MOB2"), "MOB3"), "her2st": (("C3", "C4", "C5"), "C2")}
LEVELS = (0.5, 0.9)
DROPS = (0.1, 0.25, 0.5)


# --------------------------------------------------------------------------------------------- scoring


def _ranks(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(a, axis=0)


def spearman_per_gene(score: np.ndarray, error: np.ndarray) -> np.ndarray:
    """Spearman r between two (n, G) arrays, per gene (NaN where either is constant)."""
    a, b = _ranks(score), _ranks(error)
    a, b = a - a.mean(0), b - b.mean(0)
    denom = np.sqrt((a**2).sum(0) * (b**2).sum(0))
    return np.where(denom > 0, (a * b).sum(0) / np.where(denom > 0, denom, 1.0), np.nan)


def kept_error(score: np.ndarray, error: np.ndarray, drop: float) -> float:
    """Mean over genes of the mean error of the spots kept when the ``drop`` share with the largest score is
    dropped, over the same mean with every spot kept."""
    n = len(score)
    keep = n - int(round(drop * n))
    order = np.argsort(score, axis=0, kind="stable")[:keep]  # smallest scores kept
    kept = np.take_along_axis(error, order, axis=0).mean(0)
    return float(np.mean(kept) / np.mean(error.mean(0)))


def coverage(y: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    return float(np.mean((y >= lo) & (y <= hi)))


def nominal_nb(lo, hi, mu, theta) -> float:
    """Mean probability of [lo, hi] under each spot's own negative binomial."""
    from scipy.stats import nbinom

    p = theta / (theta + mu)
    return float(np.mean(nbinom.cdf(hi, theta, p) - nbinom.cdf(lo - 1, theta, p)))


def nominal_mixture(lo, hi, mu_members, theta_members) -> float:
    from scipy.stats import nbinom

    p = theta_members[None] / (theta_members[None] + mu_members)  # (n, M, G)
    inside = nbinom.cdf(hi[:, None], theta_members[None], p) - nbinom.cdf(lo[:, None] - 1, theta_members[None], p)
    return float(np.mean(inside.mean(axis=1)))


def interval_scores(y, mu, mu_members, theta_members) -> dict:
    """Coverage, nominal coverage and mean width of the NB and mixture intervals of each level."""
    from pixgene._bench import nb_mixture_quantiles, nb_quantiles, pooled_theta

    theta = pooled_theta(theta_members)
    out = {}
    for level in LEVELS:
        a, b = (1 - level) / 2, (1 + level) / 2
        lo, hi = nb_quantiles(mu, theta, a), nb_quantiles(mu, theta, b)
        mlo, mhi = nb_mixture_quantiles(mu_members, theta_members, a), nb_mixture_quantiles(mu_members,
                                                                                           theta_members, b)
        out[f"{round(100 * level)}"] = {
            "nb": {"coverage": coverage(y, lo, hi), "nominal": nominal_nb(lo, hi, mu, theta),
                   "width": float(np.mean(hi - lo)),
                   "coverage_per_gene": _quartiles(np.mean((y >= lo) & (y <= hi), axis=0))},
            "mixture": {"coverage": coverage(y, mlo, mhi),
                        "nominal": nominal_mixture(mlo, mhi, mu_members, theta_members),
                        "width": float(np.mean(mhi - mlo)),
                        "coverage_per_gene": _quartiles(np.mean((y >= mlo) & (y <= mhi), axis=0))},
        }
    return out


def _quartiles(values: np.ndarray) -> list[float]:
    return [round(float(v), 4) for v in np.nanpercentile(values, [0, 25, 50, 75, 100])]


def calibration(y, totals, X, members, sd, pred_totals, theta_members, scaling: str) -> dict:
    """The scores (a), (b), (c) for measured counts ``y`` (n, G) and the read-out scaled by ``scaling``."""
    from pixgene._bench import log_normalize_np

    if scaling == "section":
        c = np.full((len(y), 1), totals.sum() / pred_totals.sum())
    else:
        c = (totals / np.maximum(pred_totals, 1e-12))[:, None]
    mu, mu_members, sd_c = c * X, c[:, :, None] * members, c * sd
    err = np.abs(y - mu)
    cv = sd / np.maximum(X, 1e-12)
    log_err = np.abs(log_normalize_np(y, totals) - log_normalize_np(X, pred_totals))
    rho = spearman_per_gene(sd_c, err)
    rho_mu = spearman_per_gene(mu, err)
    rho_cv = spearman_per_gene(cv, log_err)
    result = {
        "scale": float(c.mean()) if scaling == "section" else _quartiles(c.ravel()),
        "spearman_sd_abs_error": float(np.nanmean(rho)),
        "spearman_sd_abs_error_per_gene": _quartiles(rho),
        "spearman_mean_abs_error": float(np.nanmean(rho_mu)),
        "spearman_cv_log_error": float(np.nanmean(rho_cv)),
        "intervals": interval_scores(y, mu, mu_members, theta_members),
        "drop": {},
    }
    for f in DROPS:
        result["drop"][f"{round(100 * f)}"] = {
            "mae_by_sd": kept_error(sd_c, err, f), "mae_by_mean": kept_error(mu, err, f),
            "mae_by_error": kept_error(err, err, f), "log_error_by_cv": kept_error(cv, log_err, f),
            "log_error_by_error": kept_error(log_err, log_err, f),
        }
    result["mae_all"] = float(err.mean())
    result["log_error_all"] = float(log_err.mean())
    return result


# --------------------------------------------------------------------------------------------- one fold


def fitted_model(train: list, genes: list[str], seed: int, cache: Path | None):
    """``pg.tl.fit`` with its defaults, or the model an earlier run of the same fold saved in ``cache`` (members
    trained by a run that was stopped are resumed from ``cache``'s checkpoints)."""
    from pixgene.tl import PixNet

    fold = {"genes": list(genes), "seed": seed}
    if cache is not None and (cache / "fold.json").is_file() and json.loads((cache / "fold.json").read_text()) == fold:
        model = PixNet.load(cache / "model")
        log.info("loaded the fitted model from %s", cache / "model")
        return model, model.training.get("fit_s")
    t0 = time.perf_counter()
    model = pg.tl.fit(train, genes=genes, random_state=seed, progress=False,
                      checkpoint_dir=None if cache is None else cache / "checkpoints")
    fit_s = round(time.perf_counter() - t0, 1)
    model.training["fit_s"] = fit_s
    if cache is not None:
        model.save(cache / "model", overwrite=True)
        (cache / "fold.json").write_text(json.dumps(fold))
    return model, fit_s


def run_dataset(dataset: str, seed: int, repeats: int, cache: Path | None = None) -> dict:
    import scipy.sparse as sp
    import spatialdata as sd
    from accuracy import N_GENES, PeakMemory, _align, load_section

    from pixgene._bench import full_resolution, nb_dispersion

    train_names, test_name = FOLDS[dataset]
    t0 = time.perf_counter()
    train = [load_section(dataset, s) for s in train_names]
    genes = pg.pp.select_genes(train, n_top=N_GENES, flavor="hvg")
    log.info("%s: fitting on %s (%d genes)", dataset, "+".join(train_names), len(genes))
    model, fit_s = fitted_model(train, genes, seed, None if cache is None else cache / f"{dataset}_seed{seed}")
    log.info("fitted %r in %s s", model, fit_s)
    del train
    record: dict = {"train": list(train_names), "test": test_name, "genes": genes, "fit_s": fit_s,
                    "model_id": model.model_id, "n_members": model.n_members,
                    "theta": _quartiles(np.asarray(nb_dispersion(model))[:, : len(genes)].ravel())}

    with tempfile.TemporaryDirectory(prefix="pixgene-uncertainty-") as tmp:
        path = Path(tmp) / f"{test_name}.zarr"
        load_section(dataset, test_name).write(path)
        test = sd.read_zarr(path)
        times = {"plain": [], "uncertainty": []}
        peaks = {"plain": [], "uncertainty": []}
        for r in range(repeats):
            for kind in ("plain", "uncertainty"):
                key = "he_plain" if kind == "plain" else "he_unc"
                with PeakMemory() as mem:
                    t = time.perf_counter()
                    pg.tl.predict_dense(test, model, key_added=key, overwrite=r > 0, progress=False,
                                        uncertainty=kind == "uncertainty")
                    times[kind].append(round(time.perf_counter() - t, 1))
                peaks[kind].append(round(mem.peak / 1e9, 2))
                log.info("predict_dense %s: %.1f s, peak RSS %.2f GB", kind, times[kind][-1], peaks[kind][-1])
        plain = full_resolution(test.images["he_plain"])
        mean = full_resolution(test.images["he_unc"])
        members_map = full_resolution(test.images["he_unc_members"])
        same = bool(np.array_equal(np.asarray(plain.values), np.asarray(mean.values)))
        record["predict"] = {
            "map_shape": list(plain.shape), "um_per_px": 4.0,
            "time_s": times, "time_ratio": round(float(np.median(times["uncertainty"]) / np.median(times["plain"])),
                                                 3),
            "peak_rss_gb": peaks,
            "bytes_mean_map": int(plain.nbytes), "bytes_members_map": int(members_map.nbytes),
            "mean_map_identical": same,
            "chunks": test.attrs["pixgene"]["dense"]["he_unc"]["chunks"],
        }
        if not same:
            log.error("the mean map differs with uncertainty=True")
        t = time.perf_counter()
        table = pg.tl.aggregate(test, shapes="spots", dense_key="he_unc", key_added="spots_unc",
                                keep_members=True, progress=False)
        record["aggregate_s"] = round(time.perf_counter() - t, 1)
        measured = test.tables["table"]
        order = _align(table, measured)
        X = np.asarray(table[:, genes].X, dtype=np.float64)[order]
        sd_ = np.asarray(table[:, genes].layers["pixgene_sd"], dtype=np.float64)[order]
        members = np.stack([np.asarray(table[:, genes].layers[f"pixgene_member{k}"], dtype=np.float64)[order]
                            for k in range(model.n_members)], axis=1)
        pred_totals = table.obs["pixgene_total_counts"].to_numpy(dtype=np.float64)[order]
        Y = measured[:, genes].X
        y = (Y.toarray() if sp.issparse(Y) else np.asarray(Y)).astype(np.float64)
        totals = np.asarray(measured.X.sum(1), dtype=np.float64).ravel()
    gene_cols = [model.outputs.index(g) for g in genes]
    theta_members = np.asarray(nb_dispersion(model))[:, gene_cols]
    record["n_spots"] = int(len(y))
    record["calibration"] = {s: calibration(y, totals, X, members, sd_, pred_totals, theta_members, s)
                             for s in ("section", "spot")}
    record["dataset_s"] = round(time.perf_counter() - t0, 1)
    return record


# --------------------------------------------------------------------------------------------- report


def _f(v, d=3) -> str:
    return "n/a" if v is None else f"{v:.{d}f}"


def render(result: dict) -> str:
    lines = ["# Uncertainty: calibration on held-out sections", "",
             "Five-member default fit on the training sections, `predict_dense(uncertainty=True)` over the held-out "
             "section, `aggregate` over its spots; 50 training-section HVGs. Counts compared with the measured "
             "ones after scaling the read-out by the section's measured over predicted total counts (`section`; "
             "`spot`: each spot's own library size, a reference that uses each spot's total). See the docstring "
             "of `benchmarks/uncertainty.py`.", "", "Runs:", ""]
    for run in result.get("runs", []):
        lines.append(f"- `{run['command']}`: {run['started']} to {run.get('finished', '?')}; {run['machine']}")
    for ds, r in result.get("datasets", {}).items():
        p = r["predict"]
        lines += ["", f"## {ds}: fit {'+'.join(r['train'])}, predict {r['test']} ({r['n_spots']} spots)", "",
                  f"Fit {_f(r['fit_s'], 0)} s, {r['n_members']} members; theta (members x genes) min/q1/median/q3/max "
                  f"{r['theta']}. Map {p['map_shape']} at {p['um_per_px']} um/px; "
                  f"mean map identical with uncertainty: {p['mean_map_identical']}.", "",
                  "| | plain | uncertainty=True | ratio |", "|---|---|---|---|",
                  f"| predict_dense time (s, each run) | {p['time_s']['plain']} | {p['time_s']['uncertainty']} | "
                  f"{p['time_ratio']:.2f} |",
                  f"| peak RSS (GB, each run) | {p['peak_rss_gb']['plain']} | {p['peak_rss_gb']['uncertainty']} | |",
                  f"| element bytes | {p['bytes_mean_map'] / 1e6:.0f} MB | + {p['bytes_members_map'] / 1e6:.0f} MB "
                  f"members | {p['bytes_members_map'] / p['bytes_mean_map']:.1f} |", ""]
        for scaling, c in r["calibration"].items():
            lines += [f"### scaling: {scaling} (scale {c['scale']})", "",
                      "(a) Spearman r per gene, averaged: "
                      f"SD vs |error| **{_f(c['spearman_sd_abs_error'])}** (per gene min/q1/median/q3/max "
                      f"{c['spearman_sd_abs_error_per_gene']}); control, expected count vs |error| "
                      f"{_f(c['spearman_mean_abs_error'])}; CV vs |log-normalised error| "
                      f"{_f(c['spearman_cv_log_error'])}.", "",
                      "(b) Predictive intervals of the measured counts:", "",
                      "| level | kind | coverage | nominal (own distribution) | mean width | coverage per gene "
                      "(min/q1/med/q3/max) |", "|---|---|---|---|---|---|"]
            for level, kinds in c["intervals"].items():
                for kind, v in kinds.items():
                    lines.append(f"| {level} % | {kind} | {_f(v['coverage'])} | {_f(v['nominal'])} | "
                                 f"{_f(v['width'], 1)} | {v['coverage_per_gene']} |")
            lines += ["", "(c) Error of the kept spots over the error of all spots (per gene, averaged; lower = "
                      "the dropped spots had the larger errors):", "",
                      "| dropped | MAE, by SD | MAE, by expected count | MAE, by true error (best) | "
                      "log error, by CV | log error, by true error (best) |", "|---|---|---|---|---|---|"]
            for f, v in c["drop"].items():
                lines.append(f"| {f} % | {_f(v['mae_by_sd'])} | {_f(v['mae_by_mean'])} | {_f(v['mae_by_error'])} | "
                             f"{_f(v['log_error_by_cv'])} | {_f(v['log_error_by_error'])} |")
            lines += ["", f"All spots: MAE {c['mae_all']:.3f} counts, mean |log-normalised error| "
                      f"{c['log_error_all']:.3f}.", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["st_mob"], choices=list(FOLDS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="alternating predict_dense runs of each kind")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--model-cache", default=None,
                        help="folder where each fold's fitted model (and its member checkpoints) is kept: a rerun "
                             "predicts with it instead of fitting again")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the existing .json")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "uncertainty.json", out / "uncertainty.md"
    result = json.loads(json_path.read_text()) if json_path.exists() else {"datasets": {}, "runs": []}
    if args.render:
        md_path.write_text(render(result))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("pixgene", "numba", "lightning", "pytorch_lightning"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from _report import machine

    run = {"command": " ".join(["python benchmarks/uncertainty.py", *sys.argv[1:]]),
           "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
           "datasets": list(args.datasets)}
    for ds in args.datasets:
        cache = None if args.model_cache is None else Path(args.model_cache)
        result["datasets"][ds] = {**run_dataset(ds, args.seed, args.repeats, cache), "seed": args.seed}
    run["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    # a dataset run again replaces its earlier run's line
    result["runs"] = [r for r in result.get("runs", []) if not set(r.get("datasets", [])) <= set(args.datasets)]
    result["runs"].append(run)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
