"""``pg.tl.denoise``: every measured spot predicted from the histology by a model that never saw its block.

The spots are cut into square spatial blocks and the blocks dealt to ``n_folds`` folds. For each fold, PixNet is
fitted on the spots of the other folds, the fold's dense map is predicted and read out over the fold's own
spots. Each spot's value is then what the image says it should hold, learned from the rest of the slide (and
from any further slides given): its own counts, and the counts of its neighbours in the same block, took no
part. The result is a table like :func:`pixgene.tl.aggregate`'s, linked to the spots.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .._core.docs import doc_params
from .._core.keys import IMAGE_KEY, SPOTS_KEY, TABLE_KEY, TOTAL_OBS, UNS_KEY
from .._core.validate import check_not_exists, check_positive, fail, require_element

logger = logging.getLogger(__name__)

FOLD_OBS = "pixgene_fold"
BLOCK_OBS = "pixgene_block"
#: the measurement and the prediction together: Gamma-Poisson posterior means (:func:`gamma_poisson_posterior`)
POSTERIOR_LAYER = "pixgene_posterior"
POSTERIOR_TOTAL_OBS = "pixgene_posterior_total_counts"
#: default block side, in median nearest-neighbour spot distances
BLOCK_PITCHES = 4
def denoised_key(shapes_key: str) -> str:
    return f"{shapes_key}_denoised"


def spot_pitch_um(centers_um: np.ndarray) -> float:
    """Median distance from each spot centre to its nearest neighbour (microns)."""
    from scipy.spatial import cKDTree

    if len(centers_um) < 2:
        return float("nan")
    d, _ = cKDTree(centers_um).query(centers_um, k=2)
    return float(np.median(d[:, 1]))


def spatial_folds(centers_um: np.ndarray, n_folds: int, block_um: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(fold, block)`` of every spot: square blocks of ``block_um`` (from the spots' top-left corner), dealt
    to ``n_folds`` folds with about equal numbers of spots.

    The blocks are shuffled by ``rng`` and then, largest first, each given to the fold that has the fewest
    spots so far (ties: the lower fold), so every fold holds whole blocks and the folds differ in size by at
    most one block.
    """
    cells = np.floor((centers_um - centers_um.min(0)) / block_um).astype(np.int64)
    _, block = np.unique(cells, axis=0, return_inverse=True)
    block = block.reshape(-1)
    n_blocks = int(block.max()) + 1 if len(block) else 0
    if n_blocks < n_folds:
        fail("denoise", f"the spots fill only {n_blocks} blocks of {block_um:g} um, fewer than n_folds={n_folds}",
             "Pass a smaller block_um or fewer n_folds")
    sizes = np.bincount(block, minlength=n_blocks)
    order = rng.permutation(n_blocks)
    order = order[np.argsort(-sizes[order], kind="stable")]
    fold_of_block = np.empty(n_blocks, dtype=np.int64)
    load = np.zeros(n_folds, dtype=np.int64)
    for b in order:
        f = int(np.argmin(load))
        fold_of_block[b] = f
        load[f] += sizes[b]
    return fold_of_block[block], block


