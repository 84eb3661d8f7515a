"""Datasets: the embedded synthetic tissue (with ground truth) and loaders for the real sections."""

from ._real import her2st, st_mob, visium_scmuscle
from ._synthetic import synthetic

__all__ = ["her2st", "st_mob", "synthetic", "visium_scmuscle"]
