"""``pg.tl.fit``: train PixNet on the measured spots of one or many slides."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._core.docs import doc_params
from .._core.keys import IMAGE_KEY, SPOTS_KEY, TABLE_KEY, UNS_KEY
from .._core.validate import check_genes, check_int, check_positive, fail
from ..data import SpotSlide, prepare_spot_slide, select_slide_spots
from ..model import DecoderConfig, TrainConfig, remember_model

logger = logging.getLogger(__name__)

SELECTED_VAR = "pixgene_selected"
#: the arguments of :func:`fit` a tool that fits models of its own (``denoise``) passes on as they are
FIT_OPTIONS = ("encoder", "encoder_weights", "encoder_um_per_px", "n_members", "max_epochs", "decoder",
               "training", "precision")
PRECISIONS = ("auto", "bf16", "32")


def as_list(x: Any) -> list:
    """One item or a list/tuple of them, as a list."""
    return list(x) if isinstance(x, list | tuple) else [x]


def resolve_genes(genes: Sequence[str] | None, slides: list[SpotSlide], *, select: bool = True) -> list[str]:
    """``genes`` checked against every slide's table; if None, those marked by ``pg.pp.select_genes``, or (when
    none are marked and ``select``) the ones it picks by default on these slides (on the selected spots of a
    slide that holds a subset of its spots), marked as it marks them."""
    if genes is None:
        var = slides[0].table.var
        if SELECTED_VAR in var:
            genes = var.index[var[SELECTED_VAR].astype(bool)].tolist()
        elif select and any(s.selection is not None for s in slides):
            genes = _select_on_subsets(slides)
        elif select:
            from ..pp import select_genes

            genes = select_genes([s.sdata for s in slides], table_key=slides[0].table_key)
            logger.info("no genes given or selected: chose %d highly variable genes on the %d training slide(s) "
                        "(pg.pp.select_genes' defaults); pass genes=[...] for others", len(genes), len(slides))
        else:
            fail(f"table {slides[0].table_key!r}", "no genes were given and none were selected",
                 "Pass genes=[...] or run pg.pp.select_genes(sdata) first")
    for s in slides:
        check_genes(genes, s.table.var_names, f"table {s.table_key!r}")
    return list(genes)


def _select_on_subsets(slides: list[SpotSlide]) -> list[str]:
    """``pg.pp.select_genes``' default choice on the slides' own spots (only the selected ones where a slide
    holds a subset: the other spots' counts take no part), marked in every slide's full table as it marks
    them, with the number of spots it chose on."""
    from types import SimpleNamespace

    from ..pp import select_genes

    key = slides[0].table_key
    views = [SimpleNamespace(tables={key: s.table.copy()}) for s in slides]
    genes = select_genes(views, table_key=key)
    for s, view in zip(slides, views, strict=True):
        table = s.sdata.tables[s.table_key]
        table.var[SELECTED_VAR] = table.var_names.isin(genes)
        record = dict(view.tables[key].uns[UNS_KEY]["select_genes"])
        record["n_spots"] = int(s.table.n_obs)
        table.uns[UNS_KEY] = {**table.uns.get(UNS_KEY, {}), "select_genes": record}
    return genes


def spots_per_slide(spots: Any, sdatas: list, shapes_key: str) -> list:
    """One spot selection per slide: ``spots`` itself when it is a list or tuple of one selection per slide
    (each None, a mask or list of ids, a shapely polygon, or the name of one of that slide's shapes elements),
    else ``spots`` for every slide."""
    import shapely

    def one(x: Any, sd: Any) -> bool:
        if x is None or isinstance(x, shapely.Geometry):
            return True
        if isinstance(x, str):
            return x in sd.shapes and x != shapes_key
        return np.ndim(x) == 1

    if isinstance(spots, list | tuple) and len(spots) == len(sdatas) and all(map(one, spots, sdatas)):
        return list(spots)
    return [spots] * len(sdatas)


def check_fit_options(*, encoder_um_per_px: Any, n_members: Any, max_epochs: Any, decoder: Any, training: Any,
                      precision: Any, feature_cache: Any = None) -> tuple[DecoderConfig, TrainConfig]:
    """Check the options :func:`fit` shares with the tools that fit their own models; returns the decoder and
    training configs (defaults for None)."""
    decoder = DecoderConfig() if decoder is None else decoder
    training = TrainConfig() if training is None else training
    if not isinstance(decoder, DecoderConfig):
        fail("decoder", f"is a {type(decoder).__name__}, not a DecoderConfig",
             "Pass decoder=pg.tl.DecoderConfig(...), e.g. DecoderConfig(block='conv', width=32)")
    if not isinstance(training, TrainConfig):
        fail("training", f"is a {type(training).__name__}, not a TrainConfig",
             "Pass training=pg.tl.TrainConfig(...), e.g. TrainConfig(n_views=2)")
    check_positive(encoder_um_per_px, "encoder_um_per_px", "fit", "Pass e.g. 1.0, or None for the encoder's native um/px")
    check_int(max_epochs, "max_epochs", minimum=1, allow_none=True, fix="Pass e.g. 12, or None for the default")
    check_int(n_members, "n_members", minimum=1, allow_none=True,
              fix="Pass e.g. 5 (the default), or 1 for a single decoder")
    finetune = training.finetune_levels
    if n_members is not None and n_members > 1 and finetune:
        fail("n_members", f"{n_members} members cannot share an encoder that finetune_levels={finetune} tunes",
             "Pass n_members=1 with finetune_levels, or finetune_levels=0 for an ensemble")
    if precision not in PRECISIONS:
        fail("precision", f"{precision!r} is not 'auto', 'bf16' or '32'",
             "Pass 'auto' (bfloat16 where the device runs it natively), 'bf16' or '32'")
    if feature_cache is not None and finetune:
        fail("feature_cache", f"holds frozen features, and finetune_levels={finetune} runs the encoder in every "
             "step", "Pass feature_cache=None with finetune_levels")
    return decoder, training


@doc_params
def fit(
    sdata: Any,
    *,
    genes: Sequence[str] | None = None,
    spots: Any = None,
    image_key: str = IMAGE_KEY,
    shapes_key: str = SPOTS_KEY,
    table_key: str = TABLE_KEY,
    image_um_per_px: float | Sequence[float | None] | None = None,
    encoder: str = "efficientnet_lite0",
    encoder_weights: str | None = "default",
    encoder_um_per_px: float | None = None,
    n_members: int | None = None,
    max_epochs: int | None = None,
    decoder: DecoderConfig | None = None,
    training: TrainConfig | None = None,
    precision: str = "auto",
    random_state: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    feature_cache: str | os.PathLike | None = None,
    progress: bool = True,
):
    """Fit PixNet on the measured spots of one slide or a list of slides.

    A frozen, multi-scale image encoder feeds ``n_members`` decoders, each trained on the same cached features
    to predict an intensity field (expected counts per µm²) whose integral over every measured spot matches
    its counts (negative binomial likelihood, times a capture efficiency per slide), plus MSE and Pearson
    terms on log-normalised values; held-out spots stop each member early. The model predicts the members'
    mean.

    Parameters
    ----------
    sdata
        A SpatialData or a list of them (slides may come from different platforms; each gets its own
        capture-efficiency factor).
    genes
        Genes to model. Default: those marked by :func:`pixgene.pp.select_genes`; if none are marked, the
        genes ``pg.pp.select_genes`` picks with its defaults (50 highly variable genes) on these slides,
        marked in their tables as it marks them.
    spots
        Train on these spots only (default: every spot with counts). A boolean mask over the rows of the
        shapes element ``shapes_key``; a list of ids from its index (integers are ids, never row numbers); or
        a region, the spots whose centre (a circle's point, a polygon's bounding-box centre) lies inside it or
        on its boundary: the name of a shapes element of polygons in the SpatialData (carried into the spots'
        coordinates through the coordinate systems they share) or a shapely (Multi)Polygon in the spots' own
        coordinate system. With several slides: one selection per slide (a list or tuple as long as the list
        of slides, ``None`` for all of a slide's spots) or one for every slide. The other spots' counts take
        no part: neither in training nor in the genes chosen when none are given (a selection marked before by
        ``pg.pp.select_genes`` on every spot is used as it is); their image does, as the image around every
        training tile and in each slide's feature statistics. The model records which spots trained in
        ``model.training["slides"][i]["spots"]`` (``n``, ``of``, ``how``, ``sha256`` of the ids and the ids
        themselves, or runs of shapes rows beyond 100,000 spots; no entry for a slide whose every spot with
        counts trained). A mask of another length, unknown ids, ids of spots without counts and selections
        that hold no measured spot are refused before any work.
    {spot_keys}
    {image_um_per_px}
    encoder, encoder_weights
        The frozen encoder (``pixgene.nn.list_encoders()``; default: the bundled ImageNet EfficientNet-Lite0)
        and its weights (``"default"``: bundled or from the hub; or a local file).
    encoder_um_per_px
        Microns per pixel the encoder reads the images at (recorded in the model; prediction reads at the
        same). Default: the encoder's native um/px (1.0 for EfficientNet-Lite0, 0.5 for UNI2), or the finest
        slide's own when that is coarser: images are never upsampled for the encoder.
    n_members
        Decoders trained on the same cached encoder features, each with its own validation spots,
        initialisation and seed; the model predicts their mean (default 5; 1 with fine-tuning). The encoder
        runs once, so each member adds only a decoder's training and prediction time; ``model.member(k)`` is
        one of them as a model of its own.
    max_epochs
        Epochs of each member; default 8, or more on small training sets so that training takes at least
        533 optimiser steps (at most 100 epochs).
    decoder
        The decoder's architecture, :class:`pixgene.tl.DecoderConfig` (default: fusion blocks, width 48,
        output stride 4, each slide's features standardised by its own statistics).
    training
        How the decoders train, :class:`pixgene.tl.TrainConfig` (tiles, views, augmentation, loss terms,
        optimiser, fine-tuning).
    precision
        ``"bf16"``: encoder and decoder compute in bfloat16 autocast (in training and in every prediction with
        the model); ``"32"``: float32; ``"auto"`` (default): bfloat16 where the device computes it natively
        (CPUs with AVX512-BF16 or AMX, CUDA GPUs from Ampere on).
    {random_state}
    checkpoint_dir
        Directory (created if missing) where every member is written as soon as it is trained. Called again
        after an interruption with the same slides, settings and directory, the fit loads the finished members
        and makes the model an uninterrupted fit makes, to the bit; raising ``n_members`` trains only the new
        members. A member file from another fit stops the fit before any work and is never overwritten.
    feature_cache
        Directory (created if missing) of encoded training tiles shared between fits: a later fit whose
        encoding depends on the same things (images, spots, encoder and weights, um/px, tiles, views, seed,
        precision, kind of device; not the genes, decoder, loss or optimiser) loads them instead of encoding
        again, and makes the same model. Not with fine-tuning.
    {progress}

    Returns
    -------
    The fitted :class:`pixgene.tl.PixNet`. It is also remembered for each input SpatialData, as long as that
    object lives, so that :func:`pixgene.tl.predict_dense` can follow without ``model=``;
    ``sdata.attrs["pixgene"]["model"]`` records its id, genes and encoder (and, once saved, its directory).
    """
    from ..train import FitOptions, fit_model, require_directory

    sdatas = as_list(sdata)
    if not sdatas:
        fail("sdata", "no slides were given", "Pass a SpatialData or a non-empty list of them")
    ums = as_list(image_um_per_px) if isinstance(image_um_per_px, list | tuple) else [image_um_per_px] * len(sdatas)
    if len(ums) != len(sdatas):
        fail("image_um_per_px", f"{len(ums)} values for {len(sdatas)} slides",
             "Give one value per slide or a single one")
    decoder, training = check_fit_options(encoder_um_per_px=encoder_um_per_px, n_members=n_members,
                                          max_epochs=max_epochs, decoder=decoder, training=training,
                                          precision=precision, feature_cache=feature_cache)
    # before the images are hashed for the fingerprints
    for name, path in (("checkpoint_dir", checkpoint_dir), ("feature_cache", feature_cache)):
        if path is not None:
            require_directory(name, path)
    slides = [
        prepare_spot_slide(s, image_key=image_key, shapes_key=shapes_key, table_key=table_key, um_per_px=u)
        for s, u in zip(sdatas, ums, strict=True)
    ]
    if spots is not None:
        slides = [s if sel is None else select_slide_spots(s, sel, argument=f"spots of slide {i}" if
                                                           len(slides) > 1 else "spots")
                  for i, (s, sel) in enumerate(zip(slides, spots_per_slide(spots, sdatas, shapes_key),
                                                   strict=True))]
    genes = resolve_genes(genes, slides)
    options = FitOptions(
        image_key=image_key, shapes_key=shapes_key, table_key=table_key, encoder=encoder,
        encoder_weights=encoder_weights, encoder_um_per_px=encoder_um_per_px, n_members=n_members,
        max_epochs=max_epochs, decoder=decoder, training=training, precision=precision,
        random_state=random_state, checkpoint_dir=checkpoint_dir, feature_cache=feature_cache, progress=progress,
    )
    model = fit_model(slides, genes, options)
    for s in sdatas:
        remember_model(s, model)
    logger.info("fitted %r (best epoch %s)", model, model.training.get("best_epoch"))
    return model
