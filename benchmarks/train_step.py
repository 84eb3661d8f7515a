"""A decoder training step two ways, side by side, on a real section's training tiles.

``pg.tl.fit`` spends most of its time in decoder training steps on cached features. This times pixgene's step
(``PixNetTrainingPlan._loss``, backward, AdamW) against the same step computed the way it was before
2026-11-30 21:00, from the same weights on the same batches, alternating step by step so that a noisy machine
hits both alike:

- ``whole map`` (before): the intensity head over every output pixel, each transformed view's map turned back
  (``dihedral_inverse``) before the spot sums read it through the view's own columns, ``ChannelLayerNorm``'s
  explicit mean and variance on channels-last maps, and deterministic mode's NaN fill of new tensors;
- ``covered pixels`` (now): the head at the output pixels the spots cover alone (``PixNetModule.decode_at``),
  the spot operator's columns mapped through each view's dihedral, the fused LayerNorm kernel, no NaN fill.

Both are the same function: the script also gives the two losses of the first step (same weights) and their
relative difference. The cache is the one ``pg.tl.fit`` builds (its defaults, one member) for the section.

    python benchmarks/train_step.py                # her2st C3; prints a table, writes results/train_step.*
    python benchmarks/train_step.py --section C5 --steps 60
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time

import numpy as np

log = logging.getLogger("train_step")


class _Captured(Exception):
    pass


def training_inputs(section: str, n_genes: int, seed: int):
    """``(module, cache, kwargs)`` exactly as ``pg.tl.fit`` hands them to training, for one her2st section."""
    import pixgene as pg
    from pixgene._bench import training_plan

    sdata = pg.datasets.her2st(section)
    genes = pg.pp.select_genes(sdata, n_top=n_genes, flavor="hvg")
    captured = {}
    original = training_plan.train

    def capture(module, cache, **kwargs):
        captured.update(module=module, cache=cache, kwargs=kwargs)
        raise _Captured

    training_plan.train = capture
    try:
        pg.tl.fit(sdata, genes=genes, n_members=1, random_state=seed, progress=False)
    except _Captured:
        pass
    finally:
        training_plan.train = original
    return captured["module"], captured["cache"], captured["kwargs"]


def training_batches(module, cache, batch_size: int, n: int, seed: int) -> list[dict]:
    """``n`` batches of random (tile, view) items as training draws them, each with its views' own columns and
    dihedrals (``view_cols``, ``dihedrals``); ``module``'s decoder and head put in training's channels-last
    layout."""
    import torch

    from pixgene._bench import training_plan

    module.decoder.to(memory_format=torch.channels_last)
    module.head.to(memory_format=torch.channels_last)
    collate = training_plan.make_collate(cache)
    rng = np.random.default_rng(seed)
    n_views = len(cache.views[0])
    batches = []
    for _ in range(n):
        items = [(int(t), int(rng.integers(n_views))) for t in rng.choice(cache.n_tiles, batch_size, replace=False)]
        batch = collate(items)
        batch["view_cols"] = torch.from_numpy(np.concatenate([cache.views[t][v].cols for t, v in items]))
        batch["dihedrals"] = [cache.views[t][v].dihedral for t, v in items]
        batches.append(batch)
    return batches


def training_copy(module, cache, kwargs: dict) -> tuple:
    """``(module, plan, optimiser)``: a copy of ``module`` with the training plan and AdamW ``pg.tl.fit``
    gives it (``kwargs`` as :func:`training_inputs` captured them), in training mode."""
    import torch

    from pixgene._bench import training_plan

    module = copy.deepcopy(module)
    plan = training_plan.PixNetTrainingPlan(module, cache, n_slides=kwargs["n_slides"], loss=kwargs["loss"],
                                            lr=kwargs["lr"], weight_decay=kwargs["weight_decay"])
    plan.train()
    optimiser = torch.optim.AdamW([p for p in plan.parameters() if p.requires_grad], lr=kwargs["lr"],
                                  weight_decay=kwargs["weight_decay"])
    return module, plan, optimiser


def timed_step(plan, optimiser, batch: dict) -> tuple[float, float]:
    """One training step (loss, backward, optimiser step): its seconds and its loss."""
    t0 = time.perf_counter()
    loss, _ = plan._loss(batch, train=True)
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    return time.perf_counter() - t0, float(loss.detach())


def run(section: str, steps: int, n_genes: int, seed: int) -> dict:
    import torch

    from pixgene._bench import ChannelLayerNorm, dihedral_inverse, training_plan

    module, cache, kwargs = training_inputs(section, n_genes, seed)
    batches = training_batches(module, cache, kwargs["batch_size"], steps + 1, seed)

    modules, plans, optimisers = {}, {}, {}
    for name in ("whole map", "covered pixels"):
        modules[name], plans[name], optimisers[name] = training_copy(module, cache, kwargs)
    _state: dict = {}

    def decode_whole(features, batch_index, pixel):
        # the map turned back view by view; integrate_whole below reads it through the views' columns
        lam = modules["whole map"].decode(features)
        _state["map"] = torch.stack([dihedral_inverse(lam[i], d) for i, d in enumerate(_state["dihedrals"])])
        return lam.new_zeros(0)

    plans["whole map"]._decode_at = decode_whole
    fused_layer_norm, integrate_pixels = ChannelLayerNorm.forward, training_plan.integrate_pixels

    def integrate_whole(lam, batch):
        return training_plan.integrate_spots(_state["map"], {**batch, "nnz_col": batch["view_cols"]})

    def step(name: str, batch: dict) -> tuple[float, float]:
        before = name == "whole map"
        ChannelLayerNorm.forward = ChannelLayerNorm.explicit if before else fused_layer_norm
        training_plan.integrate_pixels = integrate_whole if before else integrate_pixels
        torch.utils.deterministic.fill_uninitialized_memory = before
        _state["dihedrals"] = batch["dihedrals"]
        return timed_step(plans[name], optimisers[name], batch)

    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)  # as training runs
    times: dict[str, list[float]] = {name: [] for name in plans}
    first = {}
    try:
        for i, batch in enumerate(batches):
            for name in plans:  # alternate
                t, loss = step(name, batch)
                if i == 0:
                    first[name] = loss  # same weights, same batch; the step is a warm-up, not timed
                else:
                    times[name].append(t)
    finally:
        ChannelLayerNorm.forward, training_plan.integrate_pixels = fused_layer_norm, integrate_pixels
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(deterministic)

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    n_out = cache.tile // cache.out_stride
    covered = [len(b["pixel_b"]) / (len(b["dihedrals"]) * n_out * n_out) for b in batches]
    rows = [{"step": name, "median_s": round(medians[name], 4), "min_s": round(min(times[name]), 4),
             "speed-up": round(medians["whole map"] / medians[name], 2)} for name in plans]
    for r in rows:
        log.info("%s: median %.4f s", r["step"], r["median_s"])
    return {
        "section": section, "steps": steps, "n_tiles": cache.n_tiles, "tile_px": cache.tile,
        "output_px": n_out, "batch_size": kwargs["batch_size"], "precision": module.precision,
        "covered_fraction": round(float(np.mean(covered)), 3),
        "rows": rows,
        "first_loss": {k: round(v, 7) for k, v in first.items()},
        "first_loss_relative_difference": float(abs(first["whole map"] - first["covered pixels"])
                                                / abs(first["whole map"])),
    }


def render(result: dict) -> str:
    setting = (f"`{result['command']}` on {result['started']}: {result['machine']}. her2st {result['section']}'s "
               f"training cache as `pg.tl.fit` builds it ({result['n_tiles']} tiles of {result['tile_px']} px, "
               f"{result['output_px']}x{result['output_px']} output px, batch of {result['batch_size']}, "
               f"{result['precision']}); the spots cover {result['covered_fraction']:.0%} of the output pixels. "
               f"Forward, backward and AdamW step from the same weights on the same {result['steps']} batches, "
               "alternating; medians.")
    lines = ["# A decoder training step, before and now", "", setting, "",
             "| step | median s | min s | speed-up |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['step']} | {r['median_s']} | {r['min_s']} | {r['speed-up']}x |")
    fl = result["first_loss"]
    same = (f"First step's loss (same weights, same batch): whole map {fl['whole map']}, covered pixels "
            f"{fl['covered pixels']}; relative difference {result['first_loss_relative_difference']:.2g}.")
    lines += ["", same]
    return "\n".join(lines) + "\n"


def cli(name: str, doc: str, run, render) -> None:
    """The command line of a script timing training steps on a her2st section's cache: ``--section``,
    ``--steps``, ``--genes``, ``--seed``; writes ``results/<name>.json`` and ``.md``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", default="C3")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--genes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    import _report

    _report.main(name, parser, lambda a: run(a.section, a.steps, a.genes, a.seed), render)


def main() -> None:
    cli("train_step", __doc__, run, render)


if __name__ == "__main__":
    main()
