"""Conversion of a scanpy-style Visium AnnData (``uns["spatial"]``) into the pixgene data model."""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np

from .._core.keys import IMAGE_KEY, SPOTS_KEY, TABLE_KEY, UNS_KEY
from .._core.validate import check_positive, fail
from ..data import build_spot_sdata
from ._st import check_spots_in_image, unique_names
from ._visium import VISIUM_SPOT_DIAMETER_UM

logger = logging.getLogger(__name__)

__all__ = ["from_anndata"]

_IMAGE_CHOICES = ("auto", "hires", "lowres")


def from_anndata(
    adata: Any,
    *,
    library_id: str | None = None,
    image: Literal["auto", "hires", "lowres"] = "auto",
    layer: str | None = None,
    spot_diameter_um: float = VISIUM_SPOT_DIAMETER_UM,
    platform: str = "visium",
    image_key: str = IMAGE_KEY,
    shapes_key: str = SPOTS_KEY,
    table_key: str = TABLE_KEY,
) -> Any:
    """Convert a scanpy/squidpy Visium AnnData into the pixgene data model.

    The AnnData follows the layout of ``scanpy.read_visium``: ``obsm["spatial"]`` holds spot centres (x, y) in
    full-resolution pixels, ``uns["spatial"][library_id]["images"]`` the ``"hires"`` and/or ``"lowres"`` image
    and ``uns["spatial"][library_id]["scalefactors"]`` ``tissue_hires_scalef``, ``tissue_lowres_scalef`` and
    ``spot_diameter_fullres``. If ``obs["in_tissue"]`` exists only in-tissue spots are kept.

    Parameters
    ----------
    adata
        The AnnData; it is not modified.
    library_id
        Key of ``uns["spatial"]``; may be omitted when there is only one.
    image
        ``"auto"`` takes the high-resolution image when present, else the low-resolution one.
    layer
        Layer holding the raw counts (default ``adata.X``).
    spot_diameter_um
        Physical spot diameter (55 um for Visium).
    platform
        Platform name recorded in the table.
    image_key, shapes_key, table_key
        Names of the image, spots and table elements.

    Returns
    -------
    :class:`spatialdata.SpatialData` with

    - ``images[image_key]``: the chosen image (c, y, x) in its own pixels, with transformations
      ``{library_id}_downscaled_{image}`` = identity, ``{library_id}`` and ``global`` =
      Scale(1 / scale factor), i.e. full-resolution pixels (the coordinate systems of spatialdata-io's
      Visium reader).
    - ``shapes[shapes_key]``: the spots as circles in the chosen image's pixels (``obsm["spatial"]`` x scale
      factor, radius = ``spot_diameter_fullres`` x scale factor / 2), index = ``obs_names``, with the image's
      transformations.
    - ``tables[table_key]``: raw counts (float32 CSR) linked to the spots; ``obs`` and ``var`` columns copied;
      ``obsm["spatial"]`` = centres in the chosen image's pixels, ``obsm["spatial_fullres"]`` = the input's
      ``obsm["spatial"]``; ``uns["pixgene"]`` = platform, spot_diameter_um, image_key, library_id,
      image (resolution chosen), scalefactors.
    - ``attrs["pixgene"]["um_per_px"][image_key]`` = ``spot_diameter_um`` / spot diameter in image pixels.
    """
    import anndata as ad

    if not isinstance(adata, ad.AnnData):
        fail(
            "adata",
            f"is a {type(adata).__name__}, not an AnnData",
            "Pass an AnnData (e.g. from scanpy.read_visium)",
        )
    if image not in _IMAGE_CHOICES:
        fail(f"image={image!r}", f"is not one of {_IMAGE_CHOICES}", "Choose one of those")
    check_positive(spot_diameter_um, "spot_diameter_um", "adata")

    spatial = adata.obsm.get("spatial")
    if spatial is None or np.ndim(spatial) != 2 or np.shape(spatial)[1] < 2:
        fail(
            'adata.obsm["spatial"]',
            "is missing or not an (n_spots, 2) array of (x, y) full-resolution pixel positions",
            "Read the data with scanpy.read_visium / squidpy.read.visium, or set obsm['spatial']",
        )
    spatial = np.asarray(spatial, dtype=float)[:, :2]
    if not np.isfinite(spatial).all():
        fail('adata.obsm["spatial"]', "contains NaN or infinite positions", "Drop spots without a position")

    library_id, library = _library(adata, library_id)
    resolution, pixels = _image(library, library_id, image)
    scalefactors = _scalefactors(library, library_id, resolution)
    scale = scalefactors[f"tissue_{resolution}_scalef"]

    keep = np.ones(adata.n_obs, dtype=bool)
    if "in_tissue" in adata.obs.columns:
        keep = adata.obs["in_tissue"].to_numpy() == 1
        if not keep.any():
            fail('adata.obs["in_tissue"]', "marks no spot as in tissue (== 1)", "Check the in_tissue column")
    fullres_xy = spatial[keep]
    centers = fullres_xy * scale
    check_spots_in_image(
        centers,
        tuple(pixels.shape[:2]),
        adata.obs_names[keep],
        element='adata.obsm["spatial"]',
        fix=f"obsm['spatial'] must be full-resolution pixels and tissue_{resolution}_scalef the factor from "
        f"full resolution to the {resolution} image",
    )
    if layer is not None and layer not in adata.layers:
        fail(
            f"layer {layer!r}",
            f"is not in adata.layers ({list(adata.layers)})",
            "Pass an existing layer or None",
        )
    counts = adata.layers[layer] if layer is not None else adata.X
    if counts is None:
        fail("adata.X", "is empty", "Pass layer= naming the raw counts")
    counts = counts[keep]

    diameter_px = scalefactors["spot_diameter_fullres"] * scale
    sdata = build_spot_sdata(
        pixels,
        centers_px=centers,
        spot_diameter_um=spot_diameter_um,
        um_per_px=spot_diameter_um / diameter_px,
        counts=counts,
        var_names=unique_names(adata.var_names),
        obs_names=adata.obs_names[keep],
        obs=adata.obs.loc[keep].copy(),
        platform=platform,
        image_key=image_key,
        shapes_key=shapes_key,
        table_key=table_key,
        image_transformations=_transformations(library_id, resolution, scale),
        library_id=library_id,
    )
    out = sdata.tables[table_key]
    for column in adata.var.columns:
        out.var[column] = adata.var[column].to_numpy()
    out.obsm["spatial_fullres"] = fullres_xy
    out.uns[UNS_KEY].update({"image": resolution, "scalefactors": scalefactors})
    logger.info(
        "converted AnnData %s: %d spots, %s image %s, spot diameter %.2f px",
        library_id, out.n_obs, resolution, tuple(pixels.shape), diameter_px,
    )
    return sdata


