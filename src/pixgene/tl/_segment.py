"""Cells from the H&E image alone: nuclei by colour deconvolution and a watershed, grown into cells."""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import numpy as np

from .._core.docs import doc_params
from .._core.keys import CELLS_KEY, IMAGE_KEY, UNS_KEY
from .._core.validate import check_not_exists, check_positive, fail, require_element
from ..data import expand_cells, hematoxylin, label_polygons, nuclei_threshold, nucleus_mask, split_nuclei

logger = logging.getLogger(__name__)

#: at most this many pixels are sampled (on a regular grid) for the slide's nucleus threshold
_THRESHOLD_SAMPLES = 2_000_000
#: smoothing of the hematoxylin density before thresholding, microns (about JPEG and scanner noise)
_SMOOTH_UM = 0.5
#: a nucleus diameter in pixels below this cannot be outlined (the image is too coarse for nuclei)
_MIN_NUCLEUS_PX = 4.0


@doc_params
def segment_cells(
    sdata: Any,
    *,
    image_key: str = IMAGE_KEY,
    key_added: str = CELLS_KEY,
    nucleus_diameter_um: float = 8.0,
    expand_um: float = 5.0,
    tile_um: float = 512.0,
    tissue_only: bool = True,
    image_um_per_px: float | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Any:
    """Segment nuclei in an H&E image and grow them into cells, with no model and nothing to download.

    A classical pipeline, for slides that come without a cell segmentation: the hematoxylin density of every
    pixel (colour deconvolution, ``skimage.color.rgb2hed``), lightly smoothed, above one threshold for the
    whole slide (Otsu's on a grid sample of its tissue pixels, never below a floor that keeps nuclei-free
    tissue from being cut at noise) or, for pale nuclei next to dark ones, above its neighbourhood by a share
    of that threshold; holes up to a nucleus filled, specks removed; touching nuclei split by a watershed of the
    distance transform from peaks at least ``0.4 x nucleus_diameter_um`` apart; every nucleus then grown by
    ``expand_um`` into its cell without overlaps (each pixel to the nearest nucleus, as Xenium Ranger and sopa
    expand nuclei). See :mod:`pixgene.data._segment` for the building blocks.

    A trained segmenter is better where one is available: Cellpose, StarDist or sopa (which runs either over
    whole slides) separate crowded and pale nuclei that a threshold and a distance transform merge or miss.
    Bring such a segmentation in with ``pg.io.read_cells(sdata, path)`` instead; this function is for when
    there is none. Either way, ``pg.tl.aggregate(sdata, shapes=key_added)`` reads a dense map out per cell.

    The slide is processed in square tiles of ``tile_um``, each read (through the image's dask array, never
    the whole slide) with a halo of ``4 x nucleus_diameter_um + 2 x expand_um`` around it; a cell belongs to
    the tile that holds its nucleus's centroid, so no cell is duplicated or cut at a tile border.

    Parameters
    ----------
    sdata
        SpatialData holding the H&E image.
    image_key
        RGB (c, y, x) image element, single-scale or multiscale (the full resolution is segmented).
    key_added
        Name of the new shapes element.
    nucleus_diameter_um
        Typical nucleus diameter, microns (default 8: H&E nuclei are 5-12 um). It sets the smallest nucleus
        kept (a disc of a quarter of the diameter, i.e. 12.6 um^2 by default), the largest hole filled (a
        disc of the diameter), the minimum distance between the centres of two touching nuclei
        (0.4 x diameter) and the neighbourhood of the local-contrast rule (a Gaussian of one diameter).
    expand_um
        How far each nucleus is grown into its cell, microns (default 5, Xenium Ranger's default; 0 gives
        nuclei). Neighbouring cells meet halfway between their nuclei.
    tile_um
        Side of the square tiles, microns (default 512; memory grows with its square).
    tissue_only
        Skip tiles without tissue and drop nuclei off the tissue (:func:`pixgene.data._mask.tissue_mask`).
        The slide's threshold is always taken over tissue.
    {image_um_per_px}
    {progress}
    {overwrite}

    Returns
    -------
    GeoDataFrame stored as ``sdata.shapes[key_added]``: one polygon per cell in the image's pixel space,
    with the image's transformations, index ``cell_0``, ``cell_1``, ... (ordered by the centroid's row, then
    column), columns ``nucleus_area_um2`` (the nucleus's pixels x their area) and ``cell_area_um2`` (the
    polygon's area x um_per_px^2). The parameters and the threshold are recorded in
    ``sdata.attrs["pixgene"]["segment_cells"][key_added]``.
    """
    import geopandas as gpd
    import pandas as pd
    import shapely
    from spatialdata.models import ShapesModel
    from tqdm.auto import tqdm

    from .._core.coords import transformations_of
    from .._core.raster import rgb_array
    from .._core.units import resolve_um_per_px
    from ..data import tissue_mask

    where = "pg.tl.segment_cells"
    element = require_element(sdata, image_key, "images")
    array = rgb_array(element, image_key)
    check_not_exists(sdata, key_added, overwrite)
    for name, value in (("nucleus_diameter_um", nucleus_diameter_um), ("tile_um", tile_um)):
        check_positive(value, name, where)
        if value is None:
            fail(where, f"{name} is None", f"Pass a positive {name}")
    if expand_um != 0:
        check_positive(expand_um, "expand_um", where, "Pass expand_um=5.0 (Xenium's default) or 0 for nuclei only")
    if expand_um is None:
        fail(where, "expand_um is None", "Pass expand_um=5.0 (Xenium's default) or 0 for nuclei only")
    if not 2.0 <= nucleus_diameter_um <= 50.0:
        fail(where, f"nucleus_diameter_um={nucleus_diameter_um!r} is not a nucleus size (2-50 um)",
             "Pass the typical nucleus diameter in microns, e.g. 8.0 for H&E")
    if tile_um < 4 * nucleus_diameter_um:
        fail(where, f"tile_um={tile_um!r} is smaller than four nuclei ({4 * nucleus_diameter_um:g} um)",
             "Pass tile_um of a few hundred microns, e.g. 512.0")
    um = resolve_um_per_px(sdata, image_key, um_per_px=image_um_per_px)
    if nucleus_diameter_um / um < _MIN_NUCLEUS_PX:
        fail(f"image {image_key!r}",
             f"at {um:.3g} um per pixel a {nucleus_diameter_um:g} um nucleus is {nucleus_diameter_um / um:.1f} "
             f"pixels across, too coarse to outline nuclei (at least {_MIN_NUCLEUS_PX:g} are needed)",
             "Segment a full-resolution H&E (0.25-1 um per pixel) or bring cells in with pg.io.read_cells")

    started = time.perf_counter()
    H, W = int(array.sizes["y"]), int(array.sizes["x"])
    data = array.data
    mask, factor = tissue_mask(sdata, image_key, image_um_per_px=um)
    threshold = _slide_threshold(data, mask, factor)
    params = _pixel_params(nucleus_diameter_um, expand_um, um)
    tile_px = max(1, round(tile_um / um))
    halo = int(np.ceil((4 * nucleus_diameter_um + 2 * expand_um) / um))
    tiles = [(y0, x0) for y0 in range(0, H, tile_px) for x0 in range(0, W, tile_px)]
    if tissue_only:
        from ..data import mask_fraction_in_region

        tiles = [(y0, x0) for y0, x0 in tiles
                 if mask_fraction_in_region(mask, factor, x0, y0, min(x0 + tile_px, W), min(y0 + tile_px, H)) > 0]
    logger.info("segmenting %r (%d x %d px, %.3g um/px) in %d tiles of %d px + %d px halo; threshold %.4f",
                image_key, W, H, um, len(tiles), tile_px, halo, threshold)

    polygons, nucleus_px, centroids = [], [], []
    for y0, x0 in tqdm(tiles, desc="segmenting cells", unit="tile", disable=not progress):
        y1, x1 = min(y0 + tile_px, H), min(x0 + tile_px, W)
        ry0, rx0, ry1, rx1 = max(y0 - halo, 0), max(x0 - halo, 0), min(y1 + halo, H), min(x1 + halo, W)
        block = data[:, ry0:ry1, rx0:rx1]
        block = np.asarray(block.compute() if hasattr(block, "compute") else block)
        tile = _segment_tile(block, threshold, params)
        if tile is None:
            continue
        nuclei, cells = tile
        ids, cy, cx, area = _nucleus_stats(nuclei)
        gy, gx = cy + ry0 + 0.5, cx + rx0 + 0.5  # centroid of the pixel centres, image pixel coordinates
        keep = (gy >= y0) & (gy < y1) & (gx >= x0) & (gx < x1)
        if tissue_only:
            rows = np.clip((gy / factor).astype(np.int64), 0, mask.shape[0] - 1)
            cols = np.clip((gx / factor).astype(np.int64), 0, mask.shape[1] - 1)
            keep &= mask[rows, cols]
        if not keep.any():
            continue
        outlines = label_polygons(cells, ids[keep])
        for lab, py, px, a in zip(ids[keep], gy[keep], gx[keep], area[keep], strict=True):
            polygon = outlines.get(int(lab))
            if polygon is None:
                continue
            polygons.append(shapely.transform(polygon, lambda c, dx=rx0, dy=ry0: c + [dx, dy]))
            nucleus_px.append(a)
            centroids.append((py, px))
    if not polygons:
        fail(f"image {image_key!r}", f"no nuclei were found (hematoxylin threshold {threshold:.3g})",
             "Check that the image is an H&E stain at its recorded microns per pixel, try tissue_only=False, "
             "or bring cells in with pg.io.read_cells")
    centroids = np.asarray(centroids)
    order = np.lexsort((centroids[:, 1], centroids[:, 0]))  # by row, then column
    geometry = np.asarray(polygons, dtype=object)[order]
    nucleus_um2 = np.asarray(nucleus_px, dtype=np.float64)[order] * um**2
    shapes = gpd.GeoDataFrame(
        {"nucleus_area_um2": nucleus_um2, "cell_area_um2": shapely.area(geometry) * um**2},
        geometry=list(geometry),
        index=pd.Index([f"cell_{i}" for i in range(len(order))]),
    )
    shapes = ShapesModel.parse(shapes, transformations=transformations_of(element))
    sdata.shapes[key_added] = shapes
    _record(sdata, key_added, image_key=image_key, nucleus_diameter_um=nucleus_diameter_um,
            expand_um=expand_um, tile_um=tile_um, tissue_only=tissue_only, um_per_px=um, threshold=threshold)
    if sdata.is_backed():
        # spatialdata refuses to overwrite an element inside its own store: the old cells go first (they are
        # recreated from the image, so nothing is lost if the write is interrupted)
        if any(path.split("/")[-1] == key_added for path in sdata.elements_paths_on_disk()):
            sdata.delete_element_from_disk(key_added)
        with warnings.catch_warnings():
            # anndata's and zarr's notice about a future default; nothing a user of pixgene can act on
            warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)
            sdata.write_element(key_added)
    logger.info("segmented %d cells in %r into shapes %r in %.1f s (median cell %.0f um^2, nucleus %.0f um^2)",
                len(shapes), image_key, key_added, time.perf_counter() - started,
                float(np.median(shapes["cell_area_um2"])), float(np.median(shapes["nucleus_area_um2"])))
    return shapes


