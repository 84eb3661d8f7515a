"""The physical pixel size of an image: given, recorded, or derived from its spots; validated and recorded."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .keys import UNS_KEY
from .validate import check_positive, fail

logger = logging.getLogger(__name__)

#: plausible range for H&E scans and their downsampled pyramids, microns per pixel
UM_PER_PX_RANGE = (0.05, 50.0)


def recorded_um_per_px(sdata: Any, image_key: str) -> float | None:
    record = (getattr(sdata, "attrs", None) or {}).get(UNS_KEY, {})
    value = record.get("um_per_px", {}).get(image_key)
    return None if value is None else float(value)


def record_um_per_px(sdata: Any, image_key: str, um_per_px: float) -> None:
    attrs = sdata.attrs
    record = dict(attrs.get(UNS_KEY, {}))
    per_image = dict(record.get("um_per_px", {}))
    per_image[image_key] = float(um_per_px)
    record["um_per_px"] = per_image
    attrs[UNS_KEY] = record


def derive_um_per_px(
    centers_px: np.ndarray,
    *,
    radius_px: float | None = None,
    spot_diameter_um: float | None = None,
    pitch_um: float | None = None,
) -> float | None:
    """Microns per pixel from a known spot diameter, else from the known centre-to-centre pitch."""
    if spot_diameter_um is not None and radius_px is not None and radius_px > 0:
        return float(spot_diameter_um) / (2.0 * float(radius_px))
    if pitch_um is not None and len(centers_px) >= 2:
        from scipy.spatial import cKDTree

        dist, _ = cKDTree(centers_px).query(centers_px, k=2)
        nn = float(np.median(dist[:, 1]))
        if nn > 0:
            return float(pitch_um) / nn
    return None


def validate_um_per_px(value: float, image_key: str) -> float:
    check_positive(value, "um_per_px", f"image {image_key!r}")
    lo, hi = UM_PER_PX_RANGE
    if not lo <= value <= hi:
        fail(
            f"image {image_key!r}",
            f"um_per_px={value:.4g} is outside the plausible range {lo}-{hi} microns per pixel",
            "Check the spot diameter / pitch and the image scale, or pass um_per_px explicitly",
        )
    return float(value)


def resolve_um_per_px(
    sdata: Any,
    image_key: str,
    *,
    um_per_px: float | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
) -> float:
    """Explicit value > value recorded on the SpatialData > derivation from the spots' known diameter."""
    if um_per_px is not None:
        return validate_um_per_px(um_per_px, image_key)
    recorded = recorded_um_per_px(sdata, image_key)
    if recorded is not None:
        return validate_um_per_px(recorded, image_key)
    if shapes_key is not None and table_key is not None and table_key in sdata.tables:
        info = sdata.tables[table_key].uns.get(UNS_KEY, {})
        diameter_um = info.get("spot_diameter_um")
        shapes = sdata.shapes.get(shapes_key)
        if diameter_um is not None and shapes is not None and "radius" in shapes:
            from .coords import affine_between, isotropic_scale

            scale = isotropic_scale(affine_between(sdata, shapes_key, image_key), f"shapes {shapes_key!r}")
            radius_px = float(np.median(shapes["radius"].to_numpy())) * scale
            value = derive_um_per_px(np.zeros((0, 2)), radius_px=radius_px, spot_diameter_um=diameter_um)
            if value is not None:
                logger.info("derived %.4g um/px for %r from %g um spots", value, image_key, diameter_um)
                return validate_um_per_px(value, image_key)
    fail(
        f"image {image_key!r}",
        "its microns per pixel were neither given, recorded, nor derivable from spots of known diameter",
        "Pass um_per_px=..., or read the slide with a pg.io reader, which records it",
    )
