"""``pg.tl.fit``: train PixNet on the measured spots of one or many slides."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from .._core.keys import IMAGE_KEY, SPOTS_KEY, TABLE_KEY, UNS_KEY
from .._core.validate import check_positive, fail
from ..data._geometry import scaled_polygons
from ..data._slides import SpotSlide, prepare_spot_slide

logger = logging.getLogger(__name__)

#: the default training length of each member: at least this many epochs and this many optimiser steps (small
#: training sets get more, shorter epochs), at most ``MAX_AUTO_EPOCHS``; two thirds of the 12 epochs and 800 steps
#: one member trained when an ensemble had three, so that five members train in about the time three did
MIN_EPOCHS, MIN_STEPS, MAX_AUTO_EPOCHS = 8, 533, 100
#: encoder pixels of image encoded around each training tile by default (``tile_context_px`` of :func:`fit`;
#: a multiple of every encoder's coarsest stride): chosen on training sections only, against 0 and 64
DEFAULT_CONTEXT_PX = 128

SELECTED_VAR = "pixgene_selected"

#: decoders trained on the same cached features and averaged (see ``n_members`` of :func:`fit`)
DEFAULT_MEMBERS = 5


def counts_with_library(table: Any, genes: Sequence[str]) -> np.ndarray:
    """Raw counts of ``genes`` then each row's library size (all genes of ``table``): what training fits."""
    X = table[:, list(genes)].X
    library = np.asarray(table.X.sum(1)).ravel()
    return np.column_stack([X.toarray() if sp.issparse(X) else np.asarray(X), library])


def _as_list(x: Any) -> list:
    return list(x) if isinstance(x, list | tuple) else [x]


def _resolve_genes(genes: Sequence[str] | None, slides: list[SpotSlide]) -> list[str]:
    if genes is None:
        var = slides[0].table.var
        if SELECTED_VAR not in var:
            fail(
                f"table {slides[0].table_key!r}",
                "no genes were given and none were selected",
                "Pass genes=[...] or run pg.pp.select_genes(sdata) first",
            )
        genes = var.index[var[SELECTED_VAR].astype(bool)].tolist()
    from .._core.validate import check_genes

    for s in slides:
        check_genes(genes, s.table.var_names, f"table {s.table_key!r}")
    return list(genes)


def _fingerprint_inputs(module, slides: list[SpotSlide], image_key: str) -> tuple[dict, list]:
    """What every saved result of the fit depends on (pixgene's version, the encoder's config and a digest of
    its weights), and each slide's image hashed once (:func:`~pixgene.tl._checkpoint.image_hash`), for the
    fingerprints of ``checkpoint_dir`` and ``feature_cache`` alike."""
    from .._core.version import __version__
    from ..train._checkpoint import image_hash, state_digest

    common = {
        "pixgene_version": __version__,
        "encoder": module.encoder.config(),
        "encoder_weights": state_digest(module.encoder.state_dict()),
    }
    return common, [image_hash(s.sdata.images[image_key]) for s in slides]


def _member_checkpoints(path, module, tuned_keys: list[str], slides: list[SpotSlide], train_slides: list, *,
                        inputs: tuple[dict, list], genes: list[str], settings: dict):
    """The fit's :class:`~pixgene.tl._checkpoint.MemberCheckpoints` (existing member files checked before any
    work): each member's fingerprint covers the slides' data, genes, settings, encoder weights and its own
    initial weights."""
    from ..model._pixnet import trained_state
    from ..train._checkpoint import MemberCheckpoints, member_fingerprint, slide_digest

    common, images = inputs
    common = {
        **common,
        "genes": list(genes),
        "slides": [slide_digest(h, s.centers, s.footprint(), t.counts, s.um_per_px)
                   for h, s, t in zip(images, slides, train_slides, strict=True)],
        "settings": settings,
    }
    fingerprints = [member_fingerprint(common, trained_state(module.member(k), tuned_keys), k)
                    for k in range(module.n_members)]
    checkpoints = MemberCheckpoints(path, fingerprints)
    done = [k for k in range(module.n_members) if checkpoints.done(k)]
    if done:
        logger.info("resuming from %s: member(s) %s of %d trained before", path, done, module.n_members)
    return checkpoints


