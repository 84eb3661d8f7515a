"""Readers that turn spot-based spatial transcriptomics data into the pixgene data model.

Every reader returns a :class:`spatialdata.SpatialData` with an RGB H&E image, the spots as circles in that
image's pixels and a raw-count table linked to them, with the microns per pixel derived and recorded.
"""

from ._anndata import from_anndata
from ._st import read_st
from ._visium import read_visium

__all__ = ["from_anndata", "read_st", "read_visium"]
