"""Validated views of the inputs: a slide's image, its spots in image pixels and their raw counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .._coords import affine_between, apply_affine, isotropic_scale
from .._raster import rgb_array
from .._units import resolve_um_per_px
from .._validate import check_raw_counts, fail, require_element


@dataclass
class SpotSlide:
    sdata: Any
    image_key: str
    shapes_key: str
    table_key: str
    um_per_px: float
    centers: np.ndarray  # (n, 2) spot centres in image pixels (x, y)
    radius: np.ndarray  # (n,) radii in image pixels
    table: Any  # AnnData rows aligned with ``centers``

    @property
    def spot_diameter_um(self) -> float:
        return float(np.median(self.radius) * 2 * self.um_per_px)


def linked_table_rows(table: Any, shapes: Any, *, table_key: str, shapes_key: str) -> np.ndarray:
    """Row index of the table for each shape (in shapes order), or -1 where a shape has no row."""
    attrs = table.uns.get("spatialdata_attrs", {})
    region = attrs.get("region")
    regions = [region] if isinstance(region, str) else list(region or [])
    if shapes_key not in regions:
        fail(
            f"table {table_key!r}",
            f"does not annotate the shapes {shapes_key!r} (it annotates {regions or 'nothing'})",
            f"Link it with TableModel.parse(adata, region={shapes_key!r}, region_key=..., instance_key=...) "
            "or pass the right table_key",
        )
    region_key, instance_key = attrs.get("region_key"), attrs.get("instance_key")
    obs = table.obs
    if region_key in obs:
        in_region = obs[region_key].astype(str).to_numpy() == shapes_key
    else:
        in_region = np.ones(len(obs), dtype=bool)
    pos = np.flatnonzero(in_region)
    lookup = pd.Series(pos, index=obs[instance_key].astype(str).to_numpy()[pos])
    lookup = lookup[~lookup.index.duplicated()]
    idx = lookup.reindex(shapes.index.astype(str)).to_numpy()
    return np.where(np.isnan(idx), -1, idx).astype(np.int64)


def circles_in_image(sdata: Any, shapes_key: str, image_key: str) -> tuple[np.ndarray, np.ndarray]:
    shapes = require_element(sdata, shapes_key, "shapes")
    if "radius" not in shapes.columns or not (shapes.geometry.geom_type == "Point").all():
        fail(
            f"shapes {shapes_key!r}",
            "are not circles (Point geometries with a 'radius' column)",
            "Give the spots as circles (ShapesModel.parse(xy, geometry=0, radius=...))",
        )
    matrix = affine_between(sdata, shapes_key, image_key)
    scale = isotropic_scale(matrix, f"shapes {shapes_key!r}")
    xy = np.column_stack([shapes.geometry.x.to_numpy(), shapes.geometry.y.to_numpy()])
    return apply_affine(matrix, xy), shapes["radius"].to_numpy(dtype=float) * scale


def prepare_spot_slide(
    sdata: Any,
    *,
    image_key: str,
    shapes_key: str,
    table_key: str,
    um_per_px: float | None = None,
    genes: list[str] | None = None,
) -> SpotSlide:
    """Check everything fit/evaluate need, before any work, and return the spots in image pixels."""
    from .._validate import check_genes

    image = require_element(sdata, image_key, "images")
    array = rgb_array(image, image_key)
    shapes = require_element(sdata, shapes_key, "shapes")
    table = require_element(sdata, table_key, "tables")
    um = resolve_um_per_px(sdata, image_key, um_per_px=um_per_px, shapes_key=shapes_key, table_key=table_key)
    centers, radius = circles_in_image(sdata, shapes_key, image_key)
    H, W = int(array.sizes["y"]), int(array.sizes["x"])
    outside = (centers[:, 0] < 0) | (centers[:, 0] > W) | (centers[:, 1] < 0) | (centers[:, 1] > H)
    if outside.any():
        fail(
            f"shapes {shapes_key!r}",
            f"{int(outside.sum())} of {len(centers)} spot centres fall outside image {image_key!r} "
            f"({W} x {H} px), e.g. at {centers[outside][0].round(1).tolist()}",
            "Check the spots' and the image's transformations (scale factors: full-resolution vs hires pixels)",
        )
    rows = linked_table_rows(table, shapes, table_key=table_key, shapes_key=shapes_key)
    if (rows < 0).all():
        fail(
            f"table {table_key!r}",
            f"none of its instance ids match the index of shapes {shapes_key!r}",
            "Make the table's instance_key column hold the shapes' index values",
        )
    keep = rows >= 0
    sub = table[rows[keep]]
    if genes is not None:
        check_genes(genes, sub.var_names, f"table {table_key!r}")
    check_raw_counts(sub.X, f"table {table_key!r}")
    return SpotSlide(sdata, image_key, shapes_key, table_key, um, centers[keep], radius[keep], sub)
