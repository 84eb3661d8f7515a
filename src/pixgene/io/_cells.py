"""Reader for a cell segmentation made elsewhere: GeoJSON, label masks, Xenium cell boundaries."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._core.keys import CELLS_KEY, IMAGE_KEY
from .._core.validate import check_not_exists, check_positive, fail, require_element

logger = logging.getLogger(__name__)

__all__ = ["label_polygons", "read_cells"]

_GEOJSON_SUFFIXES = (".geojson", ".json", ".geojson.gz", ".json.gz")
_MASK_SUFFIXES = (".npy", ".tif", ".tiff", ".png")
_VERTEX_SUFFIXES = (".parquet", ".csv", ".csv.gz")
#: the first of these that every feature has, with unique values, becomes the index
_ID_PROPERTIES = ("cell_id", "id", "name", "label", "object_id")
#: fraction of cells whose centre may lie outside the image before the segmentation is refused as misplaced
_OUTSIDE_TOLERANCE = 0.05


def read_cells(
    sdata: Any,
    source: Any,
    *,
    image_key: str = IMAGE_KEY,
    key_added: str = CELLS_KEY,
    overwrite: bool = False,
    image_um_per_px: float | None = None,
    coordinate_system: str | None = None,
    mask_um_per_px: float | None = None,
    affine: Any = None,
) -> Any:
    """Add a cell segmentation made elsewhere as a shapes element of cell polygons over an image.

    The polygons are stored in the image's full-resolution pixels and get the image's transformations, so
    they overlay it in every coordinate system, and pixgene's read-outs (``pg.tl.aggregate``) work on them.

    Parameters
    ----------
    sdata
        SpatialData with the image.
    source
        The segmentation, one of

        - a GeoJSON file (``.geojson``, ``.json``; QuPath, StarDist, Space Ranger exports) or its parsed
          object: a FeatureCollection, a list of features or one feature, of Polygon / MultiPolygon
          geometries in the image's full-resolution pixels. Other geometries (points, lines) are dropped. The
          feature ``id`` or the first of the properties ``cell_id``, ``id``, ``name``, ``label``,
          ``object_id`` present and unique in every feature becomes the index; QuPath's ``classification``
          becomes a column ``classification`` and other scalar properties are kept as columns.
        - a label mask (Cellpose, StarDist, ...): a 2-D integer array, or a ``.npy``, ``.tif`` / ``.tiff`` or
          ``.png`` file of one; each label > 0 is one cell. Its outline follows the pixel edges exactly, so a
          cell's polygon area equals its pixel count (times the mask's pixel area). The mask may be at the
          image's resolution, at the resolution of one of the image's pyramid levels, at a whole-number
          downsampling of it, or at ``mask_um_per_px``.
        - a Xenium ``cell_boundaries.parquet`` / ``nucleus_boundaries.parquet`` (or ``.csv.gz``), or a
          DataFrame with columns ``cell_id``, ``vertex_x``, ``vertex_y`` in microns: placed by ``affine``,
          else through ``coordinate_system``, else by the image's microns per pixel (the Xenium origin at the
          image's top-left corner, as for Xenium's own morphology image).
        - a GeoDataFrame of polygons in the image's full-resolution pixels.
        - the name of a labels or shapes element of ``sdata`` (such as spatialdata-io's Xenium
          ``cell_labels`` or ``cell_boundaries``): placed over the image through both elements' transformations.
    image_key
        The image the cells lie on.
    key_added
        Name of the new shapes element.
    overwrite
        Replace an existing shapes element named ``key_added``.
    image_um_per_px
        Microns per pixel of the image, to place a segmentation in microns or a mask given with
        ``mask_um_per_px``; default: the value recorded for the image (:func:`pixgene.io.get_um_per_px`).
    coordinate_system
        A coordinate system of the image that is in microns: vertices in microns are mapped to the image's
        pixels through the inverse of the image's transformation to it (translation and rotation included),
        and the image's microns per pixel are derived from it when not recorded.
    mask_um_per_px
        Microns per pixel of a label mask that is not at the image's resolution.
    affine
        3 x 3 (or 2 x 3) matrix taking the source's (x, y) to the image's full-resolution pixel (x, y); wins
        over every other placement. For a Xenium segmentation over a registered post-Xenium H&E, this is the
        inverse of Xenium's image alignment matrix times ``diag(1 / 0.2125, 1 / 0.2125, 1)``.

    Returns
    -------
    The shapes element (GeoDataFrame of Polygon / MultiPolygon in image pixels), also stored as
    ``sdata.shapes[key_added]`` (and written to the zarr store when ``sdata`` is backed by one). A label
    mask's cells are indexed by their label as a string and keep it in a column ``label``.

    Raises
    ------
    PixgeneInputError
        If the image is missing, ``key_added`` exists and ``overwrite`` is False, the source cannot be read,
        holds no cells, its placement cannot be determined, or the cells lie outside the image (typically a
        wrong microns per pixel, mask resolution or coordinate system).
    """
    from spatialdata.models import ShapesModel

    from .._core.coords import transformations_of
    from .._core.raster import full_resolution

    image = require_element(sdata, image_key, "images")
    check_not_exists(sdata, key_added, overwrite)
    for kind in ("images", "labels", "points", "tables"):
        if key_added in getattr(sdata, kind):
            fail(f"{kind[:-1]} {key_added!r}", "exists, and a shapes element cannot take its name",
                 "Choose another key_added")
    check_positive(image_um_per_px, "image_um_per_px", f"image {image_key!r}")
    check_positive(mask_um_per_px, "mask_um_per_px", "read_cells")
    matrix = None if affine is None else _as_affine(affine)
    full = full_resolution(image)
    height, width = int(full.sizes["y"]), int(full.sizes["x"])
    what = _describe(source)

    element = isinstance(source, str) and not Path(source).exists() and source in {*sdata.labels, *sdata.shapes}
    if element:
        # an element of this SpatialData (a reader's cell labels or boundaries): placed by its transformations
        from .._core.coords import affine_between

        what = f"{'labels' if source in sdata.labels else 'shapes'} {source!r}"
        if matrix is None:
            matrix = affine_between(sdata, source, image_key)
        if source in sdata.labels:
            kind, loaded = "mask", full_resolution(sdata.labels[source]).values
        else:
            kind, loaded = "frame", sdata.shapes[source]
    else:
        kind, loaded = _load(source, what)
    if kind == "mask":
        frame = _mask_cells(loaded, what, sdata, image_key, (height, width), image_um_per_px, coordinate_system,
                            mask_um_per_px, matrix)
    elif kind == "vertices":
        frame = _vertex_cells(loaded, what)
        if matrix is None:
            matrix = _microns_to_pixels(sdata, image_key, image_um_per_px, coordinate_system)
    else:
        frame = _feature_cells(loaded, what) if kind == "features" else _frame_cells(loaded, what)
    if kind != "mask" and matrix is not None:
        frame = _transform(frame, matrix)
    if len(frame) == 0:
        fail(what, "holds no cell polygons", "Pass a segmentation with at least one cell")
    _check_inside(frame, (height, width), what, image_key, kind)

    shapes = ShapesModel.parse(frame, transformations=transformations_of(image))
    sdata.shapes[key_added] = shapes
    if sdata.is_backed():
        sdata.write_element(key_added, overwrite=overwrite)
    logger.info("read %d cells from %s as %r over %r", len(shapes), what, key_added, image_key)
    return shapes


# ---------------------------------------------------------------------------------------------- sources


def _describe(source: Any) -> str:
    if isinstance(source, str | Path):
        return f"segmentation file {str(source)!r}"
    return f"segmentation ({type(source).__name__})"


def _load(source: Any, what: str) -> tuple[str, Any]:
    """(kind, data): kind is "features", "mask", "vertices" or "frame"."""
    import geopandas as gpd

    if isinstance(source, gpd.GeoDataFrame):
        return "frame", source
    if isinstance(source, pd.DataFrame):
        return "vertices", source
    if isinstance(source, np.ndarray) or hasattr(source, "__array__") and not isinstance(source, dict | list):
        return "mask", source
    if isinstance(source, dict | list):
        return "features", source
    if not isinstance(source, str | Path):
        fail(what, "is not a file path, an array, a DataFrame or a GeoJSON object",
             "Pass a GeoJSON file, a label mask or a Xenium cell_boundaries.parquet")
    path = Path(source)
    if not path.is_file():
        fail(what, "does not exist", "Pass the path of an existing file")
    name = path.name.lower()
    if name.endswith(_GEOJSON_SUFFIXES):
        opener = gzip.open if name.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8") as handle:
                return "features", json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            fail(what, f"is not valid GeoJSON ({err})", "Export the cells as GeoJSON (QuPath: File > Export objects)")
    if name.endswith(_VERTEX_SUFFIXES):
        frame = pd.read_parquet(path) if name.endswith(".parquet") else pd.read_csv(path)
        return "vertices", frame
    if name.endswith(_MASK_SUFFIXES):
        return "mask", _read_mask_file(path, what)
    fail(what, f"has an unknown file type {path.suffix!r}",
         "Pass a .geojson/.json, a .npy/.tif/.tiff/.png label mask or a Xenium .parquet/.csv.gz")


def _read_mask_file(path: Path, what: str) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError:
            fail(what, "holds Python objects (such as Cellpose's _seg.npy dictionary), which are not loaded",
                 "Save the label mask itself, e.g. np.save(path, seg['masks']) or cellpose's save_masks(tif=True)")
    if suffix in (".tif", ".tiff"):
        import tifffile

        return tifffile.imread(path)
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img)


def _as_affine(affine: Any) -> np.ndarray:
    matrix = np.asarray(affine, dtype=float)
    if matrix.shape == (2, 3):
        matrix = np.vstack([matrix, [0.0, 0.0, 1.0]])
    if matrix.shape != (3, 3) or not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix[:2, :2])) < 1e-12:
        fail("read_cells", f"affine has shape {matrix.shape} or is singular / not finite",
             "Pass an invertible 3 x 3 (or 2 x 3) matrix taking the source's (x, y) to image pixels")
    return matrix


def _microns_to_pixels(sdata: Any, image_key: str, um_per_px: float | None, coordinate_system: str | None):
    """3 x 3 matrix from microns to the image's pixels."""
    from .._core.coords import transformations_of
    from ._units import get_um_per_px

    if coordinate_system is not None:
        systems = transformations_of(sdata.images[image_key])
        if coordinate_system not in systems:
            fail(f"image {image_key!r}", f"has no coordinate system {coordinate_system!r} (it has "
                 f"{', '.join(repr(s) for s in systems)})", "Pass one of the image's coordinate systems")
        to_microns = systems[coordinate_system].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
        return np.linalg.inv(np.asarray(to_microns, dtype=float))
    if um_per_px is None:
        um_per_px = get_um_per_px(sdata, image_key)
    from .._core.units import validate_um_per_px

    um_per_px = validate_um_per_px(um_per_px, image_key)
    return np.diag([1.0 / um_per_px, 1.0 / um_per_px, 1.0])