def _library(adata: Any, library_id: str | None) -> tuple[str, dict]:
    libraries = adata.uns.get("spatial")
    if not isinstance(libraries, dict) or len(libraries) == 0:
        fail(
            'adata.uns["spatial"]',
            "is missing or empty, so there is no image or scale factor",
            "Read the data with scanpy.read_visium / squidpy.read.visium (pg.io.read_visium for Space Ranger "
            "output)",
        )
    if library_id is None:
        if len(libraries) > 1:
            fail('adata.uns["spatial"]', f"holds several libraries {list(libraries)}", "Pass library_id=...")
        library_id = next(iter(libraries))
    if library_id not in libraries:
        fail(
            f"library_id {library_id!r}",
            f"is not in adata.uns['spatial'] ({list(libraries)})",
            "Pass one of those",
        )
    return str(library_id), libraries[library_id]


def _image(library: dict, library_id: str, image: str) -> tuple[str, np.ndarray]:
    images = library.get("images") or {}
    order = ("hires", "lowres") if image == "auto" else (image,)
    resolution = next((res for res in order if images.get(res) is not None), None)
    if resolution is None:
        fail(
            f'adata.uns["spatial"][{library_id!r}]["images"]',
            f"has no {' or '.join(order)} image (it has {list(images)})",
            "Choose image= among the images present, or load the image into the AnnData",
        )
    pixels = np.asarray(images[resolution])
    if pixels.ndim == 3 and pixels.shape[-1] == 4:
        pixels = pixels[..., :3]  # Space Ranger PNGs may carry an opaque alpha channel
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        fail(
            f'adata.uns["spatial"][{library_id!r}]["images"][{resolution!r}]',
            f"has shape {pixels.shape}, not an RGB (y, x, 3) image",
            "Store the H&E image as a (y, x, 3) array",
        )
    return resolution, pixels


def _scalefactors(library: dict, library_id: str, resolution: str) -> dict[str, float]:
    scalefactors = library.get("scalefactors") or {}
    where = f'adata.uns["spatial"][{library_id!r}]["scalefactors"]'
    out = {}
    for key in ("spot_diameter_fullres", f"tissue_{resolution}_scalef"):
        value = scalefactors.get(key)
        if value is None:
            fail(where, f"lacks {key!r}", "Copy Space Ranger's scalefactors_json.json into it")
        try:
            value = float(value)
        except (TypeError, ValueError):
            fail(
                where,
                f"{key}={value!r} is not a number",
                "Copy Space Ranger's scalefactors_json.json into it",
            )
        check_positive(value, key, where)
        out[key] = value
    for key, value in scalefactors.items():
        if isinstance(value, int | float) and key not in out:
            out[key] = float(value)
    return out


def _transformations(library_id: str, resolution: str, scale: float) -> dict:
    from spatialdata.transformations import Identity, Scale

    to_fullres = Scale(np.array([1.0 / scale, 1.0 / scale]), axes=("y", "x"))
    return {f"{library_id}_downscaled_{resolution}": Identity(), library_id: to_fullres, "global": to_fullres}
