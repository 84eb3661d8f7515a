"""The training engine behind ``pg.tl.fit``: the slides' spots in encoder pixels, the training tiles encoded
once, every member trained on them (resumable), and the fitted :class:`~pixgene.model.PixNet`.

It takes slides already checked and genes already chosen; it remembers nothing about the SpatialData objects
it was given (``pg.tl.fit`` does that for the user's own slides), so internal fits (``denoise``) leave the
user's slides as they were.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from .._core.validate import fail
from ..data import SpotSlide, scaled_polygons
from ..model import DecoderConfig, TrainConfig

logger = logging.getLogger(__name__)

#: the default training length of each member: at least this many epochs and this many optimiser steps (small
#: training sets get more, shorter epochs), at most ``MAX_AUTO_EPOCHS``; two thirds of the 12 epochs and 800 steps
#: one member trained when an ensemble had three, so that five members train in about the time three did
MIN_EPOCHS, MIN_STEPS, MAX_AUTO_EPOCHS = 8, 533, 100


#: encoder pixels of image encoded around each training tile by default (``tile_context_px`` of :func:`fit`;
#: a multiple of every encoder's coarsest stride): chosen on training sections only, against 0 and 64
DEFAULT_CONTEXT_PX = 128


#: decoders trained on the same cached features and averaged (see ``n_members`` of :func:`fit`)
DEFAULT_MEMBERS = 5


def counts_with_library(table: Any, genes: Sequence[str]) -> np.ndarray:
    """Raw counts of ``genes`` then each row's library size (all genes of ``table``): what training fits."""
    X = table[:, list(genes)].X
    library = np.asarray(table.X.sum(1)).ravel()
    return np.column_stack([X.toarray() if sp.issparse(X) else np.asarray(X), library])


def _fingerprint_inputs(module, slides: list[SpotSlide], image_key: str) -> tuple[dict, list]:
    """What every saved result of the fit depends on (pixgene's version, the encoder's config and a digest of
    its weights), and each slide's image hashed once (:func:`~pixgene.tl._checkpoint.image_hash`), for the
    fingerprints of ``checkpoint_dir`` and ``feature_cache`` alike."""
    from .._core.version import __version__
    from ._checkpoint import image_hash, state_digest

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
    from ..model import trained_state
    from ._checkpoint import MemberCheckpoints, member_fingerprint, slide_digest

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
    from ._checkpoint import record_fingerprint, slide_digest
    from ._feature_cache import FeatureCache

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


@dataclasses.dataclass
class FitOptions:
    """What one fit is asked to do, beyond its slides and genes (every field checked by ``pg.tl.fit``)."""

    image_key: str
    shapes_key: str
    table_key: str
    encoder: str = "efficientnet_lite0"
    encoder_weights: str | None = "default"
    encoder_um_per_px: float | None = None
    n_members: int | None = None
    max_epochs: int | None = None
    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
    training: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    precision: str = "auto"
    random_state: int = 0
    checkpoint_dir: Any = None
    feature_cache: Any = None
    progress: bool = True

    def members(self) -> int:
        """``n_members``, the default filled in: 5, or 1 when the encoder is fine-tuned (one shared encoder)."""
        if self.n_members is not None:
            return self.n_members
        return 1 if self.training.finetune_levels else DEFAULT_MEMBERS