def gamma_poisson_posterior(y: np.ndarray, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean of each spot's expected count given its measured count and a prediction of it.

    Per column (gene) the measured counts are Poisson draws of an expected count ``lambda`` that varies around
    the prediction ``mu`` as a Gamma with mean ``mu`` and shape ``a``; ``1 / a`` is estimated by moments over
    the rows, ``sum((y - mu)^2 - mu) / sum(mu^2)`` (at least 0), and the posterior mean is
    ``(y + a) / (1 + a / mu) = mu (1 + y / a) / (1 + mu / a)``: the prediction where it explains the counts up
    to Poisson noise (``1 / a`` = 0), the measurement where it explains nothing. Returns the posterior means
    and ``1 / a`` per column.
    """
    y = np.asarray(y, dtype=np.float64)
    mu = np.maximum(np.asarray(mu, dtype=np.float64), 1e-12)
    inv_a = np.maximum(((y - mu) ** 2 - mu).sum(0), 0.0) / (mu**2).sum(0)
    return mu * (1.0 + inv_a * y) / (1.0 + inv_a * mu), inv_a


def _check_fit_kwargs(fit_kwargs: dict) -> dict:
    """The options denoise passes on to its fits, checked as ``pg.tl.fit`` checks them (configs filled in)."""
    from ._fit import FIT_OPTIONS, check_fit_options

    unknown = sorted(set(fit_kwargs) - set(FIT_OPTIONS))
    if unknown:
        fail("denoise", f"got arguments it does not pass on to its fits: {', '.join(unknown)}",
             f"Pass only {', '.join(FIT_OPTIONS)} (denoise sets the slides, keys, genes, seed, checkpoints and "
             "progress of its fits itself)")
    checked = {"encoder_um_per_px": None, "n_members": None, "max_epochs": None, "decoder": None,
               "training": None, "precision": "auto"}
    checked.update({k: v for k, v in fit_kwargs.items() if k in checked})
    decoder, training = check_fit_options(**checked)
    return {**fit_kwargs, "decoder": decoder, "training": training}


def _subset(sdata: Any, image_key: str, shapes_key: str, shapes_pos: np.ndarray, table_key: str | None = None,
            table_rows: np.ndarray | None = None):
    """A SpatialData holding ``sdata``'s image (the same element, not a copy), the shapes at ``shapes_pos``
    (with their transformations) and, when given, the table rows ``table_rows`` (still linked to them)."""
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import get_transformation, set_transformation

    shapes = sdata.shapes[shapes_key]
    part = ShapesModel.parse(shapes.iloc[shapes_pos].copy())
    set_transformation(part, get_transformation(shapes, get_all=True), set_all=True)
    tables = {}
    if table_key is not None:
        tables[table_key] = sdata.tables[table_key][table_rows].copy()
    sub = SpatialData(images={image_key: sdata.images[image_key]}, shapes={shapes_key: part}, tables=tables)
    record = (getattr(sdata, "attrs", None) or {}).get(UNS_KEY)
    if record is not None:
        sub.attrs[UNS_KEY] = json.loads(json.dumps(record, default=str))
    return sub


class _FoldResults:
    """The finished folds' read-outs, ``fold_<k>/denoised.h5ad`` in a :class:`pixgene.train.ResumableStore`
    under a fingerprint of what each depends on (read once, when the directory is opened); a fold of another
    run stops the run before any work."""

    SUFFIX = ".h5ad"

    def __init__(self, path: str | os.PathLike | None, fingerprints: list[str]) -> None:
        from ..train import ResumableStore

        self.store = None if path is None else ResumableStore(path, argument="checkpoint_dir")
        self.fingerprints = fingerprints
        self._saved: dict = {}
        if self.store is None:
            return
        import anndata as ad

        for k, want in enumerate(fingerprints):
            what = f"fold {k} of another denoise run"
            if self.store.finished(self._name(k), self.SUFFIX, want, what) is not None:
                self._saved[k] = ad.read_h5ad(self.store.payload(self._name(k), self.SUFFIX))

    @staticmethod
    def _name(k: int) -> str:
        return f"fold_{k}/denoised"

    def directory(self, k: int) -> Path | None:
        """Fold ``k``'s own directory (its fit's member checkpoints go there too)."""
        return None if self.store is None else self.store.path / f"fold_{k}"

    def load(self, k: int):
        """Fold ``k``'s saved table, or None."""
        table = self._saved.get(k)
        if table is not None:
            logger.info("fold %d loaded from %s (computed before; not fitted again)", k,
                        self.store.payload(self._name(k), self.SUFFIX))
        return table

    def save(self, k: int, table) -> None:
        if self.store is not None:
            self.store.save(self._name(k), self.SUFFIX, self.fingerprints[k], table.write_h5ad)


