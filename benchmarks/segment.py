"""Cells without a segmentation tool: ``pg.tl.segment_cells`` against the true cells, and what it does to read-outs.

Two parts:

- ``synthetic``: the demo slide (``pg.datasets.synthetic(seed)``, 2048 um at 1 um/px), whose true cells are
  known. Segmented cells are matched one-to-one to true cells at IoU >= 0.5 (F1, precision, recall); time and
  cells per second. The read-out effect: the slide's ground-truth intensity map (``images["truth"]``) read
  out (``pg.tl.aggregate``) over the segmented cells and over the true cells; per-gene Pearson of
  log1p(1e4 x / total) across cells (PCC@F/S/M, as ``pg.tl.evaluate``) of each matched segmented cell's
  read-out against its true cell's, and of each unmatched segmented cell's against the true cell it overlaps
  most (the share of cells a segmentation gets wrong).
- ``her2st``: one real section (``pg.datasets.her2st(section)``, about 0.74 um/px; skipped without the
  data): the number of cells, median cell and nucleus areas and time, and a crop of the H&E with the cell
  outlines, ``results/segment_her2st.png``, to see that the cells are plausible.

    python benchmarks/segment.py [--seed 0] [--section C2] [--parts synthetic her2st]

Prints a table and writes ``benchmarks/results/segment.{json,md}``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import _report
import numpy as np

import pixgene as pg
from pixgene._bench import full_resolution, recorded_um_per_px

log = logging.getLogger("segment")

SEGMENTED = "cells_segmented"
#: the her2st crop shown: top-left corner (image pixels), side (image pixels) and zoom
CROP_XY, CROP_PX, CROP_ZOOM = (6550, 5900), 400, 2


def match_iou(seg, true, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matches (IoU >= threshold, greedy by IoU) and, per segmented cell, the true cell it
    overlaps most (-1 for none): ``(seg index, true index)`` of the matches, and that best overlap."""
    import shapely

    si, ti = shapely.STRtree(true).query(seg, predicate="intersects")
    inter = shapely.area(shapely.intersection(seg[si], true[ti]))
    iou = inter / (shapely.area(seg[si]) + shapely.area(true[ti]) - inter)
    best = np.full(len(seg), -1)
    best_area = np.zeros(len(seg))
    for s, t, a in zip(si, ti, inter, strict=True):
        if a > best_area[s]:
            best[s], best_area[s] = t, a
    order = np.argsort(-iou)
    used_s, used_t, ms, mt = set(), set(), [], []
    for k in order[iou[order] >= threshold]:
        if si[k] not in used_s and ti[k] not in used_t:
            used_s.add(si[k])
            used_t.add(ti[k])
            ms.append(si[k])
            mt.append(ti[k])
    return np.asarray(ms, dtype=int), np.asarray(mt, dtype=int), best


def scores(pred, pred_total, true, true_total, genes) -> dict:
    from pixgene._bench import log_normalize_np, score_matrices

    s = score_matrices(log_normalize_np(pred, pred_total), log_normalize_np(true, true_total), genes).summary
    return {k: round(float(s[k]), 4) for k in ("PCC@F", "PCC@S", "PCC@M")} | {"n_cells": len(pred)}


