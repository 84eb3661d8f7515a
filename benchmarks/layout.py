"""The decoders' input layout at prediction, side by side: the encoder's default (NCHW) layout against
channels-last, the layout training's batches have (``PixNetModule.decode`` feeds the decoders channels-last).

The default architecture (bundled EfficientNet-Lite0, five fusion decoders of width 48 with their heads,
output stride 4, 51 outputs) in the precision ``pg.tl.fit(precision="auto")`` picks on this machine; random
decoder weights (the time does not depend on them). On tiles of the synthetic demo slide's H&E of each size in
``--tiles`` (encoder px; 2048 is ``predict_dense``'s tile: a 256 px output chunk with the 512 px halo on each
side), the two layouts alternate so that a noisy machine affects both alike; each row is the median over
``--iters``:

- decode: the five decoders and heads on one tile's features,
- predict tile: the encoder, then the five decoders and heads.

It also gives the relative difference (Frobenius) between the two layouts' maps, next to the difference between
float32 and the precision used (the same weights, channels-last): the scale of rounding either way.

    python benchmarks/layout.py                      # prints a table, writes results/layout.json and .md
    python benchmarks/layout.py --iters 3 --tiles 512
"""

from __future__ import annotations

import argparse
import logging
import statistics

log = logging.getLogger("layout")
LAYOUTS = ("default (NCHW)", "channels-last")


def decode_in_layout(module, features, layout: str):
    """The members' mean intensity with the features handed to every decoder in ``layout`` as they are."""
    import torch

    if layout == LAYOUTS[1]:
        features = [f if f is None else f.contiguous(memory_format=torch.channels_last) for f in features]
    else:
        features = [f if f is None else f.contiguous() for f in features]
    out = None
    with module.autocast("cpu"):
        for decoder, head in module.pairs():
            part = head(decoder(features))
            out = part if out is None else out + part
    return out.float() / module.n_members


def run(iters: int, tiles: list[int]) -> dict:
    import torch
    from precision import _he_tiles, _module, _timed

    from pixgene._bench import resolve_precision

    precision = resolve_precision("auto", "cpu")
    module = _module(precision, members=5)
    rows, differences = [], []
    for px in tiles:
        x = torch.from_numpy(_he_tiles(1, px, seed=1))
        with torch.inference_mode():
            features = module.encode(x)
            maps = {layout: decode_in_layout(module, features, layout) for layout in LAYOUTS}
            # what the library runs is the channels-last function, to the bit
            assert torch.equal(module.decode(features), maps[LAYOUTS[1]])
            reference = _module("32", members=5)
            reference.load_state_dict(module.state_dict())
            float32 = decode_in_layout(reference, features, LAYOUTS[1])
        base = maps[LAYOUTS[0]]
        differences.append({
            "tile_px": px,
            "layouts": float((maps[LAYOUTS[1]] - base).norm() / base.norm()),
            "float32_vs_precision": float((float32 - maps[LAYOUTS[1]]).norm() / float32.norm()),
        })

        def decode(layout, features=features):
            def f():
                with torch.inference_mode():
                    decode_in_layout(module, features, layout)
            return f

        def predict(layout, x=x):
            def f():
                with torch.inference_mode():
                    decode_in_layout(module, module.encode(x), layout)
            return f

        for stage, make in (("decode", decode), ("predict tile", predict)):
            fns = {layout: make(layout) for layout in LAYOUTS}
            times: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
            for _ in range(iters):
                for layout in LAYOUTS:
                    times[layout] += _timed(fns[layout], 1)
            t_default, t_last = (statistics.median(times[layout]) for layout in LAYOUTS)
            rows.append({"stage": stage, "tile_px": px, "nchw_s": round(t_default, 3),
                         "channels_last_s": round(t_last, 3), "speed-up": round(t_default / t_last, 2)})
            log.info("%s, %d px: NCHW %.3f s, channels-last %.3f s (%.2fx)", stage, px, t_default, t_last,
                     t_default / t_last)
    return {"rows": rows, "precision": precision, "members": module.n_members,
            "relative_difference": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in d.items()}
                                    for d in differences]}


def render(result: dict) -> str:
    lines = ["# Decoder input layout at prediction: NCHW against channels-last", "",
             f"`{result['command']}` on {result['started']}: {result['machine']}. The default architecture "
             f"(EfficientNet-Lite0, {result['members']} fusion decoders of width 48 with their heads) in "
             f"precision {result['precision']!r} (`precision=\"auto\"` here); the two layouts alternate; medians.",
             "", "| stage | tile (encoder px) | NCHW s | channels-last s | speed-up |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['stage']} | {r['tile_px']} | {r['nchw_s']} | {r['channels_last_s']} | "
                     f"{r['speed-up']}x |")
    lines += ["", "Relative difference (Frobenius) of the intensity maps: between the two layouts, and between "
              "float32 and the precision used (channels-last both), the same weights and features:", "",
              "| tile (encoder px) | NCHW vs channels-last | float32 vs this precision |", "|---|---|---|"]
    lines += [f"| {d['tile_px']} | {d['layouts']} | {d['float32_vs_precision']} |"
              for d in result["relative_difference"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--tiles", type=int, nargs="+", default=[1024, 2048])
    import _report

    _report.main("layout", parser, lambda a: run(a.iters, a.tiles), render)


if __name__ == "__main__":
    main()
