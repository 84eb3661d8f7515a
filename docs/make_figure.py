"""Draw ``docs/_static/overview.png``, the README's figure, from the output of tutorial 3.

    python docs/make_figure.py                      # reads notebooks/new_slide.zarr
    python docs/make_figure.py --store path/to/new_slide.zarr --genes ERBB2 IGKC

``notebooks/03_new_slide.ipynb`` writes ``new_slide.zarr`` next to itself: an H&E-only slide (a crop of her2st
section C5, which the model of tutorial 2 never saw), pixgene's dense map of it, the cells segmented from the
H&E and their read-out. The figure puts the H&E beside the dense map of two genes and a 400 um square of the
cells coloured by the first gene's read-out (log-normalised by each cell's predicted library size). The PNG is written with an adaptive 256-colour
palette, to stay well under 300 KB; the store itself is never committed.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PREFERRED = ("ERBB2", "IGKC", "COL1A1", "MGP", "KRT19", "SCGB2A2")
ZOOM_UM = 400.0
MAX_BYTES = 300_000


def draw(store: Path, genes: list[str] | None):
    import spatialdata as sd

    import pixgene as pg

    sdata = sd.read_zarr(store)
    channels = [str(c) for c in sdata["he_pixgene"]["scale0"]["image"].coords["c"].values]
    if not genes:
        genes = [g for g in PREFERRED if g in channels][:2] or channels[:2]
    um = pg.io.get_um_per_px(sdata, "he")
    height, width = sdata["he"]["scale0"]["image"].shape[1:]
    half = ZOOM_UM / 2 / um
    region = (width / 2 - half, height / 2 - half, width / 2 + half, height / 2 + half)

    fig, axes = plt.subplots(1, 4, figsize=(17, 4.3), layout="constrained")
    levels = [sd.get_pyramid_levels(sdata["he"], n=k) for k in range(len(sdata["he"].children))]
    he = next((lv for lv in levels if max(lv.shape[1:]) <= 1000), levels[-1])
    axes[0].imshow(he.values.transpose(1, 2, 0), extent=(0, width, height, 0))
    axes[0].set_title(f"H&E, {width * um / 1000:.1f} mm, never seen by the model")
    axes[0].add_patch(Rectangle(region[:2], region[2] - region[0], region[3] - region[1], fill=False,
                                edgecolor="white", linewidth=1.5))
    for ax, gene in zip(axes[1:3], genes, strict=False):
        pg.pl.dense(sdata, gene, ax=ax, alpha=0.8, max_px=900, show=False)
        ax.set_title(f"{gene}: dense map (counts / um$^2$)")
    layer = "pixgene_lognorm" if "pixgene_lognorm" in sdata["cells_pixgene"].layers else None
    pg.pl.spots(sdata, shapes_key="cells", table_key="cells_pixgene", color=genes[0], layer=layer,
                log1p=layer is None, ax=axes[3], region=region, alpha=0.9, show=False,
                title=f"{genes[0]} per cell ({ZOOM_UM:.0f} um square)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("")
        ax.set_ylabel("")
    return fig


def save_small(fig, out: Path, dpi: int = 75) -> int:
    """Save as an adaptive-palette PNG; returns its size in bytes."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    image = Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, optimize=True)
    return out.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=ROOT / "notebooks" / "new_slide.zarr")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "_static" / "overview.png")
    parser.add_argument("--genes", nargs=2, default=None, help="two genes of the dense map")
    args = parser.parse_args(argv)
    if not args.store.exists():
        parser.error(f"{args.store} does not exist: run notebooks/03_new_slide.ipynb first")
    fig = draw(args.store, args.genes)
    size = save_small(fig, args.out)
    print(f"wrote {args.out} ({size / 1000:.0f} KB)")
    return 0 if size < MAX_BYTES else 1


if __name__ == "__main__":
    raise SystemExit(main())
