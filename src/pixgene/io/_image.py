"""Reader for a user's own H&E slide: JPEG, PNG, TIFF, OME-TIFF and TIFF-based whole-slide formats."""

from __future__ import annotations

import functools
import logging
import re
import weakref
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from .._core.keys import IMAGE_KEY
from .._core.units import UM_PER_PX_RANGE, record_um_per_px, validate_um_per_px
from .._core.validate import check_positive, fail

logger = logging.getLogger(__name__)

__all__ = ["read_image"]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: microns per unit of OME's length units
_OME_UNITS_UM = {
    "pm": 1e-6, "Å": 1e-4, "nm": 1e-3, "µm": 1.0, "um": 1.0, "μm": 1.0, "micron": 1.0, "mm": 1e3,
    "cm": 1e4, "dm": 1e5, "m": 1e6,
}
#: microns per TIFF ResolutionUnit (2 = inch, 3 = centimetre); 1 (none) carries no physical size
_RESOLUTION_UNIT_UM = {2: 25400.0, 3: 10000.0}
#: Pillow modes that hold a colour image; greyscale and 32-bit modes are refused
_PILLOW_COLOUR_MODES = {"RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}
_OPENSLIDE_EXTRA = "pip install openslide-python openslide-bin"


def read_image(
    path: str | Path,
    *,
    um_per_px: float | None = None,
    image_key: str = IMAGE_KEY,
    chunks: int = 1024,
) -> Any:
    """Read an H&E image file into a SpatialData, lazily for TIFF-based whole-slide images.

    TIFF, OME-TIFF and TIFF-based whole-slide formats (Aperio SVS, Hamamatsu NDPI, Philips TIFF, Leica SCN,
    Ventana BIF, ...) are opened with tifffile and read tile by tile through dask when computed: a
    100,000 x 80,000 px slide opens in about a second. Their pyramid levels become the element's scales.
    Formats tifffile cannot read (MIRAX ``.mrxs``, ...) are read through openslide-python when installed
    (``pip install openslide-python openslide-bin``). JPEG, PNG and other Pillow formats are decoded at once;
    images above 4096 px on a side get a (lazily computed) pyramid.

    Parameters
    ----------
    path
        The image file.
    um_per_px
        Microns per pixel of the full-resolution image. When not given, it is read from the file: OME-XML
        ``PhysicalSizeX`` / ``PhysicalSizeY``, the Aperio ``MPP`` of an SVS description, Philips'
        ``DICOM_PIXEL_SPACING``, openslide's ``mpp-x``, or the TIFF / JPEG / PNG resolution in pixels per
        centimetre or inch (resolutions of a screen image, e.g. 72 or 300 dpi, are not taken as a pixel size).
        A given value wins over the file's.
    image_key
        Name of the image element.
    chunks
        Side of the dask chunks in pixels (rounded up to a whole number of the file's tiles).

    Returns
    -------
    :class:`spatialdata.SpatialData` with

    - ``images[image_key]``: the RGB image (dims ``c``, ``y``, ``x``; channel names ``r``, ``g``, ``b``;
      the file's dtype, usually uint8), a multiscale ``DataTree`` (``scale0``, ``scale1``, ...) when the file
      has a pyramid or the image is larger than 4096 px on a side; transformation ``global`` = identity, so
      the ``global`` coordinate system is the image's full-resolution pixels. An alpha channel is dropped.
    - ``attrs["pixgene"]["um_per_px"][image_key]``: microns per pixel.

    Raises
    ------
    PixgeneInputError
        If the file does not exist or cannot be read, if the image is not RGB (greyscale, palette,
        multi-channel fluorescence), if its pixel size is neither given nor recorded in the file, or if the
        pixel size is implausible.
    """
    path = Path(path)
    element = f"image file {str(path)!r}"
    if not path.is_file():
        fail(element, "does not exist", "Pass the path of an existing image file")
    check_positive(um_per_px, "um_per_px", element)
    if not isinstance(chunks, int | np.integer) or isinstance(chunks, bool) or chunks < 16:
        fail(element, f"chunks={chunks!r} is not a whole number of pixels of at least 16", "Pass e.g. chunks=1024")

    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic in _TIFF_MAGIC:
        opened = _open_tiff(path, element, chunks)
        if isinstance(opened, str):
            opened = _open_openslide(path, element, chunks, reason=opened)
    elif _pillow_can_open(path):
        opened = _open_pillow(path, element)
    else:
        opened = _open_openslide(path, element, chunks, reason="it is neither a TIFF nor an image Pillow can open")
    levels, found_um, source, note = opened

    if um_per_px is None:
        if found_um is None:
            fail(
                element,
                "its microns per pixel are not recorded in the file (no OME PhysicalSizeX, Aperio MPP, Philips "
                f"pixel spacing or physical resolution){note}",
                "Pass um_per_px=... (the scanner's pixel size, e.g. 0.25 for a 40x scan, 0.5 for 20x)",
            )
        um_per_px = found_um
    else:
        source = "given"
    um_per_px = validate_um_per_px(um_per_px, image_key)

    from spatialdata import SpatialData

    image = build_image_element(levels, chunks=chunks)
    sdata = SpatialData(images={image_key: image})
    record_um_per_px(sdata, image_key, um_per_px)
    full = levels[0]
    logger.info(
        "read %s: %d x %d px, %d level(s), %s, %.4g um/px (%s)",
        path, full.shape[2], full.shape[1], len(levels), full.dtype, um_per_px, source,
    )
    return sdata


def build_image_element(levels: list[Any], *, chunks: int = 1024) -> Any:
    """(3, y, x) arrays, finest first, to an Image2DModel element with identity ``global``.

    A single array is parsed by :func:`pixgene.data._build.parse_rgb_image` (a lazily computed pyramid when
    large); several become the scales of a multiscale ``DataTree`` as they are, each level scaled to the
    first by the ratio of their shapes.
    """
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, set_transformation
    from xarray import DataArray, Dataset, DataTree

    from ..data import parse_rgb_image

    arrays = [a if isinstance(a, da.Array) else da.from_array(a, chunks=(3, chunks, chunks)) for a in levels]
    if len(arrays) == 1:
        return parse_rgb_image(arrays[0], name="image", chunks=chunks)
    height, width = arrays[0].shape[1:]
    scales = {}
    for i, array in enumerate(arrays):
        coords = {"c": ["r", "g", "b"]}
        for axis, full, n in (("y", height, array.shape[1]), ("x", width, array.shape[2])):
            # pixel centres in full-resolution pixels, as spatialdata computes them for its own pyramids
            coords[axis] = np.linspace(0, full, n + 1)[:-1] + full / n / 2
        scales[f"scale{i}"] = Dataset({"image": DataArray(array, dims=("c", "y", "x"), coords=coords)})
    tree = DataTree.from_dict(scales)
    set_transformation(tree, {"global": Identity()}, set_all=True)
    Image2DModel().validate(tree)
    return tree


# --------------------------------------------------------------------------------------------------- TIFF


def _open_tiff(path: Path, element: str, chunks: int) -> tuple[list[Any], float | None, str, str] | str:
    """Levels as lazy (3, y, x) dask arrays and the file's um/px; why not, when tifffile cannot decode it."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            index = _main_series(tif)
            series = tif.series[index]
            keyframe = series.keyframe
            try:
                tifffile.TIFF.DECOMPRESSORS[keyframe.compression]
            except KeyError:
                return f"tifffile has no decoder for its compression {keyframe.compression!r}"
            layout = _rgb_layout(series, keyframe, element)
            found_um, source, note = _tiff_um_per_px(tif, index, keyframe)
            n_levels = len(series.levels)
    except tifffile.TiffFileError as err:
        return f"tifffile cannot read it: {err}"

    levels = _tiff_levels(path, index, n_levels, layout, chunks)
    return levels, found_um, source, note


def _main_series(tif: Any) -> int:
    """The series with the most pixels: the slide itself, not its label, macro or thumbnail."""
    sizes = []
    for series in tif.series:
        shape = dict(zip(series.axes, series.shape, strict=True))
        sizes.append(shape.get("Y", 0) * shape.get("X", 0))
    if not sizes or max(sizes) == 0:
        return 0
    return int(np.argmax(sizes))


def _rgb_layout(series: Any, keyframe: Any, element: str) -> str:
    """``"YXS"`` or ``"SYX"`` for an RGB(A) series; refuse anything else before any pixel is read."""
    import tifffile

    axes, shape = series.axes, series.shape
    sizes = dict(zip(axes, shape, strict=True))
    extra = {a: n for a, n in sizes.items() if a not in "YXSC" and n > 1}
    if extra:
        fail(
            element,
            f"has axes {axes} with shape {shape}: a stack ({extra}), not a single 2-D RGB image",
            "Pass a single RGB H&E image (save one plane of the stack)",
        )
    photometric = keyframe.photometric
    rgb = photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)
    if rgb and "C" not in sizes and sizes.get("S") in (3, 4):
        return "YXS" if axes.index("S") == len(axes) - 1 else "SYX"
    if photometric == tifffile.PHOTOMETRIC.PALETTE:
        fail(element, "is a palette (indexed colour) image", "Convert it to RGB, e.g. with Pillow's .convert('RGB')")
    channels = sizes.get("C", sizes.get("S", 1))
    if channels == 1:
        problem = f"is a greyscale image (axes {axes}, shape {shape}), not RGB"
    else:
        problem = (
            f"has {channels} separate channels (axes {axes}, photometric {photometric.name}): a fluorescence or "
            "multiplex image, not an RGB brightfield H&E"
        )
    fail(
        element,
        problem,
        "Pass an RGB H&E image; an RGB image stored as three planes can be rewritten with "
        "tifffile.imwrite(out, tifffile.imread(path).transpose(1, 2, 0), photometric='rgb')",
    )


def _tiff_levels(path: Path, index: int, n_levels: int, layout: str, chunks: int) -> list[Any]:
    """Each pyramid level as a lazy (3, y, x) dask array over the file's tiles (tifffile's zarr store)."""
    import dask.array as da
    import tifffile
    import zarr

    store = tifffile.imread(path, aszarr=True, series=index)
    cache = getattr(store, "_filecache", None)
    if cache is not None:
        # the store reopens the file to read tiles and keeps it open: close it when the image is dropped
        weakref.finalize(store, cache.clear)
    opened = zarr.open(store, mode="r")
    if not hasattr(opened, "keys"):
        arrays = [opened]
    else:
        arrays = [opened[str(i)] for i in range(n_levels)]
    s_axis = 2 if layout == "YXS" else 0
    levels = []
    for array in arrays:
        # whole tiles per chunk, so no tile is decoded twice
        tile_y, tile_x = (c for i, c in enumerate(array.chunks) if i != s_axis)
        cy, cx = (max(1, -(-chunks // t)) * t for t in (tile_y, tile_x))
        samples = array.shape[s_axis]
        lazy = da.from_zarr(array, chunks=(cy, cx, samples) if s_axis == 2 else (samples, cy, cx))
        levels.append(lazy[:, :, :3].transpose(2, 0, 1) if s_axis == 2 else lazy[:3])
    return _consistent_levels(levels, path)


def _consistent_levels(levels: list[Any], path: Path) -> list[Any]:
    """Keep the levels that shrink the previous one in both axes by about the same factor."""
    kept = [levels[0]]
    for level in levels[1:]:
        prev = kept[-1]
        fy, fx = prev.shape[1] / level.shape[1], prev.shape[2] / level.shape[2]
        if fy > 1 and fx > 1 and abs(fy / fx - 1) < 0.05:
            kept.append(level)
        else:
            logger.warning("%s: skipping a pyramid level of shape %s after %s", path, level.shape, prev.shape)
    return kept


def _tiff_um_per_px(tif: Any, index: int, keyframe: Any) -> tuple[float | None, str, str]:
    """(um/px, where it came from, a note on values that were found but rejected) from TIFF metadata."""
    candidates: list[tuple[float | None, str]] = []
    if tif.is_ome and tif.ome_metadata:
        candidates.append((_ome_um_per_px(tif.ome_metadata, index), "OME PhysicalSizeX/Y"))
    description = tif.pages.first.description or ""
    if tif.is_svs:
        match = re.search(r"\bMPP\s*=\s*([0-9.]+(?:[eE][-+]?[0-9]+)?)", description)
        candidates.append((float(match.group(1)) if match else None, "Aperio MPP"))
    if tif.is_philips:
        spacings = re.findall(
            r'DICOM_PIXEL_SPACING"[^>]*>\s*(?:&quot;|")?([0-9.eE+-]+)(?:&quot;|")?\s+(?:&quot;|")?([0-9.eE+-]+)',
            description,
        )
        values = [1000.0 * (float(a) + float(b)) / 2 for a, b in spacings if float(a) > 0 and float(b) > 0]
        candidates.append((min(values) if values else None, "Philips DICOM_PIXEL_SPACING"))
    candidates.append((_resolution_um_per_px(keyframe.tags), "TIFF XResolution/ResolutionUnit"))
    return _first_plausible(candidates)


def _ome_um_per_px(xml: str, index: int) -> float | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    images = root.findall("{*}Image")
    if not images:
        return None
    pixels = images[index if index < len(images) else 0].find("{*}Pixels")
    if pixels is None:
        return None
    sizes = []
    for axis in ("X", "Y"):
        value = pixels.get(f"PhysicalSize{axis}")
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        if value is None or unit not in _OME_UNITS_UM:
            continue
        sizes.append(float(value) * _OME_UNITS_UM[unit])
    return _mean_of_axes(sizes, "OME PhysicalSizeX/Y")


def _resolution_um_per_px(tags: Any) -> float | None:
    unit_tag = tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 2  # the TIFF default unit is the inch
    if unit not in _RESOLUTION_UNIT_UM:
        return None
    sizes = []
    for name in ("XResolution", "YResolution"):
        tag = tags.get(name)
        if tag is None:
            continue
        value = tag.value
        per_unit = value[0] / value[1] if isinstance(value, tuple) and value[1] else float(np.ravel(value)[0])
        if per_unit > 0:
            sizes.append(_RESOLUTION_UNIT_UM[unit] / per_unit)
    return _mean_of_axes(sizes, "TIFF resolution")


def _mean_of_axes(sizes: list[float], what: str) -> float | None:
    sizes = [s for s in sizes if np.isfinite(s) and s > 0]
    if not sizes:
        return None
    if len(sizes) == 2 and abs(sizes[0] / sizes[1] - 1) > 0.01:
        logger.warning("%s: pixels are not square (%.4g x %.4g um); using their mean", what, *sizes)
    return float(np.mean(sizes))


def _first_plausible(candidates: list[tuple[float | None, str]]) -> tuple[float | None, str, str]:
    """The first value inside pixgene's plausible um/px range; screen resolutions (72 dpi, ...) fall outside."""
    lo, hi = UM_PER_PX_RANGE
    rejected = []
    for value, source in candidates:
        if value is None:
            continue
        if lo <= value <= hi:
            return value, source, ""
        rejected.append(f"{source} gives {value:.4g} um/px ({25400.0 / value:.4g} dpi), not a microscope's pixel size")
    note = f"; {'; '.join(rejected)}" if rejected else ""
    return None, "", note


