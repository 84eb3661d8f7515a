"""Read a dense expression map out over shapes or labels: expected counts per cell, bin or spot."""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

import numpy as np

from .._core.keys import (
    AREA_OBS,
    CELLS_KEY,
    COVERAGE_OBS,
    INSTANCE_KEY,
    REGION_KEY,
    TOTAL_CHANNEL,
    TOTAL_OBS,
    UNS_KEY,
    readout_key,
)
from .._core.keys import (
    dense_key as default_dense_key,
)
from .._core.validate import check_not_exists, fail, require_element

logger = logging.getLogger(__name__)

_POINT, _POLYGON, _MULTIPOLYGON = 0, 3, 6


def aggregate(
    sdata: Any,
    *,
    shapes: str = CELLS_KEY,
    dense_key: str | None = None,
    image_key: str | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
    block_px: int = 2048,
    inplace: bool = True,
    progress: bool = True,
) -> Any:
    """Expected counts of every gene in every shape: the exact integral of the dense map over the shape.

    The map (counts per um^2, piecewise constant on its pixels) is integrated over circles, polygons
    (holes included) or the regions of a labels raster, exactly, block by block, so maps far larger than
    memory work. Overlapping shapes each get their full integral. Normalise after aggregating, by the
    predicted library size: :func:`pixgene.pp.log_normalize` (``log1p(1e4 x / obs["pixgene_total_counts"])``,
    as :func:`pixgene.tl.evaluate` compares with measured data). ``sc.pp.normalize_total`` would divide by the
    sum of the modelled genes, which is not a library size and scores lower.

    Parameters
    ----------
    sdata
        SpatialData with the dense map and the shapes or labels.
    shapes
        Name of a shapes element (circles with a ``radius`` column, or polygons / multipolygons) or of a
        labels element (one region per non-zero label id, each label pixel counted with its exact area).
    dense_key
        Dense map image element. Default: ``dense_key(image_key)`` when ``image_key`` is given, else the
        only image element whose name ends with ``"_pixgene"``.
    image_key
        H&E image the map was predicted from (only used to derive ``dense_key``).
    key_added
        Name of the new table; default :func:`pixgene._core.keys.readout_key` (``f"{shapes}_pixgene"``).
    overwrite
        Replace an existing element or table named ``key_added``.
    block_px
        Side, in map pixels, of the map blocks read at a time (memory ~ block_px^2 x channels).
    inplace
        Store the table in ``sdata.tables[key_added]`` (and write it to the zarr store when ``sdata`` is
        backed by one); otherwise only return it.
    progress
        Show a tqdm progress bar over map (or labels) blocks.

    Returns
    -------
    AnnData annotating ``shapes`` (region ``shapes``, region_key ``"region"``, instance_key
    ``"instance_id"``) with:

    - ``X``: float32 (n, genes) expected counts (the map's gene channels; not the total channel).
    - ``obs["pixgene_total_counts"]``: integral of the total-count channel (only when the map has one).
    - ``obs["pixgene_coverage"]``: fraction of the shape's area that lies on the map.
    - ``obs["pixgene_area_um2"]``: full area of the shape in um^2.
    - ``obs["region"]`` (categorical) and ``obs["instance_id"]``: the shapes' key and index (label ids
      for labels).
    - ``obsm["spatial"]``: centroids in the shapes' own intrinsic coordinates.
    - ``uns["pixgene"]``: ``params`` (every argument), ``dense_key`` and ``dense`` (the map's metadata from
      ``sdata.attrs["pixgene"]["dense"]``).

    Shapes entirely off the map get zero counts and coverage 0; drop them before normalising
    (``adata[adata.obs["pixgene_coverage"] > 0]``), as scanpy warns about cells with zero counts.
    """
    from .._core.coords import affine_between
    from .._core.raster import full_resolution

    is_labels = shapes in sdata.labels
    if not is_labels and shapes not in sdata.shapes:
        have = ", ".join(map(repr, sorted([*sdata.shapes, *sdata.labels]))) or "none"
        fail(
            f"shapes {shapes!r}",
            f"not found among the shapes or labels elements (they are: {have})",
            "Pass shapes=<name of a shapes or labels element>",
        )
    dense_key = _resolve_dense_key(sdata, dense_key, image_key)
    dense = full_resolution(require_element(sdata, dense_key, "images"))
    if tuple(dense.dims) != ("c", "y", "x"):
        fail(f"image {dense_key!r}", f"has dims {tuple(dense.dims)}, not ('c', 'y', 'x')", "Pass a dense map")
    if int(block_px) < 1:
        fail("aggregate", f"block_px={block_px!r} is not a positive integer", "Pass block_px >= 1")
    key_added = readout_key(shapes) if key_added is None else key_added
    if inplace:
        check_not_exists(sdata, key_added, overwrite)
    um_per_px = _map_um_per_px(sdata, dense_key, image_key)
    channels = [str(c) for c in dense.coords["c"].values]
    if not any(c != TOTAL_CHANNEL for c in channels):
        fail(f"image {dense_key!r}", "has no gene channels", "Pass a dense map with gene names as channels")
    affine = affine_between(sdata, shapes, dense_key)
    if is_labels:
        labels = _checked_labels(sdata, shapes)
    else:
        mapped, radii, centroids = _shapes_in_map_pixels(sdata, shapes, affine)

    params = {
        "shapes": shapes,
        "dense_key": dense_key,
        "image_key": image_key,
        "key_added": key_added,
        "overwrite": bool(overwrite),
        "block_px": int(block_px),
        "inplace": bool(inplace),
        "progress": bool(progress),
    }
    if is_labels:
        from ..data._operator import integrate_labels

        result = integrate_labels(
            dense.data, labels.data, affine, um_per_px=um_per_px, block_px=int(block_px), progress=progress
        )
        if len(result.label_ids) == 0:
            fail(f"labels {shapes!r}", "contain no non-zero label", "Pass labels with segmented regions")
        instance_ids, centroids = result.label_ids, result.centroids
    else:
        from ..data._operator import integrate_map

        result = integrate_map(
            dense.data, mapped, um_per_px=um_per_px, radii=radii, block_px=int(block_px), progress=progress
        )
        instance_ids = sdata.shapes[shapes].index.to_numpy()
    adata = _build_table(sdata, shapes, dense_key, channels, instance_ids, result, centroids, params)
    if inplace:
        sdata.tables[key_added] = adata
        if sdata.is_backed():
            with warnings.catch_warnings():
                # anndata's notice about a future zarr default; nothing a user of pixgene can act on
                warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)
                sdata.write_element(key_added, overwrite=overwrite)
    logger.info("read %r out over %d %s into table %r", dense_key, adata.n_obs, shapes, key_added)
    return adata


