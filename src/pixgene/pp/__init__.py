"""Preprocessing: choosing the genes to model, and normalising tables the way the model does."""

from ._log_normalize import log_normalize
from ._select_genes import select_genes

__all__ = ["log_normalize", "select_genes"]