# ------------------------------------------------------------------------------------------------- Pillow


def _pillow_can_open(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    from ._st import _pillow_without_size_limit

    try:
        with _pillow_without_size_limit(), Image.open(path):
            return True
    except (UnidentifiedImageError, OSError):
        return False


def _open_pillow(path: Path, element: str) -> tuple[list[Any], float | None, str, str]:
    """JPEG, PNG, ...: checked from the header, then decoded at once (these files are small enough)."""
    from PIL import Image

    from ._st import _pillow_without_size_limit, decode_rgb

    with _pillow_without_size_limit(), Image.open(path) as img:
        mode, (width, height), info = img.mode, img.size, dict(img.info)
        frames = getattr(img, "n_frames", 1)
    if mode not in _PILLOW_COLOUR_MODES:
        fail(
            element,
            f"is a {'greyscale' if mode in ('1', 'L', 'LA', 'La', 'I', 'F') or mode.startswith('I;') else mode} "
            f"image (Pillow mode {mode!r}), not RGB",
            "Pass an RGB H&E image",
        )
    if frames > 1:
        logger.warning("%s holds %d frames; reading the first", path, frames)
    dpi = info.get("dpi")
    sizes = [25400.0 / float(d) for d in np.ravel(dpi)[:2] if float(d) > 0] if dpi is not None else []
    found, source, note = _first_plausible([(_mean_of_axes(sizes, "image resolution"), "image resolution (dpi)")])
    pixels = decode_rgb(path)
    if pixels.shape[:2] != (height, width):
        fail(element, f"decoded to shape {pixels.shape}, not its header's {height} x {width}", "Re-save the image")
    return [np.ascontiguousarray(pixels.transpose(2, 0, 1))], found, source, note


# ----------------------------------------------------------------------------------------------- openslide


def _open_openslide(path: Path, element: str, chunks: int, *, reason: str) -> tuple[list[Any], float | None, str, str]:
    """Whole-slide formats tifffile cannot read, through openslide-python (an optional dependency)."""
    try:
        import openslide
    except ImportError:
        fail(
            element,
            f"cannot be read without openslide-python ({reason}), which is not installed",
            f"Install it with `{_OPENSLIDE_EXTRA}`, or convert the slide to OME-TIFF",
        )
    try:
        slide = _openslide_handle(str(path))
    except (openslide.OpenSlideError, OSError) as err:  # OpenSlideUnsupportedFormatError is an OpenSlideError
        fail(element, f"cannot be opened as a slide or image ({reason}; openslide: {err})", "Pass a JPEG, PNG, "
             "TIFF, OME-TIFF or a whole-slide image openslide supports")
    props = slide.properties
    sizes = [float(props[k]) for k in ("openslide.mpp-x", "openslide.mpp-y") if props.get(k)]
    found, source, note = _first_plausible([(_mean_of_axes(sizes, "openslide mpp"), "openslide mpp-x/mpp-y")])
    levels = [_openslide_level(slide, path, level, chunks) for level in range(slide.level_count)]
    return _consistent_levels(levels, path), found, source, note


def _openslide_level(slide: Any, path: Path, level: int, chunks: int) -> Any:
    """One level as a lazy (3, y, x) uint8 dask array; each chunk is one read_region call.

    The tasks hold the file's path, not the slide: xarray and spatialdata copy dask graphs, and an open
    slide cannot be copied or pickled. Each worker reopens the slide once (:func:`_openslide_handle`).
    """
    import dask.array as da

    width, height = slide.level_dimensions[level]
    grid = (
        (3,),
        tuple(min(chunks, height - y) for y in range(0, height, chunks)),
        tuple(min(chunks, width - x) for x in range(0, width, chunks)),
    )
    read = functools.partial(_read_openslide_block, str(path), level, float(slide.level_downsamples[level]))
    return da.map_blocks(read, dtype=np.uint8, chunks=grid, meta=np.empty((0, 0, 0), np.uint8))


@functools.lru_cache(maxsize=8)
def _openslide_handle(path: str) -> Any:
    import openslide

    return openslide.OpenSlide(path)


def _read_openslide_block(path: str, level: int, downsample: float, block_info: Any = None) -> np.ndarray:
    (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]
    region = _openslide_handle(path).read_region(
        (round(x0 * downsample), round(y0 * downsample)), level, (x1 - x0, y1 - y0)
    )
    rgba = np.asarray(region.convert("RGBA"))
    rgb = rgba[..., :3].copy()
    rgb[rgba[..., 3] == 0] = 255  # no scanned data: white background, as openslide's viewers show it
    return rgb.transpose(2, 0, 1)
