"""Dense expression maps over the H&E, one panel per gene."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._core.coords import affine_between
from .._core.docs import doc_params
from .._core.keys import IMAGE_KEY, UNS_KEY
from .._core.keys import dense_key as default_dense_key
from .._core.raster import full_resolution
from .._core.units import recorded_um_per_px
from .._core.validate import check_genes, fail, require_element
from ._utils import bounds_in, draw_raster_on, finish, image_frame, panel_size, parse_vmax, raster_window

logger = logging.getLogger(__name__)

__all__ = ["dense"]

INTENSITY_LABEL = "counts / µm²"


@doc_params
def dense(
    sdata: Any,
    genes: str | Sequence[str],
    *,
    dense_key: str | None = None,
    image_key: str = IMAGE_KEY,
    alpha: float = 0.6,
    ncols: int = 4,
    cmap: str = "magma",
    vmax: float | str | None = "p99",
    region: tuple[float, float, float, float] | None = None,
    max_px: int = 2000,
    show_image: bool = True,
    panel_width: float = 4.0,
    ax: Any = None,
    save: str | None = None,
    show: bool | None = None,
) -> Any:
    """Draw the dense intensity of each gene over the H&E.

    The map is placed into the H&E's pixel space by its own transformation, read at the pyramid level
    and block size that keep it at most ``max_px`` on a side (block means, so values stay in counts per
    square micron), and drawn with a colour bar in counts / um^2.

    Parameters
    ----------
    sdata
        SpatialData holding the H&E and the dense map.
    genes
        One gene or a list of genes (channels of the map; the library-size channel
        ``"pixgene_total_counts"`` too when present).
    dense_key
        The dense map element; default ``f"{image_key}_pixgene"``.
    image_key
        The H&E image defining the drawing frame.
    alpha
        Opacity of the map over the H&E.
    ncols
        Panels per row.
    cmap, vmax
        Colour map; upper colour limit per gene (``"pNN"`` = NN-th percentile of the gene's drawn values,
        a number, or None for the maximum). The lower limit is 0.
    {plot_region}
    max_px
        Largest side of the drawn H&E and of the drawn map.
    show_image
        Draw the H&E under the map.
    panel_width
        Width of each panel in inches.
    ax
        Axes to draw a single gene into.
    {plot_save_show}

    Returns
    -------
    The matplotlib Figure (one panel per gene in ``fig.axes``, followed by their colour bars), or ``ax`` when
    it was given. Nothing is written to ``sdata``.
    """
    import matplotlib.pyplot as plt

    key = default_dense_key(image_key) if dense_key is None else dense_key
    if key not in sdata.images:
        fail(
            f"dense map {key!r}",
            f"is not an image of the SpatialData object (images: {list(sdata.images)})",
            "Run pg.tl.predict_dense first, or pass dense_key=... naming the dense map",
        )
    element = require_element(sdata, key, "images")
    level0 = full_resolution(element)
    if tuple(level0.dims) != ("c", "y", "x"):
        fail(
            f"dense map {key!r}",
            f"has dims {tuple(level0.dims)}, not ('c', 'y', 'x')",
            "Parse it with spatialdata's Image2DModel, channels = genes",
        )
    genes = [genes] if isinstance(genes, str) else list(genes)
    genes = check_genes(genes, level0.coords["c"].values.tolist(), f"dense map {key!r}")
    if ax is not None and len(genes) != 1:
        fail(f"dense map {key!r}", f"ax= was given for {len(genes)} genes", "Pass one gene with ax=")
    if ncols < 1:
        fail(f"dense map {key!r}", f"ncols={ncols} is not a positive integer", "Pass ncols >= 1")

    frame = image_frame(sdata, image_key, region=region, max_px=max_px, show_image=show_image)
    to_image = affine_between(sdata, key, image_key)
    window = raster_window(
        element,
        bounds=bounds_in(np.linalg.inv(to_image), frame.bounds),
        max_px=max_px,
        channels=genes,
        name=f"dense map {key!r}",
    )
    logger.info("drawing %d gene(s) of %r: level %d, %s blocks", len(genes), key, window.level, window.block)

    if ax is None:
        n_cols = min(ncols, len(genes))
        n_rows = math.ceil(len(genes) / n_cols)
        width, height = panel_size(frame.bounds, width=panel_width)
        fig, axes = plt.subplots(
            n_rows, n_cols, figsize=(width * n_cols, height * n_rows), squeeze=False, layout="constrained"
        )
        axes = axes.ravel()
        for extra in axes[len(genes):]:
            extra.set_axis_off()
    else:
        fig, axes = ax.figure, [ax]

    for panel, gene, values in zip(axes, genes, window.data, strict=False):
        frame.draw_image(panel)
        top = parse_vmax(vmax, values, f"dense map {key!r}")
        if top is None or not top > 0:
            finite = values[np.isfinite(values)]
            top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        image = draw_raster_on(
            panel, window, to_image, values,
            cmap=cmap, alpha=alpha, vmin=0.0, vmax=top, interpolation="nearest",
        )
        frame.limit(panel)
        panel.set_title(gene)
        panel.set_xticks([])
        panel.set_yticks([])
        fig.colorbar(image, ax=panel, shrink=0.8, label=INTENSITY_LABEL)

    um = recorded_um_per_px(sdata, key)
    model = ((getattr(sdata, "attrs", None) or {}).get(UNS_KEY, {}).get("dense", {}) or {}).get(key)
    suptitle = f"{key} over {image_key}" + ("" if um is None else f" ({um:.3g} µm/px)")
    if isinstance(model, dict) and model.get("model_id"):
        suptitle += f", model {model['model_id']}"
    if ax is None:
        fig.suptitle(suptitle)
    finish(fig, save=save, show=show)
    return fig if ax is None else ax
