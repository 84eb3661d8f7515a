"""The public way to state and to look up an element's microns per pixel."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .._core.coords import element_of, isotropic_scale, transformations_of
from .._core.units import record_um_per_px, recorded_um_per_px, validate_um_per_px
from .._core.validate import fail

logger = logging.getLogger(__name__)

__all__ = ["get_um_per_px", "set_um_per_px"]

#: names of coordinate systems taken to be in microns without being told
MICRON_SYSTEM_NAMES = frozenset(
    {"um", "µm", "micron", "microns", "micrometer", "micrometers", "micrometre", "micrometres"}
)


def set_um_per_px(sdata: Any, element: str, um_per_px: float) -> float:
    """State the physical size of an element's pixels.

    Every pixgene function looks the value up in ``sdata.attrs["pixgene"]["um_per_px"][element]``; the
    ``pg.io`` readers record it for the image they read. Use this for an image or a dense map made elsewhere.

    Parameters
    ----------
    sdata
        The :class:`spatialdata.SpatialData` holding ``element``.
    element
        Name of an image (or labels) element.
    um_per_px
        Microns per pixel of the element's full-resolution level, e.g. 0.25 for a 40x scan, 0.5 for 20x.

    Returns
    -------
    The validated value, now recorded on ``sdata``.

    Raises
    ------
    PixgeneInputError
        If the element does not exist or the value is not a plausible pixel size (0.05 to 50 microns).
    """
    element_of(sdata, element)
    value = validate_um_per_px(um_per_px, element)
    record_um_per_px(sdata, element, value)
    return value


def get_um_per_px(sdata: Any, element: str, *, coordinate_system: str | None = None) -> float:
    """The microns per pixel of an element.

    Looked up in this order: the value recorded on ``sdata`` (by a ``pg.io`` reader or
    :func:`set_um_per_px`); the scale of the element's transformation to ``coordinate_system``, a
    coordinate system the caller knows to be in microns; the scale of its transformation to a coordinate
    system named like a micron unit (``"um"``, ``"microns"``, ``"micrometer"``, ...). spatialdata keeps no
    units on its in-memory transformations, so a system in microns cannot be recognised otherwise (the
    ``"global"`` systems of spatialdata-io's Xenium and Visium HD readers are in image pixels, not
    microns).

    Parameters
    ----------
    sdata
        The :class:`spatialdata.SpatialData` holding ``element``.
    element
        Name of an image, labels, shapes or points element.
    coordinate_system
        Name of a coordinate system of ``element`` whose units are microns.

    Returns
    -------
    Microns per pixel (per intrinsic unit) of ``element``.

    Raises
    ------
    PixgeneInputError
        If nothing is recorded and no coordinate system in microns is given or found, if the transformation
        scales x and y differently, or if the value is not a plausible pixel size.
    """
    target = element_of(sdata, element)
    recorded = recorded_um_per_px(sdata, element)
    if recorded is not None and coordinate_system is None:
        return validate_um_per_px(recorded, element)
    systems = transformations_of(target)
    if coordinate_system is not None:
        if coordinate_system not in systems:
            fail(
                f"element {element!r}",
                f"has no transformation to coordinate system {coordinate_system!r} (it has: "
                f"{', '.join(repr(s) for s in systems) or 'none'})",
                "Pass the name of a coordinate system of this element that is in microns",
            )
        chosen = coordinate_system
    else:
        in_microns = [s for s in systems if str(s).strip().lower() in MICRON_SYSTEM_NAMES]
        if not in_microns:
            fail(
                f"element {element!r}",
                "its microns per pixel are not recorded and none of its coordinate systems "
                f"({', '.join(repr(s) for s in systems) or 'none'}) is known to be in microns",
                "Pass coordinate_system='...' naming a coordinate system in microns, or state the value with "
                "pg.io.set_um_per_px(sdata, element, um_per_px)",
            )
        chosen = in_microns[0]
    matrix = systems[chosen].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    value = isotropic_scale(np.asarray(matrix, dtype=float), f"element {element!r}")
    logger.info("%r: %.4g um/px from its transformation to %r", element, value, chosen)
    return validate_um_per_px(value, element)
