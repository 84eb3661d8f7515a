"""Whole slides: memory and time of ``pg.tl.predict_dense``, and the read-out of millions of shapes.

Sections (each printed as a table; all numbers go to benchmarks/results/scale.json and scale.md):

1. machine: cores and the measured peak of a large float32 matrix product (GFLOP/s).
2. tiling: the halo measured from the model's receptive field; crop-with-halo vs taper blending on a strip.
3. predict_dense on synthetic slides of 5,000^2, 20,000^2 and 40,000^2 px (0.5 um/px, a zarr pyramid built
   from a replicated H&E texture with a few tissue islands): each in a fresh process, its peak RSS and time,
   megapixels per second next to the bound from the model's FLOPs per pixel and the measured peak.
   chunks: predict_dense's ``chunk_px`` (256, 512, 1024 output px) on the 20,000^2 px slide, each in a fresh
   process: time, peak RSS, and the largest difference between the maps where both computed chunks.
4. pg.tl.aggregate vs spatialdata's route (rasterize the polygons to labels, then spatialdata.aggregate) on a
   4,000 x 4,000 x 50-gene map with 5,000 polygons, side by side: values and time.
5. pixgene alone: 1,000,000 cell polygons and 2 um bins over the dense map of the 20,000^2 px slide.

    python benchmarks/scale.py [--workdir DIR] [--quick] [--sections tiling slides chunks versus readout]

``--quick`` runs everything at small sizes (a smoke test of the script, not numbers to report).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
SLIDE_UM = 0.5  # microns per slide pixel (a 20x scan)
N_GENES = 50
SECTIONS = ("tiling", "slides", "chunks", "versus", "readout")
DECODER = {"width": 48, "out_stride": 4, "block": "fusion"}  # pg.tl.fit's default architecture, in float32
#: tissue islands: (centre x, centre y, radius x, radius y) as fractions of the slide's side
ISLANDS = [(0.33, 0.4, 0.17, 0.21), (0.7, 0.68, 0.14, 0.16), (0.74, 0.24, 0.09, 0.07)]

log = logging.getLogger("scale")


# --------------------------------------------------------------------------------------------- helpers


def peak_rss_gb() -> float:
    """This process's peak resident memory: VmHWM of its own address space.

    Not ``ru_maxrss``: Linux carries that over ``execve`` from the forked copy of the parent, so a child of a
    large parent would report the parent's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def run_polled(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run a child process, sampling its resident memory every 0.1 s; returns (result, peak RSS in GB)."""
    import tempfile

    import psutil

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        proc, peak = psutil.Process(child.pid), 0
        while child.poll() is None:
            try:
                peak = max(peak, proc.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.1)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, child.wait(), out.read(), err.read()), peak / 1e9


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def build_model(genes: list[str]):
    """EfficientNet-Lite0 (bundled weights) with pg.tl.fit's default decoder; untrained (speed does not care)."""
    import torch

    from pixgene._bench import PixNet, build_encoder, build_module

    encoder = build_encoder("efficientnet_lite0", weights="default")
    config = encoder.config()
    torch.manual_seed(0)
    n = len(genes) + 1
    module = build_module(config, "default", n_outputs=n, decoder_config=DECODER, encoder=encoder)
    module.head.set_scale(torch.full((n,), 1e-2))
    return PixNet(module, genes=genes, encoder_config=config, encoder_weights="default",
                  decoder_config=DECODER)


