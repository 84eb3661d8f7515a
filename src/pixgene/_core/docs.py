"""Parameter documentation shared by the public functions, written once and filled into their docstrings with
:func:`doc_params` (as scanpy's ``doc_params``): ``{image_key}`` in a docstring becomes the text below."""

from __future__ import annotations

from collections.abc import Callable
from textwrap import dedent, indent
from typing import TypeVar

F = TypeVar("F", bound=Callable)

_PARAMS = {
    "image_key": """\
image_key
    The H&E image element (RGB; multiscale or not).""",
    "spot_keys": """\
image_key, shapes_key, table_key
    The H&E image, the measured spots and their raw-count table (the same keys on every slide). The spots
    are circles (points with a ``radius``) or polygons (Visium HD's square bins, segmented cells, any
    other footprint).""",
    "image_um_per_px": """\
image_um_per_px
    Microns per pixel of the H&E image (where several slides are given: one value for all, or a list of one
    per slide); default: what the reader recorded (``pg.io.set_um_per_px`` states it), or derived from spots
    of known diameter.""",
    "progress": """\
progress
    Show progress bars on long work.""",
    "overwrite": """\
overwrite
    Replace an existing element or table of the same name (otherwise refused before any work).""",
    "random_state": """\
random_state
    Seed for everything random: the same seed gives the same result (on the same kind of device and
    precision).""",
    "plot_region": """\
region
    ``(x_min, y_min, x_max, y_max)`` in the H&E's pixels to zoom into; default the whole image.""",
    "plot_save_show": """\
save, show
    Path to save the figure to; whether to show it (default: only on an interactive backend when not
    saving).""",
}


def doc_params(func: F) -> F:
    """Fill ``{name}`` placeholders of ``func``'s docstring with the shared parameter texts, indented as the
    placeholder is."""
    doc = func.__doc__
    if doc:
        lines = []
        for line in doc.splitlines():
            stripped = line.strip()
            if stripped.startswith("{") and stripped.endswith("}") and stripped[1:-1] in _PARAMS:
                pad = line[: len(line) - len(line.lstrip())]
                lines.append(indent(dedent(_PARAMS[stripped[1:-1]]), pad))
            else:
                lines.append(line)
        func.__doc__ = "\n".join(lines)
    return func