def fit_model(slides: list[SpotSlide], genes: list[str], options: FitOptions):
    """Train a :class:`~pixgene.model.PixNet` on checked slides and chosen genes (see ``pg.tl.fit``)."""
    import torch

    from ..nn import resolve_precision

    train_cfg, n_members = options.training, options.members()
    finetune = train_cfg.finetune_levels
    torch.manual_seed(options.random_state)
    rng = np.random.default_rng(options.random_state)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    decoder_config = options.decoder.module_kwargs(
        precision=resolve_precision(options.precision, device), members=n_members, finetune_levels=finetune)
    module = _build_module(slides, len(genes) + 1, options, decoder_config)
    train_slides, radii = _training_slides(slides, module, genes, options, rng)
    tile = _tile_size(module, radii, train_cfg.tile_px)
    context = training_context(train_cfg.tile_context_px, module, finetune)
    from ..model import trainable_encoder_keys

    tuned_keys = trainable_encoder_keys(module) if finetune else []
    settings = {"tile": tile, "margin": TILE_MARGIN, "context": context, "n_views": train_cfg.n_views,
                "stain_jitter": train_cfg.stain_jitter, "scale_jitter": train_cfg.scale_jitter}
    inputs = None
    if options.checkpoint_dir is not None or options.feature_cache is not None:
        inputs = _fingerprint_inputs(module, slides, options.image_key)
    checkpoints = None
    if options.checkpoint_dir is not None:
        checkpoints = _member_checkpoints(
            options.checkpoint_dir, module, tuned_keys, slides, train_slides, inputs=inputs, genes=genes,
            settings={**settings, "encoder_um_per_px": float(module.encoder.um_per_px),
                      "decoder": {k: v for k, v in decoder_config.items() if k != "members"},
                      "training": train_cfg.to_dict(), "max_epochs": options.max_epochs,
                      "random_state": options.random_state, "device": device},
        )
    store = None
    if options.feature_cache is not None:
        store = _feature_store(options.feature_cache, slides, inputs=inputs, rng=rng, settings={
            **settings, "levels": module.used_levels, "out_stride": module.out_stride,
            "precision": decoder_config["precision"], "device": device,
        })
    module.to(device)
    from ._cache import build_cache

    cache = build_cache(
        train_slides, module, tile=tile, margin=TILE_MARGIN, n_views=train_cfg.n_views,
        stain_strength=train_cfg.stain_jitter, rng=rng, scale_jitter=train_cfg.scale_jitter,
        keep_images=bool(finetune), context=context, progress=options.progress, store=store,
    )
    slide_stats = _standardize(cache, module, slides, train_slides, options)
    max_epochs, patience = training_length(cache.n_tiles, train_cfg.batch_size, options.max_epochs,
                                           train_cfg.patience)
    logger.info("training for at most %d epochs (patience %d) on %d tiles", max_epochs, patience, cache.n_tiles)
    history, summary = _train_members(module, cache, train_slides, options, tuned_keys, checkpoints,
                                      max_epochs=max_epochs, patience=patience, device=device)
    module.to("cpu").eval()
    if slide_stats is not None:
        # without a slide to take statistics from (PixNet.predict_intensity on raw tiles), the training slides'
        # pooled statistics stand in; predict_dense replaces them with the predicted slide's own
        from ..model import pool_stats

        pooled = pool_stats(slide_stats)
        for dec, _ in module.pairs():
            dec.set_feature_stats(*pooled)
    for p in module.encoder.parameters():
        p.requires_grad_(False)
    training = {
        "params": {
            "image_key": options.image_key, "shapes_key": options.shapes_key, "table_key": options.table_key,
            **train_cfg.to_dict(), "tile_px": tile, "tile_context_px": context,
            "standardize_features": options.decoder.standardize_mode(finetune) or False,
            "max_epochs": max_epochs, "patience": patience, "n_members": n_members,
            "random_state": options.random_state,
            # what the TrainConfig asked for where the fit filled in a default
            "requested": {k: getattr(train_cfg, k) for k in ("tile_px", "tile_context_px", "patience")},
        },
        "decoder": options.decoder.to_dict(),
        "slides": [
            {"um_per_px": s.um_per_px, "n_spots": int(len(s.centers)), "spot_diameter_um": s.spot_diameter_um,
             # a subset of the slide's spots (pg.tl.fit(spots=...)): which ones trained; else every spot did
             **({"spots": s.selection} if getattr(s, "selection", None) is not None else {})}
            for s in slides
        ],
        "n_tiles": cache.n_tiles,
        **summary,
    }
    from ..model import PixNet

    return PixNet(
        module, genes=genes, encoder_config=module.encoder.config(), encoder_weights=options.encoder_weights,
        decoder_config=decoder_config, history=history, training=training, finetuned=tuned_keys,
    )


#: encoder pixels kept between a tile's edge and the spots it trains on
TILE_MARGIN = 16


def _build_module(slides: list[SpotSlide], n_outputs: int, options: FitOptions, decoder_config: dict):
    """The encoder (reading the slides at its working um/px, its last levels trainable when fine-tuned) and
    fresh decoders, one per member."""
    from ..model import build_module
    from ..nn import build_encoder

    enc = build_encoder(options.encoder, weights=options.encoder_weights)
    enc.um_per_px = working_um_per_px(enc.um_per_px, [s.um_per_px for s in slides], options.encoder_um_per_px)
    logger.info("the encoder reads the images at %.3g um/px; computing in %s", enc.um_per_px,
                "bfloat16 autocast" if decoder_config["precision"] == "bf16" else "float32")
    module = build_module(enc.config(), options.encoder_weights, n_outputs=n_outputs,
                          decoder_config=decoder_config, encoder=enc)
    if options.training.finetune_levels:
        module.encoder.set_trainable(options.training.finetune_levels)
    return module


