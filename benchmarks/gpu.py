"""Timings on a CUDA GPU: encoder forward passes, and one fold of the her2st benchmark.

Sections (printed as tables; the numbers go to benchmarks/results/gpu.json and gpu.md):

1. encoders: the forward pass of the default encoder (the bundled EfficientNet-Lite0) and of a UNI2-h-sized
   encoder (``build_encoder("uni2", weights=None)``: timm's ViT-giant/14 with UNI2-h's settings, 681M
   parameters, randomly initialised; weights do not change the time) on batches of square tiles, in float32
   (pixgene's default), TF32 matrix products and bfloat16 autocast. Milliseconds per tile, tiles and mm^2 of
   tissue per second (at the encoder's um/px), achieved TFLOP/s from the counted FLOPs, peak GPU memory.
2. fold: one fold of ``benchmarks/accuracy.py`` (her2st: ``pg.tl.fit`` on three sections, ``predict_dense``
   over the whole held-out section, ``aggregate`` over its spots), with its stage times, scores and peak GPU
   memory, with the default encoder or (``--fold-encoder uni2``) the UNI2-h-sized one with random weights (its
   time and memory, not its accuracy). The same fold's CPU row from ``accuracy.json`` stands beside it.

    python benchmarks/gpu.py                            # everything (needs CUDA and the her2st data)
    python benchmarks/gpu.py --sections fold --fold-encoder uni2 --merge
    python benchmarks/gpu.py --sections encoders --device cpu --encoders efficientnet_lite0 --batch 2 --iters 1
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
SECTIONS = ("encoders", "fold")
PRECISIONS = ("fp32", "tf32", "bf16")
log = logging.getLogger("gpu")


def machine(device: str) -> dict:
    import os

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_cores": os.cpu_count(),
            "device": device}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 1e9, 1),
                    multiprocessors=props.multi_processor_count, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_forward(encoder, *, device: str, tile: int, batch: int, precision: str, iters: int,
                 warmup: int = 2) -> dict:
    """Seconds per batch of ``batch`` random tiles (the median of ``iters`` timed passes after ``warmup``)."""
    import torch

    on_gpu = device.startswith("cuda")
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    x = torch.rand(batch, 3, tile, tile, device=device)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    try:
        with torch.inference_mode(), torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                                                    enabled=precision == "bf16"):
            for k in range(warmup + iters):
                _sync(device)
                t0 = time.perf_counter()
                out = encoder(x)
                _sync(device)
                if k >= warmup:
                    times.append(time.perf_counter() - t0)
                if not all(bool(torch.isfinite(o).all()) for o in out):
                    raise RuntimeError(f"{precision} forward pass gave non-finite features")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if on_gpu else float("nan")
    return {"s_per_batch": float(np.median(times)), "peak_gpu_gb": round(peak, 2)}


def bench_encoders(names: list[str], *, device: str, batch: int, iters: int, tiles: list[int]) -> list[dict]:
    import torch

    from pixgene._bench import build_encoder, encoder_flops_per_pixel

    rows = []
    for name in names:
        t0 = time.perf_counter()
        weights = "default" if name == "efficientnet_lite0" else None
        # built straight on the device: initialising 681M parameters on the CPU would dominate the run
        with torch.device(device):
            encoder = build_encoder(name, weights=weights).eval()
        encoder.to(device)
        build_s = time.perf_counter() - t0
        n_params = sum(p.numel() for p in encoder.parameters())
        for tile in tiles:
            if tile % max(encoder.reductions):
                log.warning("%s: %d px tiles skipped (not a multiple of its largest stride)", name, tile)
                continue
            flops = encoder_flops_per_pixel(encoder, size=tile) * tile * tile
            for precision in PRECISIONS:
                if precision == "tf32" and not device.startswith("cuda"):
                    continue
                t = time_forward(encoder, device=device, tile=tile, batch=batch, precision=precision, iters=iters)
                per_tile = t["s_per_batch"] / batch
                tile_mm2 = (tile * encoder.um_per_px / 1000.0) ** 2
                row = {"encoder": name, "params_m": round(n_params / 1e6, 1), "um_per_px": encoder.um_per_px,
                       "tile_px": tile, "batch": batch, "precision": precision,
                       "ms_per_tile": round(1000 * per_tile, 3), "tiles_per_s": round(1 / per_tile, 1),
                       "mm2_per_s": round(tile_mm2 / per_tile, 2), "gflop_per_tile": round(flops / 1e9, 2),
                       "tflop_per_s": round(flops / per_tile / 1e12, 2), "peak_gpu_gb": t["peak_gpu_gb"],
                       "build_s": round(build_s, 1)}
                rows.append(row)
                log.info("%s %d px %s: %.3f ms/tile, %.1f TFLOP/s", name, tile, precision, row["ms_per_tile"],
                         row["tflop_per_s"])
        del encoder
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


#: encoders a fold can run with: pg.tl.fit's encoder options, and what the row is called
FOLD_ENCODERS = {
    "efficientnet_lite0": ({}, "pixgene default (EfficientNet-Lite0, ImageNet weights)"),
    # random weights: the time and memory of a UNI2-h fold, not its accuracy (no weights can be fetched here)
    "uni2": ({"encoder": "uni2", "encoder_weights": None}, "pixgene, UNI2-h-sized encoder, random weights"),
}


def bench_fold(test_section: str, *, device: str, seed: int, encoder: str) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    import accuracy as A

    options, label = FOLD_ENCODERS[encoder]
    method = "pixgene" if not options else f"pixgene_{encoder}"
    A.PIXGENE[method] = options
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    fold = A.run_fold("her2st", A.FOLDS["her2st"], test_section, [method], seed)
    record = fold["methods"][method]
    record["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if on_gpu else None
    out = {"label": label, "encoder": encoder, "dataset": "her2st", "test": test_section, "train": fold["train"],
           "seed": seed, "fold_s": fold["fold_s"], "n_train_spots": fold["n_train_spots"],
           "n_test_spots": fold["n_test_spots"], "pixgene": record}
    cpu = _cpu_row(test_section) if not options else None
    if cpu is not None:
        out["cpu_reference"] = cpu
    return out


def _cpu_row(test_section: str) -> dict | None:
    """The same fold's pixgene row in the committed CPU results (another machine, another run)."""
    path = RESULTS / "accuracy.json"
    if not path.exists():
        return None
    stored = json.loads(path.read_text())
    for fold in stored.get("datasets", {}).get("her2st", {}).get("folds", []):
        if fold.get("test") == test_section and "pixgene" in fold["methods"]:
            r = fold["methods"]["pixgene"]
            return {k: r.get(k) for k in ("PCC@M", "PCC@S", "time_s", "peak_rss_gb", "training")}
    return None