def _pixel_params(nucleus_diameter_um: float, expand_um: float, um: float) -> dict:
    d = nucleus_diameter_um / um
    return {
        "sigma_px": _SMOOTH_UM / um,
        "min_area_px": np.pi * (d / 4) ** 2,
        "max_hole_px": np.pi * (d / 2) ** 2,
        "background_sigma_px": d,
        "min_distance_px": 0.4 * d,
        "expand_px": expand_um / um,
    }


def _segment_tile(block: np.ndarray, threshold: float, params: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(3, h, w) image block -> (nucleus labels, cell labels), or None when it holds no nucleus."""
    from .._core.raster import to_float01

    density = hematoxylin(np.moveaxis(to_float01(block), 0, -1))
    mask = nucleus_mask(density, threshold, sigma_px=params["sigma_px"], min_area_px=params["min_area_px"],
                            max_hole_px=params["max_hole_px"], background_sigma_px=params["background_sigma_px"])
    if not mask.any():
        return None
    nuclei = split_nuclei(mask, min_distance_px=params["min_distance_px"])
    return nuclei, expand_cells(nuclei, params["expand_px"])


def _nucleus_stats(nuclei: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Label ids, centroid row and column (pixel indices) and pixel count of every nucleus."""
    n = int(nuclei.max())
    flat = nuclei.ravel()
    count = np.bincount(flat, minlength=n + 1).astype(np.float64)
    rows, cols = np.indices(nuclei.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.bincount(flat, weights=rows.ravel(), minlength=n + 1) / count
        cx = np.bincount(flat, weights=cols.ravel(), minlength=n + 1) / count
    ids = np.flatnonzero(count[1:] > 0) + 1
    return ids, cy[ids], cx[ids], count[ids]


def _slide_threshold(data: Any, mask: np.ndarray, factor: float) -> float:
    """Otsu's threshold of the hematoxylin density of pixels on a regular grid over the tissue."""
    from .._core.raster import to_float01

    _, H, W = data.shape
    stride = max(1, int(np.ceil(np.sqrt(H * W / _THRESHOLD_SAMPLES))))
    sample = data[:, stride // 2 :: stride, stride // 2 :: stride]
    sample = np.asarray(sample.compute() if hasattr(sample, "compute") else sample)
    density = hematoxylin(np.moveaxis(to_float01(sample), 0, -1))
    ys = (np.arange(stride // 2, H, stride) + 0.5) / factor
    xs = (np.arange(stride // 2, W, stride) + 0.5) / factor
    on = mask[np.clip(ys.astype(np.int64), 0, mask.shape[0] - 1)][:, np.clip(xs.astype(np.int64), 0,
                                                                               mask.shape[1] - 1)]
    values = density[on] if on.any() else density.ravel()
    return nuclei_threshold(values)


def _record(sdata: Any, key_added: str, **params) -> None:
    record = dict(sdata.attrs.get(UNS_KEY, {}))
    runs = dict(record.get("segment_cells", {}))
    runs[key_added] = {k: (float(v) if isinstance(v, float | np.floating) else v) for k, v in params.items()}
    record["segment_cells"] = runs
    sdata.attrs[UNS_KEY] = record
