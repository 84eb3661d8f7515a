"""Training plan (Lightning) for PixNet on cached frozen-encoder features of measured spots."""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .._core.torch_compat import ensure_torchvision

ensure_torchvision()

import lightning as L  # noqa: E402

from ..data import TrainingCache, dihedral_inverse  # noqa: E402
from ..nn import log_normalize, negative_binomial_nll, pearson_loss, poisson_nll  # noqa: E402

logger = logging.getLogger(__name__)


#: learning rate of fine-tuned encoder stages relative to the decoder's
ENCODER_LR_FACTOR = 0.1


@dataclass
class LossWeights:
    count: float = 1.0
    total: float = 0.0
    mse: float = 1.0
    pearson: float = 0.5
    likelihood: str = "nb"  # "nb" or "poisson"


class TileDataset(torch.utils.data.Dataset):
    """Item = one tile; training draws one of its cached views at random, validation uses the plain view."""

    def __init__(self, cache: TrainingCache, tiles: np.ndarray, *, train: bool, seed: int) -> None:
        self.cache, self.tiles, self.train = cache, tiles, train
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int):
        t = int(self.tiles[i])
        n_views = len(self.cache.views[t])
        v = int(self.rng.integers(0, n_views)) if self.train else 0
        return t, v


def dihedral_sources(n: int, d: int) -> np.ndarray:
    """``src`` such that pixel ``p`` of ``dihedral_inverse(y, d)`` is pixel ``src[p]`` of an (n, n) map ``y``
    (flat, row-major indices): the inverse transform applied to the map's own pixel indices."""
    return dihedral_inverse(torch.arange(n * n).reshape(n, n), d).reshape(-1).numpy()