def _transform(frame: Any, matrix: np.ndarray) -> Any:
    import shapely

    out = frame.copy()
    out.geometry = shapely.transform(
        frame.geometry.to_numpy(), lambda xy: xy @ matrix[:2, :2].T + matrix[:2, 2]
    )
    return out


# ------------------------------------------------------------------------------------------------ GeoJSON


def _feature_cells(data: Any, what: str) -> Any:
    import geopandas as gpd
    import shapely.geometry
    from shapely.errors import GEOSException

    if isinstance(data, dict):
        kind = data.get("type")
        if kind == "FeatureCollection":
            features = data.get("features", [])
        elif kind == "Feature":
            features = [data]
        elif kind in ("Polygon", "MultiPolygon", "GeometryCollection"):
            features = [{"type": "Feature", "geometry": data, "properties": {}}]
        else:
            fail(what, f"is a GeoJSON object of type {kind!r}", "Pass a FeatureCollection or a list of features")
    else:
        features = list(data)
    geometries, properties, ids, dropped = [], [], [], {}
    for i, feature in enumerate(features):
        if not isinstance(feature, dict) or not isinstance(feature.get("geometry"), dict):
            dropped["no geometry"] = dropped.get("no geometry", 0) + 1
            continue
        try:
            geometry = shapely.geometry.shape(feature["geometry"])
        except (GEOSException, ValueError, TypeError, KeyError, AttributeError, IndexError) as err:
            fail(what, f"feature {i} has an unreadable geometry ({err})", "Export valid GeoJSON polygons")
        if geometry.geom_type == "GeometryCollection":
            parts = [g for g in geometry.geoms if g.geom_type in ("Polygon", "MultiPolygon")]
            geometry = shapely.geometry.MultiPolygon(
                [p for g in parts for p in (g.geoms if g.geom_type == "MultiPolygon" else [g])]
            ) if parts else geometry
        if geometry.geom_type not in ("Polygon", "MultiPolygon") or geometry.is_empty:
            dropped[geometry.geom_type] = dropped.get(geometry.geom_type, 0) + 1
            continue
        geometries.append(geometry)
        props = feature.get("properties") or {}
        properties.append(props)
        ids.append(feature.get("id"))
    if dropped:
        logger.warning("%s: dropped %s feature(s) that are not polygons", what, dropped)
    if not geometries:
        fail(what, f"holds no Polygon or MultiPolygon features (dropped: {dropped or 'none'})",
             "Export the cells' outlines as polygons")
    rows = [_scalar_properties(props) for props in properties]
    names = list(dict.fromkeys(key for row in rows for key in row))
    columns = {key: [row.get(key) for row in rows] for key in names}
    table = pd.DataFrame(columns, index=range(len(geometries)))
    index = _choose_index(ids, table)
    table.index = index
    return _polygonal(gpd.GeoDataFrame(table, geometry=gpd.GeoSeries(geometries, index=index)), what)