def synthetic_part(seed: int) -> dict:
    import pandas as pd

    from pixgene._bench import INSTANCE_KEY, TOTAL_OBS

    t = time.perf_counter()
    sdata = pg.datasets.synthetic(seed)
    log.info("synthetic slide in %.1f s", time.perf_counter() - t)
    t = time.perf_counter()
    cells = pg.tl.segment_cells(sdata, key_added=SEGMENTED, progress=False)
    seconds = time.perf_counter() - t
    true = sdata.shapes["cells"]
    ms, mt, best = match_iou(cells.geometry.values, true.geometry.values)
    n_seg, n_true = len(cells), len(true)
    f1 = 2 * len(ms) / (n_seg + n_true)
    log.info("segmented %d cells in %.1f s; %d of %d true cells matched, F1 %.3f", n_seg, seconds, len(ms),
             n_true, f1)

    seg_out = pg.tl.aggregate(sdata, shapes=SEGMENTED, dense_key="truth", key_added="seg_truth", progress=False)
    true_out = pg.tl.aggregate(sdata, shapes="cells", dense_key="truth", key_added="true_truth", progress=False)
    genes = [g for g in seg_out.var_names if g.startswith(("GENE", "NOISE"))]
    # rows of each read-out in the order of its shapes (matched through the instance ids)
    seg_pos = pd.Index(seg_out.obs[INSTANCE_KEY].astype(str)).get_indexer(cells.index.astype(str))
    true_pos = pd.Index(true_out.obs[INSTANCE_KEY].astype(str)).get_indexer(true.index.astype(str))
    assert (seg_pos >= 0).all() and (true_pos >= 0).all()
    sx = np.asarray(seg_out[:, genes].X, dtype=np.float64)[seg_pos]
    tx = np.asarray(true_out[:, genes].X, dtype=np.float64)[true_pos]
    st = seg_out.obs[TOTAL_OBS].to_numpy(float)[seg_pos]
    tt = true_out.obs[TOTAL_OBS].to_numpy(float)[true_pos]
    unmatched = np.setdiff1d(np.arange(n_seg), ms)
    unmatched = unmatched[best[unmatched] >= 0]
    areas = cells["cell_area_um2"].to_numpy()
    true_um2 = true.geometry.area.to_numpy() * recorded_um_per_px(sdata, "he") ** 2
    return {
        "slide": f"pg.datasets.synthetic({seed})",
        "size_px": list(map(int, sdata.images["he"].shape[1:])),
        "n_true": n_true,
        "n_segmented": n_seg,
        "n_matched": len(ms),
        "F1": round(f1, 4),
        "precision": round(len(ms) / n_seg, 4),
        "recall": round(len(ms) / n_true, 4),
        "time_s": round(seconds, 2),
        "cells_per_s": round(n_seg / seconds, 1),
        "median_cell_um2": round(float(np.median(areas)), 1),
        "median_true_cell_um2": round(float(np.median(true_um2)), 1),
        "readout": {
            "matched": scores(sx[ms], st[ms], tx[mt], tt[mt], genes),
            "unmatched (vs the true cell overlapped most)": scores(sx[unmatched], st[unmatched],
                                                                    tx[best[unmatched]], tt[best[unmatched]],
                                                                    genes),
        },
        "n_unmatched_no_overlap": int(n_seg - len(ms) - len(unmatched)),
        "n_genes": len(genes),
    }


def her2st_part(section: str, png: Path) -> dict | None:
    try:
        sdata = pg.datasets.her2st(section)
    except (OSError, ValueError) as err:  # no data here (PixgeneInputError is a ValueError): skipped
        log.warning("her2st part skipped: %s", err)
        return {"skipped": str(err)[:300]}
    um = recorded_um_per_px(sdata, "he")
    t = time.perf_counter()
    cells = pg.tl.segment_cells(sdata, progress=False)
    seconds = time.perf_counter() - t
    H, W = full_resolution(sdata.images["he"]).shape[1:]
    _overlay(sdata, cells, png)
    return {
        "section": section,
        "size_px": [int(H), int(W)],
        "um_per_px": round(float(um), 4),
        "n_cells": len(cells),
        "median_cell_um2": round(float(np.median(cells["cell_area_um2"])), 1),
        "median_nucleus_um2": round(float(np.median(cells["nucleus_area_um2"])), 1),
        "cells_over_1000_um2": int((cells["cell_area_um2"] > 1000).sum()),
        "time_s": round(seconds, 1),
        "cells_per_s": round(len(cells) / seconds, 1),
        "overlay": png.name,
        "overlay_crop_px": [*CROP_XY, CROP_PX],
    }


