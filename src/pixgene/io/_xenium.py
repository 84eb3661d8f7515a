"""Reader for 10x Genomics Xenium output folders with a post-Xenium H&E, through spatialdata-io."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._core.keys import CELLS_KEY, IMAGE_KEY, TABLE_KEY
from .._core.units import record_um_per_px, validate_um_per_px
from .._core.validate import check_positive, fail

logger = logging.getLogger(__name__)

__all__ = ["read_xenium"]

#: Xenium's morphology-image pixel size when ``experiment.xenium`` is silent, microns
XENIUM_PIXEL_SIZE_UM = 0.2125
_SPECS = "experiment.xenium"
_REQUIRED = ("cell_feature_matrix.h5", "cells.parquet", "cell_boundaries.parquet", "cells.zarr.zip")
#: relative difference of the alignment's two axis scales above which the H&E's pixels are refused as not square
_ANISOTROPY_LIMIT = 0.05
#: relative difference between the alignment's and the OME metadata's pixel size above which a warning is given
_OME_DISAGREEMENT = 0.02


def read_xenium(
    path: str | Path,
    *,
    he_image: str | Path | None = None,
    alignment: str | Path | np.ndarray | None = None,
    nuclei: bool = False,
    transcripts: bool = False,
    min_fraction_on_image: float = 0.5,
    image_key: str = IMAGE_KEY,
    cells_key: str = CELLS_KEY,
    table_key: str = TABLE_KEY,
    nuclei_key: str = "nuclei",
) -> Any:
    """Read a Xenium output folder and its post-Xenium H&E into the pixgene data model.

    The folder is read by :func:`spatialdata_io.xenium` (cell boundaries as polygons, ``cells_as_circles=False``);
    the cells are then carried from Xenium's microns into the H&E's pixels through the alignment matrix, so
    that ``pg.tl.fit(sdata, shapes_key="cells", ...)`` trains on the cells as its spots.

    Parameters
    ----------
    path
        The Xenium output folder (``outs``): ``experiment.xenium``, ``cell_feature_matrix.h5``, ``cells.parquet``,
        ``cell_boundaries.parquet`` and ``cells.zarr.zip`` are read (plus ``nucleus_boundaries.parquet`` and
        ``transcripts.parquet`` when asked for).
    he_image
        The H&E image stained after the Xenium run: an OME-TIFF or TIFF, RGB (absolute, or relative to ``path``).
        Default: the single ``*he_image.ome.tif`` in ``path``.
    alignment
        The 3x3 affine matrix that maps H&E pixels (x, y) to Xenium morphology-image pixels (x, y): the
        ``*_he_imagealignment.csv`` Xenium Explorer writes (a path, absolute or relative to ``path``) or the
        matrix itself. Default: the CSV named after the H&E image (``X_he_image.ome.tif`` ->
        ``X_he_imagealignment.csv``). Pass ``np.eye(3)`` for an H&E already registered to the morphology image's
        pixels. Checked before anything is read.
    nuclei
        Also read the nucleus boundaries (``shapes[nuclei_key]``, in H&E pixels, index = the nucleus' label, with
        a ``cell_id`` column).
    transcripts
        Also read the transcripts (``points["transcripts"]``, in microns, with spatialdata-io's transformation
        to the morphology pixels of ``global``, where the H&E also lies).
    min_fraction_on_image
        Cells whose centre falls outside the H&E are left out with a warning; fewer than this fraction on the
        image is an error (a wrong or inverted alignment, or another run's image).
    image_key, cells_key, table_key, nuclei_key
        Names of the image, the cells' shapes, their table and the nuclei's shapes.

    Returns
    -------
    :class:`spatialdata.SpatialData` with

    - ``images[image_key]``: the H&E (RGB, c/y/x), multiscale when larger than 4096 px on a side; read lazily
      from the TIFF. Transformation ``global`` = the alignment (H&E pixels to Xenium morphology pixels, the
      coordinate system of spatialdata-io's Xenium elements).
    - ``shapes[cells_key]``: cell boundaries as polygons in H&E pixels (microns / ``pixel_size`` through the
      inverse alignment), index = Xenium cell id, with the image's transformations. Cells whose centre falls
      outside the H&E are left out (with a warning; see ``min_fraction_on_image``).
    - ``tables[table_key]``: the cells' raw counts (gene expression features only, float32 CSR) linked to the
      cells (``obs["region"]``, ``obs["instance_id"]`` = cell id); ``obs``: ``cells.parquet``'s columns
      (``transcript_counts``, ``cell_area``, ``nucleus_area``, ...); ``var``: ``gene_ids``, ``feature_types``,
      ``genome``; ``obsm["spatial"]`` = cell centres (bounding-box centres of the polygons) in H&E pixels;
      ``obsm["spatial_um"]`` = Xenium's centroids in microns; ``uns["pixgene"]``: platform ``"xenium"``,
      image_key, library_id (``run_name`` of ``experiment.xenium``, else the folder's name), pixel_size_um,
      alignment, he_image, ome_um_per_px (or None), source folder.
    - ``attrs["pixgene"]["um_per_px"][image_key]`` = the alignment's scale (square root of the absolute
      determinant of its linear part: morphology pixels per H&E pixel) x ``pixel_size`` of
      ``experiment.xenium``; spatialdata-io's provenance attributes.
    """
    path = Path(path)
    if not path.is_dir():
        fail(f"Xenium folder {str(path)!r}", "does not exist or is not a folder", "Pass the Xenium output folder")
    where = f"Xenium folder {str(path)!r}"
    he_path = _he_path(path, he_image)
    matrix, alignment_source = _alignment(path, alignment, he_path)
    check_positive(min_fraction_on_image, "min_fraction_on_image", where)
    if min_fraction_on_image > 1:
        fail(where, f"min_fraction_on_image={min_fraction_on_image} is above 1", "Pass a fraction in (0, 1]")
    for name, key in (("image_key", image_key), ("cells_key", cells_key), ("table_key", table_key),
                      ("nuclei_key", nuclei_key)):
        if not isinstance(key, str) or not key:
            fail(f"{name}={key!r}", "is not a non-empty string", f"Pass a name for {name}")
    specs = _read_specs(path)
    pixel_size = specs["pixel_size"]
    wanted = list(_REQUIRED) + (["nucleus_boundaries.parquet"] if nuclei else [])
    wanted += ["transcripts.parquet"] if transcripts else []
    missing = [name for name in wanted if not (path / name).exists()]
    if missing:
        fail(where, f"lacks {missing}", "Pass a complete Xenium output folder (XOA 1.3 or later)")

    scale = _check_similarity(matrix, alignment_source)
    um_per_px = validate_um_per_px(scale * pixel_size, image_key)
    pixels, ome_um_per_px = _read_he(he_path)
    if ome_um_per_px is not None and abs(ome_um_per_px / um_per_px - 1) > _OME_DISAGREEMENT:
        warnings.warn(
            f"{he_path}: its OME metadata give {ome_um_per_px:.4g} um/px but the alignment {alignment_source} "
            f"gives {um_per_px:.4g} um/px; the alignment's is recorded. Check that the alignment belongs to this "
            "image",
            UserWarning,
            stacklevel=2,
        )

    sdata_io = _read_with_spatialdata_io(path, nuclei=nuclei, transcripts=transcripts)

    from spatialdata import SpatialData
    from spatialdata.transformations import Affine

    from ..data import parse_rgb_image
    from ._visium_hd import polygon_shapes, polygons_with_table, transformations_of_image

    img = parse_rgb_image(
        pixels, name=image_key,
        transformations={"global": Affine(matrix, input_axes=("x", "y"), output_axes=("x", "y"))},
    )
    shape_yx = (int(pixels.shape[1]), int(pixels.shape[2]))
    # microns -> morphology pixels -> H&E pixels
    um_to_he = np.linalg.inv(matrix) @ np.diag([1 / pixel_size, 1 / pixel_size, 1.0])
    fix = (f"Check that the alignment {alignment_source} maps pixels of {str(he_path)!r} to this run's "
           "morphology pixels (not the reverse)")

    boundaries = sdata_io.shapes["cell_boundaries"]
    adata = sdata_io.tables["table"]
    cell_ids = adata.obs_names.astype(str)
    has_polygon = pd.Index(cell_ids).isin(boundaries.index.astype(str))
    if not has_polygon.any():
        fail(where, "no cell of cell_feature_matrix.h5 has a polygon in cell_boundaries.parquet",
             "Pass a complete, consistent Xenium output folder")
    if not has_polygon.all():
        logger.warning("%d of %d cells have no boundary polygon and are left out", (~has_polygon).sum(), len(cell_ids))
    adata = adata[has_polygon]
    geoms = np.asarray(boundaries.loc[adata.obs_names].geometry, dtype=object)
    inside = _centres_inside(geoms, um_to_he, shape_yx)
    if not inside.any() or inside.mean() < min_fraction_on_image:
        fail(f"shapes {cells_key!r}", f"only {int(inside.sum())} of the {len(geoms)} cell centres fall on the H&E "
             f"image ({shape_yx[1]} x {shape_yx[0]} px), fewer than min_fraction_on_image={min_fraction_on_image}",
             fix + "; if the H&E covers only part of the run, lower min_fraction_on_image")
    if not inside.all():
        warnings.warn(
            f"{int((~inside).sum())} of {len(inside)} cells lie outside the H&E image {str(he_path)!r} and are "
            "left out",
            UserWarning,
            stacklevel=2,
        )
        adata, geoms = adata[inside], geoms[inside]
    obs_columns = [c for c in adata.obs.columns if c not in ("region", "cell_id", "cell_labels")]
    library_id = str(specs.get("run_name") or path.resolve().name)
    shapes, table = polygons_with_table(
        geoms, adata, scale=um_to_he, shape_yx=shape_yx, shapes_key=cells_key, table_key=table_key,
        transformations=transformations_of_image(img), obs_columns=obs_columns,
        uns={"platform": "xenium", "image_key": image_key, "library_id": library_id,
             "pixel_size_um": float(pixel_size), "alignment": matrix.tolist(), "he_image": str(he_path),
             "ome_um_per_px": ome_um_per_px, "source": str(path.resolve())},
        obsm={"spatial_um": np.asarray(adata.obsm["spatial"], dtype=float)},
        fix=fix,
    )
    out_shapes = {cells_key: shapes}
    if nuclei and "nucleus_boundaries" in sdata_io.shapes:
        nuc = sdata_io.shapes["nucleus_boundaries"]
        nuc_geoms = np.asarray(nuc.geometry, dtype=object)
        keep = _centres_inside(nuc_geoms, um_to_he, shape_yx)
        columns = {"cell_id": nuc["cell_id"].to_numpy()[keep]} if "cell_id" in nuc.columns else None
        out_shapes[nuclei_key] = polygon_shapes(
            nuc_geoms[keep], nuc.index[keep], scale=um_to_he, shape_yx=shape_yx, shapes_key=nuclei_key,
            transformations=transformations_of_image(img), fix=fix, columns=columns,
        )
    points = {}
    if transcripts:
        points["transcripts"] = sdata_io.points["transcripts"]

    sdata = SpatialData(images={image_key: img}, shapes=out_shapes, points=points, tables={table_key: table})
    record_um_per_px(sdata, image_key, um_per_px)
    for key, value in sdata_io.attrs.items():
        sdata.attrs.setdefault(key, value)
    logger.info("read Xenium %s: %d cells x %d genes on a %s H&E at %.4g um/px", library_id, table.n_obs,
                table.n_vars, tuple(pixels.shape), um_per_px)
    return sdata


# -----------------------------------------------------------------------------------------------------------
# inputs, checked before anything is read


def _resolve(path: Path, given: str | Path) -> Path:
    given = Path(given)
    return given if given.is_absolute() else path / given


def _he_path(path: Path, he_image: str | Path | None) -> Path:
    if he_image is not None:
        found = _resolve(path, he_image)
        if not found.is_file():
            fail(f"H&E image {str(found)!r}", "does not exist", "Pass he_image= the post-Xenium H&E (OME-)TIFF")
        return found
    hits = sorted(p for p in path.glob("*he_image.ome.tif") if p.is_file())
    if len(hits) != 1:
        fail(f"Xenium folder {str(path)!r}",
             "has no '*he_image.ome.tif'" if not hits else f"has several H&E images: {[h.name for h in hits]}",
             "Pass he_image= the post-Xenium H&E (OME-)TIFF")
    return hits[0]


def _alignment(path: Path, alignment: str | Path | np.ndarray | None, he_path: Path) -> tuple[np.ndarray, str]:
    """The 3x3 H&E-pixel -> morphology-pixel matrix and where it came from; its shape and values checked."""
    if alignment is None:
        name = he_path.name
        stem = name[: -len(".ome.tif")] if name.endswith(".ome.tif") else he_path.stem
        candidate = he_path.with_name(f"{stem}alignment.csv")
        if not candidate.is_file():
            fail(f"H&E image {str(he_path)!r}",
                 f"has no alignment file next to it ({candidate.name!r})",
                 "Pass alignment= the '*_he_imagealignment.csv' Xenium Explorer wrote, or alignment=np.eye(3) "
                 "if the image is already registered to the morphology image's pixels")
        alignment = candidate
    if isinstance(alignment, str | Path):
        source = _resolve(path, alignment)
        if not source.is_file():
            fail(f"alignment file {str(source)!r}", "does not exist",
                 "Pass the '*_he_imagealignment.csv' Xenium Explorer wrote")
        what = f"alignment file {str(source)!r}"
        matrix = _read_alignment_csv(source, what)
        label = repr(str(source))
    else:
        what, label = "alignment", "matrix"
        try:
            matrix = np.asarray(alignment, dtype=float)
        except (TypeError, ValueError) as err:
            fail(what, f"is not a matrix of numbers ({err})", "Pass a 3x3 affine matrix or the CSV Xenium wrote")
    if matrix.shape != (3, 3):
        fail(what, f"has shape {matrix.shape}, not the 3x3 affine matrix that maps H&E pixels to Xenium "
             "morphology pixels", "Pass Xenium Explorer's '*_he_imagealignment.csv' (three rows of three numbers)")
    if not np.isfinite(matrix).all():
        fail(what, "has non-finite values", "Pass Xenium Explorer's '*_he_imagealignment.csv'")
    if not np.allclose(matrix[2], [0.0, 0.0, 1.0], atol=1e-9):
        fail(what, f"is not affine (its last row is {matrix[2].tolist()}, not [0, 0, 1])",
             "Pass an affine alignment (rotation, scale, translation), as Xenium Explorer writes")
    if abs(np.linalg.det(matrix[:2, :2])) < 1e-12:
        fail(what, "is singular (it maps the image onto a line)", "Pass the alignment Xenium Explorer wrote")
    return matrix, label


def _read_alignment_csv(path: Path, what: str) -> np.ndarray:
    rows = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        fail(what, f"cannot be read as text ({err})", "Pass Xenium Explorer's '*_he_imagealignment.csv'")
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rows.append([float(v) for v in line.replace(",", " ").split()])
        except ValueError:
            fail(what, f"has a line that is not numbers: {line[:80]!r}",
                 "Pass Xenium Explorer's '*_he_imagealignment.csv' (three rows of three numbers)")
    if len({len(r) for r in rows}) > 1:
        fail(what, f"has rows of different lengths {[len(r) for r in rows]}, not a 3x3 matrix",
             "Pass Xenium Explorer's '*_he_imagealignment.csv' (three rows of three numbers)")
    return np.asarray(rows, dtype=float).reshape(len(rows), -1)


def _check_similarity(matrix: np.ndarray, source: str) -> float:
    """Morphology pixels per H&E pixel: the square root of the linear part's absolute determinant."""
    sv = np.linalg.svd(matrix[:2, :2], compute_uv=False)
    if sv[0] / sv[1] - 1 > _ANISOTROPY_LIMIT:
        fail(f"alignment {source}", f"scales the H&E's x and y differently ({sv[0]:.6g} vs {sv[1]:.6g} morphology "
             "pixels per H&E pixel), so its pixels would not be square",
             "Pass an alignment that is a similarity (rotation, one scale, translation)")
    if sv[0] / sv[1] - 1 > 1e-3:
        logger.info("alignment %s: axis scales %.6g and %.6g; their geometric mean gives um/px", source, *sv)
    return float(np.sqrt(sv[0] * sv[1]))


def _read_specs(path: Path) -> dict:
    specs_path = path / _SPECS
    where = f"Xenium folder {str(path)!r}"
    if not specs_path.is_file():
        fail(where, f"has no {_SPECS}", "Pass the Xenium output folder ('outs')")
    try:
        specs = json.loads(specs_path.read_text())
    except (OSError, ValueError) as err:
        fail(f"{_SPECS} {str(specs_path)!r}", f"is not valid JSON ({err})", "Pass the file Xenium wrote")
    if not isinstance(specs, dict) or "analysis_sw_version" not in specs and "xenium_ranger" not in specs:
        fail(f"{_SPECS} {str(specs_path)!r}", "has no analysis_sw_version", "Pass the file Xenium wrote")
    size = specs.get("pixel_size")
    if size is None:
        logger.warning("%s has no pixel_size; taking Xenium's %g um", specs_path, XENIUM_PIXEL_SIZE_UM)
        specs["pixel_size"] = XENIUM_PIXEL_SIZE_UM
    elif isinstance(size, bool) or not isinstance(size, int | float) or not np.isfinite(size) or size <= 0:
        fail(f"{_SPECS} {str(specs_path)!r}", f"pixel_size={size!r} is not a positive number",
             "Pass the file Xenium wrote")
    return specs


# -----------------------------------------------------------------------------------------------------------
# the H&E and spatialdata-io


def _read_he(path: Path) -> tuple[Any, float | None]:
    """The H&E's full-resolution level as a lazy (3, y, x) dask array, and the OME pixel size (um) if any."""
    import dask.array as da
    import tifffile

    where = f"H&E image {str(path)!r}"
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, shape, dtype = series.levels[0].axes, series.levels[0].shape, series.levels[0].dtype
            ome = tif.ome_metadata if tif.is_ome else None
    except (tifffile.TiffFileError, OSError, IndexError) as err:
        fail(where, f"cannot be read as a TIFF ({err})", "Pass the H&E as an OME-TIFF or TIFF")
    keep = [i for i, (a, n) in enumerate(zip(axes, shape, strict=True)) if a in "YX" or n > 1]
    kept_axes = "".join(axes[i] for i in keep)
    channel = [a for a in kept_axes if a not in "YX"]
    if sorted(a for a in kept_axes if a in "YX") != ["X", "Y"] or len(channel) != 1 \
            or shape[keep[kept_axes.index(channel[0])]] not in (3, 4):
        fail(where, f"has axes {axes!r} of shape {tuple(shape)}, not an RGB image",
             "Pass the RGB H&E (3 or 4 samples per pixel)")
    level = _TiffLevel(path, tuple(shape), dtype)
    chunks = tuple(min(n, 1024) if a in "YX" else n for a, n in zip(axes, shape, strict=True))
    array = da.from_array(level, chunks=chunks, meta=np.empty((0,) * len(shape), dtype=dtype))
    array = array.reshape(tuple(shape[i] for i in keep))
    array = array.transpose([kept_axes.index(channel[0]), kept_axes.index("Y"), kept_axes.index("X")])
    if array.shape[0] == 4:
        array = array[:3]
    return array, _ome_um_per_px(ome)


class _TiffLevel:
    """The full-resolution level of a TIFF's first series as an array-like for dask: every read opens the file,
    reads the region through tifffile's zarr view (only the tiles or strips it covers) and closes it again, so
    no file handle outlives a read."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: Any) -> None:
        self.path, self.shape, self.dtype, self.ndim = path, shape, np.dtype(dtype), len(shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        import tifffile
        import zarr

        with tifffile.TiffFile(self.path) as tif, tif.series[0].levels[0].aszarr() as store:
            return np.asarray(zarr.open(store, mode="r")[key])


_UNITS_UM = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _ome_um_per_px(ome: str | None) -> float | None:
    if not ome:
        return None
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(ome)
    except ET.ParseError:
        return None
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or "PhysicalSizeX" not in pixels.attrib:
        return None
    sizes = []
    for axis in ("X", "Y"):
        value, unit = pixels.attrib.get(f"PhysicalSize{axis}"), pixels.attrib.get(f"PhysicalSize{axis}Unit", "µm")
        if value is None or unit not in _UNITS_UM:
            continue
        try:
            sizes.append(float(value) * _UNITS_UM[unit])
        except ValueError:
            continue
    return float(np.mean(sizes)) if sizes else None


def _centres_inside(geoms: np.ndarray, matrix: np.ndarray, shape_yx: tuple[int, int]) -> np.ndarray:
    import shapely

    from .._core.coords import apply_affine

    bounds = shapely.bounds(geoms)
    xy = apply_affine(matrix, (bounds[:, :2] + bounds[:, 2:]) / 2)
    return (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] <= shape_yx[1]) & (xy[:, 1] <= shape_yx[0])


def _read_with_spatialdata_io(path: Path, *, nuclei: bool, transcripts: bool) -> Any:
    import spatialdata_io

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Variable names are not unique", category=UserWarning)
        # the table annotates the cell labels, which are not read (pixgene links it to the polygons)
        warnings.filterwarnings("ignore", message="The table is annotating", category=UserWarning)
        warnings.filterwarnings("ignore", message="Converting `region_key", category=UserWarning)
        try:
            return spatialdata_io.xenium(
                path,
                cells_boundaries=True,
                nucleus_boundaries=nuclei,
                cells_as_circles=False,
                cells_labels=False,
                nucleus_labels=False,
                transcripts=transcripts,
                morphology_mip=False,
                morphology_focus=False,
                aligned_images=False,
                cells_table=True,
                gex_only=True,
            )
        except (AssertionError, KeyError, ValueError) as err:
            fail(f"Xenium folder {str(path)!r}", f"spatialdata-io could not read it ({type(err).__name__}: {err})",
                 "Pass a complete Xenium output folder (XOA 1.3 or later)")
    raise AssertionError("unreachable")
