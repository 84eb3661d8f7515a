"""Reader for 10x Genomics Visium Space Ranger output folders, through spatialdata-io."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from .._core.keys import IMAGE_KEY, SPOTS_KEY, TABLE_KEY, UNS_KEY
from .._core.units import validate_um_per_px
from .._core.validate import check_positive, fail
from ..data import build_spot_sdata
from ._st import check_spots_in_image

logger = logging.getLogger(__name__)

__all__ = ["read_visium"]

#: diameter of a Visium v1/v2 capture spot
VISIUM_SPOT_DIAMETER_UM = 55.0
#: columns of Space Ranger's tissue positions file, in file order
POSITION_COLUMNS = [
    "barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"
]
_COUNTS_SUFFIXES = ("filtered_feature_bc_matrix.h5", "raw_feature_bc_matrix.h5")
_IMAGE_CHOICES = ("auto", "fullres", "hires", "lowres")


def read_visium(
    path: str | Path,
    *,
    dataset_id: str | None = None,
    image: Literal["auto", "fullres", "hires", "lowres"] = "auto",
    fullres_image_file: str | Path | None = None,
    counts_file: str | Path | None = None,
    tissue_positions_file: str | Path | None = None,
    scalefactors_file: str | Path | None = None,
    spot_diameter_um: float = VISIUM_SPOT_DIAMETER_UM,
    image_key: str = IMAGE_KEY,
    shapes_key: str = SPOTS_KEY,
    table_key: str = TABLE_KEY,
) -> Any:
    """Read a Visium Space Ranger output folder into the pixgene data model.

    Files may carry a sample prefix (``Vis5A_filtered_feature_bc_matrix.h5``) or the plain Space Ranger names;
    they are looked up in ``path`` and ``path/spatial``. Only in-tissue spots are kept.

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder (or a folder laid out like it).
    dataset_id
        Name of the slide, used for spatialdata-io's coordinate systems (default: the counts file's prefix,
        else the folder name).
    image
        Which H&E image becomes ``image_key``: ``"auto"`` takes the full-resolution image when
        ``fullres_image_file`` is given, else ``tissue_hires_image.png``, else ``tissue_lowres_image.png``.
    fullres_image_file
        The full-resolution image given to Space Ranger (absolute, or relative to ``path``).
    counts_file, tissue_positions_file, scalefactors_file
        File names (relative to ``path``) or paths, for folders whose files do not follow the Space Ranger
        names; found automatically otherwise. ``counts_file`` must be a 10x ``.h5`` matrix.
    spot_diameter_um
        Physical spot diameter (55 um for Visium).
    image_key, shapes_key, table_key
        Names of the image, spots and table elements.

    Returns
    -------
    :class:`spatialdata.SpatialData` with

    - ``images[image_key]``: the chosen RGB image (c, y, x) in its own pixels, with spatialdata-io's
      transformations (``{dataset_id}``: full-resolution pixels; ``{dataset_id}_downscaled_hires`` /
      ``_lowres``: that image's pixels) plus ``global`` = the full-resolution pixel space.
    - ``shapes[shapes_key]``: in-tissue spots as circles in the chosen image's pixels (full-resolution
      position times the image's scale factor; radius = ``spot_diameter_fullres`` x scale factor / 2), index =
      barcode, with the image's transformations.
    - ``tables[table_key]``: raw counts (float32 CSR) linked to the spots (``obs["region"]``,
      ``obs["instance_id"]`` = barcode); ``obs``: ``in_tissue``, ``array_row``, ``array_col``; ``var``:
      ``gene_ids``, ``feature_types``, ``genome``; ``obsm["spatial"]`` = centres in the chosen image's pixels;
      ``obsm["spatial_fullres"]`` = centres in full-resolution pixels; ``uns["pixgene"]`` = platform
      ``"visium"``, spot_diameter_um, image_key, library_id (= dataset_id), image (resolution chosen),
      scalefactors, source folder.
    - ``attrs["pixgene"]["um_per_px"][image_key]`` = ``spot_diameter_um`` / spot diameter in the chosen
      image's pixels; spatialdata-io's provenance attributes.
    """
    path = Path(path)
    if not path.is_dir():
        fail(
            f"Space Ranger folder {str(path)!r}",
            "does not exist or is not a folder",
            "Pass the 'outs' folder",
        )
    if image not in _IMAGE_CHOICES:
        fail(f"image={image!r}", f"is not one of {_IMAGE_CHOICES}", "Choose one of those")
    check_positive(spot_diameter_um, "spot_diameter_um", f"Space Ranger folder {str(path)!r}")

    counts = _locate(
        path,
        counts_file,
        ["*filtered_feature_bc_matrix.h5"],
        "counts",
        "counts_file",
        root_only=True,
    )
    if counts is None:
        fail(
            f"Space Ranger folder {str(path)!r}",
            "has no '*filtered_feature_bc_matrix.h5' counts file",
            "Pass counts_file='...h5' (a 10x feature-barcode matrix in HDF5 format)",
        )
    if counts.suffix != ".h5":
        fail(
            f"counts file {str(counts)!r}",
            "is not a 10x .h5 matrix",
            "Pass the Space Ranger .h5 counts file",
        )
    positions = _locate(
        path, tissue_positions_file, ["*tissue_positions.csv", "*tissue_positions_list.csv"],
        "tissue positions", "tissue_positions_file",
    )
    if positions is None:
        fail(
            f"Space Ranger folder {str(path)!r}",
            "has no tissue positions file (spatial/tissue_positions.csv or tissue_positions_list.csv)",
            "Pass tissue_positions_file=...",
        )
    scalefactors_path = _locate(
        path, scalefactors_file, ["*scalefactors_json.json"], "scale factors", "scalefactors_file"
    )
    if scalefactors_path is None:
        fail(
            f"Space Ranger folder {str(path)!r}",
            "has no spatial/scalefactors_json.json",
            "Pass scalefactors_file=...",
        )
    resolution, image_file = _choose_image(path, image, fullres_image_file)
    scalefactors = _read_scalefactors(scalefactors_path)
    scale = 1.0 if resolution == "fullres" else scalefactors[f"tissue_{resolution}_scalef"]
    diameter_px = scalefactors["spot_diameter_fullres"] * scale
    um_per_px = validate_um_per_px(spot_diameter_um / diameter_px, image_key)
    dataset_id = dataset_id or _default_dataset_id(counts, path)

    table = _read_positions(positions)
    barcodes = _counts_barcodes(counts)
    in_tissue = _check_barcodes(barcodes, table, counts=counts, positions=positions)
    outside = {
        "element": f"tissue positions file {str(positions)!r}",
        "fix": f"Check that the positions, scale factors and {resolution} image {str(image_file)!r} come "
        "from the same Space Ranger run",
    }
    size = _header_size(image_file)
    if size is not None:
        spots = table.loc[in_tissue]
        centers = spots[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=float) * scale
        check_spots_in_image(centers, size, spots.index, **outside)

    sdata_io, pixels, transformations = _read_with_spatialdata_io(
        dataset_id=dataset_id,
        resolution=resolution,
        counts=counts,
        positions=table,
        scalefactors=scalefactors_path,
        image_file=image_file,
    )
    adata = sdata_io.tables["table"]
    adata = adata[adata.obs["in_tissue"].to_numpy() == 1]
    fullres_xy = np.asarray(adata.obsm["spatial"], dtype=float)
    centers = fullres_xy * scale
    if size is None:  # the header was unreadable, so check against the decoded image's shape
        check_spots_in_image(centers, tuple(pixels.shape[-2:]), adata.obs_names, **outside)
    obs = adata.obs[["in_tissue", "array_row", "array_col"]].copy()

    sdata = build_spot_sdata(
        pixels,
        centers_px=centers,
        spot_diameter_um=spot_diameter_um,
        um_per_px=um_per_px,
        counts=adata.X,
        var_names=adata.var_names,
        obs_names=adata.obs_names,
        obs=obs,
        platform="visium",
        image_key=image_key,
        shapes_key=shapes_key,
        table_key=table_key,
        image_transformations=transformations,
        library_id=dataset_id,
    )
    out = sdata.tables[table_key]
    for column in adata.var.columns:
        out.var[column] = adata.var[column].to_numpy()
    out.obsm["spatial_fullres"] = fullres_xy
    out.uns[UNS_KEY].update(
        {"image": resolution, "scalefactors": dict(scalefactors), "source": str(path.resolve())}
    )
    for key, value in sdata_io.attrs.items():
        sdata.attrs.setdefault(key, value)
    logger.info(
        "read Visium %s: %d in-tissue spots, %s image %s, spot diameter %.2f px",
        dataset_id, out.n_obs, resolution, tuple(pixels.shape), diameter_px,
    )
    return sdata


def _read_with_spatialdata_io(
    *,
    dataset_id: str,
    resolution: str,
    counts: Path,
    positions: pd.DataFrame,
    scalefactors: Path,
    image_file: Path,
) -> tuple[Any, Any, dict]:
    """Run spatialdata-io on a staging folder of links with the plain Space Ranger names.

    spatialdata-io finds images and positions only under their plain names (a prefixed positions file even
    trips an assertion), so the files are linked under those names and the positions, already parsed, are
    written with Space Ranger 2's header; only the chosen image is linked, so no other image is read. Low- and high-resolution images are loaded before the staging folder goes away; a
    full-resolution image stays lazy, read from its own path.
    """
    import spatialdata_io
    from spatialdata.transformations import Identity

    from .._core.coords import transformations_of
    from .._core.raster import full_resolution

    with tempfile.TemporaryDirectory(prefix="pixgene_visium_") as tmp:
        stage = Path(tmp)
        (stage / "spatial").mkdir()
        _link(counts, stage / "filtered_feature_bc_matrix.h5")
        positions.reset_index().to_csv(stage / "spatial" / "tissue_positions.csv", index=False)
        _link(scalefactors, stage / "spatial" / "scalefactors_json.json")
        if resolution != "fullres":
            _link(image_file, stage / "spatial" / f"tissue_{resolution}_image.png")
        with warnings.catch_warnings():
            # 10x matrices repeat some gene symbols; spatialdata-io makes them unique right after warning
            warnings.filterwarnings("ignore", message="Variable names are not unique", category=UserWarning)
            warnings.filterwarnings("ignore", message="Converting `region_key", category=UserWarning)
            sdata_io = spatialdata_io.visium(
                stage,
                dataset_id=dataset_id,
                counts_file="filtered_feature_bc_matrix.h5",
                fullres_image_file=image_file.resolve() if resolution == "fullres" else None,
            )
        name = f"{dataset_id}_full_image" if resolution == "fullres" else f"{dataset_id}_{resolution}_image"
        element = sdata_io.images[name]
        transformations = transformations_of(element)
        pixels = full_resolution(element).data
        if resolution != "fullres":
            pixels = np.asarray(pixels.compute() if hasattr(pixels, "compute") else pixels)
    if pixels.shape[0] == 4:
        pixels = pixels[:3]
    # "global" is spatialdata's default coordinate system; make it the full-resolution pixel space
    transformations.setdefault("global", transformations.get(dataset_id, Identity()))
    return sdata_io, pixels, transformations


def _locate(
    path: Path,
    given: str | Path | None,
    patterns: list[str],
    role: str,
    parameter: str,
    *,
    root_only: bool = False,
) -> Path | None:
    if given is not None:
        found = Path(given) if Path(given).is_absolute() else path / given
        if not found.is_file():
            fail(
                f"{role} file {str(found)!r}",
                "does not exist",
                f"Pass {parameter}= a file inside {str(path)!r}",
            )
        return found
    folders = [path] if root_only else [path / "spatial", path]
    hits = sorted(
        {hit for folder in folders for pattern in patterns for hit in folder.glob(pattern) if hit.is_file()}
    )
    if len(hits) > 1:
        fail(
            f"Space Ranger folder {str(path)!r}",
            f"has several {role} files: {[h.name for h in hits]}",
            f"Pass {parameter}=... to choose one",
        )
    return hits[0] if hits else None


def _choose_image(path: Path, image: str, fullres_image_file: str | Path | None) -> tuple[str, Path]:
    found: dict[str, Path | None] = {
        res: _locate(path, None, [f"*tissue_{res}_image.png"], f"{res} image", "image")
        for res in ("hires", "lowres")
    }
    if fullres_image_file is not None:
        fullres = Path(fullres_image_file)
        fullres = fullres if fullres.is_absolute() else path / fullres
        if not fullres.is_file():
            fail(
                f"full-resolution image {str(fullres)!r}",
                "does not exist",
                "Pass fullres_image_file= an existing file",
            )
        found["fullres"] = fullres
    order = ("fullres", "hires", "lowres") if image == "auto" else (image,)
    for res in order:
        if found.get(res) is not None:
            return res, found[res]
    if image == "fullres":
        fail(
            f"Space Ranger folder {str(path)!r}",
            "image='fullres' needs the full-resolution image",
            "Pass fullres_image_file=...",
        )
    fail(
        f"Space Ranger folder {str(path)!r}",
        f"has no {'H&E image' if image == 'auto' else image + ' image'} (looked for "
        f"spatial/tissue_hires_image.png and spatial/tissue_lowres_image.png)",
        "Pass fullres_image_file=..., or choose image='auto' to take the best image present",
    )
    raise AssertionError("unreachable")


def _read_scalefactors(path: Path) -> dict[str, float]:
    try:
        scalefactors = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        fail(
            f"scale factors file {str(path)!r}",
            f"is not valid JSON ({err})",
            "Pass Space Ranger's scalefactors_json.json",
        )
    # spatialdata-io needs both scale factors whichever image is used
    required = ("spot_diameter_fullres", "tissue_hires_scalef", "tissue_lowres_scalef")
    missing = [k for k in required if k not in scalefactors]
    if missing:
        fail(
            f"scale factors file {str(path)!r}",
            f"lacks {missing}",
            "Pass Space Ranger's scalefactors_json.json",
        )
    for key in required:
        value = scalefactors[key]
        if not isinstance(value, int | float) or not np.isfinite(value) or value <= 0:
            fail(
                f"scale factors file {str(path)!r}",
                f"{key}={value!r} is not a positive number",
                "Fix the file",
            )
    return {k: float(v) for k, v in scalefactors.items() if isinstance(v, int | float)}


def _positions_header(path: Path) -> bool:
    with open(path) as handle:
        first = handle.readline()
    return "in_tissue" in first or "barcode" in first


def _read_positions(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path, header=0 if _positions_header(path) else None)
    if frame.shape[1] != len(POSITION_COLUMNS):
        fail(
            f"tissue positions file {str(path)!r}",
            f"has {frame.shape[1]} columns, expected {len(POSITION_COLUMNS)} ({', '.join(POSITION_COLUMNS)})",
            "Pass Space Ranger's tissue_positions(_list).csv",
        )
    frame.columns = POSITION_COLUMNS
    frame["barcode"] = frame["barcode"].astype(str)
    return frame.set_index("barcode")


def _counts_barcodes(path: Path) -> np.ndarray:
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            return handle["matrix/barcodes"][:].astype(str)
    except (OSError, KeyError) as err:
        fail(
            f"counts file {str(path)!r}",
            f"is not a 10x feature-barcode matrix in HDF5 format ({err})",
            "Pass Space Ranger's filtered_feature_bc_matrix.h5",
        )
    raise AssertionError("unreachable")


def _check_barcodes(barcodes: np.ndarray, table: pd.DataFrame, *, counts: Path, positions: Path) -> pd.Index:
    """In-tissue barcodes of the counts file; every counts barcode must have a position."""
    known = table.index
    present = pd.Index(barcodes).isin(known)
    if not present.any():
        fail(
            f"counts file {str(counts)!r} and tissue positions file {str(positions)!r}",
            f"share no barcode (counts e.g. {list(barcodes[:2])}, positions e.g. {known[:2].tolist()})",
            "Pass the counts and positions of the same Space Ranger run",
        )
    if not present.all():
        fail(
            f"counts file {str(counts)!r} and tissue positions file {str(positions)!r}",
            f"do not match: {int((~present).sum())} of {len(barcodes)} counts barcodes have no position, "
            f"e.g. {list(barcodes[~present][:2])}",
            "Pass the counts and positions of the same Space Ranger run",
        )
    in_tissue = pd.Index(barcodes)[table.loc[barcodes, "in_tissue"].to_numpy() == 1]
    if len(in_tissue) == 0:
        fail(
            f"tissue positions file {str(positions)!r}",
            "no barcode of the counts file is marked in_tissue = 1",
            "Pass the positions file of the same run (or check the tissue detection)",
        )
    return in_tissue


def _header_size(path: Path) -> tuple[int, int] | None:
    """(height, width) from the image header, or None when Pillow cannot read this header."""
    from PIL import Image, UnidentifiedImageError

    from ._st import _pillow_without_size_limit

    try:
        with _pillow_without_size_limit(), Image.open(path) as img:
            return int(img.size[1]), int(img.size[0])
    except (UnidentifiedImageError, OSError):
        return None


def _default_dataset_id(counts: Path, path: Path) -> str:
    for suffix in _COUNTS_SUFFIXES:
        if counts.name.endswith(suffix):
            prefix = counts.name[: -len(suffix)].rstrip("_")
            if prefix:
                return prefix
    return path.resolve().name


def _link(source: Path, target: Path) -> None:
    try:
        os.symlink(source.resolve(), target)
    except OSError:  # file systems without symlinks
        shutil.copyfile(source, target)