def _training_slides(slides: list[SpotSlide], module, genes: list[str], options: FitOptions,
                     rng: np.random.Generator) -> tuple[list, list[float]]:
    """Each slide's spots in encoder pixels with their counts and validation split, and the widest spot's
    radius per slide; sets every head's initial scale to the slides' mean intensity."""
    import torch

    from ..data import SlideReader, SlideSpots

    enc_um = float(module.encoder.um_per_px)
    train_slides, mean_intensity, radii = [], [], []
    for i, s in enumerate(slides):
        reader = SlideReader(s.sdata.images[options.image_key], image_um=s.um_per_px, target_um=enc_um,
                             name=options.image_key)
        counts = counts_with_library(s.table, genes).astype(np.float32)
        train_mask = _validation_split(len(counts), options.training.val_fraction, rng)
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
    return train_slides, radii


def _tile_size(module, radii: list[float], tile_px: int | None) -> int:
    """Training tile side in encoder pixels: the widest spot with margins and context, or ``tile_px``."""
    need = 2 * max(radii) + 2 * TILE_MARGIN + 64
    align = module.alignment
    tile = int(tile_px or max(256, int(np.ceil(need / align)) * align))
    if tile % align:
        fail("tile_px", f"{tile} is not a multiple of the encoder's stride {align}", f"Pass a multiple of {align}")
    return tile


def _standardize(cache, module, slides: list[SpotSlide], train_slides: list, options: FitOptions):
    """Standardise the decoders' input features as the decoder config asks; returns each slide's own
    statistics in ``"slide"`` mode (the cache is standardised with them; the decoders keep identity buffers
    until training ends), else None."""
    from ..model import feature_stats, slide_feature_stats, standardize_cache

    mode = options.decoder.standardize_mode(options.training.finetune_levels)
    if mode == "training":
        stats = feature_stats(cache, module)
        for dec, _ in module.pairs():
            dec.set_feature_stats(*stats)
    elif mode == "slide":
        slide_stats = [
            slide_feature_stats(s.sdata, options.image_key, t.reader, module, image_um=s.um_per_px)
            for s, t in zip(slides, train_slides, strict=True)
        ]
        standardize_cache(cache, slide_stats)
        return slide_stats
    return None


def _train_members(module, cache, train_slides: list, options: FitOptions, tuned_keys: list[str], checkpoints,
                   *, max_epochs: int, patience: int, device: str) -> tuple[list[dict], dict]:
    """Train (or load from ``checkpoints``) every member; returns the history and the first member's summary
    with every member's under ``"members"``."""
    from ._plan import LossWeights, calibrate_scale, train

    cfg, seed0 = options.training, options.random_state
    weights = cfg.loss_weights
    n_members = module.n_members
    history, summaries = [], []
    for k in range(n_members):
        # member 0 keeps the split and seed drawn before (one member is the model fit has always made); the
        # others validate on their own random spots, so between them every spot also trains some member
        member_cache, seed = cache, seed0
        if k:
            member_rng = np.random.default_rng([seed0, k])
            member_cache = dataclasses.replace(
                cache, slides=[dataclasses.replace(t, train_mask=_validation_split(len(t.counts), cfg.val_fraction,
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
                member, member_cache, n_slides=len(train_slides),
                loss=LossWeights(weights["count"], weights["total"], weights["mse"], weights["pearson"],
                                 cfg.likelihood),
                max_epochs=max_epochs, patience=patience, batch_size=cfg.batch_size, lr=cfg.lr,
                weight_decay=cfg.weight_decay, seed=seed, progress=options.progress, ema_decay=cfg.ema_decay,
            )
            if weights["count"] == 0 and weights["total"] == 0:
                # no count likelihood fixed the outputs' common scale: take it from the training spots' library
                # sizes; training leaves decoder and head on the CPU; the encoder runs here again if fine-tuned
                module.to(device).eval()
                summary["scale_factor"] = calibrate_scale(member, member_cache, batch_size=cfg.batch_size)
                logger.info("outputs rescaled by %.4g to the training spots' library sizes", summary["scale_factor"])
            summary["train_s"] = round(time.perf_counter() - started, 1)
            if checkpoints is not None:
                checkpoints.save(k, member, tuned_keys, member_history, summary)
        history += [{**h, "member": k} for h in member_history] if n_members > 1 else member_history
        summaries.append(summary)
    summary = dict(summaries[0])
    if n_members > 1:
        summary["members"] = summaries
    return history, summary
