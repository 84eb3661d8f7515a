"""pixgene.pl: plots, all drawn in the H&E's pixel space (matplotlib, imported on first use)."""

from ._dense import dense
from ._scores import gene_scores, training_curves
from ._spots import measured_vs_predicted, spots
from ._uncertainty import uncertainty

__all__ = ["dense", "gene_scores", "measured_vs_predicted", "spots", "training_curves", "uncertainty"]