def _resolve_dense_key(sdata: Any, dense_key: str | None, image_key: str | None) -> str:
    if dense_key is not None:
        require_element(sdata, dense_key, "images")
        return dense_key
    if image_key is not None:
        key = default_dense_key(image_key)
        if key not in sdata.images:
            fail(
                f"image {key!r}",
                f"not found: no dense map was made from image {image_key!r}",
                "Run pg.tl.predict_dense first, or pass dense_key=... explicitly",
            )
        return key
    candidates = [k for k in sdata.images if str(k).endswith(default_dense_key(""))]
    if len(candidates) != 1:
        found = ", ".join(map(repr, candidates)) if candidates else "none"
        fail(
            "aggregate",
            f"cannot tell which dense map to read: image elements ending with '_pixgene' are {found}",
            "Pass dense_key=... (or image_key=... of the H&E the map was predicted from)",
        )
    return candidates[0]


def _map_um_per_px(sdata: Any, dense_key: str, image_key: str | None) -> float:
    """Microns per map pixel: recorded for the map, else the H&E's, carried through the transformation."""
    from .._core.coords import affine_between, isotropic_scale
    from .._core.units import recorded_um_per_px, validate_um_per_px

    recorded = recorded_um_per_px(sdata, dense_key)
    if recorded is not None:
        return validate_um_per_px(recorded, dense_key)
    meta = (getattr(sdata, "attrs", None) or {}).get(UNS_KEY, {}).get("dense", {}).get(dense_key, {})
    source = image_key or meta.get("image_key")
    source_um = recorded_um_per_px(sdata, source) if source is not None and source in sdata.images else None
    if source_um is None:
        fail(
            f"image {dense_key!r}",
            "its microns per pixel are not recorded (sdata.attrs['pixgene']['um_per_px'])",
            "Make the map with pg.tl.predict_dense, or record the value with "
            "pixgene._core.units.record_um_per_px(sdata, dense_key, um_per_px)",
        )
    scale = isotropic_scale(affine_between(sdata, dense_key, source), f"image {dense_key!r}")
    return validate_um_per_px(source_um * scale, dense_key)


