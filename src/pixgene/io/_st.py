"""Reader for legacy Spatial Transcriptomics (ST) slides: counts table, spot alignment table, H&E image."""

from __future__ import annotations

import contextlib
import gzip
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._core.keys import IMAGE_KEY, SPOTS_KEY, TABLE_KEY, UNS_KEY
from .._core.units import derive_um_per_px, validate_um_per_px
from .._core.validate import check_positive, fail
from ..data import build_spot_sdata

logger = logging.getLogger(__name__)

__all__ = ["read_st"]

#: spot ids of ST counts tables: array coordinates "{x}x{y}"
_SPOT_ID = re.compile(r"^\d+(\.\d+)?x\d+(\.\d+)?$")
#: accepted spellings of the spot table's columns, first match wins
_SPOT_COLUMNS = {
    "x": ("x", "array_x"),
    "y": ("y", "array_y"),
    "pixel_x": ("pixel_x", "pixelx", "pxl_x", "pixel x"),
    "pixel_y": ("pixel_y", "pixely", "pxl_y", "pixel y"),
    "selected": ("selected", "in_tissue"),
}
#: relative difference of the array's x and y pixel steps above which the pixels are reported as not square
_ANISOTROPY_TOLERANCE = 0.05


def read_st(
    counts: str | Path,
    spots: str | Path,
    image: str | Path,
    *,
    spot_diameter_um: float = 100.0,
    pitch_um: float = 200.0,
    um_per_px: float | None = None,
    library_id: str | None = None,
    image_key: str = IMAGE_KEY,
    shapes_key: str = SPOTS_KEY,
    table_key: str = TABLE_KEY,
) -> Any:
    """Read a legacy Spatial Transcriptomics slide into the pixgene data model.

    Parameters
    ----------
    counts
        Counts table (``.tsv``, ``.tsv.gz``, ``.csv``): raw UMI counts, one row per spot indexed ``"{x}x{y}"``
        (array coordinates) and one column per gene. A genes x spots table is recognised and transposed.
    spots
        Spot table from the ST spot detector (her2st ``spots/{section}_selection.tsv``, STUtility
        ``alignment_table_*.tsv``): columns ``x``, ``y`` (array coordinates), ``pixel_x``, ``pixel_y`` (spot
        centre in ``image``'s full-resolution pixels) and optionally ``selected`` (1 = under tissue).
    image
        The H&E image (JPEG, PNG or TIFF) the pixel coordinates refer to. It is decoded once; images larger
        than Pillow's decompression-bomb limit are accepted on purpose, as whole-slide scans are that large.
    spot_diameter_um
        Physical spot diameter (100 um for ST 1k and 2k arrays).
    pitch_um
        Physical distance between nearest spot centres (200 um on the 1k square grid, 141.4 um on the 2k
        "diamond" grid). Used to derive the pixel size when ``um_per_px`` is not given.
    um_per_px
        Microns per image pixel; derived as ``pitch_um`` / (median nearest-neighbour distance of the spot
        centres in pixels) when not given.
    library_id
        Name of the slide, recorded in the table (default: the counts file name without extensions).
    image_key, shapes_key, table_key
        Names of the image, spots and table elements.

    Returns
    -------
    :class:`spatialdata.SpatialData` with

    - ``images[image_key]``: the RGB image (c, y, x), multiscale when larger than 4096 px on a side;
      transformation ``global`` = identity (image pixels).
    - ``shapes[shapes_key]``: circles at the selected spots that have counts, ``radius`` in image pixels,
      index = spot id ``"{x}x{y}"``, with the image's transformations.
    - ``tables[table_key]``: raw counts (spots x genes, float32 CSR) linked to the spots through
      ``obs["region"]`` / ``obs["instance_id"]``; ``obs`` holds the spot table's other columns
      (``x``, ``y``, ``pixel_x``, ``pixel_y``, ...); ``obsm["spatial"]`` = centres in image pixels;
      ``uns["pixgene"]`` = platform ``"st"``, spot_diameter_um, image_key, library_id, pitch_um,
      um_per_px_source (``"given"`` or ``"pitch"``), the three source files and, when the array coordinates
      span two dimensions, array_step_px (pixels per array unit in x and y).
    - ``attrs["pixgene"]["um_per_px"][image_key]``: microns per pixel.
    """
    import dask.array as da

    counts, spots, image = Path(counts), Path(spots), Path(image)
    for role, path in (("counts", counts), ("spots", spots), ("image", image)):
        if not path.is_file():
            fail(f"{role} file {str(path)!r}", "does not exist", f"Pass the path of an existing {role} file")
    check_positive(spot_diameter_um, "spot_diameter_um", f"spots file {str(spots)!r}")
    check_positive(pitch_um, "pitch_um", f"spots file {str(spots)!r}")
    check_positive(um_per_px, "um_per_px", f"image file {str(image)!r}")

    table = read_spot_table(spots)
    height, width = image_size(image)
    matrix, spot_ids, genes = read_counts_table(counts)

    kept = _match_spots(table, spot_ids, counts=counts, spots=spots)
    centers = kept[["pixel_x", "pixel_y"]].to_numpy(dtype=float)
    check_spots_in_image(
        centers,
        (height, width),
        kept.index,
        element=f"spots file {str(spots)!r}",
        fix=f"Check that pixel_x/pixel_y refer to the full-resolution pixels of {str(image)!r} "
        "(not a downscaled copy or another image)",
    )

    grid = table[["pixel_x", "pixel_y"]].to_numpy(dtype=float)
    source = "given"
    if um_per_px is None:
        um_per_px = derive_um_per_px(grid, pitch_um=pitch_um)
        source = "pitch"
        if um_per_px is None:
            fail(
                f"spots file {str(spots)!r}",
                "the pixel size cannot be derived from fewer than two distinct spot centres",
                "Pass um_per_px=... explicitly",
            )
    um_per_px = validate_um_per_px(um_per_px, image_key)
    steps = _array_steps(table)
    if steps is not None and abs(steps[0] / steps[1] - 1.0) > _ANISOTROPY_TOLERANCE:
        logger.warning(
            "%s: one array unit spans %.2f px in x but %.2f px in y, so the image's pixels are not square; "
            "spots are drawn as circles with the average pixel size %.4g um/px",
            spots, steps[0], steps[1], um_per_px,
        )

    rows = pd.Index(spot_ids).get_indexer(kept.index)
    X = matrix[rows]
    obs = kept.drop(columns=[c for c in ("selected",) if c in kept.columns])
    # name=False skips dask's content hash of the decoded image (0.4 s for a 92-megapixel scan)
    rgb = da.from_array(decode_rgb(image), chunks=(1024, 1024, 3), name=False)

    library_id = library_id or counts.name.split(".")[0]
    sdata = build_spot_sdata(
        rgb,
        centers_px=centers,
        spot_diameter_um=spot_diameter_um,
        um_per_px=um_per_px,
        counts=X,
        var_names=unique_names(genes),
        obs_names=kept.index,
        obs=obs,
        platform="st",
        image_key=image_key,
        shapes_key=shapes_key,
        table_key=table_key,
        library_id=library_id,
    )
    info = sdata.tables[table_key].uns[UNS_KEY]
    info.update(
        {
            "pitch_um": float(pitch_um),
            "um_per_px_source": source,
            "counts_file": str(counts),
            "spots_file": str(spots),
            "image_file": str(image),
        }
    )
    if steps is not None:
        info["array_step_px"] = [float(s) for s in steps]
    return sdata


