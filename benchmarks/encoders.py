"""Registered encoders side by side: parameters, compute, feature cache size and CPU encoding time per mm².

For every entry of ``pixgene.nn.list_encoders()`` (full-size architectures; random weights, as the published
weights are gated or unreachable here and the time of a forward pass does not depend on their values):

- parameters of the encoder as pixgene builds it (the headless ViT, or the CNN's ``features_only`` stages),
  counted on the ``meta`` device;
- forward FLOPs per input pixel on a ``--crop`` tile (``encoder_flops_per_pixel``, counted on the meta device);
- the training feature cache per mm² of tissue: what ``pg.tl.fit`` stores per view (float16), i.e. a ViT's four
  token grids (``Encoder.compact``) or a CNN's pyramid levels of stride 4 and up (those the decoder reads with
  its default ``out_stride=4``), from the shapes on the crop, scaled to the entry's um/px;
- CPU seconds to encode one mm² at the entry's um/px, from one ``--crop`` x ``--crop`` px tile encoded in
  float32 and in bfloat16 autocast (pixgene's ``precision="bf16"``), on one thread by default: the process's
  CPU time, which other jobs on a shared machine inflate far less than wall time (both are recorded, with the
  load average; with several threads, threads waiting for each other would count as CPU time too). A pass
  using under 5 CPU s is repeated (median of up to 3 after a warm-up); slower ones are timed once (their
  set-up is negligible). Per mm² is the tile's time over the tile's area: a ViT's attention grows with the
  number of tokens, so larger tiles cost somewhat more per mm². On n free cores, the wall time is at best the
  CPU time over n.

Entries with an identical architecture (UNI and Phikon-v2; H-optimus-0 and H-optimus-1) are timed once; the
table says so. No GPU was available; every time is CPU time on the machine recorded with the run.

    python benchmarks/encoders.py [--crop 224] [--names uni2 virchow2 ...] [--no-time]

Writes benchmarks/results/encoders.json and encoders.md.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import time

import _report

log = logging.getLogger("encoders")

#: the decoder's default output stride: it reads the levels of stride >= this (pg.tl.DecoderConfig.out_stride)
OUT_STRIDE = 4
CACHE_BYTES = 2  # float16, as pg.tl.fit caches features
SLOW_PASS_CPU_S = 5.0  # a pass using more CPU seconds is timed once


def architecture_key(entry) -> str:
    """Entries with the same key build the same network (normalisation and weights' source aside)."""
    return f"{entry.timm_name} {sorted(entry.timm_kwargs().items(), key=lambda kv: kv[0])!r}"


def materialise(name: str):
    """The full-size encoder with random weights, without timm's (slow) initialisation of a ViT: built
    uninitialised, then every tensor filled (uniform +-1/sqrt(fan_in) for matrices, ones for norm scales and
    layer scales, zeros for biases, small noise for tokens and position embeddings)."""
    import torch

    from pixgene import _bench

    entry = _bench.encoder_entry(name)
    if entry.family != "vit":
        return _bench.build_encoder(name, weights=None)
    encoder = _bench.build_encoder(name, weights=None, weight_init="skip")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, p in encoder.named_parameters():
            if p.ndim >= 2 and not pname.endswith(("pos_embed", "cls_token", "reg_token")):
                bound = 1.0 / math.sqrt(p[0].numel())
                p.uniform_(-bound, bound, generator=gen)
            elif pname.endswith(("pos_embed", "cls_token", "reg_token")):
                p.uniform_(-0.02, 0.02, generator=gen)
            elif pname.endswith(("weight", "gamma")):
                p.fill_(1.0)
            else:
                p.zero_()
    return encoder


def static_facts(name: str, crop: int) -> dict:
    """Parameters, FLOPs per pixel and feature cache size, all from the meta device (no memory, no compute)."""
    import torch

    from pixgene import _bench

    entry = _bench.encoder_entry(name)
    with torch.device("meta"):
        encoder = _bench.build_encoder(name, weights=None)
        compact = encoder.compact(torch.empty(1, 3, crop, crop))
    levels = [k for k, r in enumerate(encoder.reductions) if r >= OUT_STRIDE]
    per_crop = sum(compact[k].numel() for k in levels) * CACHE_BYTES
    crop_mm2 = (crop * entry.um_per_px / 1000.0) ** 2
    body = encoder.body
    facts = {
        "name": name,
        "title": entry.title,
        "source": entry.source,
        "licence": entry.licence,
        "family": entry.family,
        "timm_name": entry.timm_name,
        "um_per_px": entry.um_per_px,
        "channels": encoder.channels,
        "reductions": encoder.reductions,
        "params": int(sum(p.numel() for p in encoder.parameters())),
        "flops_per_px": float(_bench.encoder_flops_per_pixel(encoder, size=crop)),
        "cache_levels": levels,
        "cache_shapes": [list(compact[k].shape[1:]) for k in levels],
        "cache_bytes_per_mm2": per_crop / crop_mm2,
    }
    if entry.family == "vit":
        facts.update(
            patch=int(body.patch_embed.patch_size[0]), img_size=entry.img_size, token_grid=entry.token_grid,
            blocks=encoder.out_indices, prefix_tokens=int(body.num_prefix_tokens), embed_dim=int(body.embed_dim),
            depth=len(body.blocks), hub=entry.hub_name or entry.hub_repo,
        )
    return facts


def _one_pass(run) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def _time_passes(run) -> tuple[float, float, int]:
    """(wall s, CPU s) of one pass: the first pass when it is slow (its set-up is then negligible), else the
    median of up to 3 passes after that first one (a warm-up)."""
    wall, cpu = _one_pass(run)
    if cpu >= SLOW_PASS_CPU_S:
        return wall, cpu, 1
    passes = []
    budget = time.process_time() + 2 * SLOW_PASS_CPU_S
    while len(passes) < 3 and time.process_time() < budget:
        passes.append(_one_pass(run))
    return statistics.median(p[0] for p in passes), statistics.median(p[1] for p in passes), 1 + len(passes)


def time_encoder(name: str, crop: int) -> dict:
    import torch

    from pixgene import _bench

    entry = _bench.encoder_entry(name)
    t0 = time.perf_counter()
    encoder = materialise(name)
    built = time.perf_counter() - t0
    x = torch.rand(1, 3, crop, crop, generator=torch.Generator().manual_seed(1))
    crop_mm2 = (crop * entry.um_per_px / 1000.0) ** 2
    out: dict = {"build_s": built, "crop_px": crop, "crop_mm2": crop_mm2}
    with torch.inference_mode():
        for label, dtype in (("float32", None), ("bf16", torch.bfloat16)):
            load = os.getloadavg()[0]
            wall, cpu, passes = _time_passes(lambda dtype=dtype: _encode(encoder, x, dtype))
            out[label] = {"cpu_s_per_crop": cpu, "cpu_s_per_mm2": cpu / crop_mm2, "wall_s_per_crop": wall,
                          "wall_s_per_mm2": wall / crop_mm2, "passes": passes, "load_average": load}
            log.info("%s %s: %.2f CPU s (%.2f s wall) per %d px crop, %.1f CPU s per mm2 (%d passes, load %.1f)",
                     name, label, cpu, wall, crop, cpu / crop_mm2, passes, load)
    return out


def _encode(encoder, x, dtype):
    import torch

    if dtype is None:
        return encoder(x)
    with torch.autocast("cpu", dtype=dtype):
        return encoder(x)


def run(args) -> dict:
    import torch

    from pixgene import _bench

    names = args.names or _bench.list_encoders()
    torch.set_num_threads(args.threads)
    # every encoder here is random on purpose: not worth a warning per build
    logging.getLogger("pixgene.nn._build").setLevel(logging.ERROR)
    rows = []
    timed: dict[str, tuple[str, dict]] = {}
    t_start = time.perf_counter()
    for name in names:
        log.info("%s: counting on the meta device", name)
        row = static_facts(name, args.crop)
        if not args.no_time:
            key = architecture_key(_bench.encoder_entry(name))
            if key in timed:
                first, timing = timed[key]
                row["timing"] = {**timing, "same_architecture_as": first}
            else:
                row["timing"] = time_encoder(name, args.crop)
                timed[key] = (name, row["timing"])
        rows.append(row)
    bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return {
        "crop_px": args.crop,
        "device": "CPU only (no GPU available)",
        "cpu_bf16_native": bf16,
        "threads": torch.get_num_threads(),
        "wall_s": time.perf_counter() - t_start,
        "encoders": rows,
    }


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _seconds(row: dict, label: str) -> str:
    timing = row.get("timing")
    if not timing or label not in timing:
        return "not measured"
    s = timing[label]["cpu_s_per_mm2"]
    return f"{s:,.0f}" if s >= 100 else f"{s:.3g}"


def render(result: dict) -> str:
    crop = result["crop_px"]
    lines = [
        "# Encoders: size, compute, feature cache and CPU time per mm²",
        "",
        f"Full-size architectures with random weights; one {crop} x {crop} px crop per encoder at its own um/px, "
        f"scaled to one mm² of tissue. {result['device']}: times are the process's CPU seconds on "
        f"{result['threads']} thread{'s' if result['threads'] > 1 else ''} (wall time on n free cores is at best "
        "that over n), float32 and bfloat16 autocast (pixgene's `precision=\"bf16\"`; native bfloat16 on this CPU: "
        f"{'yes' if result.get('cpu_bf16_native') else 'no'}). Feature cache: what `pg.tl.fit` stores per view "
        "and mm² (float16): a ViT's four token grids, a CNN's levels of stride 4 and up.",
        "",
        "| encoder | source | licence | um/px | parameters | GFLOP per mm² | feature cache per mm² "
        "| CPU s per mm², float32 | CPU s per mm², bf16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for row in result["encoders"]:
        px_per_mm2 = (1000.0 / row["um_per_px"]) ** 2
        gflop = row["flops_per_px"] * px_per_mm2 / 1e9
        same = (row.get("timing") or {}).get("same_architecture_as")
        mark = " ¹" if same else ""
        if same:
            notes.append(f"`{row['name']}` as `{same}`")
        lines.append(
            f"| `{row['name']}` ({row['title']}) | [{row['source'].removeprefix('https://')}]({row['source']}) "
            f"| {row['licence']} | {row['um_per_px']:g} | {row['params'] / 1e6:,.1f} M | {gflop:,.0f} "
            f"| {_size(row['cache_bytes_per_mm2'])} | {_seconds(row, 'float32')}{mark} "
            f"| {_seconds(row, 'bf16')}{mark} |"
        )
    if notes:
        lines += ["", "¹ The architecture of another row, timed once: " + "; ".join(notes) + "."]
    lines += [
        "",
        "| encoder | architecture | pyramid | tapped blocks | prefix tokens dropped | cache per view (crop) |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["encoders"]:
        if row["family"] == "vit":
            arch = (f"`{row['timm_name']}`: {row['depth']} blocks x {row['embed_dim']}, patch {row['patch']}, "
                    f"{row['token_grid']} x {row['token_grid']} tokens at {row['img_size']} px")
            blocks, prefix = ", ".join(map(str, row["blocks"])), str(row["prefix_tokens"])
        else:
            arch, blocks, prefix = f"`{row['timm_name']}` (features_only)", "-", "-"
        pyramid = ", ".join(f"{c}@{r}" for c, r in zip(row["channels"], row["reductions"], strict=True))
        shapes = ", ".join("x".join(map(str, s)) for s in row["cache_shapes"])
        lines.append(f"| `{row['name']}` | {arch} | {pyramid} | {blocks} | {prefix} | {shapes} |")
    lines += ["", "Pyramid: channels@stride. Cache per view: channels x height x width of each cached level on the "
              f"{crop} px crop."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", type=int, default=224, help="side of the encoded crop, pixels (multiple of 32)")
    parser.add_argument("--names", nargs="*", help="encoders to include (default: every registered one)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: CPU time then counts work alone, not threads waiting for "
                             "each other on a shared machine)")
    parser.add_argument("--no-time", action="store_true", help="sizes and FLOPs only (seconds, nothing encoded)")
    # the thread count first, so that the machine recorded with the run shows the one used
    import torch

    torch.set_num_threads(parser.parse_known_args()[0].threads)
    _report.main("encoders", parser, run, render)


if __name__ == "__main__":
    main()
