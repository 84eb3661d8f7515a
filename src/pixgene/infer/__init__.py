"""The inference layer: the dense output grid, the measured tiling halo, the resumable chunk store and the
dask tasks that predict a slide chunk by chunk."""