def read_spot_table(path: Path) -> pd.DataFrame:
    """The spot table with canonical column names, one row per spot, indexed by ``"{x}x{y}"``."""
    with _open_text(path) as handle:
        first = handle.readline()
    sep = "\t" if "\t" in first else ","
    frame = pd.read_csv(path, sep=sep)
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    # a pandas-written CSV carries its old index as an unnamed first column
    frame = frame.drop(columns=[c for c in frame.columns if c.startswith("unnamed:")])
    rename = {}
    for canonical, spellings in _SPOT_COLUMNS.items():
        found = next((s for s in spellings if s in frame.columns), None)
        if found is not None:
            rename[found] = canonical
    frame = frame.rename(columns=rename)
    required = ["x", "y", "pixel_x", "pixel_y"]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        fail(
            f"spots file {str(path)!r}",
            f"has no column(s) {missing} (its columns are {list(frame.columns)})",
            "Give an ST spot table with columns x, y (array coordinates), pixel_x, pixel_y (pixel centre) "
            "and optionally selected",
        )
    numeric = frame[required].apply(pd.to_numeric, errors="coerce")
    if numeric.isna().any().any() or not np.isfinite(numeric.to_numpy(dtype=float)).all():
        bad = int(numeric.isna().any(axis=1).sum())
        fail(
            f"spots file {str(path)!r}",
            f"{bad} row(s) have missing or non-numeric x, y, pixel_x or pixel_y",
            "Remove those rows or fill in their coordinates",
        )
    frame[required] = numeric
    if "selected" not in frame.columns:
        frame["selected"] = 1
    frame.index = pd.Index([_spot_id(x, y) for x, y in zip(frame["x"], frame["y"], strict=True)])
    if not frame.index.is_unique:
        dup = frame.index[frame.index.duplicated()].unique().tolist()
        fail(
            f"spots file {str(path)!r}",
            f"array positions are repeated: {dup[:5]}",
            "Give one row per spot (is this several sections concatenated?)",
        )
    return frame


