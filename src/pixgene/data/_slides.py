"""Validated views of the inputs: a slide's image, its spots in image pixels and their raw counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .._core.coords import affine_between, apply_affine, isotropic_scale
from .._core.raster import require_finite, rgb_array
from .._core.units import resolve_um_per_px
from .._core.validate import check_raw_counts, fail, require_element


@dataclass
class SpotSlide:
    sdata: Any
    image_key: str
    shapes_key: str
    table_key: str
    um_per_px: float
    centers: np.ndarray  # (n, 2) spot centres in image pixels (x, y); a polygon's bounding-box centre
    radius: np.ndarray  # (n,) radii in image pixels; a polygon's half extent (half its bounding box's longer side)
    table: Any  # AnnData rows aligned with ``centers``
    #: (n,) shapely Polygons / MultiPolygons in image pixels when the spots are polygons (Visium HD's square bins,
    #: any other shape); None when they are circles
    polygons: np.ndarray | None = None

    @property
    def spot_diameter_um(self) -> float:
        """Circles: the median diameter; polygons: the median longer side of their bounding boxes."""
        return float(np.median(self.radius) * 2 * self.um_per_px)

    @property
    def area_px(self) -> np.ndarray:
        """(n,) exact area of every spot, image px^2."""
        if self.polygons is None:
            return np.pi * self.radius**2
        import shapely

        return shapely.area(self.polygons)

    def footprint(self) -> np.ndarray:
        """The spots' geometry beyond their centres as one float array (radii, or every polygon's vertex count
        and vertices), for the digests that say whether training inputs changed."""
        if self.polygons is None:
            return self.radius
        import shapely

        coords = shapely.get_coordinates(self.polygons)
        return np.concatenate([shapely.get_num_coordinates(self.polygons).astype(float), coords.ravel()])

    def area_operator(self, divisor: float, grid_shape: tuple[int, int]):
        """Sparse (n, H * W) exact overlap areas (grid px^2) of every spot with a grid whose pixel is
        ``divisor`` image pixels, its top-left corner at the image's."""
        from ._geometry import spot_weights

        return spot_weights(self.centers, self.radius, self.polygons, grid_shape, scale=divisor)


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


def spots_in_image(
    sdata: Any, shapes_key: str, image_key: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The spots in image pixels: ``(centers, radius, polygons)``.

    Circles (Points with a ``radius`` column, as Visium and ST readers make them): their centres and radii,
    ``polygons`` None. Polygons / MultiPolygons (Visium HD's square bins as spatialdata-io reads them, or any
    other measured shape): their bounding-box centres, half their bounding box's longer side, and the polygons
    themselves carried into image pixels.
    """
    import shapely

    shapes = require_element(sdata, shapes_key, "shapes")
    where = f"shapes {shapes_key!r}"
    geoms = np.asarray(shapes.geometry, dtype=object)
    if len(geoms) == 0:
        fail(where, "is empty", "Pass the measured spots' shapes")
    if any(g is None for g in geoms) or shapely.is_empty(geoms).any():
        fail(where, "contains missing or empty geometries", "Drop or repair them before fitting")
    types = shapely.get_type_id(geoms)
    is_point = types == 0
    is_polygon = np.isin(types, (3, 6))
    if not (is_point | is_polygon).all():
        kinds = sorted({g.geom_type for g in geoms[~(is_point | is_polygon)]})
        fail(where, f"contains {kinds} geometries", "Give the spots as circles (points with a radius) or polygons")
    if is_point.any() and is_polygon.any():
        fail(where, f"mixes {int(is_point.sum())} circles and {int(is_polygon.sum())} polygons",
             "Give the measured spots of one element as one kind of shape")
    matrix = affine_between(sdata, shapes_key, image_key)
    if is_point.all():
        if "radius" not in shapes.columns:
            fail(where, "are points without a 'radius' column",
                 "Give the spots as circles (ShapesModel.parse(xy, geometry=0, radius=...))")
        scale = isotropic_scale(matrix, where)
        radius = shapes["radius"].to_numpy(dtype=float) * scale
        if not np.all(np.isfinite(radius) & (radius > 0)):
            fail(where, "has circles with a missing or non-positive radius", "Fix the radius column")
        xy = np.column_stack([shapes.geometry.x.to_numpy(), shapes.geometry.y.to_numpy()])
        return apply_affine(matrix, xy), radius, None
    polygons = shapely.transform(geoms, lambda xy: apply_affine(matrix, xy))
    bounds = shapely.bounds(polygons)
    if not np.isfinite(bounds).all():
        fail(where, "has non-finite coordinates", "Repair the polygons before fitting")
    centers = (bounds[:, :2] + bounds[:, 2:]) / 2
    radius = np.max(bounds[:, 2:] - bounds[:, :2], axis=1) / 2
    if not (shapely.area(polygons) > 0).all():
        fail(where, "has polygons of zero area", "Drop degenerate polygons before fitting")
    return centers, radius, polygons


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
    from .._core.validate import check_genes

    image = require_element(sdata, image_key, "images")
    array = rgb_array(image, image_key)
    require_finite(array, image_key)
    shapes = require_element(sdata, shapes_key, "shapes")
    table = require_element(sdata, table_key, "tables")
    um = resolve_um_per_px(sdata, image_key, um_per_px=um_per_px, shapes_key=shapes_key, table_key=table_key)
    centers, radius, polygons = spots_in_image(sdata, shapes_key, image_key)
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
    return SpotSlide(sdata, image_key, shapes_key, table_key, um, centers[keep], radius[keep], sub,
                     None if polygons is None else polygons[keep])
