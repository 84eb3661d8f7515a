"""How sure the dense map is: the members' spread beside the mean, over the H&E."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._core.coords import affine_between
from .._core.docs import doc_params
from .._core.keys import IMAGE_KEY, UNS_KEY, member_channel, members_key
from .._core.keys import dense_key as default_dense_key
from .._core.raster import full_resolution
from .._core.units import recorded_um_per_px
from .._core.validate import check_genes, fail, require_element
from ._dense import INTENSITY_LABEL
from ._utils import bounds_in, draw_raster_on, finish, image_frame, panel_size, parse_vmax, raster_window

logger = logging.getLogger(__name__)

__all__ = ["uncertainty"]

#: what the spread panel can show
MEASURES = ("sd", "cv")


@doc_params
def uncertainty(
    sdata: Any,
    genes: str | Sequence[str],
    *,
    dense_key: str | None = None,
    image_key: str = IMAGE_KEY,
    measure: str = "sd",
    alpha: float = 0.6,
    cmap: str = "magma",
    spread_cmap: str = "viridis",
    vmax: float | str | None = "p99",
    region: tuple[float, float, float, float] | None = None,
    max_px: int = 2000,
    show_image: bool = True,
    panel_width: float = 4.0,
    save: str | None = None,
    show: bool | None = None,
) -> Any:
    """Draw each gene's dense map and the members' spread of it side by side over the H&E.

    Needs the members' maps (``pg.tl.predict_dense(..., uncertainty=True)``). One row per gene: the mean
    intensity (as :func:`pixgene.pl.dense` draws it) and, beside it, the standard deviation across the
    members of their intensities (``measure="sd"``, counts / um^2, ddof 0 as in ``pg.tl.aggregate``'s
    ``layers["pixgene_sd"]``) or that standard deviation over the mean (``measure="cv"``, the coefficient of
    variation; 0 where the mean is 0). The members' maps are read at the pyramid level and block size that
    keep them at most ``max_px`` on a side (block means), and the spread is taken there: it is the spread of
    each drawn pixel's mean intensity, which is what a read-out over a region of that size would show (finer
    detail averages out between members' disagreements as it does in a read-out).

    Parameters
    ----------
    sdata
        SpatialData holding the H&E, the dense map and its members' maps.
    genes
        One gene or a list of genes (channels of the map; ``"pixgene_total_counts"`` too).
    dense_key
        The dense map element; default ``f"{image_key}_pixgene"``. Its members' maps are
        ``f"{dense_key}_members"``.
    image_key
        The H&E image defining the drawing frame.
    measure
        ``"sd"`` or ``"cv"``: what the spread panel shows.
    alpha
        Opacity of the maps over the H&E.
    cmap, spread_cmap
        Colour maps of the mean and of the spread.
    vmax
        Upper colour limit of each panel (``"pNN"`` = NN-th percentile of the panel's drawn values, a number,
        or None for the maximum); the lower limit is 0.
    {plot_region}
    max_px
        Largest side of the drawn H&E and of the drawn maps.
    show_image
        Draw the H&E under the maps.
    panel_width
        Width of each panel in inches.
    {plot_save_show}

    Returns
    -------
    The matplotlib Figure: for each gene its mean panel then its spread panel in ``fig.axes``, followed by their
    colour bars. Nothing is written to ``sdata``.
    """
    import matplotlib.pyplot as plt

    key = default_dense_key(image_key) if dense_key is None else dense_key
    if key not in sdata.images:
        fail(f"dense map {key!r}", f"is not an image of the SpatialData object (images: {list(sdata.images)})",
             "Run pg.tl.predict_dense first, or pass dense_key=... naming the dense map")
    if measure not in MEASURES:
        fail("measure", f"{measure!r} is not one of {MEASURES}", "Pass measure='sd' or measure='cv'")
    element = require_element(sdata, key, "images")
    level0 = full_resolution(element)
    channels = [str(c) for c in level0.coords["c"].values]
    genes = [genes] if isinstance(genes, str) else list(genes)
    genes = check_genes(genes, channels, f"dense map {key!r}")
    dense = ((getattr(sdata, "attrs", None) or {}).get(UNS_KEY, {}).get("dense", {}) or {}).get(key) or {}
    record = dense.get("uncertainty") or {}
    mkey = record.get("members_key", members_key(key))
    if not record or mkey not in sdata.images:
        fail(f"dense map {key!r}", f"has no members' maps ({mkey!r})",
             "Predict it with pg.tl.predict_dense(..., uncertainty=True) from a model of several members")
    n_members = int(record["n_members"])
    members = require_element(sdata, mkey, "images")

    frame = image_frame(sdata, image_key, region=region, max_px=max_px, show_image=show_image)
    to_image = affine_between(sdata, key, image_key)
    bounds = bounds_in(np.linalg.inv(to_image), frame.bounds)
    mean_window = raster_window(element, bounds=bounds, max_px=max_px, channels=genes, name=f"dense map {key!r}")
    wanted = [member_channel(k, g) for g in genes for k in range(n_members)]
    member_window = raster_window(members, bounds=bounds, max_px=max_px, channels=wanted,
                                  name=f"members' maps {mkey!r}")
    stack = member_window.data.reshape(len(genes), n_members, *member_window.data.shape[1:])
    spread = stack.std(axis=1, dtype=np.float64).astype(np.float32)
    if measure == "cv":
        mean = stack.mean(axis=1, dtype=np.float64)
        spread = np.where(mean > 0, spread / np.where(mean > 0, mean, 1.0), 0.0).astype(np.float32)
    logger.info("drawing the spread of %d gene(s) of %r over %d members", len(genes), key, n_members)

    width, height = panel_size(frame.bounds, width=panel_width)
    fig, axes = plt.subplots(len(genes), 2, figsize=(2 * width, height * len(genes)), squeeze=False,
                             layout="constrained")
    spread_label = "SD across members, " + INTENSITY_LABEL if measure == "sd" else "CV across members"
    for row, gene in enumerate(genes):
        panels = (
            (axes[row, 0], mean_window, mean_window.data[row], cmap, gene, INTENSITY_LABEL),
            (axes[row, 1], member_window, spread[row], spread_cmap, f"{gene}: {measure.upper()}", spread_label),
        )
        for panel, window, values, colours, title, label in panels:
            frame.draw_image(panel)
            top = parse_vmax(vmax, values, f"dense map {key!r}")
            if top is None or not top > 0:
                finite = values[np.isfinite(values)]
                top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
            image = draw_raster_on(panel, window, to_image, values, cmap=colours, alpha=alpha, vmin=0.0,
                                   vmax=top, interpolation="nearest")
            frame.limit(panel)
            panel.set_title(title)
            panel.set_xticks([])
            panel.set_yticks([])
            fig.colorbar(image, ax=panel, shrink=0.8, label=label)
    um = recorded_um_per_px(sdata, key)
    fig.suptitle(f"{key} and the spread of its {n_members} members over {image_key}"
                 + ("" if um is None else f" ({um:.3g} µm/px)"))
    finish(fig, save=save, show=show)
    return fig
