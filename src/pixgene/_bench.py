"""What the project's benchmarks (``benchmarks/*.py``) use beyond pixgene's public API: for those scripts only.

Not part of pixgene's API and with no stability promise: a name stays as long as a benchmark needs it and may
change or go in any release. Users should not import it. The benchmarks import ``pixgene``, ``pg.io``,
``pg.datasets``, ``pg.pp``, ``pg.tl``, ``pg.pl`` and this module alone (``tests/test_bench_imports.py``), so
that pixgene's private modules can move without breaking them: a benchmark that needs one more internal name
gets it here, re-exported from a layer package's public names (``pixgene.data``, ``pixgene.model``,
``pixgene.train``, ``pixgene.infer``, ``pixgene.nn``) or from a ``pixgene._core`` module. Two exceptions:
``score_matrices`` is this module's own (``pixgene.tl`` scores tables, not arrays), and ``training_plan`` is
a private module re-exported whole, for the two scripts that patch it.

``import pixgene._bench`` does not import torch: the names from ``pixgene.nn`` and ``training_plan`` are
imported on first use.

The names it provides (one a line, as a list item; the test checks this list against ``__all__``):

Scoring and normalisation

- ``score_matrices``: ``score_matrices(pred, true, genes)`` -> :class:`pixgene.tl.Scores` of two
  (shapes x genes) matrices already transformed (e.g. log-normalised), scored as :func:`pixgene.tl.evaluate`
  scores tables (per-gene Pearson, PCC@F/S/M, MSE, MAE)
- ``log_normalize_np``: ``log1p(1e4 * counts / total)`` per row, as ``pg.tl.evaluate`` normalises
  (``pixgene._core.normalize``)
- ``READOUT_RULES``: the names of the read-out normalisations ``pg.tl.evaluate`` offers
- ``normalize_readout``: a read-out's expected counts log-normalised by one of those rules
- ``depth_only_readout``: what depth alone predicts of a measurement (``pg.tl.evaluate``'s depth-only floor)
- ``nb_quantiles``: quantiles of a negative binomial of mean ``mu`` and inverse dispersion ``theta``
  (``pixgene._core.nb``)
- ``nb_mixture_quantiles``: quantiles of the equal mixture of the members' negative binomials
- ``pooled_theta``: the members' inverse dispersions pooled into one
- ``nb_dispersion``: a fitted model's per-member inverse dispersions (``pixgene.model``)

Images, units and keys (``pixgene._core``)

- ``full_resolution``: the full-resolution level of an image element
- ``to_float01``: an RGB block as float32 in [0, 1]
- ``record_um_per_px``: record an image's microns per pixel in ``sdata.attrs``
- ``recorded_um_per_px``: the microns per pixel recorded for an image (or None)
- ``resolve_um_per_px``: an image's microns per pixel (given, recorded or derived)
- ``INSTANCE_KEY``: the instance-id column of pixgene's tables
- ``TOTAL_OBS``: the ``obs`` column of a read-out's predicted library size

Data (``pixgene.data``)

- ``SlideReader``: reads an image element at a target um/px
- ``prepare_spot_slide``: a slide's spots checked and in image pixels (a ``SpotSlide``)
- ``plan_tiles``: training tiles covering a slide's spots
- ``spots_inside``: which spots lie inside each candidate tile
- ``tissue_mask``: an H&E image's boolean tissue mask and its image pixels per mask pixel
- ``block_mean``: the mean over ``step`` x ``step`` blocks of a (c, h, w) array
- ``dihedral_inverse``: undo one of the eight dihedral transforms of a tile

Model, training, inference (``pixgene.model``, ``pixgene.train``, ``pixgene.infer``)

- ``PixNet``: the fitted model (also ``pg.tl.PixNet``)
- ``build_module``: a PixNet torch module from an encoder config and decoder settings
- ``working_um_per_px``: the um/px the encoder reads slides at in ``pg.tl.fit``
- ``tiling_halo``: a model's measured tiling halo (px) and edge error
- ``edge_error_profile``: a model's error against distance from a tile's edge
- ``probe_texture``: the synthetic H&E-like texture the halo is measured on

Network parts (``pixgene.nn``; torch, imported on first use)

- ``build_encoder``: an encoder by name
- ``encoder_flops_per_pixel``: an encoder's FLOPs per input pixel
- ``resolve_precision``: ``"auto"`` -> ``"bf16"`` or ``"32"`` for a device
- ``ChannelLayerNorm``: the decoder's channel LayerNorm (``train_step.py`` swaps its ``forward``)
- ``WindowAttention``: the fusion blocks' window attention (``step_layout.py`` swaps its ``_windows``)
- ``list_encoders``: the registered encoder names
- ``encoder_entry``: a registered encoder's entry (architecture, normalisation, um/px, source, licence)

The training plan's module (torch and Lightning, imported on first use)

- ``training_plan``: the module of the Lightning training plan (``pixgene.train._plan``) itself, re-exported
  whole because ``train_step.py`` and ``step_layout.py`` replace its module-level functions for a run
  (``train``, to capture what ``pg.tl.fit`` hands to training; ``integrate_pixels``) and read others
  (``PixNetTrainingPlan``, ``make_collate``, ``batch_features``, ``integrate_spots``). Its contents change
  with the training code; those two scripts change with it.

The prediction's chunk module (imported on first use)

- ``infer_chunks``: the module that predicts ``predict_dense``'s chunks (``pixgene.infer._chunks``), re-exported
  whole because ``speed.py`` times its functions for a run (``resample_to_output``, ``ChunkStore.write``).
  Its contents change with the prediction code; that script changes with it.
"""

