"""Predicting chunks: model parts per chunk, the resumable chunk store and the dask tasks that fill it."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._tiling import DenseGrid, resample_to_output

logger = logging.getLogger(__name__)

#: tiles per model call on a GPU (on a CPU one tile already keeps every core busy)
GPU_BATCH = 4



class ChunkStore:
    """Where finished chunks go: a zarr array next to the SpatialData store, plus one marker file per chunk.

    A marker is created only after its chunk's write has returned, so a run killed at any point leaves every
    marked chunk complete; unmarked chunks (a write cut short included) are predicted again on resume.
    Chunks are the zarr chunks, so concurrent workers never write the same file.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.array_path = self.root / "level0.zarr"
        #: the members' own maps (``predict_dense(uncertainty=True)``), chunked like the mean map
        self.members_path = self.root / "members.zarr"
        self.done_dir = self.root / "done"

    @staticmethod
    def name(block: tuple[int, int, int, int]) -> str:
        return f"{block[0]}_{block[2]}"

    def done(self) -> set[str]:
        return {p.name for p in self.done_dir.iterdir()} if self.done_dir.is_dir() else set()

    def write(self, block: tuple[int, int, int, int], values: np.ndarray, members: np.ndarray | None = None) -> None:
        """Write a chunk of the mean map (and of the members' maps), then mark it done."""
        import zarr

        oy0, oy1, ox0, ox1 = block
        if members is not None:
            zarr.open_array(str(self.members_path), mode="r+")[:, oy0:oy1, ox0:ox1] = members
        zarr.open_array(str(self.array_path), mode="r+")[:, oy0:oy1, ox0:ox1] = values
        (self.done_dir / self.name(block)).touch()



@dataclass
class ModelPart:
    """One model of a prediction and how it reads the slide: its reader (at the model's encoder um/px), its
    output grid (halo and alignment in its own encoder pixels) and the one tile size that covers every
    chunk."""

    model: Any
    reader: Any
    grid: DenseGrid
    tile_hw: tuple[int, int]
    weight: float = 1.0  # its share of the mean (the weights of a prediction's models sum to 1)
    tta: int = 1  # test-time transforms averaged (PixNet.predict_intensity)
    members: bool = False  # also return every member's own map (predict_dense(uncertainty=True))



