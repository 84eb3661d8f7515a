"""``pg.tl.predict_dense``: the dense intensity map of a whole slide, chunk by chunk, as an image element.

How a slide is tiled
--------------------
Every output chunk is predicted from one tile read with a halo of context on each side and cropped back to
the chunk (stardist's "read region = write region + halo"); no chunk depends on another, so a dask graph of
independent chunk tasks writes the map straight into zarr, on one machine or on a dask.distributed cluster.

The halo is measured once per model (:func:`tiling_halo`): the same textured strip is predicted whole and
cropped, and the difference as a function of the distance to the crop's edge is the error a tile edge leaves
behind at that distance. The halo is the first multiple of ``model.alignment`` where that error is well
under :data:`TILING_TOLERANCE` (1e-4 of the map's maximum). For EfficientNet-Lite0 with the fusion decoder
the error is about 2e-2 at 128 px, 1e-4 at 384 px and 5e-6 at 512 px, so the halo is 512 px. A model that
computes in bfloat16 (``pg.tl.fit(precision=...)``) is probed in float32: how far an edge reaches is a
property of the receptive field, and bfloat16's own rounding (about 1e-2 of a value) would hide it.

Cropping is the cheapest scheme that meets the tolerance. Blending overlapping tiles with a taper (cellpose)
averages each pixel over the tiles that cover it, weighted by its distance to their edges, so the error is a
weighted mean of per-tile errors: near a tile's edge the weight is small but the error there is of order 1,
and the weight would have to stay below tolerance / error(d) over the whole band a halo crops. Measured on a
strip (``benchmarks/scale.py``, tiles of 1024 px written): with 512 px of overlap cropping leaves 1.3e-5 and a
linear taper 1.2e-2; with 1024 px of overlap (9 times the work of one pass, in 2-D) the taper still leaves
9e-3. A taper also makes each output chunk depend on several tiles, so chunks are no longer independent
tasks that can be written, resumed and distributed one by one.

Writing and resuming
--------------------
For a SpatialData backed by zarr, chunks go to ``<store>.pixgene-partial/<key>/level0.zarr`` as they finish,
and a marker file per chunk is created only after its write returned (:class:`ChunkStore`). A new run with
the same parameters (model id, grid, halo, dtype) predicts only unmarked chunks; any other parameters start
afresh. When every chunk is there the map is written into the store as a multiscale element, read back
lazily, and the partial directory is removed.

Several models
--------------
A list of models predicts their mean map (weighted with ``weights=``). Each model reads a chunk's tile at its
own encoder um/px, with its own halo and alignment, and its map is resampled to the output grid (area-exact)
before the mean, so the models need only predict the same outputs: an ensemble of fits at 1 and 2 um/px, of
two encoders, or of models fitted on different cohorts. Expected counts average, so every read-out of the
mean map is the mean of the models' read-outs. A chunk is written once every model has predicted it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._core.keys import IMAGE_KEY, UNS_KEY, dense_key
from .._core.units import record_um_per_px, resolve_um_per_px
from .._core.validate import check_not_exists, check_positive, fail, require_element
from ._model import check_tta

logger = logging.getLogger(__name__)

#: tiled and single-pass maps agree to this fraction of the map's maximum
TILING_TOLERANCE = 1e-4
#: the halo is chosen where the probe's error is this many times below the tolerance: a chunk's corner sees
#: two tile edges at once, and tissue is not the probe's texture: at 4 (and 8), a small conv-decoder model
#: left 1.03e-4 on a synthetic slide, ten times its probe error; at 16 one alignment step more left 1.1e-5
HALO_SAFETY = 16.0
#: the probe measures the edge error up to this distance (encoder px); larger receptive fields are capped
MAX_HALO_PX = 1024
#: tiles per model call on a GPU (on a CPU one tile already keeps every core busy)
GPU_BATCH = 4


def overlap_matrix(n_out: int, out_start: float, out_size: float, n_in: int, in_start: float, in_size: float):
    """(n_out, n_in) fractions of each output interval covered by each input interval (rows sum to <= 1).

    Intervals: output k = [out_start + k * out_size, ... + out_size], likewise input. Applied on both axes it
    turns a piecewise-constant intensity on one grid into its exact area average on another.
    """
    oe = out_start + out_size * np.arange(n_out + 1)
    ie = in_start + in_size * np.arange(n_in + 1)
    lo = np.maximum(oe[:-1, None], ie[None, :-1])
    hi = np.minimum(oe[1:, None], ie[None, 1:])
    return np.clip(hi - lo, 0.0, None) / out_size


@dataclass(frozen=True)
class DenseGrid:
    """Where the output map lies: output pixel (i, j) covers microns [j * um, (j + 1) * um] from (0, 0)."""

    shape: tuple[int, int]
    out_um: float
    enc_um: float
    model_um: float
    stride: int  # encoder pixels per model output pixel
    align: int  # encoder pixels; tile origins are multiples of this
    halo: int  # encoder pixels of context around each written region

    def read_window(self, oy0: int, oy1: int, ox0: int, ox1: int) -> tuple[int, int, int, int]:
        """Encoder-pixel window (x0, y0, w, h), aligned, that covers output rows/cols plus the halo."""
        s = self.out_um / self.enc_um
        x0 = int(np.floor(ox0 * s / self.align)) * self.align - self.halo
        y0 = int(np.floor(oy0 * s / self.align)) * self.align - self.halo
        x1 = int(np.ceil(ox1 * s / self.align)) * self.align + self.halo
        y1 = int(np.ceil(oy1 * s / self.align)) * self.align + self.halo
        return x0, y0, x1 - x0, y1 - y0

    def tile_shape(self, blocks: list[tuple[int, int, int, int]]) -> tuple[int, int]:
        """(h, w) of the one tile size that covers every block's window (equal tiles can be batched)."""
        windows = np.array([self.read_window(*b) for b in blocks]).reshape(-1, 4)
        return int(windows[:, 3].max()), int(windows[:, 2].max())