from __future__ import annotations

import importlib

import numpy as np

from pixgene._core.keys import INSTANCE_KEY, TOTAL_OBS
from pixgene._core.nb import nb_mixture_quantiles, nb_quantiles, pooled_theta
from pixgene._core.normalize import READOUT_RULES, depth_only_readout, log_normalize_np, normalize_readout
from pixgene._core.raster import full_resolution, to_float01
from pixgene._core.units import record_um_per_px, recorded_um_per_px, resolve_um_per_px
from pixgene.data import (
    SlideReader,
    block_mean,
    dihedral_inverse,
    plan_tiles,
    prepare_spot_slide,
    spots_inside,
    tissue_mask,
)
from pixgene.infer import edge_error_profile, probe_texture, tiling_halo
from pixgene.model import PixNet, build_module, nb_dispersion
from pixgene.train import working_um_per_px

#: names from ``pixgene.nn``, imported on first use (it imports torch)
_NN = ("build_encoder", "encoder_flops_per_pixel", "resolve_precision", "ChannelLayerNorm", "WindowAttention",
       "list_encoders", "encoder_entry")

#: modules re-exported whole, for the benchmarks that replace their functions; imported on first use
_MODULES = {"training_plan": "pixgene.train._plan", "infer_chunks": "pixgene.infer._chunks"}

__all__ = [
    "score_matrices", "log_normalize_np", "READOUT_RULES", "normalize_readout", "depth_only_readout",
    "nb_quantiles", "nb_mixture_quantiles", "pooled_theta", "nb_dispersion",
    "full_resolution", "to_float01", "record_um_per_px", "recorded_um_per_px", "resolve_um_per_px",
    "INSTANCE_KEY", "TOTAL_OBS",
    "SlideReader", "prepare_spot_slide", "plan_tiles", "spots_inside", "tissue_mask", "block_mean",
    "dihedral_inverse",
    "PixNet", "build_module", "working_um_per_px", "tiling_halo", "edge_error_profile", "probe_texture",
    *_NN, *_MODULES,
]


def __getattr__(name: str):
    if name in _NN:
        value = getattr(importlib.import_module("pixgene.nn"), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    else:
        raise AttributeError(f"module 'pixgene._bench' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def score_matrices(pred: np.ndarray, true: np.ndarray, genes: list[str]):
    """Scores of two (shapes x genes) matrices already transformed, as :func:`pixgene.tl.evaluate` scores a
    read-out table: per gene the Pearson r across shapes (NaN where either column is constant), MSE, MAE and
    the means; summary ``PCC@F`` / ``PCC@S`` / ``PCC@M`` (first quartile, median, mean of the finite per-gene
    r), ``MSE``, ``MAE`` (over shapes and genes), ``n_genes``, ``n_genes_scored``, ``n_shapes``.

    ``pg.tl.evaluate`` scores SpatialData tables; this scores arrays (baselines and references that are no
    table), the same way (``tests/test_bench_imports.py`` checks that they agree)."""
    import pandas as pd

    from pixgene.tl import Scores

    pred, true = np.asarray(pred), np.asarray(true)
    a, b = pred - pred.mean(0), true - true.mean(0)
    denom = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(0) / denom
    r[denom <= 1e-12] = np.nan
    per_gene = pd.DataFrame(
        {"pearson": r, "mse": ((pred - true) ** 2).mean(0), "mae": np.abs(pred - true).mean(0),
         "mean_true": true.mean(0), "mean_pred": pred.mean(0)},
        index=pd.Index(genes, name="gene"),
    )
    valid = r[np.isfinite(r)]
    summary = {
        "PCC@F": float(np.quantile(valid, 0.25)) if valid.size else float("nan"),
        "PCC@S": float(np.median(valid)) if valid.size else float("nan"),
        "PCC@M": float(valid.mean()) if valid.size else float("nan"),
        "MSE": float(((pred - true) ** 2).mean()),
        "MAE": float(np.abs(pred - true).mean()),
        "n_genes": int(len(genes)),
        "n_genes_scored": int(valid.size),
        "n_shapes": int(pred.shape[0]),
    }
    return Scores(per_gene, summary)
