"""Reader for 10x Genomics Visium HD Space Ranger output folders, through spatialdata-io."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from .._core.keys import CELLS_KEY, IMAGE_KEY, INSTANCE_KEY, REGION_KEY, UNS_KEY
from .._core.units import record_um_per_px, validate_um_per_px
from .._core.validate import check_raw_counts, fail
from ._st import check_spots_in_image

logger = logging.getLogger(__name__)

__all__ = ["hd_bins_key", "read_visium_hd"]

_IMAGE_CHOICES = ("auto", "fullres", "hires", "lowres")
_FEATURE_SLICE = "feature_slice.h5"
_POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
_SEGMENTED = "segmented_outputs"
_CELL_GEOJSON = "cell_segmentations.geojson"
_CELL_COUNTS = "filtered_feature_cell_matrix.h5"
#: a bin size's folder in binned_outputs
_BIN_DIR = re.compile(r"^square_(\d{3})um$")


def hd_bins_key(bin_size_um: int) -> str:
    """Name of the shapes element of one Visium HD bin size (``8`` -> ``"bins_008um"``); its table is
    ``f"{hd_bins_key(bin_size_um)}_table"``."""
    return f"bins_{int(bin_size_um):03d}um"


def read_visium_hd(
    path: str | Path,
    *,
    bin_sizes: Sequence[int] = (2, 8, 16),
    image: Literal["auto", "fullres", "hires", "lowres"] = "auto",
    fullres_image_file: str | Path | None = None,
    dataset_id: str | None = None,
    filtered_counts: bool = True,
    cells: bool = True,
    image_key: str = IMAGE_KEY,
    cells_key: str = CELLS_KEY,
    cells_table_key: str | None = None,
) -> Any:
    """Read a Visium HD Space Ranger output folder into the pixgene data model.

    The folder is read by :func:`spatialdata_io.visium_hd` (bins as squares); the chosen H&E image, every
    requested bin size and Space Ranger 4's cell segmentation are then brought into that image's pixels.
    Every input is checked before anything is read.

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder: ``feature_slice.h5`` (or ``{dataset_id}_feature_slice.h5``),
        ``binned_outputs/square_{NNN}um/`` with ``filtered_feature_bc_matrix.h5`` and
        ``spatial/{tissue_positions.parquet, scalefactors_json.json}``, the ``tissue_hires_image.png`` /
        ``tissue_lowres_image.png`` images and, from Space Ranger 4 on, ``segmented_outputs/``.
    bin_sizes
        Bin sizes in microns to read; each must be in ``binned_outputs``. Every 2 um bin becomes a polygon
        (millions on a full slide): pass ``(8, 16)`` to leave them out.
    image
        Which H&E image becomes ``image_key``: ``"auto"`` takes the full-resolution image (the ``--image``
        given to Space Ranger: ``fullres_image_file``, else the single file in ``microscope_image/`` or
        ``{dataset_id}_tissue_image.*``), else ``tissue_hires_image.png``, else ``tissue_lowres_image.png``.
    fullres_image_file
        The full-resolution image given to Space Ranger (absolute, or relative to ``path``).
    dataset_id
        Name of the slide, used for spatialdata-io's coordinate systems. Default: the prefix of a prefixed
        ``{prefix}_feature_slice.h5`` (which it must then equal), else the folder's name.
    filtered_counts
        Read ``filtered_feature_bc_matrix.h5`` (in-tissue bins; default) rather than ``raw_feature_bc_matrix.h5``.
    cells
        Also read the cell segmentation of Space Ranger 4 (``segmented_outputs/cell_segmentations.geojson``,
        with ``filtered_feature_cell_matrix.h5`` as its counts) when the folder has it.
    image_key, cells_key
        Names of the image and of the cells' shapes element.
    cells_table_key
        Name of the cells' table (default ``f"{cells_key}_table"``).

    Returns
    -------
    :class:`spatialdata.SpatialData` with

    - ``images[image_key]``: the chosen RGB image (c, y, x), multiscale when larger than 4096 px on a side, with
      spatialdata-io's transformations (``{dataset_id}``: full-resolution pixels; ``{dataset_id}_downscaled_hires``
      / ``_lowres``: the hires / lowres image's pixels) plus ``global`` = the full-resolution pixel space.
    - ``shapes[hd_bins_key(b)]`` (``"bins_002um"``, ``"bins_008um"``, ``"bins_016um"``) for every bin size
      ``b``: the bins as axis-aligned squares (spatialdata-io's ``bins_as_squares``) in the chosen image's
      pixels, index = barcode, with the image's transformations.
    - ``tables[f"{hd_bins_key(b)}_table"]``: raw counts (float32 CSR) linked to those bins (``obs["region"]``,
      ``obs["instance_id"]`` = barcode); ``obs``: ``in_tissue``, ``array_row``, ``array_col``, ``location_id``;
      ``var``: ``gene_ids``, ``feature_types``, ``genome``; ``obsm["spatial"]`` = bin centres in the chosen
      image's pixels, ``obsm["spatial_fullres"]`` in full-resolution pixels; ``uns["pixgene"]``: platform
      ``"visium_hd"``, bin_size_um, image_key, library_id (= dataset_id), image (resolution chosen),
      scalefactors (that bin size's), source folder.
    - ``shapes[cells_key]`` and ``tables[cells_table_key]`` (when ``cells`` and the folder has a cell
      segmentation): the cells' polygons in the chosen image's pixels, index = cell id
      (``cellid_000000001-1``); the table, in the same form as the bins' (platform ``"visium_hd_cells"``),
      exists when ``filtered_feature_cell_matrix.h5`` does.
    - ``attrs["pixgene"]["um_per_px"][image_key]`` = ``microns_per_pixel`` of the scale factors (full-resolution
      pixels; or ``bin_size_um / spot_diameter_fullres`` where it is missing) divided by the chosen image's
      scale factor; spatialdata-io's provenance attributes.

    Train on a bin size with ``pg.tl.fit(sdata, shapes_key="bins_008um", table_key="bins_008um_table", ...)``.
    """
    path = Path(path)
    if not path.is_dir():
        fail(f"Space Ranger HD folder {str(path)!r}", "does not exist or is not a folder", "Pass the 'outs' folder")
    where = f"Space Ranger HD folder {str(path)!r}"
    if image not in _IMAGE_CHOICES:
        fail(f"image={image!r}", f"is not one of {_IMAGE_CHOICES}", "Choose one of those")
    sizes = _check_bin_sizes(bin_sizes)
    cells_table_key = cells_table_key or f"{cells_key}_table"
    for name, key in (("image_key", image_key), ("cells_key", cells_key), ("cells_table_key", cells_table_key)):
        if not isinstance(key, str) or not key:
            fail(f"{name}={key!r}", "is not a non-empty string", f"Pass a name for {name}")

    prefix, dataset_id = _dataset_id(path, dataset_id)
    bins = _check_bins(path, sizes, filtered_counts)
    segmentation = _check_cells(path) if cells else None
    if not bins and segmentation is None:
        fail(where, "has nothing to read: no bin size was requested and there is no cell segmentation",
             "Pass bin_sizes=(8, 16) or read a Space Ranger 4 folder with segmented_outputs/")
    resolution, image_file = _choose_image(path, image, fullres_image_file, prefix)
    scalefactors = _global_scalefactors(path, bins, segmentation)
    scale = 1.0 if resolution == "fullres" else scalefactors[f"tissue_{resolution}_scalef"]
    um_per_px = validate_um_per_px(_fullres_um_per_px(bins, scalefactors, path) / scale, image_key)

    sdata_io = _read_with_spatialdata_io(
        path, dataset_id=dataset_id, sizes=sizes, filtered_counts=filtered_counts,
        cells=segmentation is not None and segmentation["counts"] is not None,
        fullres_image_file=image_file if resolution == "fullres" else None,
    )
    pixels, transformations = _image(sdata_io, dataset_id, resolution, image_file)
    from ..data import parse_rgb_image

    img = parse_rgb_image(pixels, name=image_key, transformations=transformations)
    shape_yx = tuple(int(n) for n in pixels.shape[-2:])
    out_images = {image_key: img}
    out_shapes: dict[str, Any] = {}
    out_tables: dict[str, Any] = {}
    image_info = {"image_key": image_key, "library_id": dataset_id, "image": resolution, "source": str(path.resolve())}

    for size, info in bins.items():
        key = hd_bins_key(size)
        name = f"{dataset_id}_square_{size:03d}um"
        adata = sdata_io.tables[f"square_{size:03d}um"]
        # spatialdata-io indexes the squares by location_id, the table's instance key
        geoms = np.asarray(sdata_io.shapes[name].geometry.loc[adata.obs["location_id"].to_numpy()], dtype=object)
        shapes, table = polygons_with_table(
            geoms, adata, scale=scale, shape_yx=shape_yx, shapes_key=key, table_key=f"{key}_table",
            transformations=transformations_of_image(img),
            obs_columns=["in_tissue", "array_row", "array_col", "location_id"],
            uns={"platform": "visium_hd", "bin_size_um": float(size), **image_info,
                 "scalefactors": info["scalefactors"]},
            fix=f"Check that the bins and the {resolution} image {str(image_file)!r} come from the same Space "
            "Ranger run",
        )
        out_shapes[key], out_tables[f"{key}_table"] = shapes, table

    if segmentation is not None:
        cells_element = f"{dataset_id}_cell_segmentations"
        fix = f"Check that the cell segmentation and the {resolution} image {str(image_file)!r} come from the same run"
        if segmentation["counts"] is not None:
            adata = sdata_io.tables["cell_segmentations"]
            geoms = np.asarray(sdata_io.shapes[cells_element].geometry.loc[adata.obs_names], dtype=object)
            shapes, table = polygons_with_table(
                geoms, adata, scale=scale, shape_yx=shape_yx, shapes_key=cells_key, table_key=cells_table_key,
                transformations=transformations_of_image(img), obs_columns=[],
                uns={"platform": "visium_hd_cells", **image_info}, fix=fix,
            )
            out_tables[cells_table_key] = table
        else:
            geoms, index = _cells_from_geojson(segmentation["geojson"])
            shapes = polygon_shapes(geoms, index, scale=scale, shape_yx=shape_yx, shapes_key=cells_key,
                                    transformations=transformations_of_image(img), fix=fix)
        out_shapes[cells_key] = shapes

    from spatialdata import SpatialData

    sdata = SpatialData(images=out_images, shapes=out_shapes, tables=out_tables)
    record_um_per_px(sdata, image_key, um_per_px)
    for key, value in sdata_io.attrs.items():
        sdata.attrs.setdefault(key, value)
    logger.info(
        "read Visium HD %s: %s image %s at %.4g um/px; %s",
        dataset_id, resolution, tuple(pixels.shape), um_per_px,
        ", ".join(f"{k}: {len(v)}" for k, v in out_shapes.items()),
    )
    return sdata


# -----------------------------------------------------------------------------------------------------------
# polygons in image pixels with their linked raw-count table (shared with the Xenium reader)


def transformations_of_image(img: Any) -> dict:
    from .._core.coords import transformations_of

    return transformations_of(img)


def polygon_shapes(
    geoms: np.ndarray,
    index: Sequence[str],
    *,
    scale: float | np.ndarray,
    shape_yx: tuple[int, int],
    shapes_key: str,
    transformations: dict,
    fix: str,
    columns: dict | None = None,
) -> Any:
    """Polygons (any coordinates) to a shapes element in image pixels: ``scale`` is a number (multiplies the
    coordinates) or a 3x3 affine matrix taking them to image pixels. Polygon centres must lie on the image."""
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel

    from .._core.coords import apply_affine

    matrix = np.diag([scale, scale, 1.0]) if np.ndim(scale) == 0 else np.asarray(scale, dtype=float)
    polygons = shapely.transform(np.asarray(geoms, dtype=object), lambda xy: apply_affine(matrix, xy))
    index = pd.Index([str(i) for i in index])
    bounds = shapely.bounds(polygons)
    centers = (bounds[:, :2] + bounds[:, 2:]) / 2
    check_spots_in_image(centers, shape_yx, index, element=f"shapes {shapes_key!r}", fix=fix)
    frame = gpd.GeoDataFrame(dict(columns or {}), geometry=polygons, index=index)
    return ShapesModel.parse(frame, transformations=transformations)


def polygons_with_table(
    geoms: np.ndarray,
    adata: Any,
    *,
    scale: float | np.ndarray,
    shape_yx: tuple[int, int],
    shapes_key: str,
    table_key: str,
    transformations: dict,
    obs_columns: Sequence[str],
    uns: dict,
    fix: str,
    obsm: dict | None = None,
) -> tuple[Any, Any]:
    """A shapes element of polygons (row ``i`` = ``adata`` row ``i``) and the raw-count table linked to it in the
    pixgene model: index and ``obs["instance_id"]`` = ``adata.obs_names``, ``obs["region"]`` = ``shapes_key``."""
    import anndata as ad
    import scipy.sparse as sp
    import shapely
    from spatialdata.models import TableModel

    if len(geoms) != adata.n_obs:
        fail(f"shapes {shapes_key!r}", f"{len(geoms)} polygons for {adata.n_obs} table rows",
             "Pass the polygons and counts of the same run")
    shapes = polygon_shapes(geoms, adata.obs_names, scale=scale, shape_yx=shape_yx, shapes_key=shapes_key,
                            transformations=transformations, fix=fix)
    X = sp.csr_matrix(adata.X)
    check_raw_counts(X, f"table {table_key!r}")
    names = shapes.index
    obs = pd.DataFrame({c: adata.obs[c].to_numpy() for c in obs_columns if c in adata.obs}, index=names)
    obs[REGION_KEY] = pd.Categorical([shapes_key] * len(names))
    obs[INSTANCE_KEY] = names.to_numpy()
    var = adata.var.copy()
    var.index = pd.Index([str(v) for v in adata.var_names])
    table = ad.AnnData(X=X.astype(np.float32), obs=obs, var=var)
    bounds = shapely.bounds(np.asarray(shapes.geometry, dtype=object))
    table.obsm["spatial"] = (bounds[:, :2] + bounds[:, 2:]) / 2
    if np.ndim(scale) == 0:
        table.obsm["spatial_fullres"] = table.obsm["spatial"] / float(scale)
    for key, value in (obsm or {}).items():
        table.obsm[key] = np.asarray(value)
    table.uns[UNS_KEY] = dict(uns)
    table = TableModel.parse(table, region=shapes_key, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    return shapes, table


# -----------------------------------------------------------------------------------------------------------
# checks of the folder, before anything is read


def _check_bin_sizes(bin_sizes: Sequence[int]) -> list[int]:
    if isinstance(bin_sizes, int | np.integer):
        bin_sizes = [int(bin_sizes)]
    try:
        sizes = [int(b) for b in bin_sizes]
    except (TypeError, ValueError):
        sizes = None
    if sizes is None or any(s != b or s <= 0 or s > 999 for s, b in zip(sizes, bin_sizes, strict=True)):
        fail(f"bin_sizes={bin_sizes!r}", "is not a list of whole numbers of microns",
             "Pass Visium HD bin sizes such as (2, 8, 16)")
    return sorted(set(sizes))


def _dataset_id(path: Path, dataset_id: str | None) -> tuple[str, str]:
    """``(file prefix, dataset_id)``: spatialdata-io needs the prefix of a prefixed feature slice file."""
    where = f"Space Ranger HD folder {str(path)!r}"
    if dataset_id is not None and (not isinstance(dataset_id, str) or not dataset_id):
        fail(f"dataset_id={dataset_id!r}", "is not a non-empty string", "Pass a name for the slide")
    if (path / _FEATURE_SLICE).is_file():
        return "", dataset_id or path.resolve().name
    prefixed = sorted(p.name[: -len(_FEATURE_SLICE) - 1] for p in path.glob(f"*_{_FEATURE_SLICE}") if p.is_file())
    if not prefixed:
        fail(where, f"has no {_FEATURE_SLICE} (Space Ranger HD writes it into 'outs'; spatialdata-io reads the "
             "file format from it)", "Pass the 'outs' folder of a Visium HD run")
    if len(prefixed) > 1:
        fail(where, f"has several feature slice files: {[p + '_' + _FEATURE_SLICE for p in prefixed]}",
             "Keep the one of this run")
    if dataset_id is not None and dataset_id != prefixed[0]:
        fail(f"dataset_id={dataset_id!r}", f"differs from the prefix of {prefixed[0]}_{_FEATURE_SLICE}",
             f"Pass dataset_id={prefixed[0]!r} or leave it out")
    return prefixed[0] + "_", prefixed[0]


def _read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        fail(f"{what} {str(path)!r}", f"is not valid JSON ({err})", "Pass Space Ranger's file")
    if not isinstance(value, dict):
        fail(f"{what} {str(path)!r}", "is not a JSON object", "Pass Space Ranger's file")
    return value


def _positive(scalefactors: dict, key: str, where: str) -> float:
    value = scalefactors.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value) or value <= 0:
        fail(where, f"{key}={value!r} is not a positive number", "Pass Space Ranger's scalefactors_json.json")
    return float(value)


def _check_bins(path: Path, sizes: list[int], filtered_counts: bool) -> dict[int, dict]:
    """Every requested bin size's folder with its three files, its scale factors checked as spatialdata-io
    will (it asserts), and its positions' columns."""
    if not sizes:
        return {}
    import pyarrow.parquet as pq

    where = f"Space Ranger HD folder {str(path)!r}"
    root = path / "binned_outputs"
    if not root.is_dir():
        fail(where, "has no binned_outputs/ folder", "Pass the 'outs' folder of a Visium HD run")
    available = {int(m.group(1)): d for d in root.iterdir() if d.is_dir() and (m := _BIN_DIR.match(d.name))}
    missing = [s for s in sizes if s not in available]
    if missing:
        fail(where, f"has no binned_outputs/square_NNNum folder for bin size(s) {missing} um (it has "
             f"{sorted(available) or 'none'})", f"Pass bin_sizes= a subset of {sorted(available)}")
    counts_name = "filtered_feature_bc_matrix.h5" if filtered_counts else "raw_feature_bc_matrix.h5"
    found = {}
    for size in sizes:
        folder = available[size]
        for part in (counts_name, "spatial/tissue_positions.parquet", "spatial/scalefactors_json.json"):
            if not (folder / part).is_file():
                fail(where, f"has no binned_outputs/{folder.name}/{part}",
                     "Pass a complete Space Ranger HD 'outs' folder"
                     + ("" if filtered_counts else " (or filtered_counts=True)"))
        sf_path = folder / "spatial" / "scalefactors_json.json"
        sf = _read_json(sf_path, "scale factors file")
        sf_where = f"scale factors file {str(sf_path)!r}"
        for key in ("bin_size_um", "spot_diameter_fullres", "tissue_hires_scalef", "tissue_lowres_scalef"):
            _positive(sf, key, sf_where)
        if sf["bin_size_um"] != size:
            fail(sf_where, f"bin_size_um={sf['bin_size_um']!r} in the folder of {size} um bins",
                 "Pass the scale factors Space Ranger wrote for this bin size")
        derived = sf["bin_size_um"] / sf["spot_diameter_fullres"]
        if "microns_per_pixel" not in sf:
            # spatialdata-io asserts the relation below; the pixel size of the bins themselves is equivalent
            sf["microns_per_pixel"] = derived
        elif not np.isclose(_positive(sf, "microns_per_pixel", sf_where), derived):
            fail(sf_where, f"microns_per_pixel={sf['microns_per_pixel']} disagrees with bin_size_um / "
                 f"spot_diameter_fullres = {derived:.6g}", "Pass the scale factors Space Ranger wrote")
        positions = folder / "spatial" / "tissue_positions.parquet"
        try:
            columns = pq.read_schema(positions).names
        except (OSError, ValueError) as err:  # pyarrow: ArrowInvalid (a ValueError), ArrowIOError
            fail(f"tissue positions file {str(positions)!r}", f"is not a parquet file ({err})",
                 "Pass Space Ranger HD's tissue_positions.parquet")
        if columns != _POSITION_COLUMNS:
            fail(f"tissue positions file {str(positions)!r}", f"has columns {columns}, expected {_POSITION_COLUMNS}",
                 "Pass Space Ranger HD's tissue_positions.parquet")
        found[size] = {"scalefactors": {k: float(v) for k, v in sf.items() if isinstance(v, int | float)},
                       "counts": folder / counts_name}
    return found


def _check_cells(path: Path) -> dict | None:
    geojson = path / _SEGMENTED / _CELL_GEOJSON
    if not geojson.is_file():
        return None
    counts = path / _SEGMENTED / _CELL_COUNTS
    if not counts.is_file():
        logger.warning("%s has no %s: reading the cells' polygons without counts", path / _SEGMENTED, _CELL_COUNTS)
    return {"geojson": geojson, "counts": counts if counts.is_file() else None}


def _choose_image(
    path: Path, image: str, fullres_image_file: str | Path | None, prefix: str
) -> tuple[str, Path]:
    where = f"Space Ranger HD folder {str(path)!r}"
    found: dict[str, Path | None] = {}
    for res in ("hires", "lowres"):
        hits = sorted(p for p in path.rglob(f"*tissue_{res}_image.png") if p.is_file())
        found[res] = hits[0] if hits else None
    if fullres_image_file is not None:
        fullres = Path(fullres_image_file)
        fullres = fullres if fullres.is_absolute() else path / fullres
        if not fullres.is_file():
            fail(f"full-resolution image {str(fullres)!r}", "does not exist",
                 "Pass fullres_image_file= an existing file")
        found["fullres"] = fullres
    else:
        # where spatialdata-io looks: the microscope_image folder, else {prefix}tissue_image.*
        folder = path / "microscope_image"
        candidates = (sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir()
                      else sorted(p for p in path.glob(f"{prefix}tissue_image.*") if p.is_file()))
        if len(candidates) > 1 and image in ("auto", "fullres"):
            fail(where, f"has several full-resolution images: {[p.name for p in candidates]}",
                 "Pass fullres_image_file=... to choose one")
        found["fullres"] = candidates[0] if candidates else None
    order = ("fullres", "hires", "lowres") if image == "auto" else (image,)
    for res in order:
        if found.get(res) is not None:
            return res, found[res]
    if image == "fullres":
        fail(where, "image='fullres' needs the full-resolution image given to Space Ranger",
             "Pass fullres_image_file=...")
    fail(where, f"has no {'H&E image' if image == 'auto' else image + ' image'} (looked for the full-resolution "
         "image in microscope_image/, and for tissue_hires_image.png / tissue_lowres_image.png)",
         "Pass fullres_image_file=..., or choose image='auto' to take the best image present")
    raise AssertionError("unreachable")


def _global_scalefactors(path: Path, bins: dict[int, dict], segmentation: dict | None) -> dict[str, float]:
    """The image scale factors, the same in every scale factors file of a run (the finest bin's, else the
    segmentation's, else any in the folder)."""
    if bins:
        return bins[min(bins)]["scalefactors"]
    hits = [path / _SEGMENTED / "spatial" / "scalefactors_json.json"]
    hits += sorted(p for p in path.rglob("scalefactors_json.json") if p.is_file())
    hits = [h for h in hits if h.is_file()]
    if not hits:
        fail(f"Space Ranger HD folder {str(path)!r}", "has no scalefactors_json.json",
             "Pass a complete Space Ranger HD 'outs' folder")
    sf = _read_json(hits[0], "scale factors file")
    for key in ("tissue_hires_scalef", "tissue_lowres_scalef"):
        _positive(sf, key, f"scale factors file {str(hits[0])!r}")
    return {k: float(v) for k, v in sf.items() if isinstance(v, int | float)}


def _fullres_um_per_px(bins: dict[int, dict], scalefactors: dict, path: Path) -> float:
    values = {size: info["scalefactors"]["microns_per_pixel"] for size, info in bins.items()}
    if values:
        first = next(iter(values.values()))
        if not all(np.isclose(v, first, rtol=1e-4) for v in values.values()):
            fail(f"Space Ranger HD folder {str(path)!r}",
                 f"its bin sizes' scale factors give different microns_per_pixel: {values}",
                 "Pass the outputs of a single Space Ranger run")
        return float(first)
    if "microns_per_pixel" in scalefactors:
        return _positive(scalefactors, "microns_per_pixel", f"Space Ranger HD folder {str(path)!r}")
    if "bin_size_um" in scalefactors and "spot_diameter_fullres" in scalefactors:
        return scalefactors["bin_size_um"] / scalefactors["spot_diameter_fullres"]
    fail(f"Space Ranger HD folder {str(path)!r}",
         "its scale factors give no microns_per_pixel (nor bin_size_um and spot_diameter_fullres)",
         "Read at least one bin size (bin_sizes=(8,)) so the pixel size comes from the bins")
    raise AssertionError("unreachable")


# -----------------------------------------------------------------------------------------------------------
# spatialdata-io and its results


def _read_with_spatialdata_io(
    path: Path,
    *,
    dataset_id: str,
    sizes: list[int],
    filtered_counts: bool,
    cells: bool,
    fullres_image_file: Path | None,
) -> Any:
    import spatialdata_io

    printed = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
        # 10x matrices repeat some gene symbols; spatialdata-io makes them unique right after warning
        warnings.filterwarnings("ignore", message="Variable names are not unique", category=UserWarning)
        warnings.filterwarnings("ignore", message="No full resolution image found", category=UserWarning)
        warnings.filterwarnings("ignore", message="Converting `region_key", category=UserWarning)
        sdata_io = spatialdata_io.visium_hd(
            path,
            dataset_id=dataset_id,
            filtered_counts_file=filtered_counts,
            # with no bin size spatialdata-io would read them all
            load_segmentations_only=not sizes,
            bin_size=list(sizes) or None,
            bins_as_squares=True,
            fullres_image_file=None if fullres_image_file is None else fullres_image_file.resolve(),
            var_names_make_unique=True,
        )
    if printed.getvalue().strip():
        logger.debug("spatialdata-io: %s", printed.getvalue().strip())
    expected = [f"square_{s:03d}um" for s in sizes] + (["cell_segmentations"] if cells else [])
    missing = [t for t in expected if t not in sdata_io.tables]
    if missing:
        fail(f"Space Ranger HD folder {str(path)!r}", f"spatialdata-io read no {missing} from it",
             "Check that the folder is complete")
    return sdata_io


def _image(sdata_io: Any, dataset_id: str, resolution: str, image_file: Path) -> tuple[Any, dict]:
    from spatialdata.transformations import Identity

    from .._core.coords import transformations_of
    from .._core.raster import full_resolution

    name = f"{dataset_id}_full_image" if resolution == "fullres" else f"{dataset_id}_{resolution}_image"
    if name not in sdata_io.images:
        fail(f"{resolution} image {str(image_file)!r}", "was not read by spatialdata-io",
             "Pass fullres_image_file=... or check the image file")
    element = sdata_io.images[name]
    transformations = transformations_of(element)
    pixels = full_resolution(element).data
    if resolution != "fullres":  # small: load now
        pixels = np.asarray(pixels.compute() if hasattr(pixels, "compute") else pixels)
    if pixels.ndim != 3 or pixels.shape[0] not in (3, 4):
        fail(f"{resolution} image {str(image_file)!r}", f"has shape {tuple(pixels.shape)}, not an RGB image",
             "Pass the RGB H&E image")
    if pixels.shape[0] == 4:
        pixels = pixels[:3]
    # "global" is spatialdata's default coordinate system; make it the full-resolution pixel space
    transformations.setdefault("global", transformations.get(dataset_id, Identity()))
    return pixels, transformations


def _cells_from_geojson(path: Path) -> tuple[np.ndarray, list[str]]:
    """Cell polygons of Space Ranger's GeoJSON (full-resolution pixels), named as Space Ranger's cell matrix
    names them (``cellid_000000001-1``)."""
    from shapely.geometry import Polygon

    data = _read_json(path, "cell segmentation")
    geoms, names = [], []
    try:
        for feature in data["features"]:
            geoms.append(Polygon(np.asarray(feature["geometry"]["coordinates"][0], dtype=float)))
            names.append(f"cellid_{int(feature['properties']['cell_id']):09d}-1")
    except (KeyError, TypeError, ValueError, IndexError) as err:
        fail(f"cell segmentation {str(path)!r}", f"is not Space Ranger's GeoJSON of cell polygons ({err!r})",
             "Pass Space Ranger 4's segmented_outputs/cell_segmentations.geojson")
    if not geoms:
        fail(f"cell segmentation {str(path)!r}", "has no cells", "Pass a non-empty segmentation, or cells=False")
    return np.asarray(geoms, dtype=object), names