def predict_members(model: Any, tiles: np.ndarray, tta: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`PixNet.predict_intensity` of (B, 3, H, W) tiles, and every member's own map, from one encoding.

    Returns ``(mean, members)``: ``mean`` (B, C, h, w) is ``model.predict_intensity(tiles, tta)`` to the bit,
    ``members`` (B, n_members, C, h, w) holds what ``model.member(k).predict_intensity(tiles, tta)`` gives for
    each k (float32). Each transform's tiles are encoded once (``module.encode``); each member decodes them
    through its single-member view (``module.member(k).decode``), and the mean is their float32 sum, in member
    order, over the number of members: the very operations of ``PixNetModule.decode`` (whose heads return
    float32 in every precision), so nothing of the mean changes. The decoders run once each, as in a plain
    prediction; what is added is holding the members' maps (n_members times the output tile) and the copies.
    """
    import torch

    from ..data import TTA_TRANSFORMS, dihedral, dihedral_inverse
    from ..model import check_tta

    check_tta(tta)
    module = model.module
    n = int(module.n_members)
    views = [module.member(k) for k in range(n)]
    x = torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32))
    if tta > 1 and (x.shape[-1] % model.alignment or x.shape[-2] % model.alignment):
        raise ValueError(f"tiles of {x.shape[-2]} x {x.shape[-1]} px are not multiples of the model's "
                         f"alignment ({model.alignment} px), which test-time transforms need")
    x = x.to(next(module.head.parameters()).device)
    mean, members = None, [None] * n
    with torch.inference_mode():
        for d in TTA_TRANSFORMS[:tta]:
            features = module.encode(dihedral(x, d))
            parts = [view.decode(features) for view in views]
            total = None
            for part in parts:
                total = part if total is None else total + part
            y = dihedral_inverse((total.float() / n if n > 1 else total.float()).contiguous().float(), d)
            mean = y if mean is None else mean + y
            for k, part in enumerate(parts):
                y = dihedral_inverse(part.float(), d)
                members[k] = y if members[k] is None else members[k] + y
        mean = (mean / tta if tta > 1 else mean).cpu().numpy()
        stacked = torch.stack([m / tta if tta > 1 else m for m in members], dim=1).cpu().numpy()
    return mean, stacked



def predict_chunks(parts: list[ModelPart], blocks, store, dtype: str, device: str | None,
                   threads: int | None = None):
    """One task: predict a batch of output chunks from equal-size tiles, one call per model.

    ``parts``: one :class:`ModelPart` per model. With several models each reads the chunks' tiles at its own
    um/px and the chunk is the weighted mean of their maps on the output grid; with one it is that model's
    map. With a :class:`ChunkStore` each chunk is written and marked, and ``None`` is returned for it;
    without one the chunks' arrays are returned. Image reads run on the synchronous scheduler: inside a
    distributed worker a nested ``compute`` would otherwise queue behind the very task that waits for it.
    ``threads`` fixes torch's intra-op threads for the model calls: CPU kernels split their sums by thread,
    so the same count everywhere is what makes a cluster's map identical to a local one.
    """
    import dask
    import torch

    sums: list[np.ndarray] | None = None
    member_maps: list[np.ndarray] | None = None
    for part in parts:
        move_model(part.model, device or default_device())
        origins = [part.grid.read_window(*b)[:2] for b in blocks]
        with dask.config.set(scheduler="synchronous"):
            h, w = part.tile_hw
            tiles = np.stack([part.reader.read(x0, y0, w, h) for x0, y0 in origins])
        before = torch.get_num_threads()
        if threads is not None and threads != before:
            torch.set_num_threads(threads)
        try:
            if part.members:
                lam, lam_members = predict_members(part.model, tiles, part.tta)
            else:
                lam = part.model.predict_intensity(tiles, part.tta)
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)
        maps = [resample_to_output(one, part.grid, block, x0, y0)
                for block, (x0, y0), one in zip(blocks, origins, lam, strict=True)]
        if part.members:
            # (n_members * C, h, w) per block, member-major: channel k * C + c is member k's output c
            member_maps = [resample_to_output(one.reshape(-1, *one.shape[2:]), part.grid, block, x0, y0)
                           for block, (x0, y0), one in zip(blocks, origins, lam_members, strict=True)]
        if len(parts) > 1:
            maps = [part.weight * one for one in maps]
        sums = maps if sums is None else [a + b for a, b in zip(sums, maps, strict=True)]
    results = []
    for i, (block, one) in enumerate(zip(blocks, sums, strict=True)):
        values = one.astype(dtype, copy=False)
        members = None if member_maps is None else member_maps[i].astype(dtype, copy=False)
        if store is None:
            results.append((block, values) if members is None else (block, values, members))
        else:
            store.write(block, values, members)
            results.append((block, None))
    return results



def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"



def move_model(model: Any, device: str) -> None:
    import torch

    current, target = next(model.module.parameters()).device, torch.device(device)
    if current.type != target.type or (target.index is not None and current.index != target.index):
        model.to(device)



def device_of(model: Any) -> str:
    return str(next(model.module.parameters()).device)



def active_client() -> Any:
    """The default dask.distributed client, or None when there is none (or distributed is not installed)."""
    try:
        from distributed import default_client
    except ImportError:
        return None
    try:
        return default_client()
    except ValueError:
        return None



def run_chunk_tasks(parts: list[ModelPart], batches, store, dtype, device, threads, *, client, progress,
                    total, initial) -> list:
    """Run the chunk tasks as a dask graph, on ``client`` (dask.distributed) when given, else locally.

    On a cluster every model (on the CPU, so that any worker can load it) and reader is scattered to every
    worker once, and each worker moves its own copies to ``device`` (default: its GPU when it has one).
    Locally one task runs at a time on the caller's models: a model call itself already uses every core (or
    the GPU).
    """
    import dask
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, desc="predicting dense map", unit="chunk", disable=not progress)
    results: list = []

    def task(task_parts, batch):
        run = dask.delayed(predict_chunks, pure=False)
        return run(task_parts, batch, store, dtype, device, threads)

    try:
        if client is not None:
            from distributed import as_completed

            scattered = []
            for part in parts:
                home = device_of(part.model)
                move_model(part.model, "cpu")
                try:
                    model_ref = client.scatter(part.model, broadcast=True, hash=False)
                finally:
                    move_model(part.model, home)
                reader_ref = client.scatter(part.reader, broadcast=True, hash=False)
                scattered.append(dataclasses.replace(part, model=model_ref, reader=reader_ref))
            tasks = [task(scattered, b) for b in batches]  # each worker runs its own copies
            for future in as_completed(client.compute(tasks)):
                done = future.result()
                results.extend(done)
                bar.update(len(done))
        else:
            from dask.callbacks import Callback

            tasks = [task(parts, b) for b in batches]
            sizes = {t.key: len(b) for t, b in zip(tasks, batches, strict=True)}

            class _Progress(Callback):
                def _posttask(self, key, result, dsk, state, worker_id):
                    bar.update(sizes.get(key, 0))

            with _Progress():
                for done in dask.compute(*tasks, scheduler="threads", num_workers=1):
                    results.extend(done)
    finally:
        bar.close()
    return results


def tissue_blocks(tissue: tuple[np.ndarray, float], blocks: list, image_px_per_out: float) -> list:
    """The blocks that overlap the tissue mask (``(mask, factor)`` of ``tissue_mask``), with one mask pixel of
    margin."""
    mask, mask_factor = tissue
    f = image_px_per_out / mask_factor  # mask pixels per output pixel
    keep = []
    for oy0, oy1, ox0, ox1 in blocks:
        rows = slice(int(np.floor(oy0 * f)), int(np.ceil(oy1 * f)) + 1)
        cols = slice(int(np.floor(ox0 * f)), int(np.ceil(ox1 * f)) + 1)
        if mask[rows, cols].any():
            keep.append((oy0, oy1, ox0, ox1))
    return keep



def partial_dir(sdata: Any, key: str) -> Path | None:
    path = getattr(sdata, "path", None)
    if path is None:
        return None
    return Path(str(path) + ".pixgene-partial") / key



def open_partial(partial: Path, params: dict, shape: tuple[int, ...], chunk_px: int,
                 members_channels: int | None = None) -> ChunkStore:
    """The chunk store of an earlier run with the same parameters, or a fresh, empty one (with an array of
    ``members_channels`` channels for the members' maps when given)."""
    import zarr

    store = ChunkStore(partial)
    meta_file = partial / "params.json"
    if partial.exists() and (not meta_file.exists() or json.loads(meta_file.read_text()) != params):
        logger.info("discarding a partial dense map made with other parameters")
        shutil.rmtree(partial)
    if not meta_file.exists():
        partial.mkdir(parents=True, exist_ok=True)
        zarr.create_array(str(store.array_path), shape=shape, chunks=(shape[0], chunk_px, chunk_px),
                          dtype=params["dtype"], fill_value=0, overwrite=True)
        if members_channels:
            zarr.create_array(str(store.members_path), shape=(members_channels, *shape[1:]),
                              chunks=(members_channels, chunk_px, chunk_px), dtype=params["dtype"], fill_value=0,
                              overwrite=True)
        store.done_dir.mkdir(exist_ok=True)
        # written last: a partial directory without it is incomplete and is started afresh
        meta_file.write_text(json.dumps(params))
    return store