def _scalar_properties(props: dict) -> dict:
    """A feature's properties that fit a column: QuPath's classification by name, objectType as object_type."""
    out = {}
    for key, value in props.items():
        if key == "classification" and isinstance(value, dict):
            value = value.get("name")
        if value is None or isinstance(value, str | bool | int | float):
            out["object_type" if key == "objectType" else key] = value
    return out


def _choose_index(ids: list[Any], table: pd.DataFrame) -> pd.Index:
    candidates = [("feature id", ids)] + [(c, table[c].tolist()) for c in _ID_PROPERTIES if c in table]
    for _, values in candidates:
        if not any(pd.isna(v) for v in values):
            names = pd.Index([str(v) for v in values])
            if names.is_unique:
                return names
    return pd.Index([str(i) for i in range(len(ids))])


def _frame_cells(frame: Any, what: str) -> Any:
    frame = frame.copy()
    frame.attrs = {}  # a shapes element's own transformations are replaced by the image's
    frame.index = pd.Index([str(i) for i in frame.index])
    if not frame.index.is_unique:
        fail(what, "has a repeated index", "Give each cell a unique index")
    return _polygonal(frame, what)


def _polygonal(frame: Any, what: str) -> Any:
    """Polygons and multipolygons only, repaired where invalid (self-intersections, bow ties)."""
    import shapely

    geometry = frame.geometry.to_numpy()
    types = shapely.get_type_id(geometry)
    keep = np.isin(types, (3, 6)) & ~shapely.is_empty(geometry)
    if not keep.all():
        logger.warning("%s: dropped %d geometries that are not polygons", what, int((~keep).sum()))
        frame, geometry = frame[keep], geometry[keep]
    invalid = ~shapely.is_valid(geometry)
    if invalid.any():
        logger.info("%s: repairing %d invalid polygon(s)", what, int(invalid.sum()))
        geometry = geometry.copy()
        geometry[invalid] = [_polygon_part(shapely.make_valid(g)) for g in geometry[invalid]]
        frame = frame.copy()
        frame.geometry = geometry
        frame = frame[~shapely.is_empty(geometry)]
    return frame