def make_collate(cache: TrainingCache):
    """Batch of ``(tile, view)`` items: their features (or pixels) and the spot operator of their views.

    A view's operator addresses the output in the tile's own orientation; the network's output for a transformed
    view is in the transformed one, so each operator's columns are mapped through the view's dihedral
    (:func:`dihedral_sources`): the spot sums read the same pixels as transforming the output back would, with no
    transform of the output, in the forward pass or the backward.
    """
    slides = cache.slides
    n_out = cache.tile // cache.out_stride
    sources: dict[int, np.ndarray] = {}

    def collate(items):
        # channels-last is the layout oneDNN's CPU convolutions (depthwise above all) run fastest in
        images, feats = None, None
        if cache.images is not None:
            images = torch.stack([cache.images[t, v] for t, v in items]).float().div_(255.0)
            images = images.contiguous(memory_format=torch.channels_last)
        else:
            feats = [
                torch.stack([f[t, v] for t, v in items]).float().contiguous(memory_format=torch.channels_last)
                for f in cache.features
            ]
        spot_offset = 0
        nnz_b, nnz_row, nnz_col, nnz_w = [], [], [], []
        counts, slide_idx, train_mask = [], [], []
        for b, (t, v) in enumerate(items):
            view = cache.views[t][v]
            slide = slides[view.slide]
            nnz_b.append(np.full(len(view.rows), b))
            nnz_row.append(view.rows + spot_offset)
            if view.dihedral not in sources:
                sources[view.dihedral] = dihedral_sources(n_out, view.dihedral)
            nnz_col.append(sources[view.dihedral][view.cols])
            nnz_w.append(view.weights)
            counts.append(slide.counts[view.spot_ids])
            slide_idx.append(np.full(len(view.spot_ids), slide.slide_index))
            train_mask.append(slide.train_mask[view.spot_ids])
            spot_offset += len(view.spot_ids)
        cat = np.concatenate
        nnz_b, nnz_col = cat(nnz_b), cat(nnz_col)
        # the output pixels the spots cover, once each: training evaluates the head there alone
        pixels, nnz_pixel = np.unique(nnz_b * (n_out * n_out) + nnz_col, return_inverse=True)
        return {
            "features": feats,
            "images": images,
            "nnz_b": torch.from_numpy(nnz_b),
            "nnz_row": torch.from_numpy(cat(nnz_row)),
            "nnz_col": torch.from_numpy(nnz_col),
            "pixel_b": torch.from_numpy(pixels // (n_out * n_out)),
            "pixel_col": torch.from_numpy(pixels % (n_out * n_out)),
            "nnz_pixel": torch.from_numpy(nnz_pixel.reshape(-1)),
            "nnz_w": torch.from_numpy(cat(nnz_w)).float(),
            "counts": torch.from_numpy(cat(counts)).float(),
            "slide": torch.from_numpy(cat(slide_idx)),
            "train_mask": torch.from_numpy(cat(train_mask)),
            "n_spots": spot_offset,
        }

    return collate


def integrate_spots(lam: torch.Tensor, batch: dict) -> torch.Tensor:
    """Expected counts per spot: the intensity summed over the exact disk areas (um^2) of each output pixel."""
    b, c = lam.shape[:2]
    return _sum_into_spots(lam.reshape(b, c, -1)[batch["nnz_b"], :, batch["nnz_col"]], batch)


def integrate_pixels(lam: torch.Tensor, batch: dict) -> torch.Tensor:
    """:func:`integrate_spots` from the intensity at the batch's covered pixels only (``lam`` (P, C), in the
    order of ``batch["pixel_b"]`` / ``batch["pixel_col"]``)."""
    return _sum_into_spots(lam[batch["nnz_pixel"]], batch)


def _sum_into_spots(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """The spot operator applied: ``values`` (one row per nonzero of the operator) times its areas, summed
    into the batch's spots."""
    out = values.new_zeros((batch["n_spots"], values.shape[1]))
    return out.index_add_(0, batch["nnz_row"], values * batch["nnz_w"][:, None])


def batch_features(batch: dict, cache: TrainingCache, encoder=None, device=None) -> list:
    """The pyramid a collated batch feeds the decoder: the encoder run on its pixels (fine-tuning), or its
    cached features placed at their level indices (levels the decoder does not read stay ``None``), expanded
    from their compact form where the cache holds that."""
    if encoder is not None:
        images = batch["images"] if device is None else batch["images"].to(device)
        return [f if f is None else f.float() for f in encoder(images)]  # as PixNetModule.encode gives them
    levels = cache.levels
    feats: list = [None] * (max(levels) + 1)
    for f, i in zip(batch["features"], levels, strict=True):
        feats[i] = cache.level(i, f if device is None else f.to(device))
    return feats


def calibrate_scale(module, cache: TrainingCache, *, batch_size: int = 8) -> float:
    """Rescale every output by one factor so that the predicted library sizes of the training spots add up to
    the measured ones (the Poisson maximum-likelihood factor); returns the factor.

    Losses on log-normalised values (MSE, Pearson) fix every gene's intensity relative to the library-size
    output but leave their common scale free; this pins it, so the dense map stays in expected counts per
    um^2. The plain view of every tile is used; ratios between outputs do not change.
    """
    collate = make_collate(cache)
    predicted, measured = 0.0, 0.0
    device = next(module.head.parameters()).device
    with torch.inference_mode():
        for start in range(0, cache.n_tiles, batch_size):
            batch = collate([(t, 0) for t in range(start, min(start + batch_size, cache.n_tiles))])
            encoder = module.encoder if batch["images"] is not None else None
            with module.autocast(device.type):
                feats = batch_features(batch, cache, encoder, device)
            # the batch's spot operator stays on the CPU
            pred = integrate_spots(module.decode(feats).cpu(), batch)
            mask = batch["train_mask"]
            predicted += float(pred[mask, -1].double().sum())
            measured += float(batch["counts"][mask, -1].double().sum())
    if predicted <= 0 or measured <= 0:
        return 1.0
    factor = measured / predicted
    module.head.log_scale.add_(float(np.log(factor)))
    return factor


class PixNetTrainingPlan(L.LightningModule):
    def __init__(self, module, cache: TrainingCache, *, n_slides: int, loss: LossWeights, lr: float,
                 weight_decay: float) -> None:
        super().__init__()
        # only the trainable parts are registered: the frozen encoder stays out of Lightning's train/eval switching
        self.decoder = module.decoder
        self.head = module.head
        self.cache = cache  # a plain attribute: its levels, and how to expand compact entries
        # fine-tuning: the encoder runs in every step on cached pixels (its frozen parts need no gradient)
        self.encoder = module.encoder if cache.images is not None else None
        # bound methods, not the module: the frozen encoder stays unregistered; decode computes in the model's
        # precision, autocast wraps the fine-tuned encoder in it as well
        self._decode_at, self._autocast = module.decode_at, module.autocast
        self.loss_weights = loss
        self.lr, self.weight_decay = lr, weight_decay
        n_out = module.head.out.out_channels
        # per-slide capture efficiency (log, geometric mean 1): not learned by gradient steps, which move it at
        # most about the learning rate per step, too slowly for the factors of a few between platforms or
        # sequencing depths; after every epoch it is set to its maximum-likelihood value given that epoch's
        # predictions (Poisson, library size: measured over predicted total counts of each slide's spots)
        self.register_buffer("log_efficiency", torch.zeros(n_slides))
        self.register_buffer("slide_totals", torch.zeros(2, n_slides, dtype=torch.float64), persistent=False)
        self.log_theta = nn.Parameter(torch.full((n_out,), float(np.log(10.0))))
        self.history: list[dict] = []
        self._epoch_terms: dict[str, list[float]] = {}

    def configure_optimizers(self):
        encoder_params = {id(p) for p in self.encoder.parameters()} if self.encoder is not None else set()
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in encoder_params]
        groups = [{"params": params}]
        if encoder_params:
            # pretrained stages move at a tenth of the decoder's rate
            tuned = [p for p in self.encoder.parameters() if p.requires_grad]
            groups.append({"params": tuned, "lr": self.lr * ENCODER_LR_FACTOR})
        opt = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        # cosine decay to a tenth of the rate over the epoch budget: converges in few epochs on a CPU
        epochs = max(1, int(self.trainer.max_epochs or 1))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=self.lr / 10)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def _features(self, batch):
        return batch_features(batch, self.cache, self.encoder)

    def _loss(self, batch, *, train: bool):
        with self._autocast(self.device.type):
            feats = self._features(batch)
        # the intensity where the spots are (the columns follow each view's dihedral); the same function as the
        # whole map that calibrate_scale and prediction compute
        lam = self._decode_at(feats, batch["pixel_b"], batch["pixel_col"])
        pred = integrate_pixels(lam, batch)
        mask = batch["train_mask"] if train else ~batch["train_mask"]
        if not bool(mask.any()):
            return None, {}
        pred, counts, slide = pred[mask], batch["counts"][mask], batch["slide"][mask]
        if train and self.log_efficiency.numel() > 1:
            with torch.no_grad():
                self.slide_totals[0].index_add_(0, slide, counts[:, -1].double())
                self.slide_totals[1].index_add_(0, slide, pred[:, -1].double())
        log_eff = self.log_efficiency - self.log_efficiency.mean()
        mu = pred * log_eff.exp()[slide][:, None]
        w = self.loss_weights
        if w.likelihood == "nb":
            nll = negative_binomial_nll(mu, counts, self.log_theta)
        else:
            nll = poisson_nll(mu, counts)
        # every output weighs the same whatever its depth: scale the NLL by each output's mean count
        scale = counts.mean(0).clamp_min(1.0)
        scaled = nll / scale
        terms = {"count": scaled.mean(), "total": scaled[:, -1].mean()}
        pred_norm = log_normalize(pred[:, :-1], pred[:, -1])
        true_norm = log_normalize(counts[:, :-1], counts[:, -1])
        terms["mse"] = ((pred_norm - true_norm) ** 2).mean()
        terms["pearson"] = pearson_loss(pred_norm, true_norm)
        total = (w.count * terms["count"] + w.total * terms["total"] + w.mse * terms["mse"]
                 + w.pearson * terms["pearson"])
        return total, terms

    def training_step(self, batch, batch_idx):
        loss, terms = self._loss(batch, train=True)
        if loss is None:
            return None
        bs = int(batch["train_mask"].sum())
        self.log("train_loss", loss, on_epoch=True, on_step=False, prog_bar=True, batch_size=bs)
        for k, v in terms.items():
            self.log(f"train_{k}", v, on_epoch=True, on_step=False, batch_size=bs)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, terms = self._loss(batch, train=False)
        if loss is None:
            return None
        bs = int((~batch["train_mask"]).sum())
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, batch_size=bs)
        for k, v in terms.items():
            self.log(f"val_{k}", v, on_epoch=True, batch_size=bs)
        return loss

    def on_train_epoch_end(self) -> None:
        # runs after this epoch's validation, so train and validation losses of the same epoch are recorded
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()}
        self.history.append({"epoch": int(self.current_epoch), **metrics})
        self.update_efficiency()

    @torch.no_grad()
    def update_efficiency(self) -> None:
        """Set each slide's capture efficiency to measured over predicted library size of the training spots
        seen since the last update (centred: geometric mean 1), and start the sums again."""
        measured, predicted = self.slide_totals
        if self.log_efficiency.numel() > 1 and bool((measured > 0).all() and (predicted > 0).all()):
            log_eff = (measured / predicted).log()
            self.log_efficiency.copy_(log_eff - log_eff.mean())
        self.slide_totals.zero_()