def machine_peak_gflops(n: int = 4096, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(timed(torch.mm, a, b)[1] for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def model_flops_per_pixel(model, size: int = 512) -> float:
    """Whole network (encoder + decoder + head), counted like ``encoder_flops_per_pixel``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 3, size, size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.module(x)
    return counter.get_total_flops() / float(size * size)


def table(title: str, rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = [f"\n### {title}\n", "| " + " | ".join(k.ljust(w) for k, w in zip(keys, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


# --------------------------------------------------------------------------------------------- 2. tiling


def tiling_section(model, *, written: int = 1024, n_tiles: int = 3) -> dict:
    """Halo from the receptive field; then crop vs taper blending of tiles along one axis of a strip.

    Tiles of ``written`` encoder px are read with ``o`` px of overlap on both sides. Crop keeps each tile's
    centre; taper weights every tile's output by a linear ramp from 0 at its edge to 1 at 2 * o inside
    (consecutive tiles cross-fade over their 2 * o overlap; cellpose tapers the same way, with a sigmoid).
    """
    from pixgene._bench import edge_error_profile, probe_texture, tiling_halo

    (halo, edge_error), t_probe = timed(tiling_halo, model)
    profile = edge_error_profile(model)
    s, a = model.out_stride, model.alignment
    margin = 1024
    height = 256
    width = n_tiles * written
    strip = probe_texture(height, width + 2 * margin + 2048, seed=1)
    ref = model.predict_intensity(strip)[:, :, margin // s : (margin + width) // s]
    scale = float(np.abs(ref).max())
    rows = []
    for o in (256, 384, 512, 768, 1024):
        o = int(np.ceil(o / a)) * a
        starts = [margin + k * written - o for k in range(n_tiles)]
        outs = [model.predict_intensity(strip[:, :, x : x + written + 2 * o]) for x in starts]
        crop = np.concatenate([out[:, :, o // s : (o + written) // s] for out in outs], axis=2)
        acc = np.zeros((ref.shape[0], ref.shape[1], (width + 2 * o) // s))
        wsum = np.zeros((width + 2 * o) // s)
        d = (np.arange((written + 2 * o) // s) + 0.5) * s
        ramp = np.clip(np.minimum(d, written + 2 * o - d) / (2 * o), 0, 1)
        for k, out in enumerate(outs):
            acc[:, :, k * written // s : k * written // s + out.shape[2]] += out * ramp
            wsum[k * written // s : k * written // s + out.shape[2]] += ramp
        taper = acc[:, :, o // s : (o + width) // s] / wsum[o // s : (o + width) // s]
        cost = ((written + 2 * o) / written) ** 2
        rows.append({
            "overlap_px": o, "cost_2d_x": round(cost, 2),
            "crop_rel_err": float(np.abs(crop - ref).max() / scale),
            "taper_rel_err": float(np.abs(taper - ref).max() / scale),
        })
    return {
        "halo_px": halo, "halo_edge_error": edge_error, "probe_s": round(t_probe, 2), "alignment": a,
        "profile": {str(d): float(profile[d // s]) for d in range(0, 1025, 64)}, "strip": rows,
    }


# --------------------------------------------------------------------------------------------- 3. slides


def texture_tile(size: int = 256) -> np.ndarray:
    """The H&E texture the slides replicate; a short period keeps the zarr chunks compressible."""
    from pixgene._bench import probe_texture

    return (probe_texture(size, size, seed=7) * 255).round().astype(np.uint8)


def _tissue(y: np.ndarray, x: np.ndarray, side: float) -> np.ndarray:
    inside = np.zeros(np.broadcast(y, x).shape, dtype=bool)
    for cx, cy, rx, ry in ISLANDS:
        inside |= ((x / side - cx) / rx) ** 2 + ((y / side - cy) / ry) ** 2 <= 1
    return inside


def slide_level(side: int, factor: int, texture: np.ndarray, chunk: int = 1024):
    """Level ``factor`` of a ``side``^2 slide, lazily: texture on the islands, glass around them.

    Chunks are multiples of the texture's period, so a chunk's texture is a plain tile; chunks that miss every
    island or lie inside one skip the per-pixel test.
    """
    import dask.array as da

    n = side // factor
    t = texture.shape[1]
    assert chunk % t == 0

    def block(block_info=None):
        (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        corners_y = np.array([y0, y0, y1, y1]) * factor
        corners_x = np.array([x0, x1, x0, x1]) * factor
        if _tissue(corners_y, corners_x, side).all() and _inside_one_island(corners_y, corners_x, side):
            return np.tile(texture, (1, -(-(y1 - y0) // t), -(-(x1 - x0) // t)))[:, : y1 - y0, : x1 - x0]
        if not _touches_islands(y0 * factor, y1 * factor, x0 * factor, x1 * factor, side):
            return np.full((3, y1 - y0, x1 - x0), 242, dtype=np.uint8)
        rgb = np.tile(texture, (1, -(-(y1 - y0) // t), -(-(x1 - x0) // t)))[:, : y1 - y0, : x1 - x0]
        yy = (np.arange(y0, y1)[:, None] + 0.5) * factor
        xx = (np.arange(x0, x1)[None, :] + 0.5) * factor
        return np.where(_tissue(yy, xx, side)[None], rgb, np.uint8(242))

    return da.empty((3, n, n), chunks=(3, chunk, chunk), dtype=np.uint8).map_blocks(
        lambda _, block_info=None: block(block_info), dtype=np.uint8
    )


def _inside_one_island(ys: np.ndarray, xs: np.ndarray, side: float) -> bool:
    """All points inside the same ellipse (ellipses are convex: then the rectangle they span is too)."""
    return any(
        np.all(((xs / side - cx) / rx) ** 2 + ((ys / side - cy) / ry) ** 2 <= 1) for cx, cy, rx, ry in ISLANDS
    )


def _touches_islands(y0: float, y1: float, x0: float, x1: float, side: float) -> bool:
    """Whether the rectangle meets any island's bounding box."""
    return any(
        x0 < (cx + rx) * side and x1 > (cx - rx) * side and y0 < (cy + ry) * side and y1 > (cy - ry) * side
        for cx, cy, rx, ry in ISLANDS
    )


def build_slide(path: Path, side: int, texture: np.ndarray) -> dict:
    """A zarr-backed SpatialData with an H&E pyramid (levels down to 16 um/px for the tissue mask)."""
    import spatialdata as sd
    from spatialdata.models import Image2DModel

    from pixgene._bench import record_um_per_px

    factors = [2] * int(np.log2(32))  # 0.5 um -> 16 um
    tree = Image2DModel.parse(slide_level(side, 1, texture), dims=("c", "y", "x"), c_coords=["r", "g", "b"],
                              scale_factors=factors)
    # every level is drawn at its own resolution rather than averaged from level 0 (cheap to build)
    for k, name in enumerate(sorted(tree.children, key=lambda n: int(n.replace("scale", "")))):
        old = tree[name]["image"]
        level = slide_level(side, 2**k, texture)[:, : old.sizes["y"], : old.sizes["x"]]
        tree[name]["image"] = old.copy(data=level.rechunk(old.data.chunksize))
    sdata = sd.SpatialData(images={"he": tree})
    record_um_per_px(sdata, "he", SLIDE_UM)
    if path.exists():
        shutil.rmtree(path)
    _, t = timed(sdata.write, path)
    coarse = ~_tissue(*(np.mgrid[0:512, 0:512] + 0.5) * (side / 512), side)
    return {"build_s": round(t, 1), "tissue_fraction": float(1 - coarse.mean())}


def predict_child(args) -> None:
    """In a fresh process: the model's halo, then predict_dense; prints one JSON line."""
    import spatialdata as sd

    import pixgene as pg
    from pixgene._bench import tiling_halo

    rss_start = peak_rss_gb()
    sdata = sd.read_zarr(args.store)
    model = pg.tl.PixNet.load(args.model)
    rss_loaded = peak_rss_gb()
    _, t_halo = timed(tiling_halo, model)
    _, t_pred = timed(pg.tl.predict_dense, sdata, model, um_per_px=args.um_per_px, chunk_px=args.chunk_px,
                      dtype=args.dtype, key_added=args.key, progress=False)
    meta = sdata.attrs["pixgene"]["dense"][args.key]
    print(json.dumps({
        "halo_s": t_halo, "predict_s": t_pred, "peak_rss_gb": peak_rss_gb(),
        "rss_after_imports_gb": rss_start, "rss_after_model_gb": rss_loaded, "meta": meta,
    }, default=str))


def slides_section(workdir: Path, sizes: list[int], model_dir: Path, flops_px: float, enc_flops_px: float,
                   peak: float, *, um_per_px: float, chunk_px: int, dtype: str, keep: int) -> list[dict]:
    """One fresh process per slide size; the store of the slide of side ``keep`` is left for the read-out."""
    texture = texture_tile()
    rows = []
    for side in sizes:
        store = workdir / f"slide_{side}.zarr"
        built = build_slide(store, side, texture)
        log.info("slide %d^2: built in %.0f s, %.0f%% tissue", side, built["build_s"],
                 100 * built["tissue_fraction"])
        cmd = [sys.executable, __file__, "predict-child", "--store", str(store), "--model", str(model_dir),
               "--um-per-px", str(um_per_px), "--chunk-px", str(chunk_px), "--dtype", dtype]
        t0 = time.perf_counter()
        done, polled = run_polled(cmd)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(f"predict child failed:\n{done.stderr[-4000:]}")
        child = json.loads(done.stdout.strip().splitlines()[-1])
        meta = child["meta"]
        n_chunks = meta["chunks"]["tissue"] + meta["chunks"]["background"]
        th, tw = meta["tile_px"]
        enc_per_out = um_per_px / 1.0  # encoder px per output px (EfficientNet-Lite0 runs at 1 um/px)
        written_mpx = meta["chunks"]["tissue"] * (chunk_px * enc_per_out) ** 2 / 1e6  # upper bound at edges
        run_mpx = meta["chunks"]["tissue"] * th * tw / 1e6
        t = child["predict_s"]
        rows.append({
            "slide_px": f"{side}^2", "slide_um": side * SLIDE_UM,
            "tissue_fraction": round(built["tissue_fraction"], 3),
            "chunks_computed": f"{meta['chunks']['tissue']}/{n_chunks}", "halo_px": meta["halo_px"],
            "tile_px": f"{th}x{tw}", "predict_s": round(t, 1), "halo_probe_s": round(child["halo_s"], 1),
            "peak_rss_gb": round(child["peak_rss_gb"], 2), "polled_peak_rss_gb": round(polled, 2),
            "rss_after_model_gb": round(child["rss_after_model_gb"], 2),
            "slide_mpx_per_s": round(side * side / 1e6 / t, 2),
            "tissue_enc_mpx_per_s": round(written_mpx / t, 3),
            "network_enc_mpx_per_s": round(run_mpx / t, 3),
            "bound_network_mpx_per_s": round(peak * 1e9 / flops_px / 1e6, 2),
            "bound_encoder_only_mpx_per_s": round(peak * 1e9 / enc_flops_px / 1e6, 2),
            "process_wall_s": round(wall, 1), "build_s": built["build_s"],
        })
        log.info("slide %d^2: %s", side, rows[-1])
        if side != keep:
            shutil.rmtree(store, ignore_errors=True)
    return rows


def chunks_section(workdir: Path, side: int, model_dir: Path, *, um_per_px: float, dtype: str,
                   chunk_sizes: tuple[int, ...] = (256, 512, 1024)) -> list[dict]:
    """predict_dense's ``chunk_px`` on one slide: time and peak memory of each size in a fresh process, and
    how far each map is from the first size's inside the chunks both computed (the tiling tolerance is 1e-4
    of the map's maximum; float16 storage rounds to about 1e-3 of a value)."""
    import spatialdata as sd

    from pixgene._bench import full_resolution

    store = workdir / f"slide_{side}.zarr"
    if not store.exists():
        build_slide(store, side, texture_tile())
    rows = []
    for chunk_px in chunk_sizes:
        key = f"he_chunk{chunk_px}"
        cmd = [sys.executable, __file__, "predict-child", "--store", str(store), "--model", str(model_dir),
               "--um-per-px", str(um_per_px), "--chunk-px", str(chunk_px), "--dtype", dtype, "--key", key]
        done, polled = run_polled(cmd)
        if done.returncode != 0:
            raise RuntimeError(f"predict child failed:\n{done.stderr[-4000:]}")
        child = json.loads(done.stdout.strip().splitlines()[-1])
        meta = child["meta"]
        th, tw = meta["tile_px"]
        rows.append({"slide_px": f"{side}^2", "chunk_px": chunk_px, "tile_px": f"{th}x{tw}",
                     "halo_px": meta["halo_px"], "chunks_computed": meta["chunks"]["tissue"],
                     "predict_s": round(child["predict_s"], 1), "peak_rss_gb": round(child["peak_rss_gb"], 2),
                     "polled_peak_rss_gb": round(polled, 2)})
        log.info("chunks: %s", rows[-1])
    sdata = sd.read_zarr(store)
    first = full_resolution(sdata.images[f"he_chunk{chunk_sizes[0]}"]).values.astype(np.float32)
    scale = float(np.abs(first).max())
    # background chunks stay zero (skip_background), and a larger chunk holds more background that it does
    # predict: compare where the first run computed its chunks
    c = chunk_sizes[0]
    h, w = first.shape[1:]
    blocks = np.zeros((-(-h // c), -(-w // c)), dtype=bool)
    for by in range(blocks.shape[0]):
        for bx in range(blocks.shape[1]):
            blocks[by, bx] = bool((first[:, by * c : (by + 1) * c, bx * c : (bx + 1) * c] != 0).any())
    computed = np.kron(blocks, np.ones((c, c), dtype=bool))[:h, :w]
    for row, chunk_px in zip(rows, chunk_sizes, strict=True):
        other = full_resolution(sdata.images[f"he_chunk{chunk_px}"]).values.astype(np.float32)
        diff = np.abs(other - first)[:, computed]
        row["max_rel_diff_in_first_chunks"] = float(f"{float(diff.max()) / scale:.3g}")
        row["speedup_vs_first"] = round(rows[0]["predict_s"] / row["predict_s"], 2)
    return rows


# ------------------------------------------------------------------------------------- 4. vs spatialdata


def _interpolation(n: int, cell: int) -> np.ndarray:
    """(n, n // cell + 2) linear interpolation from knots every ``cell`` px to every pixel centre."""
    t = (np.arange(n) + 0.5) / cell
    k = np.floor(t).astype(int)
    w = np.zeros((n, n // cell + 2), dtype=np.float32)
    w[np.arange(n), k] = 1 - (t - k)
    w[np.arange(n), k + 1] = t - k
    return w


def smooth_map(n_channels: int, shape: tuple[int, int], seed: int = 0, cell: int = 64) -> np.ndarray:
    """(C, H, W) float32 smooth positive intensities (counts per um^2), different for every channel."""
    rng = np.random.default_rng(seed)
    ry, rx = _interpolation(shape[0], cell), _interpolation(shape[1], cell)
    knots = rng.gamma(2.0, 5e-3, size=(n_channels, ry.shape[1], rx.shape[1])).astype(np.float32)
    return np.stack([ry @ k @ rx.T for k in knots])


def grid_polygons(n: int, side: int, seed: int = 0):
    """``n`` non-overlapping rectilinear polygons (rectangles and L shapes) with integer vertices."""
    import shapely

    rng = np.random.default_rng(seed)
    k = int(np.ceil(np.sqrt(n)))
    cell = side // k
    polys = []
    for i in range(n):
        r, c = divmod(i, k)
        x0, y0 = c * cell + rng.integers(0, cell // 4), r * cell + rng.integers(0, cell // 4)
        x1, y1 = (c + 1) * cell - rng.integers(1, cell // 4), (r + 1) * cell - rng.integers(1, cell // 4)
        if i % 2:  # an L: the rectangle without its top-right quarter
            xm, ym = (x0 + x1) // 2, (y0 + y1) // 2
            polys.append(shapely.Polygon([(x0, y0), (xm, y0), (xm, ym), (x1, ym), (x1, y1), (x0, y1)]))
        else:
            polys.append(shapely.box(x0, y0, x1, y1))
    return polys


def versus_spatialdata(*, side: int = 4000, n_shapes: int = 5000, n_genes: int = N_GENES,
                       map_um: float = 2.0) -> dict:
    import geopandas as gpd
    import spatialdata as sd
    from spatialdata.models import Image2DModel, Labels2DModel, ShapesModel

    import pixgene as pg
    from pixgene._bench import record_um_per_px

    values = smooth_map(n_genes, (side, side))
    genes = [f"G{i:02d}" for i in range(n_genes)]
    polys = grid_polygons(n_shapes, side)
    names = [f"cell{i}" for i in range(n_shapes)]
    shapes = ShapesModel.parse(gpd.GeoDataFrame(geometry=polys, index=names))
    # the same element for both routes; 2048 px chunks (840 MB) are within spatialdata's recommended size and
    # spatialdata's route (xrspatial zonal_stats, per block) is as fast on them as on one chunk
    image = Image2DModel.parse(values, dims=("c", "y", "x"), c_coords=genes, chunks=(n_genes, 2048, 2048))
    sdata = sd.SpatialData(images={"map": image}, shapes={"cells": shapes})
    record_um_per_px(sdata, "map", map_um)

    ours, t_ours = timed(pg.tl.aggregate, sdata, shapes="cells", dense_key="map", inplace=False,
                         progress=False)

    def spatialdata_route():
        labels = sd.rasterize(shapes, axes=("y", "x"), min_coordinate=[0, 0], max_coordinate=[side, side],
                              target_coordinate_system="global", target_unit_to_pixels=1.0,
                              return_regions_as_labels=True)
        mapping = labels.attrs["label_index_to_category"]
        by = Labels2DModel.parse(labels.values, dims=("y", "x"))
        table = sd.aggregate(values=image, by=by, agg_func="sum", target_coordinate_system="global")["table"]
        return table, mapping

    (table, mapping), t_theirs = timed(spatialdata_route)
    theirs = np.asarray(table.X.todense()) * map_um**2  # sum over whole pixels x pixel area = expected counts
    order = [mapping[int(i)] for i in table.obs["instance_id"]]
    ours_x = np.asarray(ours[order].X)
    rel = np.abs(ours_x - theirs) / np.abs(theirs)
    return {
        "map": f"{side}x{side}x{n_genes}", "n_polygons": n_shapes, "pixgene_s": round(t_ours, 2),
        "spatialdata_s": round(t_theirs, 2), "speedup": round(t_theirs / t_ours, 1),
        "max_rel_diff": float(rel.max()), "n_compared": int(rel.size),
        "note": "integer-vertex polygons: whole-pixel rasterisation is exact for them, so both must agree",
    }


# --------------------------------------------------------------------------------------------- 5. millions


def jittered_cells(n_target: int, extent_px: float, seed: int = 0):
    """About ``n_target`` cell-like octagons that partition the square [0, extent]^2 exactly.

    A square lattice whose corners and edge midpoints are jittered (each shared point once, so neighbours
    share their borders): every cell is an irregular octagon and together they cover the square without gaps
    or overlaps, so the cells' integrals must add up to the map's.
    """
    import shapely

    k = int(round(np.sqrt(n_target)))
    p = extent_px / k
    rng = np.random.default_rng(seed)
    grid = np.arange(k + 1) * p
    corner_x = grid[None, :] + rng.uniform(-0.2, 0.2, (k + 1, k + 1)) * p
    corner_y = grid[:, None] + rng.uniform(-0.2, 0.2, (k + 1, k + 1)) * p
    corner_x[:, [0, -1]] = grid[[0, -1]]
    corner_y[[0, -1], :] = grid[[0, -1], None]
    # midpoints of horizontal edges move vertically, of vertical edges horizontally (not on the border)
    hx = (corner_x[:, :-1] + corner_x[:, 1:]) / 2
    hy = (corner_y[:, :-1] + corner_y[:, 1:]) / 2 + rng.uniform(-0.15, 0.15, (k + 1, k)) * p
    hy[[0, -1], :] = grid[[0, -1], None]
    vx = (corner_x[:-1, :] + corner_x[1:, :]) / 2 + rng.uniform(-0.15, 0.15, (k, k + 1)) * p
    vy = (corner_y[:-1, :] + corner_y[1:, :]) / 2
    vx[:, [0, -1]] = grid[[0, -1]]
    i, j = np.divmod(np.arange(k * k), k)
    ring_x = np.stack([corner_x[i, j], hx[i, j], corner_x[i, j + 1], vx[i, j + 1], corner_x[i + 1, j + 1],
                       hx[i + 1, j], corner_x[i + 1, j], vx[i, j], corner_x[i, j]], axis=1)
    ring_y = np.stack([corner_y[i, j], hy[i, j], corner_y[i, j + 1], vy[i, j + 1], corner_y[i + 1, j + 1],
                       hy[i + 1, j], corner_y[i + 1, j], vy[i, j], corner_y[i, j]], axis=1)
    return shapely.polygons(np.stack([ring_x, ring_y], axis=-1))


def write_map(path: Path, values_fn, n_channels: int, shape: tuple[int, int], chunk: int = 1024):
    """A float16 zarr map written block by block (never whole in memory)."""
    import zarr

    arr = zarr.create_array(str(path), shape=(n_channels, *shape), chunks=(n_channels, chunk, chunk),
                            dtype="float16", fill_value=0, overwrite=True)
    for y in range(0, shape[0], chunk):
        for x in range(0, shape[1], chunk):
            y1, x1 = min(y + chunk, shape[0]), min(x + chunk, shape[1])
            arr[:, y:y1, x:x1] = values_fn(y, y1, x, x1)
    return arr


def millions_section(workdir: Path, slide_store: Path, *, side: int, n_cells: int,
                     map_um: float = 2.0) -> dict:
    """1M cells and 2 um bins read out from a map over a ``side``^2 px slide (map at ``map_um`` um/px)."""
    import dask.array as da
    import geopandas as gpd
    import spatialdata as sd
    from spatialdata.models import Image2DModel, ShapesModel
    from spatialdata.transformations import Scale

    import pixgene as pg
    from pixgene._bench import record_um_per_px

    f = map_um / SLIDE_UM  # slide px per map px
    n = int(np.ceil(side / f))
    genes = [f"G{i:02d}" for i in range(N_GENES)]
    rng = np.random.default_rng(3)
    interp = _interpolation(n, 64)
    knots = rng.gamma(2.0, 5e-3, size=(N_GENES + 1, interp.shape[1], interp.shape[1])).astype(np.float32)

    def values(y0, y1, x0, x1):
        out = np.stack([interp[y0:y1] @ k @ interp[x0:x1].T for k in knots])
        tissue = _tissue((np.arange(y0, y1)[:, None] + 0.5) * f, (np.arange(x0, x1)[None] + 0.5) * f, side)
        return np.where(tissue[None], out, 0).astype(np.float16)

    map_path = workdir / "map_2um.zarr"
    _, t_map = timed(write_map, map_path, values, N_GENES + 1, (n, n))
    sdata = sd.read_zarr(slide_store)
    dense = Image2DModel.parse(da.from_zarr(str(map_path)), dims=("c", "y", "x"),
                               c_coords=[*genes, "pixgene_total_counts"],
                               transformations={"global": Scale([f, f], axes=("y", "x"))})
    sdata.images["he_pixgene"] = dense
    record_um_per_px(sdata, "he_pixgene", map_um)

    cells, t_make = timed(jittered_cells, n_cells, side)
    sdata.shapes["cells"] = ShapesModel.parse(gpd.GeoDataFrame(geometry=cells))
    table, t_cells = timed(pg.tl.aggregate, sdata, shapes="cells", dense_key="he_pixgene", inplace=False,
                           progress=False)
    total_map = float(np.asarray(da.from_zarr(str(map_path))[-1].astype(np.float64).sum())) * map_um**2
    cells_total = float(table.obs["pixgene_total_counts"].sum())
    result = {
        "map": f"{n}x{n}x{N_GENES + 1} float16 at {map_um} um/px over a {side}^2 px slide",
        "map_write_s": round(t_map, 1), "n_cells": len(cells), "cells_build_s": round(t_make, 1),
        "cells_aggregate_s": round(t_cells, 1), "cells_per_s": round(len(cells) / t_cells),
        "cells_total_over_map_total": cells_total / total_map,
    }
    del table, cells
    sdata.shapes.pop("cells")

    bins, t_grid = timed(pg.tl.make_grid, sdata, image_key="he", bin_um=2.0, within="tissue")
    n_bins = len(bins)
    table, t_bins = timed(pg.tl.aggregate, sdata, shapes="bins_2um", dense_key="he_pixgene", inplace=False,
                          progress=False)
    result.update({
        "n_bins_2um": n_bins, "make_grid_s": round(t_grid, 1), "bins_aggregate_s": round(t_bins, 1),
        "bins_per_s": round(n_bins / t_bins),
        "bins_total_over_map_total": float(table.obs["pixgene_total_counts"].sum()) / total_map,
    })
    return result


# --------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("predict-child")
    child.add_argument("--store", required=True)
    child.add_argument("--model", required=True)
    child.add_argument("--um-per-px", type=float, default=8.0)
    child.add_argument("--chunk-px", type=int, default=256)
    child.add_argument("--dtype", default="float16")
    child.add_argument("--key", default="he_pixgene")
    parser.add_argument("--workdir", default="/tmp/pixgene-scale")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS),
                        help="run only these; the others are kept from the existing results file")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("numba", "distributed", "pixgene.tl._predict"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command == "predict-child":
        predict_child(args)
        return

    import torch

    from pixgene._bench import encoder_flops_per_pixel

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    sizes = [1000, 2000, 4000] if quick else [5000, 20000, 40000]
    mid = sizes[1]
    sections = args.sections
    out = Path(args.out)
    suffix = "_quick" if quick else ""
    previous = out / f"scale{suffix}.json"
    result = json.loads(previous.read_text()) if set(sections) != set(SECTIONS) and previous.exists() else {}
    result["quick"] = quick
    t_start = time.perf_counter()

    peak = machine_peak_gflops()
    genes = [f"G{i:02d}" for i in range(N_GENES)]
    model = build_model(genes)
    model_dir = workdir / "model"
    model.save(model_dir, overwrite=True)
    enc_flops = encoder_flops_per_pixel(model.module.encoder)
    flops = model_flops_per_pixel(model)
    machine = {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "peak_gflops_fp32": round(peak, 1),
        "model": f"efficientnet_lite0 + {DECODER['block']} decoder width {DECODER['width']}, output stride "
                 f"{DECODER['out_stride']}, {N_GENES} genes (pg.tl.fit's default architecture)",
        "encoder_kflop_per_px": round(enc_flops / 1e3, 1), "network_kflop_per_px": round(flops / 1e3, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    log.info("machine: %s", machine)
    runs = result.setdefault("runs", {})
    stamp = {"date": time.strftime("%Y-%m-%d %H:%M"), "load_average_at_start": machine["load_average_at_start"]}

    if "tiling" in sections:
        result["tiling"] = tiling_section(model)
        result["machine"] = machine
        log.info("tiling: halo %d px", result["tiling"]["halo_px"])
    if "slides" in sections:
        predict_opts = {"um_per_px": 4.0, "chunk_px": 256, "dtype": "float16"}
        slides = slides_section(workdir, sizes, model_dir, flops, enc_flops, peak, keep=mid, **predict_opts)
        result["predict_dense"] = {"options": predict_opts, "slide_um_per_px": SLIDE_UM, "slides": slides}
        result["machine"] = machine
    if "chunks" in sections:
        result["chunks"] = {"options": {"um_per_px": 4.0, "dtype": "float16"}, "slide_um_per_px": SLIDE_UM,
                            "rows": chunks_section(workdir, mid, model_dir, um_per_px=4.0, dtype="float16")}
        result["machine"] = machine
    if "versus" in sections:
        result["aggregate_vs_spatialdata"] = versus_spatialdata(side=1000 if quick else 4000,
                                                                n_shapes=500 if quick else 5000)
        log.info("versus spatialdata: %s", result["aggregate_vs_spatialdata"])
    if "readout" in sections:
        store = workdir / f"slide_{mid}.zarr"
        if not store.exists():
            build_slide(store, mid, texture_tile())
        result["readout"] = millions_section(workdir, store, side=mid, n_cells=20_000 if quick else 1_000_000)
        log.info("readout: %s", result["readout"])
    for section in sections:
        runs[section] = {**stamp, "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                         "run_s": round(time.perf_counter() - t_start, 1)}

    if all(k in result for k in ("predict_dense", "aggregate_vs_spatialdata", "readout")):
        slides = result["predict_dense"]["slides"]
        versus, millions = result["aggregate_vs_spatialdata"], result["readout"]
        rss_small, rss_large = slides[0]["peak_rss_gb"], slides[-1]["peak_rss_gb"]
        cells_s = millions["cells_aggregate_s"]
        result["acceptance"] = {
            "peak_rss_largest_gb": rss_large,
            "peak_rss_ratio_largest_vs_smallest": round(rss_large / rss_small, 3),
            "rss_within_3gb_and_1.5x": rss_large <= 3.0 and rss_large <= 1.5 * rss_small,
            "aggregate_speedup_vs_spatialdata": versus["speedup"],
            "aggregate_50x_and_equal": versus["speedup"] >= 50 and versus["max_rel_diff"] <= 1e-3,
            "one_million_cells_s": cells_s,
            "one_million_cells_under_2_min": cells_s < 120 and millions["n_cells"] >= 1_000_000,
        }
    md = render(result)
    print(md)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"scale{suffix}.json").write_text(json.dumps(result, indent=2, default=str))
    (out / f"scale{suffix}.md").write_text(md + "\n")
    shutil.rmtree(workdir, ignore_errors=True)


def render(r: dict) -> str:
    m = r["machine"]
    parts = [
        "# pixgene scale benchmark" + (" (quick smoke run)" if r["quick"] else ""),
        f"\nMachine: {m['cores']} cores ({m['cpu']}), torch {m['torch_threads']} threads, measured peak "
        f"{m['peak_gflops_fp32']} GFLOP/s (float32 matmul). Model: {m['model']}; encoder "
        f"{m['encoder_kflop_per_px']} kFLOP/px, whole network {m['network_kflop_per_px']} kFLOP/px. "
        f"No GPU on this machine.",
        "\nSections and when they ran (load average 1/5/15 min at start and end; 2 cores, so a load above 2 "
        "means other jobs shared the machine):\n",
    ]
    for name, run in r.get("runs", {}).items():
        parts.append(f"- {name}: {run['date']}, {run['run_s']:.0f} s into its run, load "
                     f"{run['load_average_at_start']} -> {run['load_average_at_end']}")
    t = r.get("tiling")
    if t is None:
        return "\n".join(parts)
    profile = ", ".join(f"{d} px {v:.1e}" for d, v in t["profile"].items())
    parts.append(
        f"\n## Tiling\n\nHalo measured from the receptive field: **{t['halo_px']} px** (alignment "
        f"{t['alignment']}, edge error there {t['halo_edge_error']:.2g}, probe {t['probe_s']} s). "
        f"Edge error vs distance from a tile edge: {profile}."
    )
    parts.append(table("Crop with halo vs taper blending (tiles of 1024 px written, overlap o on each side)",
                       t["strip"]))
    if "predict_dense" in r:
        parts.append(table("predict_dense on synthetic slides (0.5 um/px, fresh process each; output "
                           f"{r['predict_dense']['options']})", r["predict_dense"]["slides"]))
    if "chunks" in r:
        parts.append(table("predict_dense's chunk_px on one slide (0.5 um/px, fresh process each; output "
                           f"{r['chunks']['options']}; maps compared with the first row's)", r["chunks"]["rows"]))
    if "aggregate_vs_spatialdata" in r:
        parts.append(table("pg.tl.aggregate vs spatialdata (rasterize -> aggregate), same run",
                           [r["aggregate_vs_spatialdata"]]))
    if "readout" in r:
        parts.append(table("pixgene read-out at scale", [r["readout"]]))
    if "acceptance" in r:
        parts.append(table("Acceptance", [r["acceptance"]]))
    return "\n".join(parts)


if __name__ == "__main__":
    main()
