"""Spots (or any circles / polygons) over the H&E: the alignment check to run before anything else."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from .._core.keys import IMAGE_KEY, SPOTS_KEY, TABLE_KEY, TOTAL_OBS, UNS_KEY, readout_key
from .._core.units import recorded_um_per_px
from .._core.validate import check_genes, fail, require_element
from ._utils import (
    by_shape,
    color_limits,
    column_vector,
    draw_shapes,
    finish,
    image_frame,
    log_normalise,
    new_axes,
    panel_size,
    place_shapes,
    row_totals,
    rows_for_shapes,
    table_region,
)

logger = logging.getLogger(__name__)

__all__ = ["measured_vs_predicted", "spots"]

#: a drawn spot diameter this far from the table's recorded one (relative) is flagged in the title
DIAMETER_MISMATCH = 0.05


def spots(
    sdata: Any,
    *,
    image_key: str = IMAGE_KEY,
    shapes_key: str = SPOTS_KEY,
    table_key: str = TABLE_KEY,
    color: str | None = None,
    layer: str | None = None,
    log1p: bool = True,
    cmap: str = "viridis",
    vmax: float | str | None = "p99",
    alpha: float = 0.85,
    outline: str = "#00e5ff",
    linewidth: float = 0.6,
    na_color: str = "lightgrey",
    region: tuple[float, float, float, float] | None = None,
    max_px: int = 2000,
    show_image: bool = True,
    title: str | None = None,
    ax: Any = None,
    save: str | None = None,
    show: bool | None = None,
) -> Any:
    """Draw the spots over the H&E, to check that image, spots and pixel size agree.

    Everything is drawn in the H&E's pixel space: the image at the pyramid level that keeps it at most
    ``max_px`` on a side, the spots placed through the transformations they share with the image, as circles
    of their true radius (or polygons by their exteriors).

    Parameters
    ----------
    sdata
        SpatialData in the pixgene data model.
    image_key, shapes_key, table_key
        The H&E image, the shapes to draw and the table annotating them (only needed when ``color`` is set).
    color
        None for outlines only; a gene of the table (coloured by its counts, ``log1p`` of them by default);
        or an ``obs`` column (numeric: colour map; categorical: one colour per category, from
        ``table.uns[f"{color}_colors"]`` when present).
    layer
        Table layer holding the counts; default ``X``.
    log1p
        Colour genes by ``log1p(counts)`` rather than raw counts.
    cmap, vmax
        Colour map and upper limit for numeric colours (``"pNN"`` = NN-th percentile of the drawn values).
    alpha, outline, linewidth, na_color
        Fill opacity; outline colour and width (outline mode); colour of shapes without a value.
    region
        ``(x_min, y_min, x_max, y_max)`` in the H&E's pixels to zoom into; default the whole image.
    max_px
        Largest side, in pixels, of the image array handed to matplotlib.
    show_image
        Draw the H&E under the spots.
    title
        Replaces the default title (which states microns per pixel and the spot diameter in um and px).
    ax, save, show
        Axes to draw into; path to save the figure to; whether to show it (default: only on an interactive
        backend when not saving).

    Returns
    -------
    The matplotlib Axes. Nothing is written to ``sdata``.
    """
    placed = place_shapes(sdata, shapes_key, image_key)
    values, categories, label = (None, None, None)
    if color is not None:
        values, categories, label = _color_source(
            sdata, table_key, shapes_key, placed.index, color, layer, log1p
        )
    frame = image_frame(sdata, image_key, region=region, max_px=max_px, show_image=show_image)

    fig, ax = new_axes(ax, panel_size(frame.bounds, width=6.0))
    frame.draw_image(ax)
    if color is None:
        draw_shapes(ax, placed, frame.bounds, outline=outline, linewidth=linewidth)
    elif categories is not None:
        colors, handles = _category_colors(sdata.tables[table_key], color, values, categories, na_color)
        draw_shapes(ax, placed, frame.bounds, colors=colors, alpha=alpha)
        ax.legend(handles=handles, title=color, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    else:
        low, top = color_limits(values, vmax, f"shapes {shapes_key!r}")
        collection = draw_shapes(
            ax, placed, frame.bounds, values=values, cmap=cmap, vmin=low, vmax=top, alpha=alpha,
            na_color=na_color,
        )
        fig.colorbar(collection, ax=ax, shrink=0.7, label=label)
    frame.limit(ax)
    if title is None:
        title = _default_title(sdata, placed, image_key, shapes_key, table_key, color)
    ax.set_title(title)
    ax.set_xlabel(f"x ({image_key} pixels)")
    ax.set_ylabel(f"y ({image_key} pixels)")
    finish(fig, save=save, show=show)
    return ax


def _color_source(
    sdata: Any, table_key: str, shapes_key: str, index: pd.Index, color: str, layer: str | None, log1p: bool
) -> tuple[np.ndarray, list | None, str]:
    """Per-shape values for ``color``; categories when it is a categorical obs column."""
    if table_key not in sdata.tables:
        fail(
            f"table {table_key!r}",
            f"is needed to colour by {color!r} but is not in the SpatialData object",
            "Pass table_key=... naming the table that annotates the shapes, or color=None",
        )
    table = sdata.tables[table_key]
    in_obs, in_var = color in table.obs.columns, color in table.var_names
    if in_obs and in_var:
        fail(
            f"table {table_key!r}",
            f"{color!r} is both an obs column and a gene",
            "Rename the obs column so the colour source is unambiguous",
        )
    if not (in_obs or in_var):
        fail(
            f"table {table_key!r}",
            f"{color!r} is neither a gene (var_names) nor an obs column",
            "Pass a gene from var_names, an obs column, or color=None for outlines",
        )
    rows = rows_for_shapes(sdata, table_key, shapes_key, index)
    if in_var:
        if layer is not None and layer not in table.layers:
            fail(f"table {table_key!r}", f"has no layer {layer!r}", f"Use one of {list(table.layers)}, or X")
        X = table.X if layer is None else table.layers[layer]
        counts = column_vector(X, table.var_names.get_loc(color))
        values = by_shape(np.log1p(counts) if log1p else counts, rows)
        what = "counts" if layer is None else layer
        return values, None, f"log1p({what})" if log1p else what
    column = table.obs[color]
    if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
        categories = list(column.astype("category").cat.categories)
        codes = column.astype("category").cat.codes.to_numpy().astype(float)
        codes[codes < 0] = np.nan
        return by_shape(codes, rows), categories, color
    return by_shape(column.to_numpy(dtype=float), rows), None, color


def _category_colors(
    table: Any, color: str, codes: np.ndarray, categories: list, na_color: str
) -> tuple[list, list]:
    import matplotlib as mpl
    from matplotlib.patches import Patch

    palette = list(table.uns.get(f"{color}_colors", []))
    if len(palette) != len(categories):
        base = mpl.colormaps["tab10" if len(categories) <= 10 else "tab20"]
        palette = [mpl.colors.to_hex(base(i % base.N)) for i in range(len(categories))]
    colors = [palette[int(c)] if np.isfinite(c) else na_color for c in codes]
    handles = [Patch(facecolor=palette[i], label=str(cat)) for i, cat in enumerate(categories)]
    return colors, handles


def _default_title(
    sdata: Any, placed: Any, image_key: str, shapes_key: str, table_key: str, color: str | None
) -> str:
    head = f"{shapes_key} on {image_key}" + ("" if color is None else f": {color}")
    um = recorded_um_per_px(sdata, image_key)
    table_um = None
    if table_key in sdata.tables:
        table_um = sdata.tables[table_key].uns.get(UNS_KEY, {}).get("spot_diameter_um")
    if placed.kind != "circle":
        scale = "µm/px not recorded" if um is None else f"{um:.4g} µm/px"
        return f"{head}\n{scale}, {len(placed.index)} polygons"
    d_px = 2.0 * float(np.median(placed.radii)) if len(placed.radii) else float("nan")
    if um is None:
        if table_um is not None:
            implied = float(table_um) / d_px
            return f"{head}\nµm/px not recorded; spot Ø {table_um:.4g} µm = {d_px:.4g} px ({implied:.4g} µm/px)"
        return f"{head}\nµm/px not recorded; spot Ø {d_px:.4g} px"
    d_um = d_px * um
    text = f"{head}\n{um:.4g} µm/px, spot Ø {d_um:.4g} µm = {d_px:.4g} px"
    if table_um is not None and abs(d_um - float(table_um)) > DIAMETER_MISMATCH * float(table_um):
        logger.warning(
            "shapes %r are drawn %.4g um wide but table %r records %.4g um spots: check um_per_px",
            shapes_key, d_um, table_key, float(table_um),
        )
        text += f" (table {table_key!r} says {float(table_um):.4g} µm!)"
    return text


def measured_vs_predicted(
    sdata: Any,
    gene: str,
    *,
    measured: str = TABLE_KEY,
    predicted: str | None = None,
    shapes_key: str | None = None,
    image_key: str = IMAGE_KEY,
    layer: str | None = None,
    cmap: str = "viridis",
    vmax: float | str | None = "p99",
    share_scale: bool = False,
    alpha: float = 0.9,
    region: tuple[float, float, float, float] | None = None,
    max_px: int = 2000,
    show_image: bool = True,
    panel_width: float = 5.0,
    ax: Any = None,
    save: str | None = None,
    show: bool | None = None,
) -> Any:
    """Measured and predicted expression of one gene side by side on the same spots, with Pearson's r.

    Both are log-normalised the same way after aggregation, as scanpy would: measured counts by the spot's
    total count, predicted expected counts by the predicted library size (``obs["pixgene_total_counts"]``
    of the read-out table when present, else its row sum), each ``log1p(1e4 * x / total)``.

    Parameters
    ----------
    sdata
        SpatialData with the measured table, the read-out table of predictions and the shapes both annotate.
    gene
        A gene present in both tables.
    measured
        Table of raw measured counts.
    predicted
        Read-out table of expected counts (``pg.tl.aggregate``); default ``f"{shapes_key}_pixgene"``.
    shapes_key
        The shapes both tables annotate; default the region of the measured table.
    image_key
        The H&E image defining the drawing frame.
    layer
        Layer of the measured table holding raw counts; default ``X``.
    cmap, vmax
        Colour map; upper colour limit (``"pNN"`` = NN-th percentile of the drawn values).
    share_scale
        One colour scale for both panels (from the values of both). Off by default: when the measured table
        holds a gene subset its totals, and so its scale, differ from the predicted library size.
    alpha, region, max_px, show_image
        Spot opacity; ``(x_min, y_min, x_max, y_max)`` zoom in H&E pixels; largest side of the drawn H&E;
        draw the H&E under the spots.
    panel_width
        Width of each panel in inches.
    ax
        A pair of Axes to draw into.
    save, show
        Path to save the figure to; whether to show it (default: only on an interactive backend when not
        saving).

    Returns
    -------
    The matplotlib Figure; its title holds Pearson's r over the spots with both values. Nothing is written
    to ``sdata``.
    """
    import matplotlib.pyplot as plt

    measured_table = require_element(sdata, measured, "tables")
    shapes_key, _, _ = table_region(measured_table, measured, shapes_key)
    predicted = readout_key(shapes_key) if predicted is None else predicted
    if predicted not in sdata.tables:
        fail(
            f"table {predicted!r}",
            f"is not in the SpatialData object (tables: {list(sdata.tables)})",
            "Run pg.tl.aggregate on these shapes first, or pass predicted=... naming the read-out table",
        )
    predicted_table = sdata.tables[predicted]
    table_region(predicted_table, predicted, shapes_key)
    check_genes([gene], measured_table.var_names, f"table {measured!r}")
    check_genes([gene], predicted_table.var_names, f"table {predicted!r}")
    if layer is not None and layer not in measured_table.layers:
        fail(f"table {measured!r}", f"has no layer {layer!r}", f"Use one of {list(measured_table.layers)}")
    axes = None if ax is None else list(np.ravel(np.asarray(ax, dtype=object)))
    if axes is not None and len(axes) != 2:
        fail("ax", f"holds {len(axes)} Axes, not 2", "Pass a pair of Axes (measured, predicted) or ax=None")

    placed = place_shapes(sdata, shapes_key, image_key)
    measured_rows = rows_for_shapes(sdata, measured, shapes_key, placed.index)
    predicted_rows = rows_for_shapes(sdata, predicted, shapes_key, placed.index)
    frame = image_frame(sdata, image_key, region=region, max_px=max_px, show_image=show_image)
    counts = measured_table.X if layer is None else measured_table.layers[layer]
    measured_values = by_shape(
        log_normalise(column_vector(counts, measured_table.var_names.get_loc(gene)), row_totals(counts)),
        measured_rows,
    )
    expected = predicted_table.X
    totals = (
        predicted_table.obs[TOTAL_OBS].to_numpy(dtype=float)
        if TOTAL_OBS in predicted_table.obs.columns
        else row_totals(expected)
    )
    predicted_values = by_shape(
        log_normalise(column_vector(expected, predicted_table.var_names.get_loc(gene)), totals),
        predicted_rows,
    )
    both = np.isfinite(measured_values) & np.isfinite(predicted_values)
    r = pearson(measured_values[both], predicted_values[both])

    if axes is None:
        width, height = panel_size(frame.bounds, width=panel_width)
        fig, axes = plt.subplots(1, 2, figsize=(2 * width + 1.0, height + 0.6), layout="constrained")
    else:
        fig = axes[0].figure
    shared = color_limits(np.concatenate([measured_values, predicted_values]), vmax, f"table {measured!r}")
    label = "log1p(1e4 · x / total)"
    for panel, values, name in zip(
        axes, (measured_values, predicted_values), (f"measured ({measured})", f"predicted ({predicted})"),
        strict=True,
    ):
        low, top = shared if share_scale else color_limits(values, vmax, f"table {name!r}")
        frame.draw_image(panel)
        collection = draw_shapes(
            panel, placed, frame.bounds, values=values, cmap=cmap, vmin=low, vmax=top, alpha=alpha
        )
        frame.limit(panel)
        panel.set_title(name)
        panel.set_xticks([])
        panel.set_yticks([])
        fig.colorbar(collection, ax=panel, shrink=0.8, label=label)
    fig.suptitle(f"{gene}: Pearson r = {r:.3f} over {int(both.sum())} {shapes_key}")
    finish(fig, save=save, show=show)
    return fig


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r; NaN when fewer than two values or either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt(np.dot(dx, dx) * np.dot(dy, dy))
    return float(np.dot(dx, dy) / denom) if denom > 0 else float("nan")
