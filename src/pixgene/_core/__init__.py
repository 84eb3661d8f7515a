"""The bottom layer: keys, units, coordinates, rasters, validation, shared docs and the version.

Nothing here imports another pixgene package; every other layer may import from here.
"""