def _feature_store(path, slides: list[SpotSlide], *, inputs: tuple[dict, list], rng: np.random.Generator,
                   settings: dict):
    """The fit's :class:`~pixgene.tl._feature_cache.FeatureCache`: its fingerprint covers the slides' images
    and spots, the encoder's architecture and weights, the encoding settings and the state of ``rng`` that
    draws the views (taken now, just before the training tiles are planned)."""
    from ..train._checkpoint import record_fingerprint, slide_digest
    from ..train._feature_cache import FeatureCache

    common, images = inputs
    record = {
        **common,
        "slides": [slide_digest(h, s.centers, s.footprint(), None, s.um_per_px)
                   for h, s in zip(images, slides, strict=True)],
        "rng": rng.bit_generator.state,
        "settings": settings,
    }
    return FeatureCache(path, record_fingerprint(record))


def _validation_split(n: int, val_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Training mask of ``n`` spots: ``val_fraction`` of them (at least one; none below 10 spots) held out."""
    n_val = max(1, int(round(val_fraction * n))) if n >= 10 else 0
    mask = np.ones(n, dtype=bool)
    mask[rng.choice(n, size=n_val, replace=False)] = False
    return mask


def training_context(tile_context_px: int | None, module, finetune_levels: int) -> int:
    """Encoder pixels of image read around each training tile (see ``tile_context_px`` of :func:`fit`)."""
    encoder = module.encoder
    stride = max(encoder.reductions[i] for i in module.used_levels)
    possible = not finetune_levels and getattr(encoder, "compact_is_pyramid", True)
    if tile_context_px is None:
        return DEFAULT_CONTEXT_PX if possible else 0
    if tile_context_px % stride:
        fail("tile_context_px", f"{tile_context_px} is not a multiple of the encoder's coarsest stride {stride}",
             f"Pass 0 or a multiple of {stride}, e.g. {4 * stride}")
    if tile_context_px and not possible:
        fail("tile_context_px", f"encoder {encoder.config().get('name')!r} caches a compact form (token grids), "
             "which is not cropped to a tile", "Pass tile_context_px=0 with this encoder")
    return int(tile_context_px)


def training_length(
    n_tiles: int, batch_size: int, max_epochs: int | None, patience: int | None
) -> tuple[int, int]:
    """``(max_epochs, patience)``, the defaults filled in: at least ``MIN_EPOCHS`` epochs and ``MIN_STEPS``
    optimiser steps, at most ``MAX_AUTO_EPOCHS`` epochs; patience a third of the epochs, at least 4."""
    if max_epochs is None:
        steps_per_epoch = math.ceil(n_tiles / batch_size)
        max_epochs = min(MAX_AUTO_EPOCHS, max(MIN_EPOCHS, math.ceil(MIN_STEPS / steps_per_epoch)))
    if patience is None:
        patience = max(4, max_epochs // 3)
    return max_epochs, patience


def working_um_per_px(native: float, image_um: Sequence[float], requested: float | None = None) -> float:
    """The um/px the encoder reads the slides at: ``requested`` if given, else the encoder's native um/px, or
    the finest slide's own um/px when that is coarser (upsampling adds no detail, only cost)."""
    if requested is not None:
        return float(requested)
    return float(max(native, min(image_um)))


STANDARDIZE_MODES = ("slide", "training")


def _standardize_mode(value: Any, finetune_levels: int) -> str | None:
    """``"slide"``, ``"training"`` or None (off) from the ``standardize_features`` argument."""
    if value is True or value is np.True_:
        value = "training"
    elif value is False or value is np.False_ or value is None:
        return None
    if value not in STANDARDIZE_MODES:
        fail("standardize_features", f"{value!r} is not one of 'slide', 'training' or False",
             "Pass 'slide' (default: each slide by its own statistics), 'training' (True) or False")
    if value == "slide" and finetune_levels:
        # a tuned encoder moves away from the frozen statistics the slide's own would be taken from
        logger.info("fine-tuning: features are standardised with the training tiles' statistics, not per slide")
        return "training"
    return value


def fit(
    sdata: Any,
    *,
    image_key: str = IMAGE_KEY,
    shapes_key: str = SPOTS_KEY,
    table_key: str = TABLE_KEY,
    genes: Sequence[str] | None = None,
    um_per_px: float | Sequence[float | None] | None = None,
    encoder: str = "efficientnet_lite0",
    encoder_weights: str | None = "default",
    encoder_um_per_px: float | None = None,
    decoder: str = "fusion",
    width: int = 48,
    out_stride: int = 4,
    smooth_windows: bool = False,
    attention_window: int = 8,
    standardize_features: bool | str = "slide",
    tile_px: int | None = None,
    tile_context_px: int | None = None,
    n_views: int = 4,
    stain_jitter: float = 0.05,
    scale_jitter: float = 0.0,
    finetune_levels: int = 0,
    likelihood: str = "nb",
    loss_weights: dict | None = None,
    val_fraction: float = 0.1,
    max_epochs: int | None = None,
    patience: int | None = None,
    batch_size: int = 8,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    ema_decay: float = 0.0,
    n_members: int | None = None,
    precision: str = "auto",
    random_state: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    feature_cache: str | os.PathLike | None = None,
    progress: bool = True,
):
    """Fit PixNet on the measured spots of one slide or a list of slides.

    Parameters
    ----------
    sdata
        A SpatialData or a list of them (slides may come from different platforms; each gets its own
        capture-efficiency factor).
    image_key, shapes_key, table_key
        The H&E image, the measured spots and their raw-count table (same keys on every slide). The spots
        are circles (points with a ``radius``) or polygons (Visium HD's square bins, any other footprint).
    genes
        Genes to model; default: those marked by :func:`pixgene.pp.select_genes`.
    um_per_px
        Microns per image pixel (one value or one per slide); default: recorded by the reader or derived.
    encoder, encoder_weights
        Frozen encoder from :func:`pixgene.nn.build_encoder` (default: bundled ImageNet EfficientNet-Lite0).
    encoder_um_per_px
        Microns per pixel the encoder reads the images at (recorded in the model; prediction reads at the same).
        Default: the encoder's native um/px (1.0 for EfficientNet-Lite0, 0.5 for UNI2), or the finest slide's
        own um/px when that is coarser: images are never upsampled for the encoder (a 4.5 um/px ST image is
        read as it is, not blown up 4.5 times: more tissue context per tile and a twentieth of the pixels).
    decoder
        ``"fusion"`` (PixNet's fusion blocks) or ``"conv"`` (plain U-Net blocks).
    width, out_stride
        Decoder width and output stride in encoder pixels (the model's output pixel is
        ``out_stride * encoder.um_per_px`` microns).
    smooth_windows
        Fusion blocks attend within four grids of windows offset by half a window and blend them
        (``pixgene.nn._decoder.WindowAttention`` with ``smooth=True``), in place of one grid. One grid leaves the
        window lattice in the dense map as straight steps (every 32, 64 and 128 encoder pixels with the default
        decoder); four remove them, for about three times the decoder's compute in training and prediction.
    attention_window
        Side of the fusion blocks' attention windows, in pixels of each level (tile origins are multiples of
        ``window x`` the level's stride). The attention's compute grows with the window's area.
    standardize_features
        Standardise every encoder channel the decoder reads (mean 0, sd 1) before the decoder's first layer.
        ``"slide"`` (default): each slide by its own statistics, over 32 tiles centred on random points of its
        tissue; :func:`pixgene.tl.predict_dense` takes a new slide's statistics the same way, so a shift or
        rescaling of the channels that comes from staining or scanning (and differs between slides) is
        removed before the decoder. ``"training"`` (or ``True``): the statistics of all training tiles, applied
        as they are to every slide. ``False``: raw features. Frozen features are far from centred and
        unevenly spread (EfficientNet-Lite0 on her2st and st_mob tiles: channel means from -30 to +26,
        standard deviations from 0.7 to 12); standardised, the few hundred optimiser steps of a small training
        set go much further. With ``finetune_levels`` > 0, ``"slide"`` falls back to ``"training"`` (a tuned
        encoder moves away from the frozen statistics).
    tile_px, n_views, stain_jitter
        Training tile size in encoder pixels (default: fits the spots with context), number of cached views
        per tile (view 0 plain; others a random dihedral transform, shift and stain jitter of this strength).
    tile_context_px
        Encoder pixels of image encoded around each training tile, whose features are then cropped to the tile
        (a multiple of the encoder's coarsest stride; default 128, 0 with ``finetune_levels`` or a ViT's
        compact cache; docs/concepts.md gives how it was chosen).
        A tile encoded alone gives features that near its edges come from the encoder's padding, while
        ``predict_dense`` encodes every chunk with a wide halo of real tissue; with context the decoder trains
        on the features it will see. Costs ``((tile + 2 context) / tile)^2`` times the encoding of the training
        tiles (4 times at 128 px around 256 px tiles), nothing in training. Must be 0 with ``finetune_levels``
        or an encoder with a compact form (ViTs).
    scale_jitter
        Views other than the first are also read at a magnification drawn from [1 - s, 1 + s] (0: off).
    finetune_levels
        Fine-tune the encoder stages that feed only its last ``finetune_levels`` pyramid levels (0: frozen,
        features cached once; otherwise every step runs the encoder on cached pixels, at a tenth of the
        decoder's learning rate). The tuned encoder tensors are saved with the model.
    likelihood, loss_weights
        ``"nb"`` or ``"poisson"`` count likelihood; weights of the loss terms (set one to 0 to switch it off):
        ``count``, the likelihood of every output's counts (default 1); ``total``, the likelihood of the
        library size alone (default 0); ``mse`` and ``pearson`` on log-normalised expression (defaults 1 and
        0.5). Without either likelihood term nothing fixes the outputs' common scale, so after training every
        output is rescaled by one factor that makes the training spots' predicted library sizes add up to the
        measured ones (recorded as ``model.training["scale_factor"]``): the map stays in expected counts.
    val_fraction, max_epochs, patience, batch_size, lr, weight_decay
        Held-out validation spots for early stopping and the optimiser's settings. The learning rate decays
        over ``max_epochs`` (cosine, to a tenth). Default ``max_epochs`` (each member's): 8, or more on small
        training sets so that training takes at least 533 optimiser steps (at most 100 epochs); default
        ``patience``: a third of the epochs, at least 4.
    ema_decay
        Validate, keep and return an exponential moving average of the weights over the optimiser steps, with
        this decay per step (e.g. 0.99); 0 (default): the raw weights of the best epoch. Off by default because
        it did not help on both real datasets: trained on one section and scored on another training section,
        0.99 raised PCC@M on st_mob (MOB2 -> MOB3) from 0.376 to 0.394 but lowered it on her2st (C2 + C3 -> C4)
        from 0.190 to 0.175, where the best epoch comes early and the average lags behind.
    n_members
        Train this many decoders (each with its intensity head) on the same cached encoder features, each with
        its own random validation spots, initialisation, view order and seed, and predict their mean intensity
        (default: 5; 1 when ``finetune_levels`` > 0, where the members would tune one shared encoder). A few
        hundred spots leave a single decoder's fit at the mercy of its seed: on st_mob, MOB2 -> MOB3, three
        seeds gave PCC@M 0.485, 0.423 and 0.405, and the mean of the three 0.485. The features
        are encoded once, so each further member adds a decoder's training time, and a prediction runs the
        encoder once and every decoder on its features. The default five members, each trained for two thirds
        of the epochs one decoder had when the default was three, train in about the time three did and
        scored higher on training sections (docs/concepts.md). ``model.training`` keeps the first member's
        summary at its top level and every member's under ``"members"``; the history records each epoch's
        member.
    precision
        ``"bf16"``: encoder and decoder compute in bfloat16 autocast (convolutions and matrix products in
        bfloat16; standardisation, the intensity head's output and the losses in float32), in training and in
        every prediction with the model (recorded in its decoder config); ``"32"``: float32 throughout;
        ``"auto"`` (default): ``"bf16"`` where the device computes bfloat16 natively (CPUs with AVX512-BF16 or
        AMX, CUDA GPUs from Ampere on), else ``"32"``. On a 2-core AVX512-BF16 CPU bfloat16 encodes 2.3x and
        trains the decoder 1.6x as fast (``benchmarks/precision.py``).
    random_state
        Seed for spot split, views and weights: the same seed gives the same model (on the same kind of
        device and precision).
    checkpoint_dir
        Directory (created if missing) where every member is written as soon as it is trained. A fit that
        stops (killed, out of time) and is called again with the same slides, settings and directory encodes
        the training tiles again and loads the members it had finished instead of training them: the model is
        the one an uninterrupted fit makes, to the bit (same model id). A member is loaded only where
        everything its training depends on is the same (images, spots, counts, genes, settings, seed, encoder
        weights, precision, kind of device); a member file from another fit stops the fit before any work and
        is never overwritten. Raising ``n_members`` with the same directory trains only the new members.
    feature_cache
        Directory (created if missing) of encoded training tiles shared between fits. A fit writes its encoded
        tiles there once (``features_<fingerprint>.safetensors``, float16, about 0.4 MB per tile and view
        with the default encoder and tile); a later fit whose encoding depends on the same things (images,
        spots, encoder and its weights, um/px, tile, context, views, stain and scale jitter, seed, precision,
        kind of device; not the genes, decoder, loss or optimiser) loads them instead of encoding again,
        to the bit: the same features, so the same model as without the cache. For comparing decoders, loss
        terms or training settings on the same slides (her2st, three sections: encoding is about a third of a
        fit). Not with ``finetune_levels``, where the encoder runs in every step.

    Returns
    -------
    The fitted :class:`pixgene.tl.PixNet`; it is also remembered for each input SpatialData so that
    :func:`pixgene.tl.predict_dense` can follow without ``model=``, and ``sdata.attrs["pixgene"]["model"]``
    records its id and genes.
    """
    from ..data._reader import SlideReader
    from ..data._training import SlideSpots
    from ..model._pixnet import PixNet, build_module, remember_model, trainable_encoder_keys
    from ..model._standardize import feature_stats, pool_stats, slide_feature_stats, standardize_cache
    from ..train._cache import build_cache
    from ..train._plan import LossWeights, calibrate_scale, train

    sdatas = _as_list(sdata)
    if not sdatas:
        fail("sdata", "no slides were given", "Pass a SpatialData or a non-empty list of them")
    ums = _as_list(um_per_px) if isinstance(um_per_px, list | tuple) else [um_per_px] * len(sdatas)
    if len(ums) != len(sdatas):
        fail("um_per_px", f"{len(ums)} values for {len(sdatas)} slides", "Give one value per slide or a single one")
    if likelihood not in ("nb", "poisson"):
        fail("likelihood", f"{likelihood!r} is not supported", "Use 'nb' or 'poisson'")
    if not 0 <= scale_jitter < 0.5:
        fail("scale_jitter", f"{scale_jitter} is not in [0, 0.5)", "Pass e.g. 0.1 (magnifications 0.9-1.1), or 0")
    if isinstance(finetune_levels, bool) or not isinstance(finetune_levels, int) or finetune_levels < 0:
        fail("finetune_levels", f"{finetune_levels!r} is not a non-negative integer",
             "Pass 0 (frozen encoder) or the number of last pyramid levels to fine-tune, e.g. 1")
    standardize = _standardize_mode(standardize_features, finetune_levels)
    check_positive(encoder_um_per_px, "encoder_um_per_px", "fit",
                   "Pass e.g. 1.0, or None for the encoder's native um/px")
    for name, value in (("max_epochs", max_epochs), ("patience", patience), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            fail(name, f"{value!r} is not a positive integer", "Pass e.g. 12, or None for the default")
    if isinstance(attention_window, bool) or not isinstance(attention_window, int) or attention_window < 2 \
            or attention_window % 2:
        fail("attention_window", f"{attention_window!r} is not an even integer of at least 2",
             "Pass e.g. 8 (the default) or 4")
    if not isinstance(smooth_windows, bool):
        fail("smooth_windows", f"{smooth_windows!r} is not True or False", "Pass True or False")
    if isinstance(ema_decay, bool) or not isinstance(ema_decay, int | float) or not 0 <= ema_decay < 1:
        fail("ema_decay", f"{ema_decay!r} is not in [0, 1)", "Pass e.g. 0.99, or 0 for the raw weights")
    ema_decay = float(ema_decay)
    if n_members is None:
        n_members = 1 if finetune_levels else DEFAULT_MEMBERS
    if isinstance(n_members, bool) or not isinstance(n_members, int) or n_members < 1:
        fail("n_members", f"{n_members!r} is not a positive integer",
             f"Pass e.g. {DEFAULT_MEMBERS} (the default), or 1 for a single decoder")
    if n_members > 1 and finetune_levels:
        fail("n_members", f"{n_members} members cannot share an encoder that finetune_levels={finetune_levels} "
             "tunes", "Pass n_members=1 with finetune_levels, or finetune_levels=0 for an ensemble")
    if tile_context_px is not None and (isinstance(tile_context_px, bool) or not isinstance(tile_context_px, int)
                                        or tile_context_px < 0):
        fail("tile_context_px", f"{tile_context_px!r} is not a non-negative integer",
             "Pass e.g. 128 (encoder pixels around each training tile), or 0")
    if tile_context_px and finetune_levels:
        fail("tile_context_px", f"finetune_levels={finetune_levels} runs the encoder on the tiles in every step, "
             "without context", "Pass tile_context_px=0 with finetune_levels")
    if precision not in ("auto", "bf16", "32"):
        fail("precision", f"{precision!r} is not 'auto', 'bf16' or '32'",
             "Pass 'auto' (bfloat16 where the device runs it natively), 'bf16' or '32'")
    if not 0 < val_fraction < 1:
        fail("val_fraction", f"{val_fraction} is not between 0 and 1", "Pass e.g. 0.1")
    if feature_cache is not None and finetune_levels:
        fail("feature_cache", f"holds frozen features, and finetune_levels={finetune_levels} runs the encoder "
             "in every step", "Pass feature_cache=None with finetune_levels")
    from ..train._checkpoint import require_directory

    # before the images are hashed for the fingerprints
    for name, path in (("checkpoint_dir", checkpoint_dir), ("feature_cache", feature_cache)):
        if path is not None:
            require_directory(name, path)
    weights = {"count": 1.0, "total": 0.0, "mse": 1.0, "pearson": 0.5, **(loss_weights or {})}
    unknown = set(weights) - {"count", "total", "mse", "pearson"}
    if unknown:
        fail("loss_weights", f"unknown terms {sorted(unknown)}", "Use the keys 'count', 'total', 'mse' and 'pearson'")
    slides = [
        prepare_spot_slide(s, image_key=image_key, shapes_key=shapes_key, table_key=table_key, um_per_px=u)
        for s, u in zip(sdatas, ums, strict=True)
    ]
    genes = _resolve_genes(genes, slides)

    import torch

    from ..nn._pixnet import resolve_precision

    torch.manual_seed(random_state)
    rng = np.random.default_rng(random_state)
    work_device = "cuda" if torch.cuda.is_available() else "cpu"
    decoder_config = {"width": width, "out_stride": out_stride, "block": decoder, "window": attention_window,
                      "smooth": smooth_windows, "precision": resolve_precision(precision, work_device),
                      "members": n_members}
    if standardize:
        # True: the training tiles' statistics; "slide": each slide's own (recomputed on every predicted slide)
        decoder_config["standardize"] = True if standardize == "training" else "slide"
    from ..nn._encoders import build_encoder

    enc = build_encoder(encoder, weights=encoder_weights)
    enc.um_per_px = working_um_per_px(enc.um_per_px, [s.um_per_px for s in slides], encoder_um_per_px)
    logger.info("the encoder reads the images at %.3g um/px; computing in %s", enc.um_per_px,
                "bfloat16 autocast" if decoder_config["precision"] == "bf16" else "float32")
    module = build_module(
        enc.config(), encoder_weights, n_outputs=len(genes) + 1, decoder_config=decoder_config, encoder=enc
    )
    enc_um = float(module.encoder.um_per_px)
    if finetune_levels:
        module.encoder.set_trainable(finetune_levels)

    train_slides = []
    mean_intensity = []
    radii = []
    for i, s in enumerate(slides):
        reader = SlideReader(s.sdata.images[image_key], image_um=s.um_per_px, target_um=enc_um, name=image_key)
        counts = counts_with_library(s.table, genes).astype(np.float32)
        train_mask = _validation_split(len(counts), val_fraction, rng)
        if s.polygons is None:  # circles: one radius for the slide's spots
            radius = float(np.median(s.radius)) / reader.factor
            polygons = None
            area_um2 = np.pi * (radius * enc_um) ** 2
        else:  # polygons (square bins, ...): each its own extent and area
            radius = s.radius / reader.factor
            polygons = scaled_polygons(s.polygons, 1.0 / reader.factor)
            area_um2 = float(np.median(s.area_px)) * s.um_per_px**2
        train_slides.append(
            SlideSpots(f"slide{i}", reader, s.centers / reader.factor, radius, counts, train_mask, slide_index=i,
                       polygons=polygons)
        )
        mean_intensity.append(counts.mean(0) / area_um2)
        radii.append(float(np.max(radius)))
    for _, head in module.pairs():
        head.set_scale(torch.from_numpy(np.mean(mean_intensity, axis=0)).float())

    margin = 16
    need = 2 * max(radii) + 2 * margin + 64
    align = module.alignment
    tile = int(tile_px or max(256, int(np.ceil(need / align)) * align))
    if tile % align:
        fail("tile_px", f"{tile} is not a multiple of the encoder's stride {align}", f"Pass a multiple of {align}")
    context = training_context(tile_context_px, module, finetune_levels)
    tuned_keys = trainable_encoder_keys(module) if finetune_levels else []
    inputs = None
    if checkpoint_dir is not None or feature_cache is not None:
        inputs = _fingerprint_inputs(module, slides, image_key)
    checkpoints = None
    if checkpoint_dir is not None:
        checkpoints = _member_checkpoints(
            checkpoint_dir, module, tuned_keys, slides, train_slides, inputs=inputs, genes=genes,
            settings={
                "encoder_um_per_px": enc_um, "decoder": {k: v for k, v in decoder_config.items() if k != "members"},
                "tile": tile, "margin": margin, "context": context, "n_views": n_views,
                "stain_jitter": stain_jitter, "scale_jitter": scale_jitter, "finetune_levels": finetune_levels,
                "standardize": standardize, "likelihood": likelihood, "loss_weights": weights,
                "val_fraction": val_fraction, "max_epochs": max_epochs, "patience": patience,
                "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "ema_decay": ema_decay,
                "random_state": random_state, "device": work_device,
            },
        )

    store = None
    if feature_cache is not None:
        store = _feature_store(feature_cache, slides, inputs=inputs, rng=rng, settings={
            "tile": tile, "margin": margin, "context": context, "n_views": n_views, "stain_jitter": stain_jitter,
            "scale_jitter": scale_jitter, "levels": module.used_levels, "out_stride": module.out_stride,
            "precision": decoder_config["precision"], "device": work_device,
        })
    module.to(work_device)
    cache = build_cache(
        train_slides, module, tile=tile, margin=margin, n_views=n_views, stain_strength=stain_jitter, rng=rng,
        scale_jitter=scale_jitter, keep_images=bool(finetune_levels), context=context, progress=progress,
        store=store,
    )
    slide_stats = None
    if standardize == "training":
        stats = feature_stats(cache, module)
        for dec, _ in module.pairs():
            dec.set_feature_stats(*stats)
    elif standardize == "slide":
        # each slide standardised by its own statistics; the decoder trains on the standardised cache and keeps
        # identity buffers until training ends
        slide_stats = [
            slide_feature_stats(s.sdata, image_key, t.reader, module, image_um=s.um_per_px)
            for s, t in zip(slides, train_slides, strict=True)
        ]
        standardize_cache(cache, slide_stats)
    max_epochs, patience = training_length(cache.n_tiles, batch_size, max_epochs, patience)
    logger.info("training for at most %d epochs (patience %d) on %d tiles", max_epochs, patience, cache.n_tiles)
    history, summaries = [], []
    for k in range(n_members):
        # member 0 keeps the split and seed drawn above (one member is the model fit has always made); the
        # others validate on their own random spots, so between them every spot also trains some member
        member_cache, seed = cache, random_state
        if k:
            member_rng = np.random.default_rng([random_state, k])
            member_cache = dataclasses.replace(
                cache, slides=[dataclasses.replace(t, train_mask=_validation_split(len(t.counts), val_fraction,
                                                                                   member_rng))
                               for t in train_slides])
            seed = int(member_rng.integers(2**31 - 1))
        member = module.member(k)
        if checkpoints is not None and checkpoints.done(k):
            member_history, summary = checkpoints.load(k, member, tuned_keys)
        else:
            if n_members > 1:
                logger.info("training member %d of %d", k + 1, n_members)
            started = time.perf_counter()
            member_history, summary = train(
                member, member_cache, n_slides=len(slides),
                loss=LossWeights(weights["count"], weights["total"], weights["mse"], weights["pearson"],
                                 likelihood),
                max_epochs=max_epochs, patience=patience, batch_size=batch_size, lr=lr,
                weight_decay=weight_decay, seed=seed, progress=progress, ema_decay=ema_decay,
            )
            if weights["count"] == 0 and weights["total"] == 0:
                # no count likelihood fixed the outputs' common scale: take it from the training spots' library
                # sizes; training leaves decoder and head on the CPU; the encoder runs here again if fine-tuned
                module.to(work_device).eval()
                summary["scale_factor"] = calibrate_scale(member, member_cache, batch_size=batch_size)
                logger.info("outputs rescaled by %.4g to the training spots' library sizes",
                            summary["scale_factor"])
            summary["train_s"] = round(time.perf_counter() - started, 1)
            if checkpoints is not None:
                checkpoints.save(k, member, tuned_keys, member_history, summary)
        history += [{**h, "member": k} for h in member_history] if n_members > 1 else member_history
        summaries.append(summary)
    summary = dict(summaries[0])
    if n_members > 1:
        summary["members"] = summaries
    module.to("cpu").eval()
    if slide_stats is not None:
        # without a slide to take statistics from (PixNet.predict_intensity on raw tiles), the training slides'
        # pooled statistics stand in; predict_dense replaces them with the predicted slide's own
        pooled = pool_stats(slide_stats)
        for dec, _ in module.pairs():
            dec.set_feature_stats(*pooled)
    finetuned = tuned_keys
    for p in module.encoder.parameters():
        p.requires_grad_(False)
    training = {
        "params": {
            "image_key": image_key, "shapes_key": shapes_key, "table_key": table_key, "tile_px": tile,
            "tile_context_px": context,
            "n_views": n_views, "stain_jitter": stain_jitter, "scale_jitter": scale_jitter,
            "finetune_levels": finetune_levels, "standardize_features": standardize or False,
            "likelihood": likelihood, "loss_weights": weights,
            "val_fraction": val_fraction, "max_epochs": max_epochs, "patience": patience,
            "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "ema_decay": ema_decay,
            "n_members": n_members,
            "random_state": random_state,
        },
        "slides": [
            {"um_per_px": s.um_per_px, "n_spots": int(len(s.centers)), "spot_diameter_um": s.spot_diameter_um}
            for s in slides
        ],
        "n_tiles": cache.n_tiles,
        **summary,
    }
    model = PixNet(
        module, genes=genes, encoder_config=module.encoder.config(), encoder_weights=encoder_weights,
        decoder_config=decoder_config, history=history, training=training, finetuned=finetuned,
    )
    for s in sdatas:
        remember_model(s, model)
        record = dict(s.attrs.get(UNS_KEY, {}))
        record["model"] = {"model_id": model.model_id, "genes": genes, "encoder": enc.config().get("name")}
        s.attrs[UNS_KEY] = record
    logger.info("fitted %r (best epoch %s)", model, summary["best_epoch"])
    return model