class KeepBest(L.Callback):
    """Keep the decoder weights of the epoch with the lowest validation loss, in memory."""

    def __init__(self) -> None:
        self.best = float("inf")
        self.best_epoch = -1
        self.state = None

    def on_validation_epoch_end(self, trainer, plan) -> None:
        if trainer.sanity_checking or "val_loss" not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics["val_loss"])
        if value < self.best:
            self.best, self.best_epoch = value, int(plan.current_epoch)
            self.state = copy.deepcopy(plan.state_dict())


class WeightAverage(L.Callback):
    """Exponential moving average of the trainable weights, updated after every optimiser step.

    Validation sees the averaged weights, so early stopping and :class:`KeepBest` judge (and keep) them;
    training goes on from the raw weights. The decay warms up as ``min(decay, (1 + t) / (10 + t))`` after
    ``t`` steps, so the first steps are not averaged with the random initialisation. On a few hundred spots
    the raw weights move noisily from step to step; their average is the steadier predictor.
    """

    def __init__(self, decay: float) -> None:
        self.decay, self.steps = decay, 0
        self.average: list[torch.Tensor] | None = None
        self.raw: list[torch.Tensor] | None = None

    @staticmethod
    def _params(plan) -> list[torch.Tensor]:
        return [p for p in plan.parameters() if p.requires_grad]

    def on_train_batch_end(self, trainer, plan, outputs, batch, batch_idx) -> None:
        params = self._params(plan)
        with torch.no_grad():
            if self.average is None:
                self.average = [p.detach().clone() for p in params]
            d = min(self.decay, (1 + self.steps) / (10 + self.steps))
            for a, p in zip(self.average, params, strict=True):
                a.lerp_(p.detach(), 1 - d)
        self.steps += 1

    def on_validation_epoch_start(self, trainer, plan) -> None:
        if self.average is None:
            return
        params = self._params(plan)
        with torch.no_grad():
            self.raw = [p.detach().clone() for p in params]
            for a, p in zip(self.average, params, strict=True):
                p.copy_(a)

    def on_validation_epoch_end(self, trainer, plan) -> None:
        if self.raw is None:
            return
        with torch.no_grad():
            for r, p in zip(self.raw, self._params(plan), strict=True):
                p.copy_(r)
        self.raw = None


