"""Where the time of ``pg.tl.predict_dense`` goes, against the bare encoder, on a synthetic slide and a her2st section.

For each slide, ``chunk_px`` and model (the default five-member model and its member 0 alone),
``predict_dense`` runs with its other defaults on a zarr-backed copy of the slide while the parts of the work are timed in the same process:

    encoder      ``PixNetModule.encode`` (the frozen encoder's forward pass, in the model's precision)
    decoders     every member's decoder forward pass
    heads        every member's intensity head
    read         ``SlideReader.read``: the tiles read from the image pyramid and resampled to the encoder's um/px
    resample     the model-grid intensity resampled onto the output chunks (``resample_to_output``)
    write        the chunks written to the resumable chunk store (``ChunkStore.write``)
    other        the rest: the tiling halo's probe, the slide's feature statistics, the tissue mask, the
                 pyramid of the finished map and its write into the SpatialData store

Throughput is *tissue* megapixels per second at the encoder's um/px: the area of ``predict_dense``'s tissue mask,
in encoder pixels, over its wall time (the chunks it computes cover more: every chunk that touches tissue). The bare encoder's throughput is measured in the same
process, right before each prediction: ``encode`` of three tiles of the slide's own pixels of each size in
``--encoder-tiles``, nothing else (no halo, no decoder); the best size's is the reference (larger tiles run
faster per pixel on a CPU). The halo's share is the encoded area over the written area of the computed chunks;
the encoder inside the prediction runs at the encoded area over its seconds (the halo probe's and the slide
statistics' few encodings included in its seconds, not in the area).

The model is fitted in the run (``pg.tl.fit`` with the default architecture and precision on the small
synthetic slide, ``--fit-epochs`` epochs: speed does not depend on the weights), or loaded from ``--workdir``
where an earlier run saved it; the slides' stores are kept there too. The synthetic slide is a
``--side``^2 px pyramid at 0.5 um/px with tissue islands (``benchmarks/scale.py``'s ``build_slide``).

    python benchmarks/speed.py                                   # synthetic 20,000^2 px and her2st C5
    python benchmarks/speed.py --slides synthetic --side 8000    # a smaller run
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

log = logging.getLogger("speed")
PARTS = ("encoder", "decoders", "heads", "read", "resample", "write")


class Timers:
    """Seconds spent in wrapped callables, by part; a part's time excludes the parts nested in it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[float]] = []

    def wrap(self, part: str, fn):
        def timed(*args, **kwargs):
            self._stack.append([0.0])
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                nested = self._stack.pop()[0]
                self.seconds[part] += dt - nested
                self.calls[part] += 1
                if self._stack:
                    self._stack[-1][0] += dt

        return timed


@contextlib.contextmanager
def instrumented(model, timers: Timers):
    """Time the parts of a prediction with ``model`` (class-level wrappers, removed on exit)."""
    from pixgene._bench import SlideReader, infer_chunks

    decoder_cls = {type(d) for d, _ in model.module.pairs()}
    head_cls = {type(h) for _, h in model.module.pairs()}
    patches = [(type(model.module), "encode", "encoder"), (SlideReader, "read", "read"),
               (infer_chunks.ChunkStore, "write", "write"), (infer_chunks, "resample_to_output", "resample")]
    patches += [(c, "forward", "decoders") for c in decoder_cls] + [(c, "forward", "heads") for c in head_cls]
    saved = []
    for owner, name, part in patches:
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        saved.append((owner, name, original))
        setattr(owner, name, timers.wrap(part, original))
    try:
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def fit_model(workdir: Path, epochs: int, seed: int):
    import pixgene as pg

    path = workdir / "model"
    if (path / "config.json").is_file():
        return pg.tl.PixNet.load(path)
    sdata = pg.datasets.synthetic(seed=seed, size_um=1000.0)
    model = pg.tl.fit(sdata, max_epochs=epochs, random_state=seed, progress=False)
    model.save(path, overwrite=True)
    return model


def synthetic_slide(workdir: Path, side: int) -> Path:
    from scale import build_slide, texture_tile

    store = workdir / f"synthetic_{side}.zarr"
    if not store.exists():
        built = build_slide(store, side, texture_tile())
        log.info("synthetic %d^2 px slide built in %.0f s", side, built["build_s"])
    return store


def her2st_slide(workdir: Path, section: str) -> Path:
    import pixgene as pg

    store = workdir / f"her2st_{section}.zarr"
    if not store.exists():
        sdata = pg.datasets.her2st(section)
        sdata.write(store)
    return store