def chunk_blocks(shape: tuple[int, int], chunk_px: int) -> list[tuple[int, int, int, int]]:
    """Output chunks (oy0, oy1, ox0, ox1) in row-major order; they are also the zarr chunks of the map."""
    return [
        (oy, min(oy + chunk_px, shape[0]), ox, min(ox + chunk_px, shape[1]))
        for oy in range(0, shape[0], chunk_px)
        for ox in range(0, shape[1], chunk_px)
    ]


def resample_to_output(lam: np.ndarray, grid: DenseGrid, block: tuple[int, int, int, int], x0: int, y0: int):
    """Model-grid intensity of a tile read at encoder pixel (x0, y0) -> exact area average on one block."""
    oy0, oy1, ox0, ox1 = block
    m = grid.model_um
    sy, sx = (oy0 * grid.out_um - y0 * grid.enc_um) / m, (ox0 * grid.out_um - x0 * grid.enc_um) / m
    if grid.out_um == m and float(sy).is_integer() and float(sx).is_integer():
        # same grid, whole-pixel offset: the area average is a crop (rows of the overlap matrices are one-hot)
        iy, ix = int(sy), int(sx)
        if 0 <= iy and 0 <= ix and iy + oy1 - oy0 <= lam.shape[1] and ix + ox1 - ox0 <= lam.shape[2]:
            return np.ascontiguousarray(lam[:, iy : iy + oy1 - oy0, ix : ix + ox1 - ox0])
    ry = overlap_matrix(oy1 - oy0, oy0 * grid.out_um, grid.out_um, lam.shape[1], y0 * grid.enc_um, m)
    rx = overlap_matrix(ox1 - ox0, ox0 * grid.out_um, grid.out_um, lam.shape[2], x0 * grid.enc_um, m)
    return np.einsum("yi,cij,xj->cyx", ry, lam, rx, optimize=True)


# ------------------------------------------------------------------------------------------ receptive field


