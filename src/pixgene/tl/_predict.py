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

How sure the map is
-------------------
A model of several members (``pg.tl.fit``'s default: 5 decoders on one encoder) predicts the mean of its
members' maps. With ``uncertainty=True`` each chunk task also keeps every member's own map
(:func:`pixgene.infer._chunks.predict_members`: the tile is encoded once, each member's decoder and head run
once through its single-member view, and the mean is formed from those outputs with the very operations of
``PixNetModule.decode``, so it is the same map to the bit). They are stored as a second image element
``f"{key_added}_members"`` on the same grid, chunks, transformations and pyramid, channels
``member{k}:{output}`` member-major: ``n_members x (genes + 1)`` channels, ``n_members`` times the mean map's
memory and disk. Member maps are linear in the read-out like the mean, so :func:`pixgene.tl.aggregate`
integrates each member's map over each shape exactly and takes the spread of those integrals. In the chunk
store they are a second zarr array, ``members.zarr``, written before the chunk's mean and its marker, so a
resumed run finds both complete or predicts the chunk again.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

import numpy as np

from .._core.keys import IMAGE_KEY, UNS_KEY, dense_key, member_channel, members_key
from .._core.units import record_um_per_px, resolve_um_per_px
from .._core.validate import check_int, check_not_exists, check_positive, fail, require_element
from ..infer import (
    GPU_BATCH,
    ChunkStore,
    DenseGrid,
    ModelPart,
    active_client,
    chunk_blocks,
    default_device,
    device_of,
    move_model,
    open_partial,
    partial_dir,
    run_chunk_tasks,
    tiling_halo,
    tissue_blocks,
)
from ..model import check_tta, nb_dispersion

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ receptive field


# ------------------------------------------------------------------------------------------ chunk tasks


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
    uncertainty: bool = False,
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
    uncertainty
        Also store every member's own map, so that :func:`pixgene.tl.aggregate` can read out the members'
        spread of each shape's expected counts exactly (``layers["pixgene_sd"]``) and :func:`pixgene.pl.uncertainty`
        can draw it. Needs one model of several members (``pg.tl.fit(n_members=...)``, 5 by default). The
        members' maps are computed in the same chunk tasks as the mean map, from the same encoding of each tile
        (the encoder runs once per chunk; each decoder once, as without ``uncertainty``), and the mean map is
        the same, to the bit, as without it. Stored as a second image element ``f"{key_added}_members"``
        (:func:`pixgene._core.keys.members_key`): dims (c, y, x), the same grid, chunks, transformations and
        pyramid as the mean map, channels ``f"member{k}:{output}"`` member-major (member 0's genes and
        total, then member 1's, ...). Memory and disk: ``n_members`` times the mean map's (5 x by default;
        each chunk task holds its members' chunks too). Time: the decoders and heads run as before; what is
        added is copying, resampling and writing the members' maps (``benchmarks/results/uncertainty.md``).
    progress
        Show a tqdm progress bar over chunks.

    Returns
    -------
    The new image element (dims c, y, x; channels = genes then ``pixgene_total_counts``; values = expected
    counts per um^2), also stored as ``sdata.images[key_added]`` with transformations that overlay the H&E in
    every coordinate system; ``sdata.attrs["pixgene"]["um_per_px"][key_added]`` and
    ``sdata.attrs["pixgene"]["dense"][key_added]`` (model id, genes, parameters including the halo and the
    probe's edge error, and the numbers of tissue and background chunks; for a list of models the ids joined
    by ``+``, ``model_ids``, and one halo, tile size and edge error per model) are recorded. For a single
    model fitted with the negative binomial likelihood the record holds ``"nb_theta"``: each member's fitted
    inverse dispersion per output (``model.training["theta"]``, and ``["members"][k]["theta"]``), from which
    :func:`pixgene.tl.aggregate` derives count intervals. With ``uncertainty=True`` the record holds
    ``"uncertainty"``: ``{"members_key", "n_members"}``, and ``sdata.images[f"{key_added}_members"]`` the
    members' maps. When ``sdata`` is
    backed by a zarr store the map is written there and read back lazily; until it is complete the finished
    chunks live in ``<store>.pixgene-partial/<key_added>`` (removed at the end).
    """
    image = require_element(sdata, image_key, "images")
    models = _models_to_run(sdata, model)
    shares = _model_weights(weights, len(models))
    tta, uncertainty = _check_options(image, image_key, models, um_per_px=um_per_px, dtype=dtype,
                                      chunk_px=chunk_px, batch_size=batch_size, threads=threads, tta=tta,
                                      uncertainty=uncertainty, halo_px=halo_px)
    key = key_added or dense_key(image_key)
    check_not_exists(sdata, key, overwrite)
    mkey = members_key(key)
    if uncertainty:
        check_not_exists(sdata, mkey, overwrite)
    n_members = models[0].n_members if uncertainty else 0
    image_um = resolve_um_per_px(sdata, image_key, um_per_px=image_um_per_px)

    import torch

    local_device = device or default_device()
    on_gpu = local_device.startswith("cuda")
    batch_size = int(batch_size or (GPU_BATCH if on_gpu else 1))
    threads = None if on_gpu else int(threads or torch.get_num_threads())
    client = active_client()

    from ..data import SlideReader, tissue_mask

    readers = [SlideReader(image, image_um=image_um, target_um=m.encoder_um_per_px, name=image_key)
               for m in models]
    H0, W0 = readers[0].shape_level0
    out_shape = (int(np.ceil(H0 * image_um / um_per_px)), int(np.ceil(W0 * image_um / um_per_px)))
    blocks = chunk_blocks(out_shape, chunk_px)
    original_devices = [device_of(m) for m in models]
    try:
        # one tissue mask serves both the background chunks and the slide's own feature statistics
        mask = tissue_mask(sdata, image_key, image_um_per_px=image_um) if (
            skip_background or any(m.slide_standardized for m in models)) else None
        parts, halos = [], []
        for fitted, reader in zip(models, readers, strict=True):
            move_model(fitted, local_device)
            align = fitted.alignment
            if halo_px is None:
                halo, edge_error = tiling_halo(fitted)
            else:
                halo, edge_error = int(np.ceil(halo_px / align)) * align, None
            ready = fitted
            if fitted.slide_standardized:
                from ..model import slide_feature_stats

                # this slide's own channel statistics, taken the same way fit took each training slide's
                stats = slide_feature_stats(sdata, image_key, reader, fitted.module, image_um=image_um,
                                            mask=mask)
                ready = fitted.with_feature_stats(*stats)
            grid = DenseGrid(out_shape, float(um_per_px), ready.encoder_um_per_px, ready.out_um_per_px,
                             ready.out_stride, align, halo)
            parts.append(ModelPart(ready, reader, grid, grid.tile_shape(blocks), shares[len(parts)], tta,
                                   members=uncertainty))
            halos.append((halo, edge_error))
        tissue = tissue_blocks(mask, blocks, um_per_px / image_um) if skip_background else blocks
        n_out = len(models[0].outputs)
        params = {
            "image_key": image_key, "image_shape": [H0, W0], "um_per_px": float(um_per_px),
            "image_um_per_px": image_um, "chunk_px": int(chunk_px), "dtype": dtype,
            "skip_background": skip_background, "tta": tta,
        }
        if uncertainty:  # only then: a partial map of a plain run stays resumable as it was
            params["uncertainty"] = True
        if len(models) == 1:
            params.update(halo_px=halos[0][0], tile_px=list(parts[0].tile_hw), model_id=models[0].model_id)
        else:
            params.update(halo_px=[h for h, _ in halos], tile_px=[list(p.tile_hw) for p in parts],
                          model_id="+".join(m.model_id for m in models),
                          model_ids=[m.model_id for m in models], weights=shares)
        partial = partial_dir(sdata, key)
        store = None if partial is None else open_partial(partial, params, (n_out, *out_shape), chunk_px,
                                                          members_channels=n_members * n_out or None)
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
            move_model(fitted, home)
    edge_error = halos[0][1] if len(models) == 1 else [e for _, e in halos]

    level0, members0 = _assembled(results, store, n_out=n_out, n_members=n_members, out_shape=out_shape,
                                  dtype=dtype, chunk_px=chunk_px)
    element = _dense_element(level0, image, models[0].outputs, um_per_px / image_um, scale_factors, out_shape)
    if key in sdata.images and overwrite:
        del sdata.images[key]
    if mkey in sdata.images and overwrite:
        # an earlier run's members belong to the map this one replaces
        del sdata.images[mkey]
        if partial is not None:
            _delete_from_disk(sdata, mkey)
    sdata.images[key] = element
    record_um_per_px(sdata, key, um_per_px)
    if uncertainty:
        channels = [member_channel(k, o) for k in range(n_members) for o in models[0].outputs]
        sdata.images[mkey] = _dense_element(members0, image, channels, um_per_px / image_um, scale_factors,
                                            out_shape)
        record_um_per_px(sdata, mkey, um_per_px)
    record = dict(sdata.attrs.get(UNS_KEY, {}))
    dense = dict(record.get("dense", {}))
    dense[key] = {
        **params, "halo_edge_error": edge_error, "genes": models[0].genes, "batch_size": batch_size,
        "device": "dask.distributed" if client is not None else local_device,
        "chunks": {"tissue": len(tissue), "background": len(blocks) - len(tissue)},
    }
    theta = nb_dispersion(models[0]) if len(models) == 1 else None
    if theta is not None:
        dense[key]["nb_theta"] = theta
    if uncertainty:
        dense[key]["uncertainty"] = {"members_key": mkey, "n_members": n_members}
    record["dense"] = dense
    sdata.attrs[UNS_KEY] = record
    if partial is not None:
        _write_into_store(sdata, key)
        if uncertainty:
            _write_into_store(sdata, mkey)
        sdata.write_attrs()
        from spatialdata import read_zarr

        written = read_zarr(sdata.path, selection=("images",)).images
        sdata.images[key] = written[key]
        if uncertainty:
            sdata.images[mkey] = written[mkey]
        shutil.rmtree(partial, ignore_errors=True)
        if partial.parent.is_dir() and not any(partial.parent.iterdir()):
            partial.parent.rmdir()
    logger.info(
        "dense map %r: %d x %d px at %g um/px, %d outputs; %d of %d chunks had tissue", key, *out_shape,
        um_per_px, n_out, len(tissue), len(blocks),
    )
    if uncertainty:
        logger.info("members' maps %r: %d members x %d outputs", mkey, n_members, n_out)
    return sdata.images[key]


def _check_options(image: Any, image_key: str, models: list, *, um_per_px: Any, dtype: Any, chunk_px: Any,
                   batch_size: Any, threads: Any, tta: Any, uncertainty: Any, halo_px: Any) -> tuple[int, bool]:
    """Every check of :func:`predict_dense`'s arguments, before any work; returns ``tta`` and ``uncertainty``
    as plain Python values (the parameters are written as JSON)."""
    from .._core.raster import require_finite, rgb_array

    require_finite(rgb_array(image, image_key), image_key)
    check_positive(um_per_px, "um_per_px", "predict_dense")
    if dtype not in ("float32", "float16"):
        fail("dtype", f"{dtype!r} is not supported", "Use 'float32' or 'float16'")
    for name, value in (("chunk_px", chunk_px), ("batch_size", batch_size), ("threads", threads)):
        check_int(value, name, minimum=1, allow_none=name != "chunk_px",
                  fix=f"Pass {name}=256 or another positive integer")
    check_tta(tta)
    if not isinstance(uncertainty, bool | np.bool_):
        fail("uncertainty", f"{uncertainty!r} is not True or False", "Pass uncertainty=True or False")
    if uncertainty:
        if len(models) > 1:
            fail("uncertainty", f"needs one model of several members, not a list of {len(models)} models",
                 "Pass one model fitted with n_members > 1 (pg.tl.fit's default is 5)")
        if models[0].n_members < 2:
            fail("uncertainty", "needs a model of several members: this model has one decoder, so there is no "
                 "spread between members to store",
                 "Fit with n_members >= 2 (pg.tl.fit's default is 5), or pass uncertainty=False")
    if halo_px is not None and (not np.isfinite(halo_px) or halo_px < 0):
        fail("halo_px", f"{halo_px!r} is not a non-negative number",
             "Pass halo_px=None to derive it from the model")
    return int(tta), bool(uncertainty)


def _assembled(results, store, *, n_out: int, n_members: int, out_shape: tuple[int, int], dtype: str,
               chunk_px: int):
    """The map (and with ``n_members``, the members' maps) as dask arrays: from the chunk store where the map
    was written to disk, else from the chunks' results in memory."""
    import dask.array as da

    n_members_ch = n_members * n_out
    if store is not None:
        members0 = da.from_zarr(str(store.members_path)) if n_members else None
        return da.from_zarr(str(store.array_path)), members0
    level0 = np.zeros((n_out, *out_shape), dtype=dtype)
    members0 = np.zeros((n_members_ch, *out_shape), dtype=dtype) if n_members else None
    for (oy0, oy1, ox0, ox1), values, *members in results:
        level0[:, oy0:oy1, ox0:ox1] = values
        if n_members:
            members0[:, oy0:oy1, ox0:ox1] = members[0]
    level0 = da.from_array(level0, chunks=(n_out, chunk_px, chunk_px))
    if n_members:
        members0 = da.from_array(members0, chunks=(n_members_ch, chunk_px, chunk_px))
    return level0, members0


def _write_into_store(sdata: Any, key: str) -> None:
    """Write element ``key`` into ``sdata``'s zarr store, replacing an element stored under that name
    (``overwrite=True`` was checked before): spatialdata refuses ``write_element(overwrite=True)`` inside the
    object's own store, so the stored one is deleted first (the new element reads from the partial map, not from
    it)."""
    _delete_from_disk(sdata, key)
    sdata.write_element(key)


def _delete_from_disk(sdata: Any, key: str) -> None:
    """Remove element ``key`` from ``sdata``'s zarr store, if it is there."""
    try:
        sdata.delete_element_from_disk(key)
    except (KeyError, ValueError):  # not on disk
        pass


def _models_to_run(sdata: Any, model: Any) -> list:
    """``model`` as a list of fitted models, checked: one PixNet, several that predict the same outputs, or
    (``None``) the model last fitted on ``sdata``."""
    from ..model import PixNet, last_model

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