def encoder_mpx_per_s(model, tiles: np.ndarray, repeats: int = 3) -> float:
    """Megapixels per second of ``model.module.encode`` alone on (n, 3, s, s) tiles, one at a time."""
    import torch

    module = model.module
    with torch.inference_mode():
        module.encode(torch.from_numpy(tiles[:1]))  # warm-up
        best = np.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            for tile in tiles:
                module.encode(torch.from_numpy(tile[None]))
            best = min(best, time.perf_counter() - t0)
    return tiles.shape[0] * tiles.shape[2] * tiles.shape[3] / 1e6 / best


def sample_tiles(store: Path, model, n: int = 3, size: int = 1024) -> np.ndarray:
    """``n`` tiles of ``size``^2 encoder px from the slide's tissue, as ``predict_dense`` reads them."""
    import spatialdata as sd

    from pixgene._bench import SlideReader, resolve_um_per_px

    sdata = sd.read_zarr(store)
    image_um = resolve_um_per_px(sdata, "he")
    reader = SlideReader(sdata.images["he"], image_um=image_um, target_um=model.encoder_um_per_px, name="he")
    h, w = reader.shape
    ys = np.linspace(0.35 * h, 0.6 * h - size, n).astype(int)
    xs = np.linspace(0.3 * w, 0.6 * w - size, n).astype(int)
    return np.stack([reader.read(int(x), int(y), size, size) for y, x in zip(ys, xs, strict=True)]).astype(np.float32)


