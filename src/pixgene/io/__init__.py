"""Readers that turn spot-based spatial transcriptomics data into the pixgene data model.

Every reader returns a :class:`spatialdata.SpatialData` with an RGB H&E image, the spots as circles in that
image's pixels and a raw-count table linked to them, with the microns per pixel derived and recorded.
"""

from ._anndata import from_anndata
from ._cells import read_cells
from ._image import read_image
from ._st import read_st
from ._units import get_um_per_px, set_um_per_px
from ._visium import read_visium
from ._visium_hd import read_visium_hd
from ._xenium import read_xenium

__all__ = [
    "from_anndata",
    "get_um_per_px",
    "read_cells",
    "read_image",
    "read_st",
    "read_visium",
    "read_visium_hd",
    "read_xenium",
    "set_um_per_px",
]