def _shapes_in_map_pixels(sdata: Any, shapes_key: str, affine: np.ndarray):
    """Validated shapes carried into map pixels: (geometries, radii or None, centroids in own coordinates)."""
    import shapely

    from .._core.coords import apply_affine, isotropic_scale

    frame = sdata.shapes[shapes_key]
    where = f"shapes {shapes_key!r}"
    if len(frame) == 0:
        fail(where, "is empty", "Pass a shapes element with at least one shape")
    geoms = np.asarray(frame.geometry, dtype=object)
    if any(g is None for g in geoms) or shapely.is_empty(geoms).any():
        fail(where, "contains missing or empty geometries", "Drop or repair them first")
    types = shapely.get_type_id(geoms)
    unsupported = ~np.isin(types, (_POINT, _POLYGON, _MULTIPOLYGON))
    if unsupported.any():
        kinds = sorted({g.geom_type for g in geoms[unsupported]})
        fail(where, f"contains {kinds} geometries", "Use circles (points with a radius) or polygons")
    is_point = types == _POINT
    radii = None
    if is_point.any():
        if "radius" not in frame.columns:
            fail(where, "are points without a 'radius' column", "Parse them as circles with a radius")
        radii = frame["radius"].to_numpy(dtype=float) * isotropic_scale(affine, where)
        if not np.all(np.isfinite(radii[is_point]) & (radii[is_point] > 0)):
            fail(where, "has circles with a missing or non-positive radius", "Fix the radius column")
    # circle centres and polygon vertices are carried into map pixels by the same affine
    mapped = shapely.transform(geoms, lambda xy: apply_affine(affine, xy))
    return mapped, radii, shapely.get_coordinates(shapely.centroid(geoms))


def _checked_labels(sdata: Any, labels_key: str) -> Any:
    from .._core.raster import full_resolution

    labels = full_resolution(sdata.labels[labels_key])
    if tuple(labels.dims) != ("y", "x"):
        fail(f"labels {labels_key!r}", f"has dims {tuple(labels.dims)}, not ('y', 'x')", "Pass 2-D labels")
    if not np.issubdtype(labels.dtype, np.integer):
        fail(f"labels {labels_key!r}", f"has dtype {labels.dtype}, not integer", "Pass integer label ids")
    return labels


def _build_table(sdata, region, dense_key, channels, instance_ids, result, centroids, params):
    import anndata as ad
    import pandas as pd
    from spatialdata.models import TableModel

    genes = [c for c in channels if c != TOTAL_CHANNEL]
    values, covered, area = result.values, result.covered_um2, result.area_um2
    names = pd.Index([str(i) for i in instance_ids], dtype=str)
    obs = pd.DataFrame(index=names)
    if TOTAL_CHANNEL in channels:
        obs[TOTAL_OBS] = values[:, channels.index(TOTAL_CHANNEL)]
    obs[COVERAGE_OBS] = np.where(area > 0, covered / np.where(area > 0, area, 1.0), 0.0)
    obs[AREA_OBS] = area
    obs[REGION_KEY] = pd.Categorical([region] * len(names), categories=[region])
    obs[INSTANCE_KEY] = instance_ids
    adata = ad.AnnData(
        X=np.ascontiguousarray(values[:, [channels.index(g) for g in genes]], dtype=np.float32),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(genes, dtype=str)),
    )
    adata.obsm["spatial"] = np.asarray(centroids, dtype=np.float64)
    dense_meta = (getattr(sdata, "attrs", None) or {}).get(UNS_KEY, {}).get("dense", {}).get(dense_key, {})
    adata.uns[UNS_KEY] = {
        "params": dict(params),
        "dense_key": dense_key,
        "dense": copy.deepcopy(dict(dense_meta)),
    }
    return TableModel.parse(adata, region=region, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
