"""Every default element, table and field name pixgene derives, in one place."""

from __future__ import annotations

IMAGE_KEY = "he"
SPOTS_KEY = "spots"
CELLS_KEY = "cells"
TABLE_KEY = "table"
TRUTH_KEY = "truth"
EXPECTED_TRUTH_KEY = "truth_expected"
#: the synthetic slide's square bins (Visium HD-like) and their counts
BINS_KEY = "bins"
BINS_TABLE_KEY = "bins_table"

#: key of the per-slide record in ``sdata.attrs`` and of parameters in ``adata.uns``
UNS_KEY = "pixgene"
#: channel of the dense map holding the predicted all-gene (library size) intensity
TOTAL_CHANNEL = "pixgene_total_counts"
#: ``obs`` column of read-out tables holding the integral of :data:`TOTAL_CHANNEL`
TOTAL_OBS = "pixgene_total_counts"
COVERAGE_OBS = "pixgene_coverage"
AREA_OBS = "pixgene_area_um2"
REGION_KEY = "region"
INSTANCE_KEY = "instance_id"


def dense_key(image_key: str) -> str:
    return f"{image_key}_pixgene"


def readout_key(shapes_key: str) -> str:
    return f"{shapes_key}_pixgene"


def grid_key(bin_um: float, shape: str = "square") -> str:
    size = f"{bin_um:g}".replace(".", "p")
    return f"bins_{size}um" if shape == "square" else f"hexbins_{size}um"
