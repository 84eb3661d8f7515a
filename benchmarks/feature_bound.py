"""How much fine-scale accuracy the frozen encoder's features allow: the bound behind the cross-scale numbers.

On the synthetic data (truth known everywhere) a dense head is trained on the frozen encoder's feature pyramid
with the *truth itself* as the target, at every 4 um pixel of the image's left half, and scored on the right
half against the truth over square bins. No model trained on spot totals through the same frozen features can
be expected to beat a head supervised pixel by pixel, so its score is an estimate of the bound those features
put on any such model. Next to it, on the same pixels and with the same metric: the expected truth (the
ceiling of any predictor from the histology) and pixgene's default model fitted on 100 um spots.

Rows:

- ``expected truth``: ``truth_expected`` (the truth without the cell-to-cell variability no image explains).
- ``pixgene, 100 um spots``: ``pg.tl.fit`` with its defaults on the 100 um spots (150 um pitch) of the whole
  image, ``pg.tl.predict_dense`` at 4 um per pixel.
- ``dense head on truth, encoder at U um/px``: the encoder's levels of 2 to 16 um (strides 2 to 16 at
  1 um/px; 4 to 32 at 0.5 um/px, the image upsampled twice first) brought to the 4 um grid (finer levels
  averaged, coarser ones interpolated), standardised, and a head of three 3x3 convolutions (128 channels, SiLU, softplus
  output) trained with squared error on the expected truth of the left half (random 64 x 64 crops).
- ``dense head on truth, raw pixels``: the same head on the image's own pixels instead, each 4 um pixel's 4 x 4
  image pixels (1 um/px) as 48 channels of optical density (-log of RGB in [1/255, 1]); ``... encoder at 1 um/px
  and raw pixels``: both inputs side by side. Whether the pixels themselves carry fine-scale information that
  the encoder's levels lose (a decoder could read them through a full-resolution skip).

Scores: PCC@M (mean over genes of the per-gene Pearson r across bins) and PCC@S (median) on the right half,
over bins of 4, 8 and 16 um with more than half of their area in tissue (the truth's total > 0).

    python benchmarks/feature_bound.py [--steps 600] [--size-um 3072] [--seed 0]

Writes benchmarks/results/feature_bound.json and feature_bound.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np

from pixgene._bench import block_mean

RESULTS = Path(__file__).parent / "results"
MAP_UM = 4.0
BINS_UM = (4.0, 8.0, 16.0)

log = logging.getLogger("feature_bound")


def image_array(sdata, key: str, channels=None) -> np.ndarray:
    from pixgene._bench import full_resolution

    el = full_resolution(sdata.images[key])
    if channels is not None:
        el = el.sel(c=list(channels))
    return np.asarray(el.values)


def scores(pred: np.ndarray, truth: np.ndarray, tissue: np.ndarray) -> dict:
    """PCC@M / PCC@S of ``pred`` against ``truth`` (both (genes, h, w) on the 4 um grid) over square bins,
    scored as ``pg.tl.evaluate`` scores tables (bins x genes)."""
    from pixgene._bench import score_matrices

    out = {}
    for b in BINS_UM:
        k = int(round(b / MAP_UM))
        p, t = block_mean(pred, k), block_mean(truth, k)
        keep = block_mean(tissue[None].astype(np.float64), k)[0] > 0.5
        s = score_matrices(p[:, keep].T, t[:, keep].T, [str(g) for g in range(len(p))]).summary
        out[f"{b:g} um"] = {"PCC@M": round(s["PCC@M"], 4), "PCC@S": round(s["PCC@S"], 4),
                            "n_bins": int(keep.sum())}
    return out


def pyramid_on_grid(image: np.ndarray, encoder_um: float, *, tile: int = 512, halo: int = 64) -> np.ndarray:
    """The default encoder's levels of 2 to 16 um, on the 4 um grid of a 1 um/px (3, H, W) float image."""
    import torch
    import torch.nn.functional as F

    from pixgene._bench import build_encoder

    enc = build_encoder("efficientnet_lite0").eval()
    zoom = int(round(1.0 / encoder_um))
    g = int(MAP_UM)  # grid pixels are g image pixels
    h, w = image.shape[1:]
    out = None
    with torch.inference_mode():
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                y0, x0 = max(0, y - halo), max(0, x - halo)
                y1, x1 = min(h, y + tile + halo), min(w, x + tile + halo)
                t = torch.from_numpy(np.ascontiguousarray(image[None, :, y0:y1, x0:x1]))
                if zoom > 1:
                    t = F.interpolate(t, scale_factor=zoom, mode="bilinear", align_corners=False)
                size = ((y1 - y0) // g, (x1 - x0) // g)
                levels = []
                for r, f in zip(enc.reductions, enc(t), strict=True):
                    um = r * encoder_um
                    if not 2.0 <= um <= 16.0:
                        continue
                    # finer than the grid: averaged onto it; as fine or coarser: interpolated (identity at 4 um)
                    levels.append(F.adaptive_avg_pool2d(f, size) if um < MAP_UM else
                                  F.interpolate(f, size=size, mode="bilinear", align_corners=False))
                cat = torch.cat(levels, 1)[0].numpy()
                if out is None:
                    out = np.zeros((cat.shape[0], h // g, w // g), np.float32)
                oy, ox = (y - y0) // g, (x - x0) // g
                ny, nx = min(tile, h - y) // g, min(tile, w - x) // g
                out[:, y // g:y // g + ny, x // g:x // g + nx] = cat[:, oy:oy + ny, ox:ox + nx]
    return out


def pixels_on_grid(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The 4 x 4 image pixels of every 4 um grid pixel of a 1 um/px (3, H, W) image in [0, 1], as 48 channels
    of optical density (-log of the intensity, clipped at 1/255)."""
    g = int(MAP_UM)
    h, w = shape
    im = image[:, : h * g, : w * g].reshape(3, h, g, w, g).transpose(0, 2, 4, 1, 3).reshape(3 * g * g, h, w)
    return -np.log(np.clip(im, 1 / 255, 1.0)).astype(np.float32)


def supervised_head(features: np.ndarray, target: np.ndarray, half: int, *, steps: int, seed: int) -> np.ndarray:
    """Train a 3-layer conv head on (features, target) left of column ``half``; predict the right side."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    c, h, _ = features.shape
    mu = features[:, :, :half].mean((1, 2), keepdims=True)
    sd = features[:, :, :half].std((1, 2), keepdims=True) + 1e-6
    x = torch.from_numpy(((features - mu) / sd).astype(np.float32))
    scale = target[:, :, :half].mean((1, 2), keepdims=True) + 1e-12
    y = torch.from_numpy((target / scale).astype(np.float32))
    head = nn.Sequential(
        nn.Conv2d(c, 128, 3, padding=1), nn.SiLU(), nn.Conv2d(128, 128, 3, padding=1), nn.SiLU(),
        nn.Conv2d(128, 128, 3, padding=1), nn.SiLU(), nn.Conv2d(128, target.shape[0], 1), nn.Softplus(),
    )
    opt = torch.optim.Adam(head.parameters(), 1e-3)
    crop, batch = 64, 8
    for _ in range(steps):
        ys = rng.integers(0, h - crop, batch)
        xs = rng.integers(0, half - crop, batch)
        xb = torch.stack([x[:, a:a + crop, b:b + crop] for a, b in zip(ys, xs, strict=True)])
        yb = torch.stack([y[:, a:a + crop, b:b + crop] for a, b in zip(ys, xs, strict=True)])
        loss = ((head(xb) - yb) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    margin = 8  # the head sees 3 pixels either side: start left of the half so its edge is not zero padding
    with torch.inference_mode():
        pred = head(x[None, :, :, half - margin:])[0, :, :, margin:].numpy()
    return pred * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size-um", type=float, default=3072.0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    import pixgene as pg

    started = time.time()
    sdata = pg.datasets.synthetic(args.seed, size_um=args.size_um, n_genes=30, spot_diameter_um=100.0,
                                  spot_pitch_um=150.0, expected_truth=True)
    genes = [g for g in sdata.tables["table"].var_names if g.startswith("GENE")]
    truth_um = float(sdata.attrs["pixgene"]["um_per_px"]["truth"])
    k = int(round(MAP_UM / truth_um))
    truth = block_mean(image_array(sdata, "truth", genes).astype(np.float64), k)
    expected = block_mean(image_array(sdata, "truth_expected", genes).astype(np.float64), k)
    tissue = truth.sum(0) > 0
    half = truth.shape[2] // 2
    right = (slice(None), slice(None), slice(half, None))

    rows = [{"row": "expected truth", "scores": scores(expected[right], truth[right], tissue[:, half:])}]
    t0 = time.time()
    model = pg.tl.fit(sdata, genes=genes, random_state=args.seed, progress=False)
    pg.tl.predict_dense(sdata, model, um_per_px=MAP_UM, progress=False)
    dense = image_array(sdata, "he_pixgene", genes).astype(np.float64)[:, : truth.shape[1], : truth.shape[2]]
    rows.append({"row": "pixgene, 100 um spots", "seconds": round(time.time() - t0, 1),
                 "scores": scores(dense[right], truth[right], tissue[:, half:])})

    image = image_array(sdata, "he").astype(np.float32) / 255.0
    inputs = {}
    for enc_um in (1.0, 0.5):
        t0 = time.time()
        feats = pyramid_on_grid(image, enc_um)[:, : truth.shape[1], : truth.shape[2]]
        inputs[f"encoder at {enc_um:g} um/px"] = (feats, time.time() - t0)
    t0 = time.time()
    inputs["raw pixels"] = (pixels_on_grid(image, truth.shape[1:]), time.time() - t0)
    inputs["encoder at 1 um/px and raw pixels"] = (
        np.concatenate([inputs["encoder at 1 um/px"][0], inputs["raw pixels"][0]]), 0.0)
    for name, (feats, built_s) in inputs.items():
        t0 = time.time()
        pred = supervised_head(feats, expected, half, steps=args.steps, seed=args.seed)
        rows.append({"row": f"dense head on truth, {name}", "channels": int(feats.shape[0]),
                     "seconds": round(built_s + time.time() - t0, 1),
                     "scores": scores(pred, truth[right], tissue[:, half:])})
        log.info("%s", rows[-1])

    result = {
        "command": "python benchmarks/feature_bound.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "genes": len(genes), "map_um": MAP_UM, "rows": rows,
        "wall_s": round(time.time() - started, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "feature_bound.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "feature_bound.md").write_text(render(result))
    print(render(result))


def render(result: dict) -> str:
    lines = [
        "# Fine-scale bound of the frozen features (synthetic, truth known everywhere)", "",
        f"`{result['command']}`, {result['date']}, {result['machine']['cores']} cores, torch "
        f"{result['machine']['torch']}, {result['wall_s']:.0f} s. Right half of the image, {result['genes']} "
        "genes, PCC@M / PCC@S against the truth over square bins in tissue; the dense heads were trained on "
        "the expected truth of the left half (see the script's docstring).", "",
        "| | " + " | ".join(f"{b:g} um bins" for b in BINS_UM) + " |",
        "|---|" + "---|" * len(BINS_UM),
    ]
    for r in result["rows"]:
        cells = [f"{r['scores'][f'{b:g} um']['PCC@M']:.3f} / {r['scores'][f'{b:g} um']['PCC@S']:.3f}"
                 for b in BINS_UM]
        lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
