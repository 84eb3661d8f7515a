"""The settings of a fit that most users leave alone, grouped and documented once: the decoder's architecture
(:class:`DecoderConfig`) and how it is trained (:class:`TrainConfig`). Both validate themselves when made, are
recorded in the model's ``config.json`` and read back from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._core.validate import check_fraction, check_int, check_positive, fail

DECODER_BLOCKS = ("fusion", "conv")
STANDARDIZE_MODES = ("slide", "training")
LIKELIHOODS = ("nb", "poisson")
LOSS_TERMS = ("count", "total", "mse", "pearson")
DEFAULT_LOSS_WEIGHTS = {"count": 1.0, "total": 0.0, "mse": 1.0, "pearson": 0.5}


@dataclass(frozen=True)
class DecoderConfig:
    """The decoder's architecture (``pg.tl.fit(decoder=pg.tl.DecoderConfig(...))``).

    Parameters
    ----------
    block
        ``"fusion"`` (PixNet's fusion blocks: depthwise 3x3, SiLU, 1x1, LayerNorm with a residual, then window
        self-attention) or ``"conv"`` (plain U-Net blocks).
    width
        Channels of every decoder level.
    out_stride
        Output stride in encoder pixels: the model's output pixel is ``out_stride * encoder_um_per_px`` microns.
    attention_window
        Side of the fusion blocks' attention windows, in pixels of each level (an even integer); the
        attention's compute grows with the window's area.
    smooth_windows
        Attend within four grids of windows offset by half a window and blend them, in place of one grid: no
        straight steps along the window lattice in the map, for about three times the decoder's compute.
    standardize_features
        Standardise every encoder channel the decoder reads (mean 0, sd 1) before its first layer.
        ``"slide"``: each slide by its own statistics, over 32 tiles centred on its tissue, so that shifts of
        the channels that come from staining or scanning are removed (``predict_dense`` takes a new slide's
        statistics the same way); ``"training"`` (or ``True``): the training tiles' statistics for every
        slide; ``False``: raw features. With fine-tuning, ``"slide"`` becomes ``"training"``.
    """

    block: str = "fusion"
    width: int = 48
    out_stride: int = 4
    attention_window: int = 8
    smooth_windows: bool = False
    standardize_features: bool | str = "slide"

    def __post_init__(self) -> None:
        if self.block not in DECODER_BLOCKS:
            fail("DecoderConfig.block", f"{self.block!r} is not a decoder block", "Pass 'fusion' or 'conv'")
        object.__setattr__(self, "width", check_int(self.width, "DecoderConfig.width", minimum=1))
        object.__setattr__(self, "out_stride", check_int(self.out_stride, "DecoderConfig.out_stride", minimum=1))
        window = check_int(self.attention_window, "DecoderConfig.attention_window", minimum=2,
                           fix="Pass e.g. 8 (the default) or 4")
        if window % 2:
            fail("DecoderConfig.attention_window", f"{window} is not even", "Pass e.g. 8 (the default) or 4")
        object.__setattr__(self, "attention_window", window)
        if not isinstance(self.smooth_windows, bool | np.bool_):
            fail("DecoderConfig.smooth_windows", f"{self.smooth_windows!r} is not True or False",
                 "Pass True or False")
        object.__setattr__(self, "smooth_windows", bool(self.smooth_windows))
        mode = self.standardize_features
        if mode is True or mode is np.True_:
            mode = "training"
        elif mode is False or mode is np.False_ or mode is None:
            mode = False
        elif mode not in STANDARDIZE_MODES:
            fail("DecoderConfig.standardize_features", f"{mode!r} is not one of 'slide', 'training' or False",
                 "Pass 'slide' (default: each slide by its own statistics), 'training' (True) or False")
        object.__setattr__(self, "standardize_features", mode)

    def standardize_mode(self, finetune_levels: int) -> str | None:
        """``"slide"``, ``"training"`` or None (off), given how many encoder levels are fine-tuned (a tuned
        encoder moves away from the frozen statistics a slide's own would be taken from)."""
        mode = self.standardize_features or None
        return "training" if mode == "slide" and finetune_levels else mode

    def module_kwargs(self, *, precision: str, members: int, finetune_levels: int = 0) -> dict:
        """The keyword arguments of :class:`pixgene.nn.PixNetModule` (what ``config.json`` records as the
        model's ``decoder``)."""
        kwargs = {"width": self.width, "out_stride": self.out_stride, "block": self.block,
                  "window": self.attention_window, "smooth": self.smooth_windows, "precision": precision,
                  "members": members}
        mode = self.standardize_mode(finetune_levels)
        if mode:
            # True: the training tiles' statistics; "slide": each slide's own (recomputed on every predicted slide)
            kwargs["standardize"] = True if mode == "training" else "slide"
        return kwargs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    """How the decoders are trained (``pg.tl.fit(training=pg.tl.TrainConfig(...))``).

    Parameters
    ----------
    tile_px
        Training tile size in encoder pixels (default: fits the spots with context).
    tile_context_px
        Encoder pixels of image encoded around each training tile, whose features are then cropped to the
        tile (a multiple of the encoder's coarsest stride; default 128, 0 with ``finetune_levels`` or a ViT's
        compact cache), so that the decoder trains on the features a whole-slide prediction gives it rather
        than on features near a tile's padded edge. Costs ``((tile + 2 context) / tile)^2`` times the
        encoding of the training tiles.
    n_views, stain_jitter, scale_jitter
        Cached views per tile (view 0 plain; others a random dihedral transform, shift and H&E stain jitter of
        this strength), and a magnification drawn from ``[1 - s, 1 + s]`` for the views after the first
        (0: off).
    finetune_levels
        Fine-tune the encoder stages that feed only its last ``finetune_levels`` pyramid levels (0: frozen,
        features cached once; otherwise every step runs the encoder on cached pixels, at a tenth of the
        decoder's learning rate; one member). The tuned encoder tensors are saved with the model.
    likelihood, loss_weights
        ``"nb"`` or ``"poisson"`` count likelihood; weights of the loss terms (0 switches one off): ``count``,
        the likelihood of every output's counts (default 1); ``total``, of the library size alone (default 0);
        ``mse`` and ``pearson`` on log-normalised expression (defaults 1 and 0.5). Without either likelihood
        term every output is rescaled after training by the one factor that makes the training spots'
        predicted library sizes add up to the measured ones (``model.training["scale_factor"]``).
    val_fraction, patience
        Held-out validation spots for early stopping (none below 10 spots), and epochs without improvement
        before stopping (default: a third of the epochs, at least 4).
    batch_size, lr, weight_decay
        The optimiser's settings; the learning rate decays over the epochs (cosine, to a tenth).
    ema_decay
        Validate, keep and return an exponential moving average of the weights with this decay per step
        (e.g. 0.99); 0: the raw weights of the best epoch.
    """

    tile_px: int | None = None
    tile_context_px: int | None = None
    n_views: int = 4
    stain_jitter: float = 0.05
    scale_jitter: float = 0.0
    finetune_levels: int = 0
    likelihood: str = "nb"
    loss_weights: dict = field(default_factory=dict)
    val_fraction: float = 0.1
    patience: int | None = None
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("tile_px", check_int(self.tile_px, "TrainConfig.tile_px", minimum=1, allow_none=True))
        put("tile_context_px", check_int(self.tile_context_px, "TrainConfig.tile_context_px", minimum=0,
                                         allow_none=True, fix="Pass e.g. 128 (encoder pixels around each "
                                         "training tile), or 0"))
        put("n_views", check_int(self.n_views, "TrainConfig.n_views", minimum=1))
        put("finetune_levels", check_int(self.finetune_levels, "TrainConfig.finetune_levels", minimum=0,
                                         fix="Pass 0 (frozen encoder) or the number of last pyramid levels to "
                                         "fine-tune, e.g. 1"))
        put("patience", check_int(self.patience, "TrainConfig.patience", minimum=1, allow_none=True))
        put("batch_size", check_int(self.batch_size, "TrainConfig.batch_size", minimum=1))
        put("stain_jitter", check_fraction(self.stain_jitter, "TrainConfig.stain_jitter"))
        put("scale_jitter", check_fraction(self.scale_jitter, "TrainConfig.scale_jitter", high=0.5,
                                           fix="Pass e.g. 0.1 (magnifications 0.9-1.1), or 0"))
        put("val_fraction", check_fraction(self.val_fraction, "TrainConfig.val_fraction", closed_low=False,
                                           fix="Pass e.g. 0.1"))
        put("ema_decay", check_fraction(self.ema_decay, "TrainConfig.ema_decay",
                                        fix="Pass e.g. 0.99, or 0 for the raw weights"))
        check_positive(self.lr, "lr", "TrainConfig.lr")
        if self.weight_decay != 0:
            check_positive(self.weight_decay, "weight_decay", "TrainConfig.weight_decay")
        if self.likelihood not in LIKELIHOODS:
            fail("TrainConfig.likelihood", f"{self.likelihood!r} is not supported", "Use 'nb' or 'poisson'")
        weights = dict(self.loss_weights or {})
        unknown = set(weights) - set(LOSS_TERMS)
        if unknown:
            fail("TrainConfig.loss_weights", f"unknown terms {sorted(unknown)}",
                 "Use the keys 'count', 'total', 'mse' and 'pearson'")
        put("loss_weights", {**DEFAULT_LOSS_WEIGHTS, **weights})
        if self.tile_context_px and self.finetune_levels:
            fail("TrainConfig.tile_context_px", f"finetune_levels={self.finetune_levels} runs the encoder on the "
                 "tiles in every step, without context", "Pass tile_context_px=0 with finetune_levels")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
