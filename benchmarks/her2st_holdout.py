"""Fit on her2st C2, C3, C4 and score the held-out section C5 (spots vs measured counts).

Genes: the top-50 highly variable genes of the training sections only. Everything else is the library's
defaults (no setting is chosen on C5). Prints a table and writes benchmarks/results/her2st_holdout.json.

    python benchmarks/her2st_holdout.py [--train C2 C3 C4] [--test C5] [--n-genes 50]
    python benchmarks/her2st_holdout.py --render      # the markdown table again from the JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import time
from pathlib import Path

import pixgene as pg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", nargs="+", default=["C2", "C3", "C4"])
    parser.add_argument("--test", default="C5")
    parser.add_argument("--n-genes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "her2st_holdout.json"))
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the existing .json")
    args = parser.parse_args()
    if args.render:
        write_markdown(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(".md"))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import _report

    started, machine = _report.started(), _report.machine()
    load_start = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    train = [pg.datasets.her2st(s) for s in args.train]
    test = pg.datasets.her2st(args.test)
    t_read = time.perf_counter() - t0

    genes = pg.pp.select_genes(train, n_top=args.n_genes, flavor="hvg")
    t1 = time.perf_counter()
    model = pg.tl.fit(train, genes=genes, random_state=args.seed)
    t_fit = time.perf_counter() - t1

    t2 = time.perf_counter()
    pg.tl.predict_dense(test, model, um_per_px=4.0)
    pg.tl.aggregate(test, shapes="spots")
    t_predict = time.perf_counter() - t2
    scores = pg.tl.evaluate(test, predicted="spots_pixgene", measured="table", genes=genes, normalize="predicted_total")
    total = time.perf_counter() - t0

    s = scores.summary
    print(f"\nher2st: train {'+'.join(args.train)}, test {args.test}, {len(genes)} HVG, model {model.model_id}")
    print("PCC@F   PCC@S   PCC@M   MSE     MAE     fit_s  predict_s  total_s")
    print(f"{s['PCC@F']:.3f}   {s['PCC@S']:.3f}   {s['PCC@M']:.3f}   {s['MSE']:.4f}  {s['MAE']:.4f}  "
          f"{t_fit:5.0f}  {t_predict:9.0f}  {total:7.0f}")
    result = {
        "command": _report.command("her2st_holdout.py"), "started": started, "machine": machine,
        "train": args.train, "test": args.test, "genes": genes, "seed": args.seed, "model_id": model.model_id,
        "scores": s, "per_gene_pearson": scores.per_gene["pearson"].round(4).to_dict(),
        "timings_s": {"read": round(t_read, 1), "fit": round(t_fit, 1), "predict_and_aggregate": round(t_predict, 1),
                      "total": round(total, 1)},
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "training": {k: model.training[k] for k in ("best_epoch", "best_val_loss", "epochs_run", "n_tiles",
                                                  "capture_efficiency")},
        "members": [{k: m[k] for k in ("best_epoch", "epochs_run")} for m in model.training.get("members", [])],
        "fit_params": model.training["params"],
        "load_average": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    write_markdown(result, Path(args.out).with_suffix(".md"))
    print(f"wrote {args.out}")


def write_markdown(r: dict, path: Path) -> None:
    s, t, tr = r["scores"], r["timings_s"], r["training"]
    p = r.get("fit_params", {})
    load = r.get("load_average")
    members = r.get("members") or [tr]
    epochs = ", ".join(f"{m['best_epoch']} / {m['epochs_run']}" for m in members)
    lines = [
        f"# her2st hold-out: fit on {' + '.join(r['train'])}, score {r['test']} spots", "",
        "`python benchmarks/her2st_holdout.py`: the library's defaults (frozen EfficientNet-Lite0, fusion decoder,"
        f" {p.get('n_views', '?')} views per tile, at most {p.get('max_epochs', '?')} epochs, patience "
        f"{p.get('patience', '?')}, {len(members)} decoder{'s' if len(members) > 1 else ''}), nothing chosen on "
        f"the test section. Genes: the top-{len(r['genes'])} highly variable genes of the training sections "
        "only. Targets: log1p(1e4 x / total) per spot.", "",
        "| test | PCC@F | PCC@S | PCC@M | MSE | MAE | best epoch / run (each member) | fit s | predict + aggregate s "
        "| total s | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['test']} | {s['PCC@F']:.3f} | {s['PCC@S']:.3f} | {s['PCC@M']:.3f} | {s['MSE']:.3f} | {s['MAE']:.3f} "
        f"| {epochs} | {t['fit']:.0f} | {t['predict_and_aggregate']:.0f} "
        f"| {t['total']:.0f} | {r['peak_rss_gb']} |", "",
        "Reference floor from DESIGN.md (ridge on PCA of the same encoder's spot-patch embeddings, test C5): "
        "PCC@M 0.097. The side-by-side comparison with baselines is `benchmarks/accuracy.py`.",
    ]
    if r.get("started"):
        lines += ["", f"`{r['command']}` started {r['started']}; {r['machine']}."]
    if r.get("notes"):
        lines += ["", r["notes"]]
    if load:
        lines += ["", f"Load average (1, 5, 15 min) at start {load['start']}, at end {load['end']} (2 cores)."]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
