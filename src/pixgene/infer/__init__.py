"""The inference layer: the dense output grid, the measured tiling halo, the resumable chunk store and the
dask tasks that predict a slide chunk by chunk."""

from ._chunks import (
    GPU_BATCH,
    ChunkStore,
    ModelPart,
    active_client,
    default_device,
    device_of,
    move_model,
    open_partial,
    partial_dir,
    run_chunk_tasks,
    tissue_blocks,
)
from ._tiling import DenseGrid, chunk_blocks, edge_error_profile, probe_texture, tiling_halo

__all__ = [
    "active_client", "chunk_blocks", "ChunkStore", "default_device", "DenseGrid", "device_of",
    "GPU_BATCH", "ModelPart", "move_model", "open_partial", "partial_dir", "run_chunk_tasks",
    "tiling_halo", "tissue_blocks",
    "edge_error_profile", "probe_texture",
]
