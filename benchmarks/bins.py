"""Training on square bins (Visium HD) and other polygon spots, against training on circles.

Three parts, each side by side in one run:

- ``synthetic``: one synthetic slide (``pg.datasets.synthetic(seed, bins_um=16)``, truth known everywhere)
  measured twice over the same tissue: 55 um circles on a 100 um grid (Visium) and 16 um square bins
  (Visium HD). A model fitted on each (pixgene's defaults); each dense map read out over 8 um and 16 um
  bins and the 55 um spots and scored against the truth (per-gene Pearson of log1p(1e4 x / total), as
  ``benchmarks/accuracy.py``'s cross-scale part), next to the ceiling (``truth_expected`` read out the same
  way).
- ``her2st``: real spots given three ways: the circles the reader makes, the same spots as regular 96-gons
  (polygons, as a segmentation or another platform would give them; 0.07 % less area than their circles),
  and circles shrunk to the 96-gons' area (the control: circles again, the same change of area). One model
  each on two sections, scored on the third against its measured counts. The polygon path should score as
  the circle path does, and its prediction should differ from the circles' as much as the control's does
  (training amplifies any change: one decoder's prediction on a new section depends even on its seed).
- ``loss``: the loss terms on the same synthetic slide, one decoder a model: the default (count likelihood,
  MSE and Pearson on log-normalised values), without the MSE term, without the Pearson term, and the count
  likelihood alone, fitted on the 16 um bins; the default and no MSE on the 55 um spots. Scored as above.
- ``planning``: where the training tiles go (``plan_tiles``: a set cover of every spot by tile cores) for
  Visium HD-sized bin grids, the per-spot candidate lists against the candidates x spots matrix that was used
  before (kept here as the reference): time, peak memory (tracemalloc) and whether the tiles are the same.

    python benchmarks/bins.py [--parts planning her2st synthetic loss] [--n-members 5] [--merge]

Prints a table and writes ``benchmarks/results/bins.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
import tracemalloc

import _report
import numpy as np

import pixgene as pg

log = logging.getLogger("bins")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def summary(s: dict) -> dict:
    return {k: round(float(s[k]), 4) for k in ("PCC@F", "PCC@S", "PCC@M", "MSE")}


# -------------------------------------------------------------------------------------------------- synthetic


#: where the synthetic parts read each dense map out (name: shapes element)
READOUTS = {"8 um bins": "grid_8um", "16 um bins": "bins", "55 um spots": "spots"}


def bins_slide(seed: int, **options) -> tuple:
    """The synthetic slide of both synthetic parts (55 um spots, 16 um bins and an 8 um grid) and its genes."""
    sdata = pg.datasets.synthetic(seed, size_um=3072.0, n_genes=30, spot_diameter_um=55.0, spot_pitch_um=100.0,
                                  bins_um=16.0, **options)
    pg.tl.make_grid(sdata, bin_um=8.0, key_added="grid_8um")
    return sdata, [g for g in sdata.tables["table"].var_names if g.startswith("GENE")]


def readout_scores(sdata, dense_key: str, genes: list[str]) -> dict:
    """The map ``dense_key`` read out over every shapes element of READOUTS, each scored against the truth."""
    scores = {}
    for where, shapes in READOUTS.items():
        key = f"{shapes}_{dense_key}"
        pg.tl.aggregate(sdata, shapes=shapes, dense_key=dense_key, key_added=key, progress=False)
        scores[where] = summary(pg.tl.evaluate(sdata, predicted=key, truth="truth", genes=genes).summary)
        del sdata.tables[key]
    return scores


def synthetic_part(seed: int, n_members: int) -> dict:
    sdata, genes = bins_slide(seed, expected_truth=True)
    rows = []
    ceiling = readout_scores(sdata, "truth_expected", genes)
    for name, shapes_key, table_key in (("55 um circles (Visium)", "spots", "table"),
                                        ("16 um square bins (Visium HD)", "bins", "bins_table")):
        log.info("fitting on %s (%d spots)", name, sdata.tables[table_key].n_obs)
        t0 = time.perf_counter()
        model = pg.tl.fit(sdata, shapes_key=shapes_key, table_key=table_key, genes=genes, random_state=seed,
                          n_members=n_members, progress=False)
        fit_s = time.perf_counter() - t0
        dense = f"he_{shapes_key}_model"
        pg.tl.predict_dense(sdata, model, key_added=dense, progress=False)
        scores = readout_scores(sdata, dense, genes)
        rows.append({"trained_on": name, "n_spots": int(sdata.tables[table_key].n_obs),
                     "n_tiles": int(model.training.get("n_tiles", 0)), "fit_s": round(fit_s, 1),
                     "total_s": round(time.perf_counter() - t0, 1), "model_id": model.model_id,
                     "scores": scores, "peak_rss_gb": round(peak_rss_gb(), 2)})
        log.info("%s", rows[-1])
    return {"seed": seed, "size_um": 3072.0, "n_genes": len(genes), "n_members": n_members, "rows": rows,
            "ceiling": ceiling}


LOSSES = {"default": {}, "no MSE": {"mse": 0.0}, "no Pearson": {"pearson": 0.0},
          "count likelihood alone": {"mse": 0.0, "pearson": 0.0}}


def loss_part(seed: int) -> dict:
    sdata, genes = bins_slide(seed)
    rows = []
    runs = [("16 um square bins", "bins", "bins_table", name) for name in LOSSES]
    runs += [("55 um circles", "spots", "table", name) for name in ("default", "no MSE")]
    for trained_on, shapes_key, table_key, name in runs:
        t0 = time.perf_counter()
        model = pg.tl.fit(sdata, shapes_key=shapes_key, table_key=table_key, genes=genes, random_state=seed,
                          n_members=1, progress=False, training=pg.tl.TrainConfig(loss_weights=LOSSES[name]))
        fit_s = time.perf_counter() - t0
        pg.tl.predict_dense(sdata, model, key_added="loss_map", overwrite=True, progress=False)
        scores = readout_scores(sdata, "loss_map", genes)
        rows.append({"trained_on": trained_on, "loss": name, "loss_weights": LOSSES[name], "scores": scores,
                     "fit_s": round(fit_s, 1), "model_id": model.model_id})
        log.info("loss %s", rows[-1])
    return {"seed": seed, "rows": rows}


# ----------------------------------------------------------------------------------------------------- her2st


def shrink_circles(sdata, factor: float) -> None:
    spots = sdata.shapes["spots"]
    spots["radius"] = spots["radius"] * factor


def as_polygons(sdata, n_vertices: int = 96) -> None:
    """Replace the circles of ``shapes["spots"]`` by regular ``n_vertices``-gons inscribed in them."""
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import get_transformation

    spots = sdata.shapes["spots"]
    angles = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)
    ring = np.stack([np.cos(angles), np.sin(angles)], 1)
    polys = [shapely.Polygon(np.array([x, y]) + r * ring)
             for x, y, r in zip(spots.geometry.x, spots.geometry.y, spots["radius"], strict=True)]
    frame = gpd.GeoDataFrame(geometry=polys, index=spots.index)
    sdata.shapes["spots"] = ShapesModel.parse(frame, transformations=get_transformation(spots, get_all=True))


def her2st_part(seed: int, n_members: int, train: list[str], test: str) -> dict:
    from pixgene._bench import log_normalize_np, score_matrices

    rows = []
    n_vertices = 96
    equal_area = float(np.sqrt(n_vertices / (2 * np.pi) * np.sin(2 * np.pi / n_vertices)))
    for kind in ("circles", f"{n_vertices}-gons", "circles of the 96-gons' area"):
        slides = [pg.datasets.her2st(s) for s in (*train, test)]
        for s in slides:
            if kind.endswith("-gons"):
                as_polygons(s, n_vertices)
            elif kind != "circles":
                shrink_circles(s, equal_area)
        train_sd, test_sd = slides[:-1], slides[-1]
        genes = pg.pp.select_genes(train_sd, n_top=50)
        t0 = time.perf_counter()
        model = pg.tl.fit(train_sd, genes=genes, random_state=seed, n_members=n_members, progress=False)
        fit_s = time.perf_counter() - t0
        pg.tl.predict_dense(test_sd, model, progress=False)
        table = pg.tl.aggregate(test_sd, shapes="spots", inplace=False, progress=False)
        measured = test_sd.tables["table"]
        order = table.obs["instance_id"].astype(str).to_numpy()
        m = measured[measured.obs["instance_id"].astype(str).to_numpy().argsort()]
        m = m[np.searchsorted(m.obs["instance_id"].astype(str).to_numpy(), order)]
        y = np.asarray(m[:, genes].X.toarray(), dtype=np.float64)
        y = log_normalize_np(y, np.asarray(m.X.sum(1)).ravel())
        p = log_normalize_np(np.asarray(table[:, genes].X, dtype=np.float64),
                             table.obs["pixgene_total_counts"].to_numpy(float))
        s = score_matrices(p, y, genes).summary
        rows.append({"spots": kind, "fit_s": round(fit_s, 1), "model_id": model.model_id,
                     "scores": {k: round(float(s[k]), 4) for k in ("PCC@F", "PCC@S", "PCC@M", "MSE")},
                     "prediction": p})
        log.info("her2st %s: %s", kind, rows[-1]["scores"])
    a, b, c = (r.pop("prediction") for r in rows)

    def agreement(x, y) -> dict:
        per_gene = [np.corrcoef(x[:, g], y[:, g])[0, 1] for g in range(x.shape[1])]
        return {"median_gene_r": round(float(np.nanmedian(per_gene)), 4),
                "max_abs_diff": round(float(np.abs(x - y).max()), 4)}

    return {"train": train, "test": test, "n_members": n_members, "rows": rows,
            "circles_vs_polygons": agreement(a, b), "circles_vs_equal_area_circles": agreement(a, c)}


# --------------------------------------------------------------------------------------------------- planning


def plan_tiles_dense(centers: np.ndarray, radius: float, tile: int, margin: int) -> np.ndarray:
    """The candidates x spots set cover pixgene used before (the reference)."""
    from pixgene._bench import spots_inside

    core = tile - 2 * margin
    step = max(8, int((core - 2 * radius) // 2))
    lo = np.floor(centers.min(0) - tile).astype(int)
    hi = np.ceil(centers.max(0)).astype(int)
    xs, ys = np.arange(lo[0], hi[0] + 1, step), np.arange(lo[1], hi[1] + 1, step)
    cand = np.stack(np.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
    inside = spots_inside(cand, centers, radius, tile, margin)
    keep = inside.any(1)
    cand, inside = cand[keep], inside[keep]
    uncovered = np.ones(len(centers), dtype=bool)
    chosen = []
    while uncovered.any():
        gain = (inside & uncovered[None, :]).sum(1)
        best = int(np.argmax(gain))
        if gain[best] == 0:
            break
        chosen.append(cand[best])
        uncovered &= ~inside[best]
    return np.asarray(chosen, dtype=int).reshape(-1, 2)


def measure(fn, *args) -> tuple[object, float, float]:
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn(*args)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, seconds, peak / 1024**2


def planning_part(dense_limit: int) -> list[dict]:
    from pixgene._bench import plan_tiles

    rows = []
    # encoder pixels of 1 um (pixgene's default working resolution on her2st), tiles of 256 px, margin 16
    for side_mm, bin_um in ((1.0, 16.0), (2.0, 16.0), (3.0, 16.0), (6.5, 16.0), (6.5, 8.0)):
        g = np.arange(0, side_mm * 1000, bin_um) + bin_um / 2
        centers = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
        r = bin_um / 2
        new, t_new, m_new = measure(plan_tiles, centers, np.full(len(centers), r), 256, 16)
        row = {"side_mm": side_mm, "bin_um": bin_um, "n_bins": len(centers), "n_tiles": len(new),
               "per_spot_s": round(t_new, 3), "per_spot_peak_mb": round(m_new, 1)}
        n_cand = (int((side_mm * 1000 + 256) / max(8, int((224 - 2 * r) // 2))) + 1) ** 2
        if n_cand * len(centers) <= dense_limit:
            old, t_old, m_old = measure(plan_tiles_dense, centers, r, 256, 16)
            row.update(matrix_s=round(t_old, 3), matrix_peak_mb=round(m_old, 1),
                       same_tiles=bool(np.array_equal(old, new)))
        else:
            row.update(matrix_s=None, matrix_peak_mb=round(n_cand * len(centers) / 1024**2, 1), same_tiles=None)
        log.info("planning %s", row)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------- report


def _f(v, digits: int = 3) -> str:
    return "" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def render(result: dict) -> str:
    lines = ["# Training on square bins and polygon spots", ""]

    def made_by(part: dict) -> list[str]:
        r = part["run"]
        return [f"Made by `{r['command']}`: {r['started']}; {r['machine']}.", ""]

    syn = result.get("synthetic")
    if syn:
        lines += ["## Synthetic slide: Visium circles against Visium HD bins, scored against the truth", "",
                  *made_by(syn),
                  f"Seed {syn['seed']}, {syn['size_um']:g} um square, {syn['n_genes']} genes, "
                  f"{syn['n_members']} decoder(s) a model. PCC@M (PCC@S) of each dense map read out over:", "",
                  "| trained on | spots | tiles | 8 um bins | 16 um bins | 55 um spots | fit (s) | peak RSS (GB) |",
                  "|---|---|---|---|---|---|---|---|"]
        wheres = ["8 um bins", "16 um bins", "55 um spots"]
        for r in syn["rows"]:
            cells = [f"{r['scores'][w]['PCC@M']:.3f} ({r['scores'][w]['PCC@S']:.3f})" for w in wheres]
            lines.append(f"| {r['trained_on']} | {r['n_spots']} | {r['n_tiles']} | " + " | ".join(cells)
                         + f" | {r['fit_s']:.0f} | {r['peak_rss_gb']:.2f} |")
        cells = [f"{syn['ceiling'][w]['PCC@M']:.3f} ({syn['ceiling'][w]['PCC@S']:.3f})" for w in wheres]
        lines += ["| ceiling (expected truth) | | | " + " | ".join(cells) + " | | |", ""]
    her = result.get("her2st")
    if her:
        lines += ["## her2st: the same spots as circles and as 96-gons", "", *made_by(her),
                  f"Trained on {' + '.join(her['train'])}, scored on {her['test']} against its counts (50 HVG), "
                  f"{her['n_members']} decoder(s) a model.", "",
                  "| spots | PCC@F | PCC@S | PCC@M | MSE | fit (s) | model id |", "|---|---|---|---|---|---|---|"]
        for r in her["rows"]:
            s = r["scores"]
            lines.append(f"| {r['spots']} | {s['PCC@F']:.3f} | {s['PCC@S']:.3f} | {s['PCC@M']:.3f} | "
                         f"{s['MSE']:.3f} | {r['fit_s']:.0f} | {r['model_id']} |")
        pairs = (("circles against 96-gons", her["circles_vs_polygons"]),
                 ("circles against circles of the 96-gons' area (control)", her["circles_vs_equal_area_circles"]))
        lines += ["", f"Predictions of {her['test']} compared (log-normalised; median over genes of the Pearson r "
                  "across spots, and the largest absolute difference):", ""]
        lines += [f"- {name}: r {v['median_gene_r']:.4f}, largest difference {v['max_abs_diff']:.4f}"
                  for name, v in pairs]
        lines += ["", "Any change of the spots changes every gradient step, and one decoder's prediction of a new "
                  "section moves with it (it moves with the decoder's seed too: docs/concepts.md, \"Members\"); "
                  "the control shows how far a change of area alone moves it.", ""]
    loss = result.get("loss")
    if loss:
        lines += ["## Loss terms (one decoder a model, the synthetic slide above)", "", *made_by(loss),
                  "PCC@M against the truth over:", "",
                  "| trained on | loss | 8 um bins | 16 um bins | 55 um spots | fit (s) |", "|---|---|---|---|---|---|"]
        for r in loss["rows"]:
            cells = [f"{r['scores'][w]['PCC@M']:.3f}" for w in ("8 um bins", "16 um bins", "55 um spots")]
            lines.append(f"| {r['trained_on']} | {r['loss']} | " + " | ".join(cells) + f" | {r['fit_s']:.0f} |")
        lines.append("")
    plan = result.get("planning")
    if plan:
        lines += ["## Planning the training tiles of a bin grid (256 px tiles, 1 um px)", "", *made_by(plan),
                  "Per-spot candidate lists (now) against the candidates x spots matrix (before; not run where the "
                  "matrix alone would pass the limit: its size is given).", "",
                  "| grid | bins | tiles | now (s) | now peak (MB) | before (s) | before peak (MB) | same tiles |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in plan["rows"]:
            lines.append(f"| {r['side_mm']:g} mm, {r['bin_um']:g} um | {r['n_bins']} | {r['n_tiles']} | "
                         f"{r['per_spot_s']:.3f} | {r['per_spot_peak_mb']:.1f} | {_f(r['matrix_s'])} | "
                         f"{r['matrix_peak_mb']:.1f} | {_f(r['same_tiles'])} |")
        lines.append("")
    return "\n".join(lines)


PARTS = ("planning", "her2st", "synthetic", "loss")


def run(args) -> dict:
    result: dict = {}
    if args.merge:
        path = _report.RESULTS / "bins.json"
        if path.exists():
            result = {k: v for k, v in json.loads(path.read_text()).items() if k in PARTS}
    # each part records the run that made it (a merged file holds parts of several runs)
    made_by = {"command": _report.command("bins.py"), "started": _report.started(), "machine": _report.machine()}
    if "planning" in args.parts:
        result["planning"] = {"rows": planning_part(args.dense_limit), "run": made_by}
    if "her2st" in args.parts:
        result["her2st"] = {**her2st_part(args.seed, args.her2st_members, args.train, args.test), "run": made_by}
    if "synthetic" in args.parts:
        result["synthetic"] = {**synthetic_part(args.seed, args.n_members), "run": made_by}
    if "loss" in args.parts:
        result["loss"] = {**loss_part(args.seed), "run": made_by}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["planning", "her2st", "synthetic", "loss"],
                        choices=list(PARTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-members", type=int, default=5, help="decoders a synthetic model (default: pixgene's)")
    parser.add_argument("--her2st-members", type=int, default=1)
    parser.add_argument("--train", nargs="+", default=["C3", "C4"])
    parser.add_argument("--test", default="C5")
    parser.add_argument("--dense-limit", type=float, default=2e8,
                        help="run the matrix reference where candidates x spots is at most this")
    parser.add_argument("--merge", action="store_true", help="keep the other parts of the existing JSON")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the existing .json")
    if "--render" in __import__("sys").argv:
        path = _report.RESULTS / "bins.json"
        (_report.RESULTS / "bins.md").write_text(render(json.loads(path.read_text())))
        return
    _report.main("bins", parser, run, render)


if __name__ == "__main__":
    main()
