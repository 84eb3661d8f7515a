"""Visium-HD-like square or hexagonal bins over an image, as a polygons shapes element."""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np

from .._core.docs import doc_params
from .._core.keys import IMAGE_KEY, UNS_KEY, grid_key
from .._core.validate import check_not_exists, check_positive, fail, require_element

logger = logging.getLogger(__name__)

_SHAPES = ("square", "hex")


@doc_params
def make_grid(
    sdata: Any,
    *,
    image_key: str = IMAGE_KEY,
    bin_um: float = 8.0,
    shape: Literal["square", "hex"] = "square",
    within: str | None = "tissue",
    key_added: str | None = None,
    overwrite: bool = False,
) -> Any:
    """Tile an image with square or hexagonal bins of ``bin_um`` microns, as a polygons shapes element.

    Square bins start at the image's top-left corner, so grids whose bin sizes differ by a power of two
    nest exactly (a 2 x 2 block of 4 um bins is one 8 um bin, to the last bit). Hexagons are pointy-topped
    with centre-to-centre distance ``bin_um`` along a row (flat-to-flat width ``bin_um``, area
    sqrt(3) / 2 * bin_um^2); odd rows are shifted right by half a bin.

    Parameters
    ----------
    sdata
        SpatialData with the image; its microns per pixel must be recorded or derivable.
    image_key
        Image element the bins are laid over; the bins live in its pixel space and get its transformations.
    bin_um
        Bin size in microns (side of a square; centre-to-centre distance of hexagons).
    shape
        ``"square"`` or ``"hex"``.
    within
        ``"tissue"``: keep bins whose centre lies in the tissue mask (:func:`pixgene.data._mask.tissue_mask`);
        ``None``: keep every bin that touches the image; the name of a shapes element: keep bins whose centre
        lies inside one of its shapes (circles or polygons).
    key_added
        Name of the new shapes element; default :func:`pixgene._core.keys.grid_key` (``"bins_8um"``,
        ``"hexbins_8um"``).
    {overwrite}

    Returns
    -------
    The shapes element (GeoDataFrame), also stored as ``sdata.shapes[key_added]`` (and written to the zarr
    store when ``sdata`` is backed by one). Index ``"bin_{row}_{col}"``; columns ``array_row``,
    ``array_col`` (grid indices) and ``geometry`` (polygons in image pixels). The parameters are recorded
    in ``sdata.attrs["pixgene"]["grids"][key_added]``.
    """
    import geopandas as gpd
    import pandas as pd
    from spatialdata.models import ShapesModel

    from .._core.coords import transformations_of
    from .._core.raster import full_resolution
    from .._core.units import resolve_um_per_px

    element = require_element(sdata, image_key, "images")
    check_positive(bin_um, "bin_um", "make_grid")
    if shape not in _SHAPES:
        fail("make_grid", f"shape={shape!r} is not one of {_SHAPES}", "Pass shape='square' or shape='hex'")
    if within is not None and within != "tissue":
        require_element(sdata, within, "shapes")
    key_added = grid_key(bin_um, shape) if key_added is None else key_added
    check_not_exists(sdata, key_added, overwrite)
    um_per_px = resolve_um_per_px(sdata, image_key)
    array = full_resolution(element)
    height, width = int(array.sizes["y"]), int(array.sizes["x"])
    bin_px = float(bin_um) / um_per_px
    if bin_px < 0.5:
        fail(
            "make_grid",
            f"bin_um={bin_um} is {bin_px:.3g} image pixels, finer than the image resolves",
            f"Pass bin_um >= {um_per_px:.3g} (one pixel)",
        )

    if shape == "square":
        rows, cols, centers, polygons = _square_bins(height, width, bin_px)
    else:
        rows, cols, centers, polygons = _hex_bins(height, width, bin_px)
    keep = _bins_within(sdata, within, image_key, centers)
    if not keep.any():
        fail(
            "make_grid",
            f"no bin centre lies within {within!r}",
            "Check the tissue mask / the shapes' placement over the image, or pass within=None",
        )
    rows, cols, polygons = rows[keep], cols[keep], polygons[keep]
    names = pd.Index([f"bin_{r}_{c}" for r, c in zip(rows.tolist(), cols.tolist(), strict=True)])
    frame = gpd.GeoDataFrame(
        {"array_row": rows.astype(np.int64), "array_col": cols.astype(np.int64)},
        geometry=gpd.GeoSeries(polygons, index=names),
        index=names,
    )
    bins = ShapesModel.parse(frame, transformations=transformations_of(element))
    sdata.shapes[key_added] = bins
    record = dict(sdata.attrs.get(UNS_KEY, {}))
    grids = dict(record.get("grids", {}))
    grids[key_added] = {
        "image_key": image_key,
        "bin_um": float(bin_um),
        "bin_px": bin_px,
        "shape": shape,
        "within": within,
        "n_bins": int(len(bins)),
    }
    record["grids"] = grids
    sdata.attrs[UNS_KEY] = record
    if sdata.is_backed():
        sdata.write_element(key_added, overwrite=overwrite)
    logger.info(
        "made %d %s bins of %g um (%.3g px) over %r as %r",
        len(bins), shape, bin_um, bin_px, image_key, key_added,
    )
    return bins


def _square_bins(height: int, width: int, bin_px: float):
    import shapely

    n_rows, n_cols = int(np.ceil(height / bin_px)), int(np.ceil(width / bin_px))
    # every edge is computed once, as index * bin_px, so neighbouring bins share it bit for bit
    y_edges = np.arange(n_rows + 1) * bin_px
    x_edges = np.arange(n_cols + 1) * bin_px
    rows, cols = np.divmod(np.arange(n_rows * n_cols), n_cols)
    polygons = shapely.box(x_edges[cols], y_edges[rows], x_edges[cols + 1], y_edges[rows + 1])
    centers = np.c_[(x_edges[cols] + x_edges[cols + 1]) / 2, (y_edges[rows] + y_edges[rows + 1]) / 2]
    return rows, cols, centers, polygons


def _hex_bins(height: int, width: int, pitch: float):
    import shapely

    circumradius = pitch / np.sqrt(3.0)
    row_step = 1.5 * circumradius
    n_rows = int(np.ceil((height + circumradius) / row_step)) + 1
    n_cols = int(np.ceil(width / pitch)) + 1
    rows, cols = np.divmod(np.arange(n_rows * n_cols), n_cols)
    cx = (cols + 0.5 * (rows % 2)) * pitch
    cy = rows * row_step
    # pointy-topped: vertices straight above and below the centre, and at +-30 degrees on the sides
    dx = np.array([0.0, 0.5, 0.5, 0.0, -0.5, -0.5, 0.0]) * pitch
    dy = np.array([-1.0, -0.5, 0.5, 1.0, 0.5, -0.5, -1.0]) * circumradius
    # keep hexagons whose bounding box overlaps the image
    inside = (np.abs(cx - width / 2) < width / 2 + 0.5 * pitch) & (
        np.abs(cy - height / 2) < height / 2 + circumradius
    )
    rows, cols, cx, cy = rows[inside], cols[inside], cx[inside], cy[inside]
    rings = np.stack([cx[:, None] + dx[None], cy[:, None] + dy[None]], axis=-1)
    polygons = shapely.polygons(rings)
    return rows, cols, np.c_[cx, cy], polygons


def _bins_within(sdata: Any, within: str | None, image_key: str, centers: np.ndarray) -> np.ndarray:
    """Boolean mask of the bin centres (image pixels) that lie in the tissue or in the given shapes."""
    if within is None:
        return np.ones(len(centers), dtype=bool)
    if within == "tissue":
        from ..data import tissue_mask

        mask, factor = tissue_mask(sdata, image_key)
        i = np.floor(centers[:, 1] / factor).astype(np.int64)
        j = np.floor(centers[:, 0] / factor).astype(np.int64)
        ok = (i >= 0) & (i < mask.shape[0]) & (j >= 0) & (j < mask.shape[1])
        keep = np.zeros(len(centers), dtype=bool)
        keep[ok] = mask[i[ok], j[ok]]
        return keep
    return _centers_in_shapes(sdata, within, image_key, centers)


def _centers_in_shapes(sdata: Any, shapes_key: str, image_key: str, centers: np.ndarray) -> np.ndarray:
    import shapely
    from scipy.spatial import cKDTree

    from .._core.coords import affine_between, apply_affine

    shapes = sdata.shapes[shapes_key]
    # test containment in the shapes' own frame, which is exact for any affine map (circles stay circles)
    to_shapes = np.linalg.inv(affine_between(sdata, shapes_key, image_key))
    points = apply_affine(to_shapes, centers)
    keep = np.zeros(len(centers), dtype=bool)
    geoms = np.asarray(shapes.geometry, dtype=object)
    types = shapely.get_type_id(geoms)
    is_point = types == 0
    if is_point.any():
        if "radius" not in shapes.columns:
            fail(f"shapes {shapes_key!r}", "are points without a 'radius' column", "Parse them with a radius")
        xy = shapely.get_coordinates(geoms[is_point])
        radius = shapes["radius"].to_numpy(dtype=float)[is_point]
        hits = cKDTree(points).query_ball_point(xy, radius)
        for hit in hits:
            keep[np.asarray(hit, dtype=np.int64)] = True
    if (~is_point).any():
        tree = shapely.STRtree(geoms[~is_point])
        hit, _ = tree.query(shapely.points(points), predicate="within")
        keep[hit] = True
    return keep
