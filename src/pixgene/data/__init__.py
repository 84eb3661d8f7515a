"""Geometry, tiling and sampling on the image grid (internal building blocks of :mod:`pixgene.tl`)."""
