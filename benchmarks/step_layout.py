"""Copies a decoder training step makes between memory layouts, side by side, before and now.

Training runs the decoder channels-last. Two places used to leave it:

- the fusion blocks' window attention cut its windows from the (b, 3c, h, w) tensor (two copies each way on a
  channels-last tensor, and its output came back NCHW); it now cuts them from the (b, h, w, 3c) view, which is
  contiguous (``WindowAttention._windows``; since 2026-12-02 16:08);
- ``PixNetModule.decode_at`` gathered the covered output pixels from the (b, c, h * w) view, so their gradient
  came back NCHW and the last level's convolutions and layer norms copied it into channels-last in the
  backward; it now gathers from the (b, h * w, c) view (since 2026-12-02 16:50).

Three ways, each from the same weights on the same batches, alternating step by step so that a noisy machine hits
them alike: ``before`` (both as they were), ``windows`` (the windows cut now, the gather of before) and ``now``.
They are the same function (a different order of copies, the same arithmetic): the script checks that they give
the same loss, to the bit, at every step. On her2st C3's training cache as ``pg.tl.fit`` builds it
(``train_step.py``'s inputs: its defaults, one member); medians over ``--steps``:

- training step: forward, backward and AdamW step of ``PixNetTrainingPlan._loss``, as training runs it;
- decode: the decoder and head on a batch's features in inference mode, as a prediction runs them (the gather
  is training's alone, so ``windows`` and ``now`` decode alike).

    python benchmarks/step_layout.py            # prints a table, writes results/step_layout.json and .md
    python benchmarks/step_layout.py --steps 20
"""

from __future__ import annotations

import logging
import statistics
import time

log = logging.getLogger("step_layout")
WAYS = ("before", "windows", "now")


def windows_before(self, qkv, valid):
    """``WindowAttention._windows`` before: windows cut from (b, 3c, h, w); the output NCHW."""
    import torch

    b, c3, h, w = qkv.shape
    k = self.window
    c = c3 // 3
    d = c // self.heads
    nw = (h // k) * (w // k)
    t = qkv.reshape(b, 3, self.heads, d, h // k, k, w // k, k).permute(1, 0, 4, 6, 2, 5, 7, 3)
    q, key, v = t.reshape(3, b * nw * self.heads, k * k, d).unbind(0)
    logits = torch.bmm(q * d**-0.5, key.transpose(1, 2))
    if valid is not None:
        mask = valid.reshape(h // k, k, w // k, k).permute(0, 2, 1, 3).reshape(nw, 1, k * k)
        logits = (logits.reshape(b, nw, self.heads, k * k, k * k) + ((mask - 1.0) * 1e4)[None, :, None]).reshape(
            logits.shape)
    out = torch.bmm(logits.softmax(-1), v)
    return out.reshape(b, h // k, w // k, self.heads, k, k, d).permute(0, 3, 6, 1, 4, 2, 5).reshape(b, c, h, w)


def decode_at_before(module):
    """``PixNetModule.decode_at`` before: the pixels gathered from the (b, c, h * w) view."""

    def decode_at(features, batch_index, pixel):
        def at_pixels(head, x):
            return head.forward_pixels(x.flatten(2)[batch_index, :, pixel])

        return module._members_mean(features, at_pixels)

    return decode_at


def run(section: str, steps: int, n_genes: int, seed: int) -> dict:
    import torch
    from train_step import timed_step, training_batches, training_copy, training_inputs

    from pixgene._bench import WindowAttention, training_plan

    module, cache, kwargs = training_inputs(section, n_genes, seed)
    batches = training_batches(module, cache, kwargs["batch_size"], steps + 1, seed)
    library_windows = WindowAttention._windows
    windows = {"before": windows_before, "windows": library_windows, "now": library_windows}
    modules, plans, optimisers = {}, {}, {}
    for name in WAYS:
        modules[name], plans[name], optimisers[name] = training_copy(module, cache, kwargs)
        if name != "now":
            plans[name]._decode_at = decode_at_before(modules[name])

    def train_step(name: str, batch: dict) -> tuple[float, float]:
        return timed_step(plans[name], optimisers[name], batch)

    def decode(name: str, batch: dict) -> tuple[float, torch.Tensor]:
        features = training_plan.batch_features(batch, cache)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = modules[name].decode(features)
        return time.perf_counter() - t0, out

    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)  # as training runs
    torch.utils.deterministic.fill_uninitialized_memory = False
    times = {(stage, name): [] for stage in ("training step", "decode") for name in WAYS}
    losses: dict[str, list[float]] = {name: [] for name in WAYS}
    maps_equal = True
    try:
        for i, batch in enumerate(batches):
            outs = []
            for name in WAYS:  # alternate
                WindowAttention._windows = windows[name]
                t, loss = train_step(name, batch)
                losses[name].append(loss)
                td, out = decode(name, batch)
                outs.append(out)
                if i:  # the first is a warm-up, not timed
                    times[("training step", name)].append(t)
                    times[("decode", name)].append(td)
            maps_equal &= all(torch.equal(outs[0], o) for o in outs[1:])
    finally:
        WindowAttention._windows = library_windows
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(deterministic)

    rows = []
    for stage in ("training step", "decode"):
        before = statistics.median(times[(stage, "before")])
        for name in WAYS:
            median = statistics.median(times[(stage, name)])
            rows.append({"stage": stage, "way": name, "median_s": round(median, 4),
                         "min_s": round(min(times[(stage, name)]), 4), "speed-up": round(before / median, 2)})
            log.info("%s, %s: median %.4f s", stage, name, median)
    return {
        "section": section, "steps": steps, "n_tiles": cache.n_tiles, "tile_px": cache.tile,
        "output_px": cache.tile // cache.out_stride, "batch_size": kwargs["batch_size"],
        "precision": module.precision, "rows": rows,
        "losses_equal": all(losses[name] == losses["before"] for name in WAYS), "maps_equal": maps_equal,
        "first_loss": round(losses["now"][0], 7), "last_loss": round(losses["now"][-1], 7),
    }


def render(result: dict) -> str:
    setting = (f"`{result['command']}` on {result['started']}: {result['machine']}. her2st {result['section']}'s "
               f"training cache as `pg.tl.fit` builds it ({result['n_tiles']} tiles of {result['tile_px']} px, "
               f"{result['output_px']}x{result['output_px']} output px, batch of {result['batch_size']}, "
               f"{result['precision']}). The same weights and batches, {result['steps']} steps of each way, "
               "alternating; medians. `before`: attention windows cut from (b, 3c, h, w), the covered pixels "
               "gathered from (b, c, h * w); `windows`: the windows cut from the channels-last (b, h, w, 3c) view; "
               "`now`: that and the pixels gathered from the (b, h * w, c) view.")
    lines = ["# Layout copies in a decoder training step, before and now", "", setting, "",
             "| stage | way | median s | min s | speed-up |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['stage']} | {r['way']} | {r['median_s']} | {r['min_s']} | {r['speed-up']}x |")
    same = "the same to the bit" if result["losses_equal"] else "NOT the same"
    maps = "the same to the bit" if result["maps_equal"] else "NOT the same"
    lines += ["", f"Losses of the three ways at every step: {same} (first {result['first_loss']}, last "
              f"{result['last_loss']}); decoded maps: {maps}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    from train_step import cli

    cli("step_layout", __doc__, run, render)


if __name__ == "__main__":
    main()
