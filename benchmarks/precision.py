"""float32 against bfloat16 autocast, side by side: the default model's stages on this machine's CPU.

For the default architecture (bundled EfficientNet-Lite0, fusion decoder of width 48, output stride 4) the same
weights are timed in both precisions, alternating (float32, bfloat16, float32, ...) so that a noisy machine
affects both alike; each row is the median over ``--iters`` repetitions:

- encode: the encoder over a batch of training tiles (what ``pg.tl.fit`` caches),
- train step: decoder and head forward, backward and an AdamW step on cached features,
- predict tile: encoder, decoder and head over one tile of ``predict_dense`` (a 256 px output chunk with the
  default model's 512 px halo on each side: 2048 encoder px).

It also gives how far bfloat16 moves the features (relative Frobenius error per pyramid level) and the
intensity map, on tiles of the synthetic demo slide's H&E.

    python benchmarks/precision.py                 # prints a table, writes results/precision.json and .md
    python benchmarks/precision.py --iters 3 --predict-px 1024
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import numpy as np

log = logging.getLogger("precision")


def _module(precision: str, members: int = 1):
    import torch

    from pixgene._bench import build_encoder, build_module

    torch.manual_seed(0)
    decoder = {"width": 48, "out_stride": 4, "block": "fusion", "window": 8, "precision": precision,
               "members": members}
    return build_module(build_encoder("efficientnet_lite0").config(), "default", n_outputs=51,
                        decoder_config=decoder).eval()


def _he_tiles(n: int, px: int, seed: int = 0) -> np.ndarray:
    """``n`` tiles of ``px`` from the synthetic demo slide's H&E (RGB in [0, 1], 1 um/px)."""
    import pixgene as pg
    from pixgene._bench import full_resolution, to_float01

    sdata = pg.datasets.synthetic(seed=seed, size_um=float(max(1024, px + 64)))
    image = to_float01(np.asarray(full_resolution(sdata.images["he"]).values))
    rng = np.random.default_rng(seed)
    h, w = image.shape[1:]
    corners = [(int(rng.integers(0, h - px + 1)), int(rng.integers(0, w - px + 1))) for _ in range(n)]
    return np.stack([image[:, y : y + px, x : x + px] for y, x in corners]).astype(np.float32)


def _timed(fn, iters: int) -> list[float]:
    fn()  # warm-up: oneDNN picks and caches its kernels for the shapes
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def run(iters: int, batch: int, tile: int, predict_px: int) -> dict:
    import torch

    from pixgene._bench import resolve_precision

    modules = {p: _module(p) for p in ("32", "bf16")}
    modules["bf16"].load_state_dict(modules["32"].state_dict())
    x = torch.from_numpy(_he_tiles(batch, tile))
    big = torch.from_numpy(_he_tiles(1, predict_px, seed=1))

    with torch.inference_mode():
        features = {p: m.encode(x) for p, m in modules.items()}
        lam = {p: m.decode(features["32"]) for p, m in modules.items()}
    levels = modules["32"].used_levels
    ref = features["32"]
    errors = {f"level {i} (stride {modules['32'].encoder.reductions[i]})":
              float((ref[i] - features["bf16"][i]).norm() / ref[i].norm()) for i in levels}
    errors["intensity map (same features)"] = float((lam["32"] - lam["bf16"]).norm() / lam["32"].norm())

    def encode(p):
        def f():
            with torch.inference_mode():
                modules[p].encode(x)
        return f

    def predict(p):
        def f():
            with torch.inference_mode():
                modules[p](big)
        return f

    def train_step(p):
        m = modules[p]
        cached = [None if f is None else f.clone().contiguous(memory_format=torch.channels_last) for f in ref]
        m.decoder.train().to(memory_format=torch.channels_last)
        m.head.to(memory_format=torch.channels_last)
        params = [q for q in (*m.decoder.parameters(), *m.head.parameters()) if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def f():
            loss = m.decode(cached).log1p().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return f

    stages = {"encode": (encode, f"{batch} tiles of {tile} px"),
              "predict tile": (predict, f"1 tile of {predict_px} px"),
              "train step": (train_step, f"batch of {batch}, {tile} px tiles")}
    rows = []
    for name, (make, what) in stages.items():
        fns = {p: make(p) for p in ("32", "bf16")}
        times: dict[str, list[float]] = {"32": [], "bf16": []}
        for _ in range(iters):  # alternate, so drifts of a noisy machine hit both
            for p in ("32", "bf16"):
                times[p] += _timed(fns[p], 1)
        t32, t16 = statistics.median(times["32"]), statistics.median(times["bf16"])
        rows.append({"stage": name, "what": what, "float32_s": round(t32, 4), "bfloat16_s": round(t16, 4),
                     "speed-up": round(t32 / t16, 2)})
        log.info("%s: float32 %.3f s, bfloat16 %.3f s (%.2fx)", name, t32, t16, t32 / t16)
    return {"rows": rows, "relative_error": {k: round(v, 4) for k, v in errors.items()},
            "bf16_native": resolve_precision("auto", "cpu") == "bf16"}


def render(result: dict) -> str:
    m = result["machine"]
    lines = ["# float32 against bfloat16 autocast (CPU)", "",
             f"`{result['command']}` on {result['started']}: {m}. The default architecture (EfficientNet-Lite0, "
             "fusion decoder of width 48); the same weights in both precisions, runs alternating; medians. "
             f"bfloat16 native on this CPU: {result['bf16_native']}.", "",
             "| stage | input | float32 s | bfloat16 s | speed-up |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['stage']} | {r['what']} | {r['float32_s']} | {r['bfloat16_s']} | {r['speed-up']}x |")
    lines += ["", "How far bfloat16 moves the numbers (relative Frobenius error against float32, tiles of the "
              "synthetic slide's H&E; the intensity map decoded from the same float32 features):", "",
              "| quantity | relative error |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in result["relative_error"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--predict-px", type=int, default=2048)
    import _report

    _report.main("precision", parser, lambda a: run(a.iters, a.batch, a.tile, a.predict_px), render)


if __name__ == "__main__":
    main()