def read_counts_table(path: Path) -> tuple[sp.csr_matrix, list[str], list[str]]:
    """Counts as spots x genes CSR, the spot ids and the gene names exactly as written in the file."""
    with _open_text(path) as handle:
        lines = [line for line in handle.read().splitlines() if line.strip()]
    if len(lines) < 2:
        fail(
            f"counts file {str(path)!r}",
            "has no data rows",
            "Give a counts table with a header and one row per spot",
        )
    sep = "\t" if "\t" in lines[0] else ","
    header = [h.strip().strip('"') for h in lines[0].split(sep)]
    rows = [line.split(sep, 1)[0].strip().strip('"') for line in lines[1:]]
    n_fields = lines[1].count(sep) + 1
    # numpy's C parser reads these wide tables (~16k columns) 4x faster than pandas (a Series per column)
    try:
        values = np.loadtxt(
            lines[1:], delimiter=sep, usecols=range(1, n_fields), dtype=np.float64, ndmin=2, quotechar='"'
        )
    except ValueError as err:
        fail(
            f"counts file {str(path)!r}",
            f"is not a table of numbers after its first column ({err})",
            "Give a rectangular table of raw integer UMI counts, spot (or gene) names in the first column",
        )
    if len(header) == values.shape[1] + 1:
        header = header[1:]
    if len(header) != values.shape[1]:
        fail(
            f"counts file {str(path)!r}",
            f"its header has {len(header)} names for {values.shape[1]} columns",
            "Give a rectangular table with one header row and the spot (or gene) names in the first column",
        )
    if _looks_like_spots(rows):
        spot_ids, genes = rows, header
    elif _looks_like_spots(header):
        spot_ids, genes, values = header, rows, values.T
    else:
        fail(
            f"counts file {str(path)!r}",
            f"neither its rows (e.g. {rows[:3]}) nor its columns (e.g. {header[:3]}) are ST spot ids "
            "'{x}x{y}'",
            "Give an ST counts table indexed by array coordinates, e.g. '12x7'",
        )
    spot_ids = [_normalise_spot_id(s) for s in spot_ids]
    if len(set(spot_ids)) != len(spot_ids):
        fail(f"counts file {str(path)!r}", "spot ids are repeated", "Give one row per spot")
    return sp.csr_matrix(values), spot_ids, genes


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with _pillow_without_size_limit(), Image.open(path) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError) as err:
        fail(f"image file {str(path)!r}", f"cannot be opened as an image ({err})", "Pass a JPEG, PNG or TIFF")
    return int(height), int(width)


def decode_rgb(path: Path) -> np.ndarray:
    """Decode an image file once into a (y, x, 3) uint8 array."""
    from PIL import Image

    if path.suffix.lower() in (".jpg", ".jpeg"):
        pixels = _decode_jpeg(path)
        if pixels is not None:
            return pixels
    with _pillow_without_size_limit(), Image.open(path) as img:
        if img.mode != "RGB":
            logger.info("converting %s from mode %s to RGB", path, img.mode)
            img = img.convert("RGB")
        return np.asarray(img)


def unique_names(names: Any) -> list[str]:
    """Gene names made unique the way AnnData does ("Myh4", "Myh4-1"), before the table is built."""
    from anndata.utils import make_index_unique

    index = pd.Index([str(n) for n in names])
    return list(index if index.is_unique else make_index_unique(index))


