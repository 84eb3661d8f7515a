"""``pixgene`` on the command line: ``pixgene demo`` and ``pixgene predict``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

from ._core.validate import PixgeneInputError

logger = logging.getLogger("pixgene")


def _demo(args: argparse.Namespace) -> int:
    import numpy as np

    import pixgene as pg

    out = Path(args.out)
    store = out / "demo.zarr"
    if store.exists() and not args.overwrite:
        print(f"{store} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        timings[name] = round(now - t0, 2)
        t0 = now

    sdata = pg.datasets.synthetic(seed=args.seed)
    if store.exists():
        import shutil

        shutil.rmtree(store)
    sdata.write(store)
    lap("synthetic data")
    genes = pg.pp.select_genes(sdata, n_top=args.n_genes, flavor="hvg")
    model = pg.tl.fit(sdata, genes=genes, max_epochs=args.epochs, random_state=args.seed)
    model.save(out / "model", overwrite=True)
    lap("fit")
    pg.tl.predict_dense(sdata, model, um_per_px=args.um_per_px)
    lap("predict_dense")
    pg.tl.make_grid(sdata, bin_um=10.0, key_added="bins_10um", within="tissue")
    for shapes in ("spots", "cells", "bins_10um"):
        pg.tl.aggregate(sdata, shapes=shapes, dense_key="he_pixgene")
    lap("aggregate")
    pg.tl.colour_control(sdata, genes=genes, um_per_px=args.um_per_px)
    pg.tl.aggregate(sdata, shapes="bins_10um", dense_key="he_colour_control", key_added="bins_10um_colour")
    lap("colour control")

    rows = {
        "pixgene, 10 um bins vs truth": pg.tl.evaluate(sdata, predicted="bins_10um_pixgene", truth="truth", genes=genes),
        "colour control, 10 um bins vs truth": pg.tl.evaluate(sdata, predicted="bins_10um_colour", truth="truth",
                                                              genes=genes),
        "pixgene, cells vs truth": pg.tl.evaluate(sdata, predicted="cells_pixgene", truth="truth", genes=genes),
        "pixgene, spots vs measured": pg.tl.evaluate(sdata, predicted="spots_pixgene", measured="table", genes=genes),
    }
    lap("evaluate")
    # predict_dense, make_grid and aggregate write into the backed store themselves; the control is in memory
    sdata.write_element("he_colour_control")
    sdata.write_attrs()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = rows["pixgene, 10 um bins vs truth"].per_gene["pearson"].sort_values(ascending=False).index[:3].tolist()
    fig = _figure(sdata, best)
    fig.savefig(out / "demo.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    metrics = {
        "scores": {name: s.summary for name, s in rows.items()},
        "per_gene_pearson_10um": rows["pixgene, 10 um bins vs truth"].per_gene["pearson"].round(4).to_dict(),
        "timings_s": timings,
        "model_id": model.model_id,
        "model": {"best_epoch": model.training.get("best_epoch"), "epochs_run": model.training.get("epochs_run")},
        "genes": genes,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    width = max(len(n) for n in rows)
    print(f"\n{'':{width}}  PCC@F  PCC@S  PCC@M     MSE     MAE")
    for name, s in rows.items():
        m = s.summary
        print(f"{name:{width}}  {m['PCC@F']:.3f}  {m['PCC@S']:.3f}  {m['PCC@M']:.3f}  {m['MSE']:.4f}  {m['MAE']:.4f}")
    gain = rows["pixgene, 10 um bins vs truth"].summary["PCC@M"] - rows["colour control, 10 um bins vs truth"].summary["PCC@M"]
    print(f"\npixgene - colour control, PCC@M at 10 um: {gain:+.3f}")
    print(f"time: {sum(timings.values()):.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")
    print(f"wrote {store}, {out / 'demo.png'}, {out / 'metrics.json'}, {out / 'model'}")
    return 0 if np.isfinite(gain) else 1


def _figure(sdata, genes):
    import matplotlib.pyplot as plt
    import numpy as np

    from ._core.raster import full_resolution

    he = full_resolution(sdata.images["he"]).values.transpose(1, 2, 0)
    maps = {
        "truth": full_resolution(sdata.images["truth"]),
        "pixgene": full_resolution(sdata.images["he_pixgene"]),
        "colour control": full_resolution(sdata.images["he_colour_control"]),
    }
    fig, axes = plt.subplots(len(genes), 4, figsize=(14, 3.6 * len(genes)), squeeze=False)
    for r, gene in enumerate(genes):
        axes[r, 0].imshow(he)
        axes[r, 0].set_title("H&E" if r == 0 else "")
        truth = np.asarray(maps["truth"].sel(c=gene).values)
        vmax = float(np.quantile(truth, 0.99)) or 1.0
        for c, (name, m) in enumerate(maps.items(), start=1):
            im = axes[r, c].imshow(np.asarray(m.sel(c=gene).values), vmin=0, vmax=vmax, cmap="magma")
            axes[r, c].set_title(f"{gene}: {name}")
        fig.colorbar(im, ax=axes[r, 3], label="counts / um$^2$", fraction=0.046)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def _predict(args: argparse.Namespace) -> int:
    import spatialdata as sd

    import pixgene as pg

    models = [pg.tl.PixNet.load(path) for path in args.model]
    src = Path(args.image)
    image_key = args.image_key
    if src.suffix == ".zarr" or src.is_dir():
        sdata = sd.read_zarr(src)
    else:  # JPEG, PNG, TIFF, OME-TIFF, SVS, NDPI, ...: read lazily, um/px from the file unless given
        sdata = pg.io.read_image(src, um_per_px=args.image_um_per_px, image_key=image_key)
    out = Path(args.out)
    if out.resolve() != src.resolve():
        if out.exists() and not args.overwrite:
            print(f"{out} exists; pass --overwrite", file=sys.stderr)
            return 2
        sdata.write(out, overwrite=args.overwrite)
        sdata = sd.read_zarr(out)
    pg.tl.predict_dense(sdata, models, image_key=image_key, um_per_px=args.um_per_px,
                        image_um_per_px=args.image_um_per_px, overwrite=args.overwrite, tta=args.tta)
    print(f"wrote {image_key}_pixgene to {out}")
    if args.cells or args.segment:
        if args.cells:
            pg.io.read_cells(sdata, args.cells, image_key=image_key, overwrite=args.overwrite)
        else:
            pg.tl.segment_cells(sdata, image_key=image_key, overwrite=args.overwrite)
        pg.tl.aggregate(sdata, shapes="cells", dense_key=f"{image_key}_pixgene", image_key=image_key,
                        overwrite=args.overwrite)
        print(f"wrote cells and their read-out cells_pixgene to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixgene", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="synthetic slide -> fit -> dense map -> spots/cells/bins -> scores")
    demo.add_argument("--out", default="pixgene_demo", help="folder for demo.zarr, the model, metrics and figure")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic slide and the fit")
    demo.add_argument("--epochs", type=int, default=25, help="epochs of each member")
    demo.add_argument("--n-genes", type=int, default=30, help="highly variable genes to model")
    demo.add_argument("--um-per-px", type=float, default=4.0, help="microns per pixel of the dense map")
    demo.add_argument("--overwrite", action="store_true", help="replace an earlier demo's output")
    demo.set_defaults(func=_demo)
    pred = sub.add_parser("predict", help="dense map of an image with a saved model")
    pred.add_argument("--model", required=True, nargs="+",
                      help="a saved model's folder, or several: the map is their mean")
    pred.add_argument("--image", required=True,
                      help="a SpatialData .zarr, or an H&E image file (JPEG, PNG, TIFF, OME-TIFF, SVS, NDPI, ...)")
    pred.add_argument("--out", required=True, help="output SpatialData .zarr (may equal --image)")
    pred.add_argument("--image-key", default="he", help="the image element (of a .zarr; the name given to a file's)")
    pred.add_argument("--image-um-per-px", type=float, default=None,
                      help="microns per pixel of the image (default: from the file's metadata or the .zarr)")
    pred.add_argument("--um-per-px", type=float, default=4.0, help="microns per pixel of the dense map")
    pred.add_argument("--tta", type=int, default=1, choices=(1, 2, 4, 8),
                      help="test-time augmentation: average the maps of this many dihedral transforms")
    cells = pred.add_mutually_exclusive_group()
    cells.add_argument("--cells", default=None,
                       help="a segmentation (GeoJSON, label mask .npy/.tif, Xenium cell_boundaries.parquet): "
                       "read the map out over its cells into the table cells_pixgene")
    cells.add_argument("--segment", action="store_true",
                       help="segment cells from the H&E (pg.tl.segment_cells) and read the map out over them")
    pred.add_argument("--overwrite", action="store_true", help="replace existing elements of the same names")
    pred.set_defaults(func=_predict)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("lightning", "lightning.pytorch", "numba", "distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        # zarr announces a future default on every array spatialdata writes; on a terminal that buries the output
        warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)
        try:
            return int(args.func(args))
        except PixgeneInputError as err:  # bad input: the message says what to change; no traceback
            print(f"pixgene {args.command}: {err}", file=sys.stderr)
            return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