def probe_texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(3, height, width) float32 H&E-like texture: pink stroma, purple nuclei, white lumina, pixel noise.

    The edge error of a tile depends on how much its content differs from the zero padding the network sees
    beyond it; a textured, stained probe is a harder case than blank glass.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)

    def field(cell: int) -> np.ndarray:
        coarse = rng.random((height // cell + 2, width // cell + 2))
        return ndimage.zoom(coarse, cell, order=1)[:height, :width]

    stroma = np.array([0.93, 0.70, 0.82])[:, None, None]
    nuclei = np.array([0.35, 0.22, 0.55])[:, None, None]
    glass = np.array([0.97, 0.96, 0.97])[:, None, None]
    texture = field(6) * 0.6 + field(24) * 0.4
    lumen = field(48)
    image = np.where(texture > 0.62, nuclei, stroma)
    image = np.where(lumen > 0.85, glass, image)
    image = image + 0.04 * rng.standard_normal((3, height, width))
    return np.clip(image, 0.0, 1.0).astype(np.float32)


@contextlib.contextmanager
def _in_float32(model: Any):
    """The model computes in float32 inside (a bfloat16 model's rounding, about 1e-2 relative, would hide how
    far a tile edge reaches: that is a property of the architecture's receptive field, not of the precision)."""
    module = model.module
    precision = module.precision
    module.precision = "32"
    try:
        yield
    finally:
        module.precision = precision


def edge_error_profile(model: Any, *, max_halo_px: int = MAX_HALO_PX) -> np.ndarray:
    """Error a tile edge leaves at each distance: ``profile[k]`` at ``k * out_stride`` encoder px from it.

    A textured strip is predicted whole, with its first ``max_halo_px`` columns cut off and with its last
    ``max_halo_px`` columns cut off (the cuts on multiples of ``model.alignment``); the largest difference over
    all outputs, rows, both cuts and columns at distance ``>= k * out_stride`` from the cut, relative to the
    largest intensity, is ``profile[k]`` (non-increasing). Both sides count: an encoder with TensorFlow "SAME"
    padding pads its strided convolutions more after the image than before it, so a tile's right and bottom
    edges reach further in than its left and top ones. Measured in float32 whatever the model's precision.
    """
    a, s = int(model.alignment), int(model.out_stride)
    margin = int(np.ceil(max_halo_px / a)) * a
    height = int(np.ceil(max(256, 2 * a) / a)) * a
    crop_width = margin + 2 * a
    strip = probe_texture(height, margin + crop_width)
    with _in_float32(model):
        whole = model.predict_intensity(strip)
        after_left_cut = model.predict_intensity(strip[:, :, margin:])  # column k: k * s px right of the cut
        before_right_cut = model.predict_intensity(strip[:, :, :crop_width])  # column n-1-k: k * s px left of it
    n = crop_width // s
    left = np.abs(whole[:, :, -n:] - after_left_cut).max(axis=(0, 1))
    right = np.abs(whole[:, :, :n] - before_right_cut).max(axis=(0, 1))[::-1]
    per_column = np.maximum(left, right) / max(float(np.abs(whole).max()), 1e-30)
    return np.maximum.accumulate(per_column[::-1])[::-1]


def tiling_halo(
    model: Any, *, tolerance: float = TILING_TOLERANCE, max_halo_px: int = MAX_HALO_PX
) -> tuple[int, float]:
    """Halo (encoder px, a multiple of ``model.alignment``) for tiled prediction within ``tolerance``.

    Measured once per model and cached on the instance (keyed by the model id): the smallest multiple of the
    alignment where :func:`edge_error_profile` is below ``tolerance / HALO_SAFETY``. A model whose receptive
    field never gets there within ``max_halo_px`` (a ViT with global attention) gets ``max_halo_px`` and a
    logged warning with the error it leaves.

    Returns
    -------
    ``(halo_px, edge_error)``: the halo and the probe's relative error at that distance from a tile edge.
    """
    cache = model.__dict__.setdefault("_tiling_halo_cache", {})
    key = (model.model_id, float(tolerance), int(max_halo_px))
    if key in cache:
        return cache[key]
    a, s = int(model.alignment), int(model.out_stride)
    profile = edge_error_profile(model, max_halo_px=max_halo_px)
    limit = int(np.ceil(max_halo_px / a)) * a
    halo = next((d for d in range(0, limit + 1, a) if profile[d // s] <= tolerance / HALO_SAFETY), None)
    if halo is None:
        halo = limit
        logger.warning(
            "the model's receptive field exceeds %d px: tiles leave a relative error of %.2g at their seams "
            "(tolerance %.2g); pass a larger halo_px to predict_dense to reduce it",
            limit, profile[limit // s], tolerance,
        )
    cache[key] = (int(halo), float(profile[halo // s]))
    logger.info("tiling halo %d px (edge error %.2g, tolerance %.2g)", halo, profile[halo // s], tolerance)
    return cache[key]


# ------------------------------------------------------------------------------------------ chunk tasks


class ChunkStore:
    """Where finished chunks go: a zarr array next to the SpatialData store, plus one marker file per chunk.

    A marker is created only after its chunk's write has returned, so a run killed at any point leaves every
    marked chunk complete; unmarked chunks (a write cut short included) are predicted again on resume.
    Chunks are the zarr chunks, so concurrent workers never write the same file.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.array_path = self.root / "level0.zarr"
        self.done_dir = self.root / "done"

    @staticmethod
    def name(block: tuple[int, int, int, int]) -> str:
        return f"{block[0]}_{block[2]}"

    def done(self) -> set[str]:
        return {p.name for p in self.done_dir.iterdir()} if self.done_dir.is_dir() else set()

    def write(self, block: tuple[int, int, int, int], values: np.ndarray) -> None:
        import zarr

        oy0, oy1, ox0, ox1 = block
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
    for part in parts:
        _move(part.model, device or _default_device())
        origins = [part.grid.read_window(*b)[:2] for b in blocks]
        with dask.config.set(scheduler="synchronous"):
            h, w = part.tile_hw
            tiles = np.stack([part.reader.read(x0, y0, w, h) for x0, y0 in origins])
        before = torch.get_num_threads()
        if threads is not None and threads != before:
            torch.set_num_threads(threads)
        try:
            lam = part.model.predict_intensity(tiles, part.tta)
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)
        maps = [resample_to_output(one, part.grid, block, x0, y0)
                for block, (x0, y0), one in zip(blocks, origins, lam, strict=True)]
        if len(parts) > 1:
            maps = [part.weight * one for one in maps]
        sums = maps if sums is None else [a + b for a, b in zip(sums, maps, strict=True)]
    results = []
    for block, one in zip(blocks, sums, strict=True):
        values = one.astype(dtype, copy=False)
        if store is None:
            results.append((block, values))
        else:
            store.write(block, values)
            results.append((block, None))
    return results


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _move(model: Any, device: str) -> None:
    import torch

    current, target = next(model.module.parameters()).device, torch.device(device)
    if current.type != target.type or (target.index is not None and current.index != target.index):
        model.to(device)


def _device_of(model: Any) -> str:
    return str(next(model.module.parameters()).device)


def _active_client() -> Any:
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
                home = _device_of(part.model)
                _move(part.model, "cpu")
                try:
                    model_ref = client.scatter(part.model, broadcast=True, hash=False)
                finally:
                    _move(part.model, home)
                reader_ref = client.scatter(part.reader, broadcast=True, hash=False)
                scattered.append(ModelPart(model_ref, reader_ref, part.grid, part.tile_hw, part.weight,
                                           part.tta))
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


# ------------------------------------------------------------------------------------------ the tool


def predict_dense(
    sdata: Any,
    model: Any = None,
    *,
    image_key: str = IMAGE_KEY,
    um_per_px: float = 4.0,
    image_um_per_px: float | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
    weights: Any = None,
    chunk_px: int = 256,
    halo_px: int | None = None,
    dtype: str = "float32",
    skip_background: bool = True,
    scale_factors: tuple[int, ...] | None = (2, 2),
    device: str | None = None,
    batch_size: int | None = None,
    threads: int | None = None,
    tta: int = 1,
    progress: bool = True,
):
    """Predict the dense intensity map over the whole image and store it as an image element.

    Each output chunk is predicted from a tile read with a halo of context and cropped back to the chunk; the
    halo comes from the model's measured receptive field (:func:`tiling_halo`), so the tiled map equals one
    pass over the whole image to 1e-4 of its maximum. The chunks form a dask graph of independent tasks that
    runs on the default ``dask.distributed`` client when one exists (the model is scattered to each worker
    once), else locally. When ``sdata`` is backed by a zarr store each chunk is written to disk as soon as
    it is done and the map is never held whole; a run that was interrupted resumes where it stopped.

    Parameters
    ----------
    sdata
        SpatialData holding the H&E image.
    model
        A fitted :class:`pixgene.tl.PixNet`, or a list of them to average (models fitted with the same genes,
        at other encoder um/px, with other encoders or on other slides: each reads the slide at its own um/px
        with its own halo, and the map is the mean of their maps on the output grid); default: the model
        last fitted on this object.
    image_key
        The H&E image element.
    um_per_px
        Output pixel size in microns (e.g. 2, 4 or 8).
    image_um_per_px
        Microns per image pixel; default: recorded by the reader or derived from the spots.
    key_added
        Name of the new image element; default ``f"{image_key}_pixgene"``.
    overwrite
        Replace an existing element of that name.
    weights
        With a list of models: their weights in the mean (positive; scaled to sum to 1), e.g. their numbers
        of members; default: equal.
    chunk_px
        Output chunk size (output pixels): the unit of work, of resuming and of the zarr chunks. Larger
        chunks spend less on halos and more memory per task.
    halo_px
        Context read around each chunk (encoder pixels, rounded up to a multiple of ``model.alignment``);
        default: measured from the model's receptive field.
    dtype
        ``"float32"`` or ``"float16"`` (half the disk; about 1e-3 relative rounding).
    skip_background
        Leave chunks without tissue (tissue mask) as zeros without running the model.
    scale_factors
        Downsampling factors of the multiscale pyramid (``None`` for a single scale).
    device
        Torch device for the model (``"cuda"``, ``"cpu"``); default: CUDA when available. Workers of a
        cluster move their own copy.
    batch_size
        Chunks per model call; default 4 on a GPU and 1 on a CPU.
    threads
        Torch intra-op threads per model call on a CPU; default: this process's ``torch.get_num_threads()``.
        Cluster workers use the same number, because CPU kernels split their sums by thread: the same count
        is what makes the map identical wherever it is computed.
    tta
        Test-time augmentation: each tile's map is the mean of the maps of this many dihedral transforms of
        it, each turned back (1: none; 2: and the half turn; 4: and the two mirror images; 8: and the quarter
        turns and transposes). The decoders were trained on such transforms, so the mean removes what of a map
        depends on the tile's orientation; the prediction takes about ``tta`` times as long.
    progress
        Show a tqdm progress bar over chunks.

    Returns
    -------
    The new image element (dims c, y, x; channels = genes then ``pixgene_total_counts``; values = expected
    counts per um^2), also stored as ``sdata.images[key_added]`` with transformations that overlay the H&E in
    every coordinate system; ``sdata.attrs["pixgene"]["um_per_px"][key_added]`` and
    ``sdata.attrs["pixgene"]["dense"][key_added]`` (model id, genes, parameters including the halo and the
    probe's edge error, and the numbers of tissue and background chunks; for a list of models the ids joined
    by ``+``, ``model_ids``, and one halo, tile size and edge error per model) are recorded. When ``sdata`` is
    backed by a zarr store the map is written there and read back lazily; until it is complete the finished
    chunks live in ``<store>.pixgene-partial/<key_added>`` (removed at the end).
    """
    image = require_element(sdata, image_key, "images")
    from .._core.raster import rgb_array

    rgb_array(image, image_key)
    models = _models_to_run(sdata, model)
    shares = _model_weights(weights, len(models))
    check_positive(um_per_px, "um_per_px", "predict_dense")
    if dtype not in ("float32", "float16"):
        fail("dtype", f"{dtype!r} is not supported", "Use 'float32' or 'float16'")
    for name, value in (("chunk_px", chunk_px), ("batch_size", batch_size), ("threads", threads)):
        integer = isinstance(value, int | np.integer) and not isinstance(value, bool)
        if value is not None and (not integer or value < 1):
            fail(name, f"{value!r} is not a positive integer", f"Pass {name}=256 or another positive integer")
    check_tta(tta)
    tta = int(tta)  # a numpy integer too: the parameters are written as JSON (attrs, a partial map's params)
    if halo_px is not None and (not np.isfinite(halo_px) or halo_px < 0):
        fail("halo_px", f"{halo_px!r} is not a non-negative number",
             "Pass halo_px=None to derive it from the model")
    key = key_added or dense_key(image_key)
    check_not_exists(sdata, key, overwrite)
    image_um = resolve_um_per_px(sdata, image_key, um_per_px=image_um_per_px)

    import torch

    local_device = device or _default_device()
    on_gpu = local_device.startswith("cuda")
    batch_size = int(batch_size or (GPU_BATCH if on_gpu else 1))
    threads = None if on_gpu else int(threads or torch.get_num_threads())
    client = _active_client()

    from ..data._mask import tissue_mask
    from ..data._reader import SlideReader

    readers = [SlideReader(image, image_um=image_um, target_um=m.encoder_um_per_px, name=image_key)
               for m in models]
    H0, W0 = readers[0].shape_level0
    out_shape = (int(np.ceil(H0 * image_um / um_per_px)), int(np.ceil(W0 * image_um / um_per_px)))
    blocks = chunk_blocks(out_shape, chunk_px)
    original_devices = [_device_of(m) for m in models]
    try:
        # one tissue mask serves both the background chunks and the slide's own feature statistics
        mask = tissue_mask(sdata, image_key, image_um_per_px=image_um) if (
            skip_background or any(m.slide_standardized for m in models)) else None
        parts, halos = [], []
        for fitted, reader in zip(models, readers, strict=True):
            _move(fitted, local_device)
            align = fitted.alignment
            if halo_px is None:
                halo, edge_error = tiling_halo(fitted)
            else:
                halo, edge_error = int(np.ceil(halo_px / align)) * align, None
            ready = fitted
            if fitted.slide_standardized:
                from ..data._training import slide_feature_stats

                # this slide's own channel statistics, taken the same way fit took each training slide's
                stats = slide_feature_stats(sdata, image_key, reader, fitted.module, image_um=image_um,
                                            mask=mask)
                ready = fitted.with_feature_stats(*stats)
            grid = DenseGrid(out_shape, float(um_per_px), ready.encoder_um_per_px, ready.out_um_per_px,
                             ready.out_stride, align, halo)
            parts.append(ModelPart(ready, reader, grid, grid.tile_shape(blocks), shares[len(parts)], tta))
            halos.append((halo, edge_error))
        tissue = _tissue_blocks(mask, blocks, um_per_px / image_um) if skip_background else blocks
        n_out = len(models[0].outputs)
        params = {
            "image_key": image_key, "image_shape": [H0, W0], "um_per_px": float(um_per_px),
            "image_um_per_px": image_um, "chunk_px": int(chunk_px), "dtype": dtype,
            "skip_background": skip_background, "tta": tta,
        }
        if len(models) == 1:
            params.update(halo_px=halos[0][0], tile_px=list(parts[0].tile_hw), model_id=models[0].model_id)
        else:
            params.update(halo_px=[h for h, _ in halos], tile_px=[list(p.tile_hw) for p in parts],
                          model_id="+".join(m.model_id for m in models),
                          model_ids=[m.model_id for m in models], weights=shares)
        partial = _partial_dir(sdata, key)
        store = None if partial is None else _open_partial(partial, params, (n_out, *out_shape), chunk_px)
        done = store.done() if store is not None else set()
        todo = [b for b in tissue if ChunkStore.name(b) not in done]
        if done:
            logger.info("resuming %r: %d of %d tissue chunks already written", key, len(tissue) - len(todo),
                        len(tissue))
        batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
        # on a cluster each worker picks its own device unless one was asked for
        task_device = device if client is not None else local_device
        results = run_chunk_tasks(parts, batches, store, dtype, task_device, threads, client=client,
                                  progress=progress, total=len(tissue), initial=len(tissue) - len(todo))
    finally:
        for fitted, home in zip(models, original_devices, strict=True):
            _move(fitted, home)
    edge_error = halos[0][1] if len(models) == 1 else [e for _, e in halos]

    import dask.array as da

    if store is None:
        level0 = np.zeros((n_out, *out_shape), dtype=dtype)
        for (oy0, oy1, ox0, ox1), values in results:
            level0[:, oy0:oy1, ox0:ox1] = values
        level0 = da.from_array(level0, chunks=(n_out, chunk_px, chunk_px))
    else:
        level0 = da.from_zarr(str(store.array_path))
    element = _dense_element(level0, image, models[0].outputs, um_per_px / image_um, scale_factors, out_shape)
    if key in sdata.images and overwrite:
        del sdata.images[key]
    sdata.images[key] = element
    record_um_per_px(sdata, key, um_per_px)
    record = dict(sdata.attrs.get(UNS_KEY, {}))
    dense = dict(record.get("dense", {}))
    dense[key] = {
        **params, "halo_edge_error": edge_error, "genes": models[0].genes, "batch_size": batch_size,
        "device": "dask.distributed" if client is not None else local_device,
        "chunks": {"tissue": len(tissue), "background": len(blocks) - len(tissue)},
    }
    record["dense"] = dense
    sdata.attrs[UNS_KEY] = record
    if partial is not None:
        sdata.write_element(key, overwrite=overwrite)
        sdata.write_attrs()
        from spatialdata import read_zarr

        sdata.images[key] = read_zarr(sdata.path, selection=("images",)).images[key]
        shutil.rmtree(partial, ignore_errors=True)
        if partial.parent.is_dir() and not any(partial.parent.iterdir()):
            partial.parent.rmdir()
    logger.info(
        "dense map %r: %d x %d px at %g um/px, %d outputs; %d of %d chunks had tissue", key, *out_shape,
        um_per_px, n_out, len(tissue), len(blocks),
    )
    return sdata.images[key]


def _models_to_run(sdata: Any, model: Any) -> list:
    """``model`` as a list of fitted models, checked: one PixNet, several that predict the same outputs, or
    (``None``) the model last fitted on ``sdata``."""
    from ._model import PixNet, last_model

    if model is None:
        model = last_model(sdata)
        if model is None:
            fail("model", "none was given and none was fitted on this SpatialData",
                 "Pass model=pg.tl.fit(...) or model=pg.tl.PixNet.load(dir)")
    models = list(model) if isinstance(model, list | tuple) else [model]
    if not models:
        fail("model", "is an empty list", "Pass one PixNet, or a list of PixNet models to average")
    for i, m in enumerate(models):
        if not isinstance(m, PixNet):
            where = "" if len(models) == 1 and not isinstance(model, list | tuple) else f" (item {i})"
            fail("model", f"is a {type(m).__name__}{where}, not a PixNet",
                 "Pass a model from pg.tl.fit or PixNet.load, or a list of them")
    first = models[0].outputs
    for i, m in enumerate(models[1:], start=1):
        if m.outputs != first:
            differ = sorted(set(m.outputs) ^ set(first)) or ["the same genes in another order"]
            fail("model", f"item {i} predicts other outputs than item 0 ({', '.join(differ[:5])})",
                 "Fit every model of an ensemble with the same genes= (select them once, pass them to each "
                 "fit)")
    return models


def _model_weights(weights: Any, n: int) -> list[float]:
    """The models' shares of the mean map: ``weights`` checked and scaled to sum to 1 (default: equal)."""
    if weights is None:
        return [1.0 / n] * n
    if n == 1:
        fail("weights", "were given for a single model", "Pass a list of models, or weights=None")
    try:
        values = np.asarray(weights, dtype=float)
    except (TypeError, ValueError):
        values = None
    if values is None or values.ndim != 1 or len(values) != n:
        fail("weights", f"{weights!r} is not one number per model ({n} models)", f"Pass {n} positive numbers")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        fail("weights", f"{list(values)} are not all positive and finite",
             "Pass positive numbers, e.g. [3, 2]")
    return [float(v) for v in values / values.sum()]


def _tissue_blocks(tissue: tuple[np.ndarray, float], blocks: list, image_px_per_out: float) -> list:
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


def _partial_dir(sdata: Any, key: str) -> Path | None:
    path = getattr(sdata, "path", None)
    if path is None:
        return None
    return Path(str(path) + ".pixgene-partial") / key


def _open_partial(partial: Path, params: dict, shape: tuple[int, ...], chunk_px: int) -> ChunkStore:
    """The chunk store of an earlier run with the same parameters, or a fresh, empty one."""
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
        store.done_dir.mkdir(exist_ok=True)
        # written last: a partial directory without it is incomplete and is started afresh
        meta_file.write_text(json.dumps(params))
    return store


def _dense_element(level0, image, outputs, out_px_in_image_px, scale_factors, out_shape):
    """The map as an image element (multiscale when large enough) that overlays ``image`` everywhere."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale, Sequence

    from .._core.coords import transformations_of

    f = out_px_in_image_px
    to_image = Scale([f, f], axes=("y", "x"))
    transformations = {cs: Sequence([to_image, t]) for cs, t in transformations_of(image).items()}
    large = scale_factors and min(out_shape) // int(np.prod(scale_factors)) >= 16
    factors = list(scale_factors) if large else None
    return Image2DModel.parse(level0, dims=("c", "y", "x"), c_coords=outputs, transformations=transformations,
                              scale_factors=factors)
