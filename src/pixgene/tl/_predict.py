"""``pg.tl.predict_dense``: the dense intensity map of a whole slide, tile by tile, as an image element."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._keys import IMAGE_KEY, UNS_KEY, dense_key
from .._units import record_um_per_px, resolve_um_per_px
from .._validate import check_not_exists, check_positive, fail, require_element

logger = logging.getLogger(__name__)


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
    """Where the output map lies: output pixel (i, j) covers microns [j * um, (j + 1) * um] from the image corner."""

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


def predict_block(model, reader, grid: DenseGrid, oy0: int, oy1: int, ox0: int, ox1: int, dtype) -> np.ndarray:
    """Intensity (n_outputs, oy1 - oy0, ox1 - ox0) for one output block."""
    x0, y0, w, h = grid.read_window(oy0, oy1, ox0, ox1)
    tile = reader.read(x0, y0, w, h)
    lam = model.predict_intensity(tile)  # (C, h / s, w / s) on the model grid starting at (x0, y0)
    m = grid.model_um
    ry = overlap_matrix(oy1 - oy0, oy0 * grid.out_um, grid.out_um, lam.shape[1], y0 * grid.enc_um, m)
    rx = overlap_matrix(ox1 - ox0, ox0 * grid.out_um, grid.out_um, lam.shape[2], x0 * grid.enc_um, m)
    out = np.einsum("yi,cij,xj->cyx", ry, lam, rx, optimize=True)
    return out.astype(dtype, copy=False)


def _partial_dir(sdata: Any, key: str) -> Path | None:
    path = getattr(sdata, "path", None)
    if path is None:
        return None
    return Path(str(path) + ".pixgene-partial") / key


def predict_dense(
    sdata: Any,
    model: Any = None,
    *,
    image_key: str = IMAGE_KEY,
    um_per_px: float = 4.0,
    image_um_per_px: float | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
    chunk_px: int = 256,
    halo_px: int | None = None,
    dtype: str = "float32",
    skip_background: bool = True,
    scale_factors: tuple[int, ...] | None = (2, 2),
    progress: bool = True,
):
    """Predict the dense intensity map over the whole image and store it as an image element.

    Parameters
    ----------
    sdata
        SpatialData holding the H&E image.
    model
        A fitted :class:`pixgene.tl.PixNet`; default: the model last fitted on this object.
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
    chunk_px, halo_px
        Output chunk size (output pixels) and the context read around each chunk (encoder pixels; default
        three times the encoder's coarsest stride).
    dtype
        ``"float32"`` or ``"float16"``.
    skip_background
        Leave chunks without tissue (tissue mask) as zeros without running the model.
    scale_factors
        Downsampling factors of the multiscale pyramid (``None`` for a single scale).

    Returns
    -------
    The new image element (dims c, y, x; channels = genes then ``pixgene_total_counts``; values = expected
    counts per um^2), also stored as ``sdata.images[key_added]`` with transformations that overlay the H&E in
    every coordinate system; ``sdata.attrs["pixgene"]["um_per_px"][key_added]`` and
    ``sdata.attrs["pixgene"]["dense"][key_added]`` (model id, genes, parameters) are recorded. When ``sdata``
    is backed by a zarr store the map is written there chunk by chunk (resumable) and read back lazily.
    """
    from ._model import PixNet, last_model

    image = require_element(sdata, image_key, "images")
    from .._raster import rgb_array

    rgb_array(image, image_key)
    if model is None:
        model = last_model(sdata)
        if model is None:
            fail("model", "none was given and none was fitted on this SpatialData", "Pass model=pg.tl.fit(...) or "
                 "model=pg.tl.PixNet.load(dir)")
    if not isinstance(model, PixNet):
        fail("model", f"is a {type(model).__name__}, not a PixNet", "Pass a model from pg.tl.fit or PixNet.load")
    check_positive(um_per_px, "um_per_px", "predict_dense")
    if dtype not in ("float32", "float16"):
        fail("dtype", f"{dtype!r} is not supported", "Use 'float32' or 'float16'")
    key = key_added or dense_key(image_key)
    check_not_exists(sdata, key, overwrite)
    image_um = resolve_um_per_px(sdata, image_key, um_per_px=image_um_per_px)

    from ..data._reader import SlideReader

    reader = SlideReader(image, image_um=image_um, target_um=model.encoder_um_per_px, name=image_key)
    H0, W0 = reader.shape_level0
    out_shape = (int(np.ceil(H0 * image_um / um_per_px)), int(np.ceil(W0 * image_um / um_per_px)))
    align = model.alignment
    halo = int(halo_px if halo_px is not None else 3 * align)
    halo = int(np.ceil(halo / align)) * align
    grid = DenseGrid(out_shape, float(um_per_px), model.encoder_um_per_px, model.out_um_per_px,
                     model.out_stride, align, halo)
    mask = None
    if skip_background:
        from ..data._mask import tissue_mask

        mask, mask_factor = tissue_mask(sdata, image_key)
    n_out = len(model.outputs)
    params = {
        "image_key": image_key, "um_per_px": float(um_per_px), "image_um_per_px": image_um, "chunk_px": chunk_px,
        "halo_px": halo, "dtype": dtype, "skip_background": skip_background, "model_id": model.model_id,
    }

    def has_tissue(oy0, oy1, ox0, ox1) -> bool:
        if mask is None:
            return True
        f = um_per_px / image_um / mask_factor  # mask pixels per output pixel
        sl = mask[int(np.floor(oy0 * f)) : int(np.ceil(oy1 * f)) + 1, int(np.floor(ox0 * f)) : int(np.ceil(ox1 * f)) + 1]
        return bool(sl.any())

    blocks = [
        (oy, min(oy + chunk_px, out_shape[0]), ox, min(ox + chunk_px, out_shape[1]))
        for oy in range(0, out_shape[0], chunk_px)
        for ox in range(0, out_shape[1], chunk_px)
    ]
    partial = _partial_dir(sdata, key)
    level0 = _compute_level0(model, reader, grid, blocks, has_tissue, n_out, dtype, chunk_px, partial, params,
                             progress)

    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale, Sequence

    from .._coords import transformations_of

    f = um_per_px / image_um
    to_image = Scale([f, f], axes=("y", "x"))
    transformations = {cs: Sequence([to_image, t]) for cs, t in transformations_of(image).items()}
    factors = list(scale_factors) if scale_factors and min(out_shape) // int(np.prod(scale_factors)) >= 16 else None
    element = Image2DModel.parse(
        da.from_array(level0, chunks=(n_out, chunk_px, chunk_px)) if not hasattr(level0, "dask") else level0,
        dims=("c", "y", "x"), c_coords=model.outputs, transformations=transformations, scale_factors=factors,
    )
    if key in sdata.images and overwrite:
        del sdata.images[key]
    sdata.images[key] = element
    record_um_per_px(sdata, key, um_per_px)
    record = dict(sdata.attrs.get(UNS_KEY, {}))
    dense = dict(record.get("dense", {}))
    dense[key] = {**params, "genes": model.genes}
    record["dense"] = dense
    sdata.attrs[UNS_KEY] = record
    if partial is not None:
        sdata.write_element(key, overwrite=overwrite)
        sdata.write_attrs()
        import shutil

        from spatialdata import read_zarr

        sdata.images[key] = read_zarr(sdata.path, selection=("images",)).images[key]
        shutil.rmtree(partial, ignore_errors=True)
    logger.info("dense map %r: %d x %d px at %g um/px, %d outputs", key, *out_shape, um_per_px, n_out)
    return sdata.images[key]


def _compute_level0(model, reader, grid, blocks, has_tissue, n_out, dtype, chunk_px, partial, params, progress):
    """Compute every block once. Backed: into a zarr array next to the store, resuming finished blocks."""
    from tqdm.auto import tqdm

    shape = (n_out, *grid.shape)
    if partial is None:
        out = np.zeros(shape, dtype=dtype)
        done: set = set()
    else:
        import zarr

        partial.mkdir(parents=True, exist_ok=True)
        meta_file = partial / "params.json"
        if meta_file.exists() and json.loads(meta_file.read_text()) != params:
            import shutil

            logger.info("discarding a partial dense map made with other parameters")
            shutil.rmtree(partial)
            partial.mkdir(parents=True)
        meta_file.write_text(json.dumps(params))
        out = zarr.open_array(str(partial / "level0.zarr"), mode="a", shape=shape, dtype=dtype,
                              chunks=(n_out, chunk_px, chunk_px), fill_value=0)
        done_dir = partial / "done"
        done_dir.mkdir(exist_ok=True)
        done = {p.name for p in done_dir.iterdir()}
        if done:
            logger.info("resuming: %d of %d blocks already written", len(done), len(blocks))
    for oy0, oy1, ox0, ox1 in tqdm(blocks, desc="predicting dense map", unit="chunk", disable=not progress):
        name = f"{oy0}_{ox0}"
        if name in done:
            continue
        if has_tissue(oy0, oy1, ox0, ox1):
            out[:, oy0:oy1, ox0:ox1] = predict_block(model, reader, grid, oy0, oy1, ox0, ox1, dtype)
        if partial is not None:
            (partial / "done" / name).touch()
    if partial is None:
        return out
    import dask.array as da

    return da.from_zarr(out)