def render(result: dict) -> str:
    m = result["machine"]
    lines = ["# GPU timings", "",
             f"Machine: {m.get('gpu', m['device'])}, {m.get('gpu_memory_gb', '-')} GB, CUDA {m.get('cuda', '-')}, "
             f"torch {m['torch']}, {m['cpu_cores']} CPU cores. Written by `python benchmarks/gpu.py`.", ""]
    if result.get("encoders"):
        lines += ["## Encoder forward pass", "",
                  "Median of the timed passes over one batch of random tiles; FLOPs counted by torch's "
                  "FlopCounterMode; mm^2/s of tissue at the encoder's um/px.", "",
                  "| encoder | params (M) | um/px | tile px | batch | precision | ms/tile | tiles/s | mm^2/s "
                  "| GFLOP/tile | TFLOP/s | peak GPU GB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["encoders"]:
            lines.append(f"| {r['encoder']} | {r['params_m']} | {r['um_per_px']} | {r['tile_px']} | {r['batch']} | "
                         f"{r['precision']} | {r['ms_per_tile']} | {r['tiles_per_s']} | {r['mm2_per_s']} | "
                         f"{r['gflop_per_tile']} | {r['tflop_per_s']} | {r['peak_gpu_gb']} |")
        lines.append("")
    folds = result.get("folds") or []
    if folds:
        first = folds[0]
        lines += ["## One her2st fold", "",
                  f"Test section {first['test']}, trained on {', '.join(first['train'])} "
                  f"({first['n_train_spots']} / {first['n_test_spots']} spots), seed {first['seed']}: `pg.tl.fit`, "
                  "`predict_dense` over the whole held-out section, `aggregate` over its spots, as in "
                  "`benchmarks/accuracy.py`. Each row is its own run.", "",
                  "| run | fit s | predict + aggregate s | fold s | PCC@M | PCC@S | epochs | peak RSS GB | peak GPU GB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        cpu = None
        for fold in folds:
            p = fold["pixgene"]
            t = p.get("training", {})
            lines.append(f"| {fold['label']}, this GPU | {t.get('fit_s')} | {t.get('predict_and_aggregate_s')} | "
                         f"{p['time_s']} | {p['PCC@M']} | {p['PCC@S']} | {t.get('epochs_run')} | "
                         f"{p['peak_rss_gb']} | {p['peak_gpu_gb']} |")
            cpu = cpu or fold.get("cpu_reference")
        if cpu:
            ct = cpu.get("training") or {}
            lines.append(f"| pixgene default, CPU row of accuracy.json (2 cores) | {ct.get('fit_s')} | "
                         f"{ct.get('predict_and_aggregate_s')} | {cpu['time_s']} | {cpu['PCC@M']} | {cpu['PCC@S']} | "
                         f"{ct.get('epochs_run')} | {cpu['peak_rss_gb']} | - |")
        lines += ["", "GPU and CPU training differ in floating-point order, so their scores differ within a "
                  "fold's seed-to-seed spread; two GPU runs with one seed give the same model (`model_id`, a "
                  "hash of the fitted weights, in the JSON).", ""]
    if result.get("notes"):
        lines += ["## Notes", "", result["notes"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--encoders", nargs="+", default=["efficientnet_lite0", "uni2"])
    parser.add_argument("--tiles", nargs="+", type=int, default=[224, 448])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--fold", default="C2", help="her2st test section")
    parser.add_argument("--fold-encoder", default="efficientnet_lite0", choices=list(FOLD_ENCODERS))
    parser.add_argument("--merge", action="store_true",
                        help="keep the sections and folds already in the results file; add this run's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("numba", "distributed", "pixgene.tl._predict"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py: no CUDA device here; pass --device cpu for a smoke run")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": machine(args.device)}
    if args.merge and (out / "gpu.json").exists():
        result = {**json.loads((out / "gpu.json").read_text()), "machine": result["machine"]}

    def write() -> None:
        (out / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "gpu.md").write_text(render(result))

    if "encoders" in args.sections:
        result["encoders"] = bench_encoders(args.encoders, device=args.device, batch=args.batch, iters=args.iters,
                                            tiles=args.tiles)
        write()
    if "fold" in args.sections:
        fold = bench_fold(args.fold, device=args.device, seed=args.seed, encoder=args.fold_encoder)
        result["folds"] = [*result.get("folds", []), fold]
        write()
    print(render(result))


if __name__ == "__main__":
    main()
