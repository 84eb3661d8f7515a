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
#: ``layers`` of read-out tables: the members' standard deviation of each shape's expected counts
SD_LAYER = "pixgene_sd"
#: ``obs`` column of read-out tables: the members' standard deviation of :data:`TOTAL_OBS`
TOTAL_SD_OBS = "pixgene_total_counts_sd"


def dense_key(image_key: str) -> str:
    return f"{image_key}_pixgene"


def members_key(dense_key: str) -> str:
    """The image element holding every member's own map beside the mean map ``dense_key``."""
    return f"{dense_key}_members"


def member_channel(member: int, output: str) -> str:
    """Channel of member ``member``'s map of ``output`` in the :func:`members_key` element."""
    return f"member{member}:{output}"


def member_layer(member: int) -> str:
    """``layers`` key of member ``member``'s own read-out (``pg.tl.aggregate(keep_members=True)``)."""
    return f"pixgene_member{member}"


def quantile_layer(q: float) -> str:
    """``layers`` key of the ``q`` quantile of a read-out's counts: ``pixgene_q05`` for 0.05, ``pixgene_q97p5``
    for 0.975."""
    return "pixgene_q" + f"{100 * q:.6g}".zfill(2).replace(".", "p")


def readout_key(shapes_key: str) -> str:
    return f"{shapes_key}_pixgene"


def grid_key(bin_um: float, shape: str = "square") -> str:
    size = f"{bin_um:g}".replace(".", "p")
    return f"bins_{size}um" if shape == "square" else f"hexbins_{size}um"