def _polygon_part(geometry: Any) -> Any:
    import shapely

    if geometry.geom_type in ("Polygon", "MultiPolygon"):
        return geometry
    parts = [g for g in getattr(geometry, "geoms", []) if g.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else shapely.Polygon()


# --------------------------------------------------------------------------------------- Xenium vertices


def _vertex_cells(frame: pd.DataFrame, what: str) -> Any:
    import geopandas as gpd
    import shapely

    missing = [c for c in ("cell_id", "vertex_x", "vertex_y") if c not in frame.columns]
    if missing:
        fail(what, f"has no column(s) {missing} (its columns are {list(frame.columns)})",
             "Pass Xenium's cell_boundaries.parquet or a table with cell_id, vertex_x, vertex_y (microns)")
    if len(frame) == 0:
        fail(what, "holds no vertices", "Pass a segmentation with at least one cell")
    ids = frame["cell_id"]
    if ids.dtype == object and len(ids) and isinstance(ids.iloc[0], bytes):
        ids = ids.str.decode("utf-8")
    ids = ids.astype(str).to_numpy()
    parts = ids
    if "label_id" in frame.columns:
        parts = (pd.Series(ids) + "\x00" + frame["label_id"].astype(str).to_numpy()).to_numpy()
    # consecutive rows of one (cell, label) form one ring; Xenium repeats the first vertex at the end
    starts = np.flatnonzero(np.r_[True, parts[1:] != parts[:-1]])
    counts = np.diff(np.r_[starts, len(parts)])
    if np.any(counts < 3):
        fail(what, f"{int((counts < 3).sum())} cell(s) have fewer than 3 vertices",
             "Pass whole cell outlines, their vertices in order, one cell after another")
    xy = frame[["vertex_x", "vertex_y"]].to_numpy(dtype=float)
    polygons = shapely.polygons(shapely.linearrings(xy, indices=np.repeat(np.arange(len(starts)), counts)))
    names = ids[starts]
    if pd.Index(names).is_unique:
        geometry = polygons
    else:  # a cell in several parts (Xenium label_id), or its rows not consecutive
        merged = pd.Series(polygons).groupby(names, sort=False).agg(
            lambda g: g.iloc[0] if len(g) == 1 else shapely.MultiPolygon(list(g))
        )
        names, geometry = merged.index.to_numpy(), merged.to_numpy()
    index = pd.Index(names.astype(str))
    return _polygonal(gpd.GeoDataFrame(index=index, geometry=gpd.GeoSeries(geometry, index=index)), what)


# ---------------------------------------------------------------------------------------------- masks


def _mask_cells(
    mask: Any,
    what: str,
    sdata: Any,
    image_key: str,
    image_shape: tuple[int, int],
    um_per_px: float | None,
    coordinate_system: str | None,
    mask_um_per_px: float | None,
    matrix: np.ndarray | None,
) -> Any:
    import geopandas as gpd
    import shapely

    labels = np.asarray(mask)
    labels = np.squeeze(labels) if labels.ndim > 2 else labels
    if labels.ndim != 2:
        fail(what, f"has shape {np.shape(mask)}, not a 2-D label mask", "Pass one (y, x) label image")
    if labels.dtype == bool:
        fail(what, "is a boolean (foreground) mask, not a label mask",
             "Label its cells first, e.g. skimage.measure.label(mask)")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.issubdtype(labels.dtype, np.floating) or not np.all(labels == np.round(labels)):
            fail(what, f"has dtype {labels.dtype}, not integer labels", "Pass an integer label mask")
        labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        fail(what, "has negative labels", "Pass a label mask with 0 as background and cells labelled 1, 2, ...")
    if not labels.any():
        fail(what, f"is empty: all {labels.shape[0]} x {labels.shape[1]} pixels are background (0)",
             "Check the segmentation; pass the mask of the cells")

    if matrix is None:
        fy, fx = _mask_scale(labels.shape, image_shape, sdata, image_key, um_per_px, coordinate_system,
                             mask_um_per_px, what)
        matrix = np.diag([fx, fy, 1.0])
    ids, polygons = label_polygons(labels)
    geometry = shapely.transform(polygons, lambda xy: xy @ matrix[:2, :2].T + matrix[:2, 2])
    index = pd.Index([str(i) for i in ids.tolist()])
    return gpd.GeoDataFrame({"label": ids}, index=index, geometry=gpd.GeoSeries(geometry, index=index))


def _mask_scale(
    mask_shape: tuple[int, int],
    image_shape: tuple[int, int],
    sdata: Any,
    image_key: str,
    um_per_px: float | None,
    coordinate_system: str | None,
    mask_um_per_px: float | None,
    what: str,
) -> tuple[float, float]:
    """(y, x) image pixels per mask pixel."""
    from .._core.raster import scale_levels

    if mask_um_per_px is not None:
        if um_per_px is None:
            from ._units import get_um_per_px

            um_per_px = get_um_per_px(sdata, image_key, coordinate_system=coordinate_system)
        factor = float(mask_um_per_px) / float(um_per_px)
        return factor, factor
    if tuple(mask_shape) == tuple(image_shape):
        return 1.0, 1.0
    height, width = image_shape
    for array, _ in scale_levels(sdata.images[image_key]):
        if (int(array.sizes["y"]), int(array.sizes["x"])) == tuple(mask_shape):
            return height / mask_shape[0], width / mask_shape[1]
    for factor in range(2, 129):
        fits = all(n in (int(np.floor(full / factor)), int(np.ceil(full / factor)))
                   for n, full in zip(mask_shape, image_shape, strict=True))
        if fits:
            return float(factor), float(factor)
    fail(what, f"is {mask_shape[1]} x {mask_shape[0]} px, which is neither the {width} x {height} px image "
         "nor one of its pyramid levels nor a whole-number downsampling of it",
         "Pass mask_um_per_px=... (the mask's pixel size), or affine=... mapping mask pixels to image pixels")


def label_polygons(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact outlines of the cells of a label mask, along the pixels' edges.

    Pixel ``(row, col)`` covers ``[col, col + 1] x [row, row + 1]``; each label's polygon is the union of its
    pixels, so its area equals the label's pixel count. Pixels of one label that touch only at a corner are
    separate parts (4-connectivity); a label in several parts becomes a MultiPolygon, and enclosed background
    or other labels become holes.

    Parameters
    ----------
    labels
        2-D integer array, 0 = background.

    Returns
    -------
    ``(ids, polygons)``: the labels present (ascending) and one shapely Polygon / MultiPolygon each.
    """
    import shapely

    labels = np.asarray(labels)
    padded = np.pad(labels, 1)
    w2 = labels.shape[1] + 2
    core = padded[1:-1, 1:-1]
    neighbours = (padded[:-2, 1:-1], padded[1:-1, 2:], padded[2:, 1:-1], padded[1:-1, :-2])  # top right bottom left
    rows, cols, sides = [], [], []
    for side, neighbour in enumerate(neighbours):
        r, c = np.nonzero((core != 0) & (core != neighbour))
        rows.append(r + 1)
        cols.append(c + 1)
        sides.append(np.full(r.size, side, dtype=np.int64))
    row, col, side = (np.concatenate(a).astype(np.int64) for a in (rows, cols, sides))
    key = (row * w2 + col) * 4 + side
    order = np.argsort(key, kind="stable")
    row, col, side, key = row[order], col[order], side[order], key[order]
    label = padded[row, col]
    n = key.size

    # successor of each edge, walking with the cell on the right (image axes: x right, y down): turn round the
    # same pixel where possible (so pixels meeting at a corner stay separate), else go straight, else turn in
    travel = np.array([[0, 1], [1, 0], [0, -1], [-1, 0]])  # (drow, dcol) along the top, right, bottom, left edge
    normal = np.array([[-1, 0], [0, 1], [1, 0], [0, -1]])  # towards the neighbour across each edge
    ahead_r, ahead_c = row + travel[side, 0], col + travel[side, 1]
    diag_r, diag_c = ahead_r + normal[side, 0], ahead_c + normal[side, 1]
    convex = padded[ahead_r, ahead_c] != label
    straight = ~convex & (padded[diag_r, diag_c] != label)
    next_row = np.where(convex, row, np.where(straight, ahead_r, diag_r))
    next_col = np.where(convex, col, np.where(straight, ahead_c, diag_c))
    next_side = np.where(convex, (side + 1) % 4, np.where(straight, side, (side + 3) % 4))
    successor = np.searchsorted(key, (next_row * w2 + next_col) * 4 + next_side)

    # rings: each edge's ring is named by its smallest edge index (pointer doubling), then ranked along it
    ring = np.arange(n)
    jump = successor.copy()
    for _ in range(64):
        updated = np.minimum(ring, ring[jump])
        jump = jump[jump]
        if np.array_equal(updated, ring):
            break
        ring = updated
    last = successor == ring
    dist = (~last).astype(np.int64)
    pointer = np.where(last, np.arange(n), successor)
    while np.any(pointer[pointer] != pointer):
        dist = dist + dist[pointer]
        pointer = pointer[pointer]
    walk = np.lexsort((-dist, ring))
    ring, side, row, col, label = ring[walk], side[walk], row[walk], col[walk], label[walk]
    first = np.flatnonzero(np.r_[True, ring[1:] != ring[:-1]])
    ends = np.r_[first[1:], n] - 1
    previous = np.arange(n) - 1
    previous[first] = ends
    corner = side != side[previous]  # a vertex where the direction changes; straight runs are merged
    # start corner of each edge, in (x, y) of the unpadded mask: top (c, r), right (c+1, r), bottom (c+1, r+1),
    # left (c, r+1)
    x = (col - 1 + (side == 1) + (side == 2))[corner].astype(float)
    y = (row - 1 + (side == 2) + (side == 3))[corner].astype(float)
    ring_of_vertex = np.cumsum(np.r_[True, ring[corner][1:] != ring[corner][:-1]]) - 1
    ring_start = np.flatnonzero(np.r_[True, np.diff(ring_of_vertex) != 0])
    ring_label = label[corner][ring_start]
    nxt = np.arange(x.size) + 1
    ring_end = np.r_[ring_start[1:], x.size] - 1
    nxt[ring_end] = ring_start
    area = np.add.reduceat(x * y[nxt] - x[nxt] * y, ring_start) / 2.0
    rings = shapely.linearrings(np.c_[x, y], indices=ring_of_vertex)

    ids, per_label = np.unique(ring_label, return_counts=True)
    polygons = np.empty(ids.size, dtype=object)
    single = per_label == 1
    by_label = np.searchsorted(ids, ring_label)
    simple_rings = np.isin(by_label, np.flatnonzero(single))
    polygons[by_label[simple_rings]] = shapely.polygons(rings[simple_rings])
    for i in np.flatnonzero(~single):
        mine = np.flatnonzero(by_label == i)
        polygons[i] = _assemble(rings[mine], area[mine])
    invalid = ~shapely.is_valid(polygons)
    if invalid.any():
        polygons[invalid] = [_polygon_part(shapely.make_valid(g)) for g in polygons[invalid]]
    return ids, polygons


def _assemble(rings: np.ndarray, area: np.ndarray) -> Any:
    """One label's rings to a Polygon or MultiPolygon: positive area = outline, negative = hole."""
    import shapely

    shells = shapely.polygons(rings[area > 0])
    shell_area = area[area > 0]
    holes: list[list[Any]] = [[] for _ in shells]
    for hole in rings[area < 0]:
        covering = np.flatnonzero(shapely.covers(shells, hole))
        if covering.size:
            holes[covering[np.argmin(shell_area[covering])]].append(hole)
    parts = [shapely.Polygon(s.exterior, h) for s, h in zip(shells, holes, strict=True)]
    return parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)


# ---------------------------------------------------------------------------------------------- checks


def _check_inside(frame: Any, shape: tuple[int, int], what: str, image_key: str, kind: str) -> None:
    """The cells must lie on the image; a few cut by its border are accepted."""
    import shapely

    height, width = shape
    geometry = frame.geometry.to_numpy()
    minx, miny, maxx, maxy = shapely.total_bounds(geometry)
    if minx >= -0.5 and miny >= -0.5 and maxx <= width + 0.5 and maxy <= height + 0.5:
        return
    centre = shapely.get_coordinates(shapely.centroid(geometry))
    outside = (centre[:, 0] < 0) | (centre[:, 1] < 0) | (centre[:, 0] > width) | (centre[:, 1] > height)
    fix = {
        "vertices": "Check image_um_per_px (the image's microns per pixel) or pass coordinate_system= / affine= for an "
        "image registered to the segmentation",
        "mask": "Check that the mask belongs to this image, or pass mask_um_per_px= / affine=",
    }.get(kind, "Check that the coordinates are in this image's full-resolution pixels (not a downscaled copy "
          "or microns), or pass affine=")
    if outside.mean() > _OUTSIDE_TOLERANCE:
        fail(
            what,
            f"{int(outside.sum())} of {len(outside)} cells lie outside image {image_key!r}: the cells span "
            f"x {minx:.1f} to {maxx:.1f}, y {miny:.1f} to {maxy:.1f} px, the image x 0 to {width}, y 0 to {height}",
            fix,
        )
    logger.warning(
        "%s: %d of %d cells are cut by the border of %r (cells span x %.1f-%.1f, y %.1f-%.1f px; image %d x %d)",
        what, int(outside.sum()), len(outside), image_key, minx, maxx, miny, maxy, width, height,
    )