@contextlib.contextmanager
def _quiet_lightning():
    """Lightning's start-up notices (accelerator summary, tips) go to DEBUG while pixgene trains."""
    names = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def _restoring_torch_flags():
    """Training runs with ``Trainer(deterministic=True)``, which switches on deterministic algorithms, turns off
    cuDNN benchmarking and sets CUBLAS_WORKSPACE_CONFIG for the whole process; the caller's settings come back
    afterwards.

    Deterministic algorithms also fill every newly allocated tensor with NaN by default, a guard against reading
    memory no kernel wrote; nothing in training reads such memory, so the fill is switched off for it: the same
    results, ~5 % less time per step on a CPU.
    """
    import os

    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def train(
    module,
    cache: TrainingCache,
    *,
    n_slides: int,
    loss: LossWeights,
    max_epochs: int,
    patience: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    progress: bool,
    ema_decay: float = 0.0,
) -> tuple[list[dict], dict]:
    """Fit decoder and head; returns the per-epoch history and a summary (best epoch, efficiencies)."""
    from lightning.pytorch.callbacks import EarlyStopping

    L.seed_everything(seed, workers=True, verbose=False)
    module.decoder.to(memory_format=torch.channels_last)
    module.head.to(memory_format=torch.channels_last)
    plan = PixNetTrainingPlan(module, cache, n_slides=n_slides, loss=loss, lr=lr, weight_decay=weight_decay)
    tiles = np.arange(cache.n_tiles)
    has_val = np.array(
        [any((~cache.slides[v.slide].train_mask[v.spot_ids]).any() for v in views[:1]) for views in cache.views]
    )
    collate = make_collate(cache)
    train_loader = torch.utils.data.DataLoader(
        TileDataset(cache, tiles, train=True, seed=seed), batch_size=batch_size, shuffle=True,
        collate_fn=collate, generator=torch.Generator().manual_seed(seed),
    )
    val_loader = torch.utils.data.DataLoader(
        TileDataset(cache, tiles[has_val], train=False, seed=seed), batch_size=batch_size, collate_fn=collate
    )
    keep = KeepBest()
    callbacks: list = [keep]
    if ema_decay > 0:
        # listed after KeepBest: at the end of validation KeepBest copies the averaged weights, then these
        # put the raw ones back
        callbacks.append(WeightAverage(ema_decay))
    # fewer than 10 training spots have no validation spots (fit's split): train for max_epochs, keep the last
    validate = bool(has_val.any())
    if validate:
        callbacks.append(EarlyStopping("val_loss", patience=patience, mode="min"))
    else:
        logger.warning("no validation spots (fewer than 10 spots): training for all %d epochs, without early "
                       "stopping, and keeping the last epoch's weights", max_epochs)
    with _quiet_lightning(), _restoring_torch_flags():
        trainer = L.Trainer(
            max_epochs=max_epochs,
            accelerator="auto",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=progress,
            enable_model_summary=False,
            callbacks=callbacks,
            deterministic=True,
            num_sanity_val_steps=0,
        )
        with warnings.catch_warnings():
            # a fine-tuned encoder keeps its frozen BatchNorm layers in eval mode on purpose
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
            # Lightning 2.6 against torch 2.13 (its own code; nothing a user can act on)
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
            # no validation spots (see above): nothing to validate, on purpose
            warnings.filterwarnings("ignore", message=r"You defined a `validation_step` but have no `val_dataloader`")
            # a batch whose tiles hold validation spots alone (an epoch's last, short batch, where a tile holds
            # one spot, as on legacy ST) has nothing to train on: its step is skipped, on purpose
            warnings.filterwarnings("ignore", message=r"`training_step` returned `None`")
            trainer.fit(plan, train_loader, val_loader if validate else None)
    if keep.state is not None:
        plan.load_state_dict(keep.state)
    plan.to("cpu")
    module.decoder.to(memory_format=torch.contiguous_format)
    module.head.to(memory_format=torch.contiguous_format)
    eff = (plan.log_efficiency - plan.log_efficiency.mean()).exp().detach().cpu().numpy()
    summary = {
        "best_epoch": keep.best_epoch if validate else int(trainer.current_epoch) - 1,
        "best_val_loss": keep.best if validate else None,
        "epochs_run": int(trainer.current_epoch),
        "capture_efficiency": eff.tolist(),
        "theta": plan.log_theta.exp().detach().cpu().numpy().tolist(),
    }
    return plan.history, summary