def _overlay(sdata, cells, png: Path) -> None:
    """The H&E crop at CROP_XY, zoomed, with every cell outline crossing it in green (a 96-colour PNG)."""
    import shapely
    from PIL import Image, ImageDraw

    (x0, y0), s, z = CROP_XY, CROP_PX, CROP_ZOOM
    rgb = np.asarray(full_resolution(sdata.images["he"]).data[:, y0 : y0 + s, x0 : x0 + s].compute())
    image = Image.fromarray(np.moveaxis(rgb, 0, -1).astype(np.uint8)).resize((s * z, s * z), Image.LANCZOS)
    draw = ImageDraw.Draw(image)
    geometry = cells.geometry.values
    for polygon in geometry[shapely.intersects(geometry, shapely.box(x0, y0, x0 + s, y0 + s))]:
        xy = (np.asarray(polygon.exterior.coords) - [x0, y0]) * z
        draw.line([tuple(v) for v in xy], fill=(0, 230, 0), width=2)
    png.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(96).save(png, optimize=True)
    log.info("overlay %s: %d KB", png, png.stat().st_size // 1024)


def run(args) -> dict:
    result = {}
    if "synthetic" in args.parts:
        result["synthetic"] = synthetic_part(args.seed)
    if "her2st" in args.parts:
        result["her2st"] = her2st_part(args.section, Path(args.out) / "segment_her2st.png")
    return result


def render(r: dict) -> str:
    lines = ["# Cells without a segmentation tool: `pg.tl.segment_cells`", "",
             ("Defaults: nucleus_diameter_um=8, expand_um=5, tile_um=512, tissue_only=True. "
             "Segmented cells match true cells one-to-one at IoU >= 0.5."), ""]
    s = r.get("synthetic")
    if s:
        lines += [
            f"## {s['slide']}: {s['size_px'][1]} x {s['size_px'][0]} px at 1 um/px", "",
            ("| true cells | segmented | matched | F1 | precision | recall | time (s) | cells/s "
            "| median cell um^2 (true) |"),
            "|---|---|---|---|---|---|---|---|---|",
            (f"| {s['n_true']} | {s['n_segmented']} | {s['n_matched']} | {s['F1']:.3f} | {s['precision']:.3f} "
            f"| {s['recall']:.3f} | {s['time_s']:.1f} | {s['cells_per_s']:.0f} | {s['median_cell_um2']:.0f} "
            f"({s['median_true_cell_um2']:.0f}) |"), "",
            (f"The ground-truth map read out over the segmented cells against the same map over the true cells "
            f"({s['n_genes']} genes; per-gene Pearson of log1p(1e4 x / total) across cells):"), "",
            "| segmented cells | cells | PCC@F | PCC@S | PCC@M |", "|---|---|---|---|---|",
        ]
        for name, v in s["readout"].items():
            lines.append(f"| {name} | {v['n_cells']} | {v['PCC@F']:.3f} | {v['PCC@S']:.3f} | {v['PCC@M']:.3f} |")
        lines += ["", f"{s['n_unmatched_no_overlap']} segmented cells overlap no true cell.", ""]
    h = r.get("her2st")
    if h and "skipped" not in h:
        lines += [
            f"## her2st {h['section']}: {h['size_px'][1]} x {h['size_px'][0]} px at {h['um_per_px']} um/px", "",
            "| cells | median cell um^2 | median nucleus um^2 | cells > 1000 um^2 | time (s) | cells/s |",
            "|---|---|---|---|---|---|",
            (f"| {h['n_cells']} | {h['median_cell_um2']:.0f} | {h['median_nucleus_um2']:.0f} "
            f"| {h['cells_over_1000_um2']} | {h['time_s']:.1f} | {h['cells_per_s']:.0f} |"), "",
            (f"![cells on her2st {h['section']}]({h['overlay']}) (crop x, y, side in px: "
            f"{', '.join(map(str, h['overlay_crop_px']))})"), "",
        ]
    elif h:
        lines += [f"her2st: skipped ({h['skipped']})", ""]
    lines.append(f"`{r.get('command', '')}` started {r.get('started', '?')}; {r.get('machine', '')}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--section", default="C2")
    parser.add_argument("--parts", nargs="+", default=["synthetic", "her2st"], choices=["synthetic", "her2st"])
    _report.main("segment", parser, run, render)


if __name__ == "__main__":
    main()
