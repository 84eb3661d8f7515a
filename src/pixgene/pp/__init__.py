"""Preprocessing: choosing the genes to model."""

from ._select_genes import select_genes

__all__ = ["select_genes"]