def decoder_reach(model, size: int = 1024, tolerance: float = 1e-6) -> dict:
    """How far (encoder px) a change of the encoder's features reaches through one decoder and head: the features
    of a random tile zeroed right of a cut at every level, the farthest output column left of the cut that moves
    by more than ``tolerance`` of the map's largest value. Cuts on a multiple of the coarsest level's stride: one
    on the attention windows' grid (half the tile), one off it. The whole network's halo is ``tiling_halo``."""
    import torch

    view = model.module.member(0)
    torch.manual_seed(0)
    with torch.inference_mode():
        features = model.module.encode(torch.rand(1, 3, size, size))
        base = view.decode(features)
        reach = {}
        for cut in (size // 2, size // 2 - 96):
            cut_features = []
            for f in features:
                if f is not None:
                    f = f.clone()
                    f[..., cut * f.shape[-1] // size:] = 0
                cut_features.append(f)
            moved = (view.decode(cut_features) - base).abs().amax(dim=(0, 1, 2)).numpy()
            moved = moved[: cut // model.out_stride] / float(base.abs().max())
            far = np.nonzero(moved > tolerance)[0]
            reach[f"cut at {cut} px"] = int(cut - far.min() * model.out_stride) if far.size else 0
    return reach


def tissue_mpx(store: Path, model) -> float:
    """The slide's tissue area (``predict_dense``'s tissue mask) in megapixels at the model's encoder um/px."""
    import spatialdata as sd

    from pixgene._bench import resolve_um_per_px, tissue_mask

    sdata = sd.read_zarr(store)
    image_um = resolve_um_per_px(sdata, "he")
    mask, factor = tissue_mask(sdata, "he", image_um_per_px=image_um)
    return float(mask.sum()) * (factor * image_um / model.encoder_um_per_px) ** 2 / 1e6


def predict_once(store: Path, model, key: str, chunk_px: int) -> dict:
    import spatialdata as sd

    import pixgene as pg

    sdata = sd.read_zarr(store)
    timers = Timers()
    with instrumented(model, timers):
        t0 = time.perf_counter()
        pg.tl.predict_dense(sdata, model, key_added=key, overwrite=True, chunk_px=chunk_px, progress=False)
        wall = time.perf_counter() - t0
    meta = sdata.attrs["pixgene"]["dense"][key]
    enc_um = model.encoder_um_per_px
    chunk_enc = meta["chunk_px"] * meta["um_per_px"] / enc_um
    th, tw = meta["tile_px"]
    n = meta["chunks"]["tissue"]
    parts = {p: round(timers.seconds[p], 2) for p in PARTS}
    parts["other"] = round(wall - sum(timers.seconds[p] for p in PARTS), 2)
    del sdata.images[key]
    sdata.delete_element_from_disk(key)  # the slide's store is left as it was for the next run
    return {"chunk_px": chunk_px, "wall_s": round(wall, 1), "tissue_chunks": n, "tile_px": [th, tw], "halo_px": meta["halo_px"],
            "computed_mpx": round(n * chunk_enc ** 2 / 1e6, 2), "encoded_over_written": round(th * tw / chunk_enc ** 2, 2),
            "parts_s": parts, "calls": dict(timers.calls)}


def run(args) -> dict:
    import torch

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = fit_model(workdir, args.fit_epochs, args.seed)
    models = {"default (5 members)": model, "member 0 alone": model.member(0)}
    slides = {}
    if "synthetic" in args.slides:
        slides[f"synthetic {args.side}^2 px"] = synthetic_slide(workdir, args.side)
    if "her2st" in args.slides:
        slides[f"her2st {args.section}"] = her2st_slide(workdir, args.section)
    rows = []
    for slide, store in slides.items():
        tiles = {size: sample_tiles(store, model, size=size) for size in args.encoder_tiles}
        tissue = tissue_mpx(store, model)
        for chunk_px, (name, m) in ((c, nm) for c in args.chunk_px for nm in models.items()):
            # the bare encoder right before each prediction: the same state of a shared machine; its best tile
            # size is the reference
            by_size = {size: round(encoder_mpx_per_s(model, t), 3) for size, t in tiles.items()}
            enc = max(by_size.values())
            r = predict_once(store, m, "speed_map", chunk_px)
            r.update(slide=slide, model=name, n_members=m.n_members, encoder_mpx_per_s=round(enc, 3),
                     encoder_mpx_per_s_by_tile=by_size, tissue_mpx=round(tissue, 2),
                     tissue_mpx_per_s=round(tissue / r["wall_s"], 3))
            r["fraction_of_encoder"] = round(r["tissue_mpx_per_s"] / enc, 3)
            # the encoder inside predict_dense, per encoded pixel (halo included)
            r["encoder_in_predict_mpx_per_s"] = round(
                r["computed_mpx"] * r["encoded_over_written"] / max(r["parts_s"]["encoder"], 1e-9), 3)
            log.info("%s, %s: %s", slide, name, r)
            rows.append(r)
    reach = decoder_reach(model)
    log.info("decoder reach: %s", reach)
    return {"model_id": model.model_id, "precision": model.module.precision, "threads": torch.get_num_threads(),
            "decoder_reach_px": reach,
            "load_average_at_end": [round(v, 2) for v in os.getloadavg()], "rows": rows}


def render(r: dict) -> str:
    lines = ["# Where the time of `predict_dense` goes", "",
             f"`{r['command']}`, {r['started']}, {r['machine']}; load average at the end "
             f"{r['load_average_at_end']}. Model {r['model_id']} (default architecture and precision "
             f"{r['precision']}), predict_dense's defaults (see the script's docstring).", "",
             "| slide | model | chunk px | tissue Mpx | computed Mpx | tile px (halo) | encoded / written | wall s | tissue Mpx/s | bare encoder "
             "Mpx/s | fraction of encoder | encoder in predict Mpx/s | " + " | ".join(f"{p} s" for p in (*PARTS, "other")) + " |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * (len(PARTS) + 1)]
    for w in r["rows"]:
        parts = " | ".join(f"{w['parts_s'][p]:.1f}" for p in (*PARTS, "other"))
        lines.append(f"| {w['slide']} | {w['model']} | {w['chunk_px']} | {w['tissue_mpx']:.1f} | {w['computed_mpx']:.1f} | {w['tile_px'][0]}x{w['tile_px'][1]} "
                     f"({w['halo_px']}) | {w['encoded_over_written']:.2f} | {w['wall_s']:.1f} | "
                     f"{w['tissue_mpx_per_s']:.3f} | {w['encoder_mpx_per_s']:.3f} | {w['fraction_of_encoder']:.3f} "
                     f"| {w['encoder_in_predict_mpx_per_s']:.3f} | {parts} |")
    lines += ["", "How far a change of the encoder's features reaches through one decoder (encoder px; see "
              f"`decoder_reach`): {r['decoder_reach_px']}; the whole network's tiling halo is the table's halo."]
    return "\n".join(lines) + "\n"


def main() -> None:
    import _report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", nargs="+", default=["synthetic", "her2st"], choices=["synthetic", "her2st"])
    parser.add_argument("--side", type=int, default=20000, help="synthetic slide side, px at 0.5 um/px")
    parser.add_argument("--section", default="C5", help="her2st section")
    parser.add_argument("--chunk-px", type=int, nargs="+", default=[256],
                        help="predict_dense's chunk_px (output px; 256 is its default)")
    parser.add_argument("--fit-epochs", type=int, default=1)
    parser.add_argument("--encoder-tiles", type=int, nargs="+", default=[1024, 2048],
                        help="tile sides (encoder px) of the bare encoder's measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/pixgene_speed")
    _report.main("speed", parser, run, render)


if __name__ == "__main__":
    main()
