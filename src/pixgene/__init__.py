"""pixgene: dense, pixel-level gene expression from H&E histology.

``import pixgene as pg`` is light: the submodules ``pg.io``, ``pg.datasets``, ``pg.pp``, ``pg.tl`` and
``pg.pl`` load on first use, and torch is imported only when a model is built or loaded.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

from ._core.version import __version__

__all__ = ["datasets", "io", "pl", "pp", "tl", "__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())

_SUBMODULES = {"datasets", "io", "pl", "pp", "tl", "data", "nn"}

if TYPE_CHECKING:  # pragma: no cover
    from . import data, datasets, io, nn, pl, pp, tl  # noqa: F401


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'pixgene' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES)