def _decode_jpeg(path: Path) -> np.ndarray | None:
    """libjpeg-turbo straight into numpy, or None when the JPEG is not plain RGB / greyscale.

    Pillow decodes as fast but then copies the pixels into numpy row by row: 2.8 s instead of 0.9 s for a
    92-megapixel her2st scan, with identical pixels. imagecodecs comes with spatialdata-io and squidpy.
    """
    try:
        import imagecodecs
    except ImportError:
        return None
    try:
        pixels = imagecodecs.jpeg_decode(path.read_bytes())
    except Exception as err:  # imagecodecs raises its own error classes per codec; Pillow gets the next try
        logger.debug("imagecodecs could not decode %s (%s); using Pillow", path, err)
        return None
    if pixels.dtype != np.uint8:
        return None
    if pixels.ndim == 2:
        return np.repeat(pixels[..., None], 3, axis=-1)
    return pixels if pixels.ndim == 3 and pixels.shape[-1] == 3 else None


def check_spots_in_image(
    centers_xy: np.ndarray, shape_yx: tuple[int, int], names: Any, *, element: str, fix: str
) -> None:
    """Every spot centre must lie on the image: x in [0, width], y in [0, height] (image pixels)."""
    height, width = shape_yx
    x, y = centers_xy[:, 0], centers_xy[:, 1]
    outside = np.flatnonzero((x < 0) | (y < 0) | (x > width) | (y > height))
    if outside.size:
        first = outside[0]
        fail(
            element,
            f"{outside.size} of {len(x)} spot centres lie outside the {width} x {height} px image, e.g. spot "
            f"{list(names)[first]!r} at (x={x[first]:.1f}, y={y[first]:.1f})",
            fix,
        )


def _match_spots(table: pd.DataFrame, spot_ids: list[str], *, counts: Path, spots: Path) -> pd.DataFrame:
    selected = table[pd.to_numeric(table["selected"], errors="coerce").fillna(0).astype(int) == 1]
    if selected.empty:
        fail(
            f"spots file {str(spots)!r}",
            "no spot has selected == 1",
            "Mark the spots under tissue with selected = 1",
        )
    have = set(spot_ids)
    kept = selected[selected.index.isin(have)]
    if kept.empty:
        fail(
            f"counts file {str(counts)!r} and spots file {str(spots)!r}",
            f"share no spot: counts rows are e.g. {spot_ids[:3]}, selected spots e.g. "
            f"{selected.index[:3].tolist()}",
            "Pass the counts and spot table of the same section",
        )
    if len(kept) < len(selected):
        logger.info(
            "%d of %d selected spots in %s have no counts row and are left out",
            len(selected) - len(kept), len(selected), spots.name,
        )
    return kept


def _array_steps(table: pd.DataFrame) -> tuple[float, float] | None:
    """Pixels per array unit along x and along y: least-squares affine fit of pixel on array coordinates."""
    array = table[["x", "y"]].to_numpy(dtype=float)
    if len(array) < 3 or np.linalg.matrix_rank(array - array.mean(0)) < 2:
        return None
    design = np.c_[array, np.ones(len(array))]
    coef, *_ = np.linalg.lstsq(design, table[["pixel_x", "pixel_y"]].to_numpy(dtype=float), rcond=None)
    step_x, step_y = np.linalg.norm(coef[0]), np.linalg.norm(coef[1])
    return float(step_x), float(step_y)


def _spot_id(x: float, y: float) -> str:
    return f"{_format_coord(x)}x{_format_coord(y)}"


def _format_coord(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else f"{value:g}"


def _normalise_spot_id(name: str) -> str:
    x, y = name.split("x")
    return _spot_id(float(x), float(y))


def _looks_like_spots(names: list[str]) -> bool:
    return len(names) > 0 and np.mean([bool(_SPOT_ID.match(n)) for n in names]) >= 0.9


@contextlib.contextmanager
def _open_text(path: Path) -> Iterator[Any]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        yield handle


@contextlib.contextmanager
def _pillow_without_size_limit() -> Iterator[None]:
    """Whole-slide H&E scans exceed Pillow's decompression-bomb guard; these files are chosen by the user."""
    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous
