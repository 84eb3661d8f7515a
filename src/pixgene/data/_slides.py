"""Validated views of the inputs: a slide's image, its spots in image pixels and their raw counts."""

from __future__ import annotations

from dataclasses import dataclass, replace
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
    #: (n,) row of the shapes element of every spot (prepare_spot_slide keeps the shapes that have counts)
    positions: np.ndarray | None = None
    #: what :meth:`subset` kept (:func:`selection_record`); None when the slide holds every spot with counts
    selection: dict | None = None

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

    def subset(self, keep: np.ndarray, how: str) -> SpotSlide:
        """The slide with only the spots where ``keep`` (boolean over its spots) is True: the same SpatialData
        and image, the kept spots' centres, footprints and table rows, and the record of which they are
        (``selection``; ``how`` says how they were chosen)."""
        keep = np.asarray(keep, dtype=bool)
        ids = self.sdata.shapes[self.shapes_key].index[self.positions[keep]]
        return replace(
            self, centers=self.centers[keep], radius=self.radius[keep], table=self.table[np.flatnonzero(keep)],
            polygons=None if self.polygons is None else self.polygons[keep], positions=self.positions[keep],
            selection=selection_record(ids, self.positions[keep], len(self.centers), how),
        )


#: a training record lists the ids of at most this many selected spots (beyond it: runs of shapes rows)
MAX_LISTED_IDS = 100_000


def selection_record(ids: Any, positions: np.ndarray, n_of: int, how: str) -> dict:
    """Which spots a subset holds, for a model's training record: ``n`` (their number), ``of`` (the slide's
    spots with counts), ``how`` (mask, ids or region), ``sha256`` of their ids (as text, one a line, in the
    shapes' order) and the ids themselves, or, beyond ``MAX_LISTED_IDS`` of them, ``runs``: ``[start, stop)``
    ranges of their rows in the shapes element."""
    import hashlib

    text = [str(i) for i in ids]
    record = {"n": len(text), "of": int(n_of), "how": how,
              "sha256": hashlib.sha256("\n".join(text).encode()).hexdigest()}
    if len(text) <= MAX_LISTED_IDS:
        record["ids"] = [i.item() if isinstance(i, np.generic) else i for i in ids]
    else:
        pos = np.asarray(positions, dtype=np.int64)
        breaks = np.flatnonzero(np.diff(pos) != 1) + 1
        starts, stops = pos[np.r_[0, breaks]], pos[np.r_[breaks - 1, len(pos) - 1]] + 1
        record["runs"] = np.column_stack([starts, stops]).tolist()
    return record


def _shape_centres(shapes: Any) -> np.ndarray:
    """(n, 2) centre of every shape in its own coordinates: a circle's point, a polygon's bounding-box centre
    (the centres prepare_spot_slide uses)."""
    import shapely

    geoms = np.asarray(shapes.geometry, dtype=object)
    bounds = shapely.bounds(geoms)
    return (bounds[:, :2] + bounds[:, 2:]) / 2


def _region_geometry(sdata: Any, region: Any, shapes_key: str, argument: str) -> Any:
    """One (multi)polygon in the spots' coordinates: a shapely polygon as it is, or the union of a shapes
    element's polygons carried into the spots' coordinates."""
    import shapely

    from .._core.coords import affine_between

    if isinstance(region, str):
        element = require_element(sdata, region, "shapes")
        geoms = np.asarray(element.geometry, dtype=object)
        types = shapely.get_type_id(geoms) if len(geoms) else np.array([], dtype=int)
        if len(geoms) == 0 or not np.isin(types, (3, 6)).all():
            kinds = sorted({g.geom_type for g in geoms if shapely.get_type_id(g) not in (3, 6)})
            fail(f"{argument} (region {region!r})",
                 f"shapes {region!r} is not an element of polygons (it holds {', '.join(kinds)})" if len(geoms)
                 else f"shapes {region!r} is empty",
                 "Pass the name of a shapes element of polygons (the region), a shapely polygon in the spots' "
                 "coordinates, a boolean mask or a list of spot ids")
        matrix = affine_between(sdata, region, shapes_key)
        return shapely.union_all(shapely.transform(geoms, lambda xy: apply_affine(matrix, xy)))
    if not isinstance(region, shapely.Geometry) or shapely.get_type_id(region) not in (3, 6):
        fail(argument, f"a {region.geom_type} is not a region", "Pass a shapely Polygon or MultiPolygon")
    if region.is_empty:
        fail(argument, "the polygon is empty", "Pass a polygon around the spots to select")
    return region


def spot_selection(sdata: Any, shapes_key: str, spots: Any, *, argument: str = "spots") -> tuple[np.ndarray, str]:
    """A selection of the spots of ``shapes_key`` as a boolean mask over the shapes element's rows, and how it
    was given (``"mask"``, ``"ids"``, ``"region '<name>'"`` or ``"polygon"``).

    ``spots`` is a boolean mask over the element's rows (a list, array or Series of booleans of its length),
    ids from its index (a list, array or Index; integers are ids, never row numbers), or a region: the name
    of a shapes element of polygons in ``sdata`` or a shapely (Multi)Polygon in the spots' coordinate system,
    selecting the spots whose centre (a circle's point, a polygon's bounding-box centre) lies inside or on its
    boundary. Refuses (naming ``argument`` and the element) a mask of another length, unknown ids and
    selections that hold no spot.
    """
    import shapely

    shapes = require_element(sdata, shapes_key, "shapes")
    where = f"{argument} (over shapes {shapes_key!r})"
    n = len(shapes)
    if isinstance(spots, str) or isinstance(spots, shapely.Geometry):
        region = _region_geometry(sdata, spots, shapes_key, argument)
        xy = _shape_centres(shapes)
        mask = shapely.intersects_xy(region, xy[:, 0], xy[:, 1])
        how = f"region {spots!r}" if isinstance(spots, str) else "polygon"
        if not mask.any():
            fail(where, f"the {how} holds none of the {n} spot centres",
                 "Check that the region is in the spots' coordinate system (a shapes element is carried "
                 "through the coordinate systems it shares with the spots; a shapely polygon is taken as it is)")
        return mask, how
    if spots is None or isinstance(spots, dict | set) or np.ndim(spots) != 1:
        fail(where, f"a {type(spots).__name__} is not a selection of spots",
             f"Pass a boolean mask of length {n}, a list of spot ids, a region's name or a shapely polygon")
    values = np.asarray(spots.to_numpy() if hasattr(spots, "to_numpy") else list(spots))
    if values.dtype == bool:
        if len(values) != n:
            fail(where, f"the boolean mask has {len(values)} entries, the shapes have {n} rows",
                 f"Pass a mask with one entry per row of shapes {shapes_key!r}, in its order")
        mask = values
        how = "mask"
    else:
        index = pd.Index(shapes.index.astype(str))
        wanted = pd.Index([str(v) for v in values])
        unknown = wanted[index.get_indexer_for(wanted) < 0].unique()
        if len(unknown):
            fail(where, f"{len(unknown)} of the {len(wanted.unique())} ids given are not in the shapes' index, "
                 f"e.g. {list(unknown[:5])}", f"Pass ids from sdata.shapes[{shapes_key!r}].index (or a boolean mask)")
        mask = index.isin(wanted)
        how = "ids"
    if not mask.any():
        fail(where, f"{'the mask selects' if how == 'mask' else 'the ids given select'} none of the {n} spots",
             "Select at least one spot with counts")
    return mask, how


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
                     None if polygons is None else polygons[keep], positions=np.flatnonzero(keep))


def select_slide_spots(slide: SpotSlide, spots: Any, *, argument: str = "spots") -> SpotSlide:
    """``slide`` with only the spots :func:`spot_selection` selects (see there for the forms of ``spots``),
    their record in ``selection``. Shapes without counts are never selected: ids of such shapes are refused, a
    mask or region that selects only such shapes is refused as empty."""
    mask, how = spot_selection(slide.sdata, slide.shapes_key, spots, argument=argument)
    keep = mask[slide.positions]
    where = f"{argument} (over shapes {slide.shapes_key!r})"
    if how == "ids" and keep.sum() < mask.sum():
        fail(where, f"{int(mask.sum() - keep.sum())} of the ids given have no counts in table {slide.table_key!r}",
             "Pass ids of measured spots (rows of the table)")
    if not keep.any():
        fail(where, f"the {how} selects {int(mask.sum())} spot(s), none with counts in table {slide.table_key!r}",
             "Select measured spots")
    return slide.subset(keep, how)