@doc_params
def denoise(
    sdata: Any,
    *,
    genes: list[str] | None = None,
    n_folds: int = 5,
    block_um: float | None = None,
    train_with: Any = None,
    image_key: str = IMAGE_KEY,
    shapes_key: str = SPOTS_KEY,
    table_key: str = TABLE_KEY,
    image_um_per_px: float | None = None,
    um_per_px: float = 4.0,
    key_added: str | None = None,
    overwrite: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    random_state: int = 0,
    progress: bool = True,
    **fit_kwargs: Any,
):
    """Predict every measured spot from the histology with a model fitted without the spot's spatial block.

    The spots are cut into square blocks of ``block_um`` and the blocks dealt to ``n_folds`` folds of about
    equal size (:func:`spatial_folds`). For each fold, :func:`pixgene.tl.fit` trains on the spots of the other
    folds (and on every spot of ``train_with``), :func:`pixgene.tl.predict_dense` predicts the slide at
    ``um_per_px`` and :func:`pixgene.tl.aggregate` reads the map out over the fold's spots. A spot's value is
    the expected count the image predicts for it: a denoised version of its measurement that its own counts,
    and its block's, did not shape. Measured and denoised tables compare directly
    (``pg.tl.evaluate(sdata, predicted=key_added, measured=table_key)``: the out-of-fold accuracy).

    Parameters
    ----------
    sdata
        SpatialData with the H&E image, the spots (circles or polygons) and their raw-count table, as for
        :func:`pixgene.tl.fit`.
    genes
        Genes to model; default: those marked by :func:`pixgene.pp.select_genes`.
    n_folds
        Number of folds (models fitted), at least 2.
    block_um
        Side of the square blocks in microns; default four times the median distance between neighbouring
        spots (a spot and its nearest neighbours mostly share a block, so they leave training together).
    train_with
        Further slides (a SpatialData or a list) whose spots train every fold's model as well, e.g. the other
        sections of a cohort; their keys are ``image_key``, ``shapes_key`` and ``table_key`` too.
    {spot_keys}
    {image_um_per_px}
    um_per_px
        Output pixel size of each fold's dense map (microns).
    key_added
        Name of the new table; default ``f"{shapes_key}_denoised"``.
    {overwrite}
    checkpoint_dir
        Directory for resuming: each fold's members are checkpointed in ``fold_<k>/`` (as
        ``pg.tl.fit(checkpoint_dir=...)`` does) and its read-out is written there once done, so a run called
        again with the same data and settings skips the finished folds and the finished members of the next.
        A directory that holds another run's folds is never overwritten.
    random_state
        Seed of the blocks' deal to folds and of every fold's fit.
    {progress}
    **fit_kwargs
        Options of every fold's fit, as for :func:`pixgene.tl.fit`: ``encoder``, ``encoder_weights``,
        ``encoder_um_per_px``, ``n_members``, ``max_epochs``, ``decoder``, ``training``, ``precision``.

    Returns
    -------
    AnnData (also stored as ``sdata.tables[key_added]``), one row per measured spot in the shapes' order,
    linked to ``shapes_key`` like :func:`pixgene.tl.aggregate`'s tables: ``X`` expected counts of the genes,
    ``obs["pixgene_total_counts"]`` the predicted library size, ``obs["pixgene_fold"]`` and
    ``obs["pixgene_block"]`` the spot's fold and block; ``layers["pixgene_posterior"]`` and
    ``obs["pixgene_posterior_total_counts"]`` the measurement and the prediction together: the posterior mean
    of each spot's expected count given its measured count, with the prediction (scaled by one factor to the
    slide's measured library sizes) as a Gamma prior whose spread is estimated per gene
    (:func:`gamma_poisson_posterior`; it uses the spot's counts, so score it against a truth, never against
    the same measurement); ``uns["pixgene"]`` the parameters (the block size among them), the model ids, the
    posterior's depth factor and per-gene inverse shapes and, under ``folds["<k>"]``, each fold's model id,
    numbers of spots and dense-map record.
    """
    import anndata as ad
    import pandas as pd
    from spatialdata.models import TableModel

    from .._core.keys import INSTANCE_KEY, REGION_KEY
    from ..data import linked_table_rows, prepare_spot_slide
    from ..train import FitOptions, counts_with_library, fit_model
    from ._aggregate import aggregate
    from ._fit import as_list, resolve_genes
    from ._predict import predict_dense

    # ---- every check before any work
    if isinstance(n_folds, bool) or not isinstance(n_folds, int | np.integer) or n_folds < 2:
        fail("n_folds", f"{n_folds!r} is not an integer of at least 2", "Pass n_folds=5 or another integer >= 2")
    if block_um is not None:
        check_positive(block_um, "block_um", "denoise")
    check_positive(um_per_px, "um_per_px", "denoise")
    fit_options = _check_fit_kwargs(fit_kwargs)
    key = key_added or denoised_key(shapes_key)
    check_not_exists(sdata, key, overwrite)
    if checkpoint_dir is not None:
        from ..train import require_directory

        require_directory("checkpoint_dir", checkpoint_dir)
    slide = prepare_spot_slide(sdata, image_key=image_key, shapes_key=shapes_key, table_key=table_key,
                               um_per_px=image_um_per_px)
    others = [] if train_with is None else as_list(train_with)
    other_slides = [prepare_spot_slide(o, image_key=image_key, shapes_key=shapes_key, table_key=table_key)
                    for o in others]
    genes = resolve_genes(genes, [slide, *other_slides])
    shapes = require_element(sdata, shapes_key, "shapes")
    table = sdata.tables[table_key]
    rows = linked_table_rows(table, shapes, table_key=table_key, shapes_key=shapes_key)
    shapes_pos = np.flatnonzero(rows >= 0)  # the slide's spots (those with a row), in the shapes' order
    table_rows = rows[shapes_pos]
    n = len(shapes_pos)
    if n < n_folds:
        fail(f"shapes {shapes_key!r}", f"only {n} spots have counts, fewer than n_folds={n_folds}",
             "Pass fewer n_folds")
    centers_um = slide.centers * slide.um_per_px
    pitch = spot_pitch_um(centers_um)
    if block_um is None:
        block_um = BLOCK_PITCHES * (pitch if np.isfinite(pitch) else slide.spot_diameter_um)
    rng = np.random.default_rng(random_state)
    fold, block = spatial_folds(centers_um, int(n_folds), float(block_um), rng)
    ids = shapes.index.to_numpy()[shapes_pos]

    params = {
        "genes": list(genes), "n_folds": int(n_folds), "block_um": float(block_um), "image_key": image_key,
        "shapes_key": shapes_key, "table_key": table_key, "image_um_per_px": slide.um_per_px,
        "um_per_px": float(um_per_px), "random_state": int(random_state), "train_with": len(others),
        "fit_kwargs": json.loads(json.dumps(fit_kwargs, default=str)),
    }
    results = None
    if checkpoint_dir is not None:
        import pixgene

        from ..train import image_hash, record_fingerprint, slide_digest

        def digest(s) -> str:
            return slide_digest(image_hash(s.sdata.images[image_key]), s.centers, s.footprint(),
                                counts_with_library(s.table, genes), s.um_per_px)

        common = {**params, "pixgene": pixgene.__version__, "slides": [digest(s) for s in [slide, *other_slides]]}
        fingerprints = [record_fingerprint({**common, "fold": k, "held_out": [str(i) for i in ids[fold == k]]})
                        for k in range(n_folds)]
        results = _FoldResults(checkpoint_dir, fingerprints)
    logger.info("denoising %d spots in %d folds of %g um blocks (%d blocks; spot pitch %.0f um)", n, n_folds,
                block_um, int(block.max()) + 1, pitch)

    # ---- the folds
    parts, folds_meta = [], []
    for k in range(n_folds):
        held = np.flatnonzero(fold == k)
        part = results.load(k) if results is not None else None
        if part is None:
            logger.info("fold %d of %d: fitting on %d spots, predicting %d", k + 1, n_folds, n - len(held),
                        len(held))
            train = np.flatnonzero(fold != k)
            train_sdata = _subset(sdata, image_key, shapes_key, shapes_pos[train], table_key, table_rows[train])
            fold_dir = results.directory(k) if results is not None else None
            train_slide = prepare_spot_slide(train_sdata, image_key=image_key, shapes_key=shapes_key,
                                             table_key=table_key, um_per_px=slide.um_per_px)
            # the engine, not pg.tl.fit: a fold's model is never remembered for the user's slides
            model = fit_model([train_slide, *other_slides], genes, FitOptions(
                image_key=image_key, shapes_key=shapes_key, table_key=table_key, random_state=random_state,
                checkpoint_dir=fold_dir, progress=progress, **fit_options))
            held_sdata = _subset(sdata, image_key, shapes_key, shapes_pos[held])
            fold_map = f"{image_key}_fold_{k}"  # in the working object only, never in sdata
            predict_dense(held_sdata, model, image_key=image_key, um_per_px=um_per_px,
                          image_um_per_px=slide.um_per_px, key_added=fold_map, progress=progress)
            part = aggregate(held_sdata, shapes=shapes_key, dense_key=fold_map, image_key=image_key,
                             inplace=False, progress=False)
            part.uns[UNS_KEY] = {"model_id": model.model_id, "n_train_spots": int(len(train)),
                                 "n_train_spots_other_slides": int(sum(len(s.centers) for s in other_slides)),
                                 "n_spots": int(len(held)), "dense": part.uns[UNS_KEY]["dense"]}
            if results is not None:
                results.save(k, part)
        folds_meta.append(dict(part.uns[UNS_KEY]))
        parts.append(part)

    # ---- one table in the shapes' order
    joined = ad.concat(parts, join="inner")
    order = pd.Index(joined.obs[INSTANCE_KEY].astype(str)).get_indexer(pd.Index(ids.astype(str)))
    if (order < 0).any():  # every spot is in exactly one fold, so this cannot happen unless shapes changed
        fail(f"shapes {shapes_key!r}", "changed while denoise ran", "Run denoise again")
    joined = joined[order].copy()
    joined.obs[FOLD_OBS] = fold
    joined.obs[BLOCK_OBS] = block
    joined.obs[REGION_KEY] = pd.Categorical([shapes_key] * n, categories=[shapes_key])
    joined.obs_names = pd.Index([str(i) for i in ids], dtype=str)
    # the measurement and the out-of-fold prediction together (Gamma-Poisson posterior mean), the predictions
    # first put on the slide's own depth (one factor: the measured over the predicted library sizes)
    y = counts_with_library(table[table_rows], genes)
    mu = np.column_stack([np.asarray(joined.X, dtype=np.float64), joined.obs[TOTAL_OBS].to_numpy(float)])
    depth = float(y[:, -1].sum() / max(mu[:, -1].sum(), 1e-12))
    post, inv_shape = gamma_poisson_posterior(y, mu * depth)
    joined.layers[POSTERIOR_LAYER] = post[:, :-1].astype(np.float32)
    joined.obs[POSTERIOR_TOTAL_OBS] = post[:, -1]
    joined.uns = {UNS_KEY: {"params": {**params, "key_added": key}, "spot_pitch_um": pitch,
                            "posterior": {"depth_factor": depth, "inverse_shape": dict(zip(
                                [*genes, TOTAL_OBS], map(float, inv_shape), strict=True))},
                            "folds": {str(k): m for k, m in enumerate(folds_meta)},
                            "model_ids": [m["model_id"] for m in folds_meta]}}
    adata = TableModel.parse(joined, region=shapes_key, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    if overwrite and key in sdata.tables:
        del sdata.tables[key]
    sdata.tables[key] = adata
    if sdata.is_backed():
        sdata.write_element(key, overwrite=overwrite)
    logger.info("denoised %d spots into table %r", n, key)
    return adata
