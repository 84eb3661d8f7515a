"""Accuracy of pixgene against the field's baselines, side by side, on the same folds and genes, in one run.

Datasets and folds
    her2st C2-C5, leave one section out (4 folds); st_mob MOB1-MOB3, leave one section out (3 folds).
    Genes: the top-50 highly variable genes of the training sections of each fold (no leakage). Targets:
    ``log1p(1e4 * counts / total)`` per spot, total = every gene of the spot. Metrics on the held-out section's
    spots: PCC@F/S/M (first quartile, median, mean over genes of the per-gene Pearson r across spots), MSE, MAE.

Methods (the same frozen encoder everywhere but in ``pixgene_lite1``: the bundled ImageNet EfficientNet-Lite0,
reading the images at pixgene's default um/px: the encoder's 1 um/px, or an image's own um/px where that is
coarser, as on st_mob; patch and superpixel sizes are in encoder pixels, so the um below hold at 1 um/px)
    mean      the training-mean expression of each gene (constant: its Pearson r is undefined, shown as n/a)
    ridge     HEST-Benchmark style: encoder embedding of a 224 um patch on each spot (pooled last level),
              PCA to 256 dimensions, ridge with the penalty chosen by cross-validation on the training spots
    stnet     ST-Net style: the encoder plus a linear head fine-tuned on 224 um spot crops (MSE, dihedral
              augmentation; the last two encoder levels are trained, which keeps a fold within CPU minutes)
    istar     iStar style: an MLP on 8 um superpixel features (every pyramid level pooled or upsampled to
              8 um), the mean over the superpixels inside each spot fitted to the spot (MSE)
    pixgene   ``pg.tl.fit`` with its defaults (five decoders on the same features, averaged),
              ``predict_dense`` over the whole held-out section, ``aggregate`` over its spots
    ablations pixgene with one decoder (``pixgene_single``: ``n_members=1``; when ``pixgene`` runs in the same
              fold, member 0 of its model, which is that fit to the bit, is not fitted again), and, each against
              ``pixgene_single`` (one decoder, one setting changed): the plain conv decoder
              (``pixgene_conv``), the MSE term only (``pixgene_mse``), no stain augmentation
              (``pixgene_nostain``), the encoder's raw features instead of standardised ones
              (``pixgene_raw``), standardised with the training tiles' statistics instead of each slide's
              own (``pixgene_pooled``)
    variants  one decoder attending over four half-window-shifted grids of 4 x 4 windows, blended
              (``pixgene_smooth``: ``smooth_windows=True, attention_window=4``; no window lattice in the map,
              about the default's attention compute); the default and one decoder with every training tile
              encoded alone, without the 128 encoder pixels of image around it that the default encodes and
              crops away (``pixgene_tile_alone``, ``pixgene_single_tile_alone``: ``tile_context_px=0``); the
              default on ImageNet EfficientNet-Lite1 (``pixgene_lite1``: ``encoder="efficientnet_lite1"``,
              weights from ``pixgene[lite]``; the baselines keep Lite0); the default's model predicting with
              test-time augmentation (``pixgene_tta``: ``predict_dense(tta=4)``, the mean of the maps of each
              tile, its half turn and its two mirror images; when ``pixgene`` runs in the same fold its model
              is not fitted again)

Cross-scale (synthetic data, truth known everywhere)
    Fit on 100 um spots only, read the dense map out over 2, 8, 16 and 55 um square bins and over the
    training spots, and score each against the truth; and fit on 55 um spots, score 100 um bins. Each score
    stands next to its ceiling: the expected truth given the histology, read out and scored the same way.
    ``--cross-scale-method`` fits one of the pixgene variants above instead of the defaults.

Every method gets the fold's seed; the same seed gives the same table. Prints markdown tables and writes
``benchmarks/results/accuracy.json`` and ``accuracy.md`` (``accuracy_<tag>`` for partial runs).

    python benchmarks/accuracy.py                       # the standard methods, both datasets, cross-scale
    python benchmarks/accuracy.py --datasets st_mob --methods mean ridge pixgene --tag smoke
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import pixgene as pg

log = logging.getLogger("accuracy")
RESULTS = Path(__file__).parent / "results"
FOLDS = {"her2st": ("C2", "C3", "C4", "C5"), "st_mob": ("MOB1", "MOB2", "MOB3")}
BASELINES = ("mean", "ridge", "stnet", "istar")
# the ablations and variants change one setting of a single-member pixgene: compare them with pixgene_single
SINGLE = {"n_members": 1}
PIXGENE = {
    "pixgene": {},
    "pixgene_single": SINGLE,
    "pixgene_pooled": {**SINGLE, "decoder": pg.tl.DecoderConfig(standardize_features="training")},
    "pixgene_raw": {**SINGLE, "decoder": pg.tl.DecoderConfig(standardize_features=False)},
    "pixgene_conv": {**SINGLE, "decoder": pg.tl.DecoderConfig(block="conv")},
    "pixgene_mse": {**SINGLE, "training": pg.tl.TrainConfig(loss_weights={"count": 0.0, "mse": 1.0, "pearson": 0.0})},
    "pixgene_nostain": {**SINGLE, "training": pg.tl.TrainConfig(stain_jitter=0.0)},
    "pixgene_smooth": {**SINGLE, "decoder": pg.tl.DecoderConfig(smooth_windows=True, attention_window=4)},
    # every training tile encoded alone (no image around it)
    "pixgene_tile_alone": {"training": pg.tl.TrainConfig(tile_context_px=0)},
    "pixgene_single_tile_alone": {**SINGLE, "training": pg.tl.TrainConfig(tile_context_px=0)},
    "pixgene_lite1": {"encoder": "efficientnet_lite1"},
    "pixgene_tta": {},
}
#: one-decoder methods that are member 0 of another method's model: {single: its ensemble}
SINGLE_OF = {"pixgene_single": "pixgene", "pixgene_single_tile_alone": "pixgene_tile_alone"}
#: methods that predict with another method's whole model, only ``predict_dense``'s options changed
PREDICTS_WITH = {"pixgene_tta": "pixgene"}
#: ``predict_dense`` options of a method (default: none)
PREDICT_OPTIONS = {"pixgene_tta": {"tta": 4}}
METHODS = (*BASELINES, *PIXGENE)
#: what a run without ``--methods`` runs: the baselines, the default, one decoder and the three ablations (the
#: other variants on request)
STANDARD = (*BASELINES, "pixgene", "pixgene_single", "pixgene_conv", "pixgene_mse", "pixgene_nostain")
PATCH_PX = 224  # HEST / ST-Net patch, encoder pixels
SUPERPIXEL_PX = 8  # iStar superpixel, encoder pixels
N_GENES = 50


# --------------------------------------------------------------------------------------------- measuring


class PeakMemory:
    """Peak resident memory of this process while the block runs, sampled every 50 ms."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(0.05)

    def __enter__(self) -> PeakMemory:
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


@contextmanager
def measured(record: dict):
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        yield
    record["time_s"] = round(time.perf_counter() - t0, 1)
    record["peak_rss_gb"] = round(mem.peak / 1e9, 2)


# --------------------------------------------------------------------------------------------- spots


@dataclass
class Spots:
    """The spots of one section in encoder pixels, with their log-normalised targets."""

    section: str
    sdata: object
    reader: object
    centers: np.ndarray  # (n, 2) x, y, encoder pixels
    radius: float  # encoder pixels
    y: np.ndarray  # (n, G) log1p(1e4 * counts / total)


def load_section(dataset: str, section: str):
    return pg.datasets.her2st(section) if dataset == "her2st" else pg.datasets.st_mob(section)


def spots_of(section: str, sdata, genes: list[str], enc_um: float) -> Spots:
    import scipy.sparse as sp

    from pixgene._bench import SlideReader, log_normalize_np, prepare_spot_slide

    s = prepare_spot_slide(sdata, image_key="he", shapes_key="spots", table_key="table", um_per_px=None)
    reader = SlideReader(sdata.images["he"], image_um=s.um_per_px, target_um=enc_um, name="he")
    X = s.table[:, genes].X
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    total = np.asarray(s.table.X.sum(1)).ravel()
    y = log_normalize_np(X.astype(np.float64), total).astype(np.float32)
    return Spots(section, sdata, reader, s.centers / reader.factor, float(np.median(s.radius)) / reader.factor, y)


def read_patches(spots: Spots, size: int) -> np.ndarray:
    """(n, 3, size, size) uint8 patches centred on the spots."""
    out = np.empty((len(spots.centers), 3, size, size), dtype=np.uint8)
    for i, (cx, cy) in enumerate(spots.centers):
        x0, y0 = int(round(cx - size / 2)), int(round(cy - size / 2))
        out[i] = np.clip(spots.reader.read(x0, y0, size, size) * 255 + 0.5, 0, 255).astype(np.uint8)
    return out


def as_float(batch: np.ndarray):
    import torch

    return torch.from_numpy(batch).float().div_(255.0)


def encode_patches(encoder, patches: np.ndarray, batch: int = 16) -> list[np.ndarray]:
    """Frozen-encoder pyramid of each patch, one array per level, float32."""
    import torch

    levels: list[list[np.ndarray]] = []
    with torch.inference_mode():
        for i in range(0, len(patches), batch):
            feats = encoder(as_float(patches[i : i + batch]))
            if not levels:
                levels = [[] for _ in feats]
            for k, f in enumerate(feats):
                levels[k].append(f.float().numpy())
    return [np.concatenate(x) for x in levels]


def split_validation(n: int, rng: np.random.Generator, fraction: float = 0.1) -> np.ndarray:
    mask = np.ones(n, dtype=bool)
    mask[rng.choice(n, size=max(1, int(round(fraction * n))), replace=False)] = False
    return mask  # True = train


# --------------------------------------------------------------------------------------------- baselines


def fit_mean(train: list[Spots], test: Spots, **_) -> np.ndarray:
    mean = np.concatenate([s.y for s in train]).mean(0)
    return np.broadcast_to(mean, test.y.shape).copy()


def fit_ridge(train: list[Spots], test: Spots, *, encoder, seed: int, **_) -> np.ndarray:
    """HEST-Benchmark: PCA(256) of pooled patch embeddings, then ridge (penalty by CV on training spots)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def embed(s: Spots) -> np.ndarray:
        return encode_patches(encoder, read_patches(s, PATCH_PX))[-1].mean((2, 3))

    x_train = np.concatenate([embed(s) for s in train])
    y_train = np.concatenate([s.y for s in train])
    n_comp = min(256, x_train.shape[0] - 1, x_train.shape[1])
    model = make_pipeline(
        StandardScaler(), PCA(n_components=n_comp, random_state=seed),
        RidgeCV(alphas=np.logspace(-1, 5, 13), alpha_per_target=True),
    )
    model.fit(x_train, y_train)
    return model.predict(embed(test)).astype(np.float32)


def _dihedral_batch(x, rng: np.random.Generator):
    import torch

    k = int(rng.integers(0, 4))
    x = torch.rot90(x, k, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if rng.random() < 0.5 else x


def fit_stnet(train: list[Spots], test: Spots, *, seed: int, epochs: int = 6, batch: int = 16,
              trainable_levels: int = 2, **_) -> np.ndarray:
    """ST-Net: encoder + linear head on the pooled last level, fine-tuned on spot crops with MSE."""
    import torch
    from torch import nn

    from pixgene._bench import build_encoder

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    enc = build_encoder("efficientnet_lite0")
    enc.set_trainable(trainable_levels)
    head = nn.Linear(enc.channels[-1], train[0].y.shape[1])
    y_all = np.concatenate([s.y for s in train])
    with torch.no_grad():
        head.weight.mul_(0.1)
        head.bias.copy_(torch.from_numpy(y_all.mean(0)))
    big = PATCH_PX + 32  # room for a random shift of +-16 px
    patches = np.concatenate([read_patches(s, big) for s in train])
    is_train = split_validation(len(patches), rng)
    params = [p for p in enc.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params, "lr": 3e-4}, {"params": head.parameters(), "lr": 1e-3}],
                            weight_decay=1e-4)

    def predict(crops: np.ndarray) -> np.ndarray:
        enc.eval()
        out = []
        with torch.inference_mode():
            for i in range(0, len(crops), 32):
                out.append(head(enc(as_float(crops[i : i + 32]))[-1].mean((2, 3))).numpy())
        return np.concatenate(out)

    centre = slice(16, 16 + PATCH_PX)
    val_crops = patches[~is_train][:, :, centre, centre]
    best, best_state = np.inf, None
    idx = np.flatnonzero(is_train)
    for _ in range(epochs):
        enc.train()
        order = rng.permutation(idx)
        for i in range(0, len(order), batch):
            b = order[i : i + batch]
            dy, dx = rng.integers(0, 33, size=2)
            x = _dihedral_batch(as_float(patches[b][:, :, dy : dy + PATCH_PX, dx : dx + PATCH_PX]), rng)
            loss = ((head(enc(x)[-1].mean((2, 3))) - torch.from_numpy(y_all[b])) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        val = float(((predict(val_crops) - y_all[~is_train]) ** 2).mean())
        if val < best:
            best = val
            best_state = ({k: v.clone() for k, v in enc.state_dict().items()},
                          {k: v.clone() for k, v in head.state_dict().items()})
    enc.load_state_dict(best_state[0])
    head.load_state_dict(best_state[1])
    return predict(read_patches(test, PATCH_PX))


def superpixel_features(encoder, spots: Spots) -> tuple[np.ndarray, np.ndarray]:
    """Features of the 8 um superpixels whose centres lie inside each spot (rows) and each row's spot."""
    import torch
    import torch.nn.functional as F

    size = PATCH_PX
    grid = size // SUPERPIXEL_PX
    centres = (np.arange(grid) + 0.5) * SUPERPIXEL_PX - size / 2
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    feats, owners = [], []
    patches = read_patches(spots, size)
    with torch.inference_mode():
        for i in range(0, len(patches), 16):
            pyramid = encoder(as_float(patches[i : i + 16]))
            # every level on the 8 um grid: finer levels averaged, coarser levels interpolated
            on_grid = [F.adaptive_avg_pool2d(f, grid) if f.shape[-1] > grid else
                       F.interpolate(f, size=(grid, grid), mode="bilinear", align_corners=False) for f in pyramid]
            stacked = torch.cat(on_grid, 1).permute(0, 2, 3, 1).numpy()  # (b, grid, grid, C)
            for k in range(stacked.shape[0]):
                j = i + k
                # spot centre sits at patch centre up to the rounding of the patch origin
                cx, cy = spots.centers[j]
                ox, oy = cx - (round(cx - size / 2) + size / 2), cy - (round(cy - size / 2) + size / 2)
                inside = (xx - ox) ** 2 + (yy - oy) ** 2 <= spots.radius**2
                feats.append(stacked[k][inside].astype(np.float16))
                owners.append(np.full(int(inside.sum()), j))
    return np.concatenate(feats), np.concatenate(owners)


def fit_istar(train: list[Spots], test: Spots, *, encoder, seed: int, epochs: int = 40, batch: int = 32,
              hidden: int = 256, **_) -> np.ndarray:
    """iStar: per-superpixel MLP whose mean over a spot's superpixels is fitted to the spot (MSE)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    parts = [superpixel_features(encoder, s) for s in train]
    offsets = np.cumsum([0] + [len(s.centers) for s in train])
    x = np.concatenate([p[0] for p in parts])
    owner = np.concatenate([p[1] + o for p, o in zip(parts, offsets[:-1], strict=True)])
    y = np.concatenate([s.y for s in train])
    mu, sd = x.astype(np.float32).mean(0), x.astype(np.float32).std(0) + 1e-6
    n_spots = len(y)
    rows_of = np.split(np.argsort(owner, kind="stable"), np.cumsum(np.bincount(owner, minlength=n_spots))[:-1])
    mlp = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, hidden),
                        nn.LeakyReLU(0.1), nn.Linear(hidden, y.shape[1]))
    with torch.no_grad():
        mlp[-1].bias.copy_(torch.from_numpy(y.mean(0)))
    opt = torch.optim.AdamW(mlp.parameters(), lr=1e-3, weight_decay=1e-4)
    is_train = split_validation(n_spots, rng)

    def spot_means(spot_ids: np.ndarray, xs: np.ndarray, rows: list[np.ndarray]):
        r = np.concatenate([rows[i] for i in spot_ids])
        seg = torch.from_numpy(np.repeat(np.arange(len(spot_ids)), [len(rows[i]) for i in spot_ids]))
        out = mlp(torch.from_numpy((xs[r].astype(np.float32) - mu) / sd))
        sums = torch.zeros(len(spot_ids), out.shape[1]).index_add_(0, seg, out)
        return sums / torch.bincount(seg, minlength=len(spot_ids)).clamp_min(1)[:, None]

    val_ids = np.flatnonzero(~is_train)
    best, best_state = np.inf, None
    for _ in range(epochs):
        mlp.train()
        order = rng.permutation(np.flatnonzero(is_train))
        for i in range(0, len(order), batch):
            b = order[i : i + batch]
            loss = ((spot_means(b, x, rows_of) - torch.from_numpy(y[b])) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        mlp.eval()
        with torch.no_grad():
            val = float(((spot_means(val_ids, x, rows_of) - torch.from_numpy(y[val_ids])) ** 2).mean())
        if val < best:
            best, best_state = val, {k: v.clone() for k, v in mlp.state_dict().items()}
    mlp.load_state_dict(best_state)
    xt, ot = superpixel_features(encoder, test)
    rows_t = np.split(np.argsort(ot, kind="stable"),
                      np.cumsum(np.bincount(ot, minlength=len(test.centers)))[:-1])
    mlp.eval()
    with torch.no_grad():
        return spot_means(np.arange(len(test.centers)), xt, rows_t).numpy()


def fit_pixgene(train_sdatas: list, test: Spots, *, genes: list[str], seed: int, name: str, options: dict,
                model=None, predict_options: dict | None = None, **_) -> tuple[np.ndarray, dict, object]:
    """``pg.tl.fit`` -> ``predict_dense`` -> ``aggregate`` over the test spots; log-normalised like the targets.
    With ``model`` given, the fit is skipped and that model predicts. Returns the prediction, a summary of the
    training and the model."""
    from pixgene._bench import log_normalize_np

    t0 = time.perf_counter()
    if model is None:
        model = pg.tl.fit(train_sdatas, genes=genes, random_state=seed, progress=False, **options)
    fit_s = time.perf_counter() - t0
    dense_key, table_key = f"he_{name}", f"spots_{name}"
    pg.tl.predict_dense(test.sdata, model, key_added=dense_key, overwrite=True, progress=False,
                        **(predict_options or {}))
    table = pg.tl.aggregate(test.sdata, shapes="spots", dense_key=dense_key, key_added=table_key,
                            overwrite=True, progress=False)
    order = _align(table, test.sdata.tables["table"])
    X = np.asarray(table[:, genes].X)[order]
    total = table.obs["pixgene_total_counts"].to_numpy()[order]
    del test.sdata.images[dense_key], test.sdata.tables[table_key]
    info = {k: model.training[k] for k in ("best_epoch", "best_val_loss", "epochs_run", "n_tiles")}
    members = model.training.get("members", [])
    if members:  # every member's (the top-level entries are the first member's)
        info.update(n_members=len(members), best_epoch=[m["best_epoch"] for m in members],
                    best_val_loss=[m["best_val_loss"] for m in members],
                    epochs_run=[m["epochs_run"] for m in members],
                    train_s=[m.get("train_s") for m in members])
    info["precision"] = model.decoder_config["precision"]
    info["model_id"] = model.model_id  # a hash of the fitted weights: equal ids, equal models
    info.update(fit_s=round(fit_s, 1), predict_and_aggregate_s=round(time.perf_counter() - t0 - fit_s, 1))
    return log_normalize_np(X.astype(np.float64), total).astype(np.float32), info, model


def member_of_fitted(method: str, fitted: dict) -> tuple[object, float] | None:
    """``(model, fit_s)`` for a method that is one member of a model this fold has already fitted, or predicts
    with that whole model (``PREDICTS_WITH``: the model and its fit time as they are), else None.

    ``pixgene_single`` is member 0 of ``pixgene``'s fit, to the bit (``pg.tl.fit`` draws member 0's split and
    seed exactly as with ``n_members=1``; the same model id), so it is not fitted again (likewise every pair
    in ``SINGLE_OF``). Its fit time is what a fit of one member takes: the ensemble's fit less the training of
    its other members.
    """
    if PREDICTS_WITH.get(method) in fitted:
        return fitted[PREDICTS_WITH[method]]
    parent = SINGLE_OF.get(method)
    if parent not in fitted:
        return None
    model, fit_s = fitted[parent]
    if model.n_members == 1:
        return model, fit_s
    members = model.training.get("members", [])
    others = sum(m["train_s"] for m in members[1:])
    return model.member(0), fit_s - others


def single_after_full(methods: list[str]) -> list[str]:
    """``methods`` with each one-decoder method of ``SINGLE_OF`` moved right after its ensemble when both run
    (see member_of_fitted)."""
    order = list(methods)
    for single, parent in (*SINGLE_OF.items(), *PREDICTS_WITH.items()):
        if single in order and parent in order:
            order.remove(single)
            order.insert(order.index(parent) + 1, single)
    return order


def _align(pred_table, measured_table) -> np.ndarray:
    """Row of ``pred_table`` for each row of the measured table (same spots, matched by instance id)."""
    import pandas as pd

    pid = pred_table.obs[pred_table.uns["spatialdata_attrs"]["instance_key"]].astype(str).to_numpy()
    mid = measured_table.obs[measured_table.uns["spatialdata_attrs"]["instance_key"]].astype(str).to_numpy()
    pos = pd.Series(np.arange(len(pid)), index=pid)
    return pos.loc[mid].to_numpy()


# --------------------------------------------------------------------------------------------- folds


def score(pred: np.ndarray, y: np.ndarray, genes: list[str]) -> dict:
    from pixgene._bench import score_matrices

    return rounded(score_matrices(pred.astype(np.float64), y.astype(np.float64), genes).summary)


def rounded(summary: dict) -> dict:
    """A score summary for JSON: floats to 4 decimals, undefined ones (NaN) as None."""
    return {k: (round(v, 4) if isinstance(v, float) and np.isfinite(v) else (None if isinstance(v, float) else v))
            for k, v in summary.items()}


def run_fold(dataset: str, sections: tuple[str, ...], test_section: str, methods: list[str], seed: int) -> dict:
    from pixgene._bench import build_encoder, resolve_um_per_px, working_um_per_px

    t0 = time.perf_counter()
    train_names = [s for s in sections if s != test_section]
    train_sdatas = [load_section(dataset, s) for s in train_names]
    test_sdata = load_section(dataset, test_section)
    genes = pg.pp.select_genes(train_sdatas, n_top=N_GENES, flavor="hvg")
    encoder = build_encoder("efficientnet_lite0").eval()
    # every method reads the images at pixgene's default um/px (the encoder's, or the images' own if coarser)
    encoder.um_per_px = working_um_per_px(encoder.um_per_px, [resolve_um_per_px(sd, "he") for sd in train_sdatas])
    train = [spots_of(n, sd, genes, encoder.um_per_px) for n, sd in zip(train_names, train_sdatas, strict=True)]
    test = spots_of(test_section, test_sdata, genes, encoder.um_per_px)
    fold = {"dataset": dataset, "test": test_section, "train": train_names, "genes": genes,
            "n_train_spots": int(sum(len(s.y) for s in train)), "n_test_spots": int(len(test.y)),
            "spot_diameter_um": round(2 * test.radius * encoder.um_per_px, 1),
            "encoder_um_per_px": round(encoder.um_per_px, 3), "methods": {}}
    log.info("%s fold %s: %d train / %d test spots", dataset, test_section, fold["n_train_spots"],
             fold["n_test_spots"])
    fitted: dict = {}  # method -> (model, fit seconds), for methods that are one member of another's model
    # the fold's pixgene fits share their encoded training tiles (pg.tl.fit(feature_cache=...)): a method whose
    # encoding matches an earlier one's (the same tiles, views and jitter: not pixgene_nostain) loads its
    # features, to the bit, instead of encoding again; its time is then its training, prediction and read-out
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pixgene-features-") as features:
        for method in single_after_full(methods):
            record: dict = {}
            info = None
            derived = member_of_fitted(method, fitted)
            with measured(record):
                if method in PIXGENE:
                    pred, info, model = fit_pixgene(train_sdatas, test, genes=genes, seed=seed, name=method,
                                                    options={**PIXGENE[method], "feature_cache": features},
                                                    model=derived and derived[0],
                                                    predict_options=PREDICT_OPTIONS.get(method))
                    if derived is None and method in (*SINGLE_OF.values(), *PREDICTS_WITH.values()):
                        fitted[method] = (model, info["fit_s"])
                else:
                    fn = {"mean": fit_mean, "ridge": fit_ridge, "stnet": fit_stnet, "istar": fit_istar}[method]
                    pred = fn(train, test, encoder=encoder, seed=seed)
            if derived is not None:
                # timed: the prediction; the fit is the share of the ensemble's fit that one member takes, or (for
                # a method of PREDICTS_WITH) the whole fit of the model it predicts with
                parent = SINGLE_OF.get(method) or PREDICTS_WITH[method]
                relation = "member_of" if method in SINGLE_OF else "model_of"
                info.update(fit_s=round(derived[1], 1), **{relation: parent})
                record["time_s"] = round(record["time_s"] + derived[1], 1)
            record.update(score(pred, test.y, genes))
            if info:
                record["training"] = info
            fold["methods"][method] = record
            log.info("%s %s %s: PCC@M %s PCC@S %s (%.0f s, %.2f GB)", dataset, test_section, method,
                     record["PCC@M"], record["PCC@S"], record["time_s"], record["peak_rss_gb"])
    fold["fold_s"] = round(time.perf_counter() - t0, 1)
    return fold


def run_fold_apart(dataset: str, test_section: str, methods: list[str], seed: int) -> dict:
    """:func:`run_fold` in a fresh Python process: a fold's time and peak memory are its own, not shaped by
    what earlier folds left in this process's heap."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fold.json"
        cmd = [sys.executable, __file__, "--datasets", dataset, "--folds", test_section, "--methods", *methods,
               "--seed", str(seed), "--no-cross-scale", "--fold-json", str(out)]
        subprocess.run(cmd, check=True)
        fold = json.loads(out.read_text())
    for record in fold["methods"].values():
        record["own_process"] = True
    return fold


# --------------------------------------------------------------------------------------------- cross-scale


def cross_scale(seed: int, *, size_um: float = 3072.0, n_genes: int = 30, method: str = "pixgene") -> list[dict]:
    """Fit on one spot size of the synthetic data, score the dense map over other sizes against the truth.

    Next to every score stands the ceiling: the synthetic data's expected truth (``truth_expected``: the truth
    without the cell-to-cell variability no image explains) read out over the same shapes and scored the same
    way. No predictor from the histology can beat it on average, so ``fraction of ceiling`` is how much of the
    achievable accuracy the model reaches at each scale.
    """
    out = []
    for train_um, pitch_um, bins in ((100.0, 150.0, (2.0, 8.0, 16.0, 55.0, 100.0)), (55.0, 100.0, (100.0,))):
        record: dict = {"train_spot_um": train_um, "method": method}
        with measured(record):
            sdata = pg.datasets.synthetic(seed, size_um=size_um, n_genes=n_genes, spot_diameter_um=train_um,
                                          spot_pitch_um=pitch_um, expected_truth=True)
            genes = [g for g in sdata.tables["table"].var_names if g.startswith("GENE")]
            model = pg.tl.fit(sdata, genes=genes, random_state=seed, progress=False, **PIXGENE[method])
            pg.tl.predict_dense(sdata, model, progress=False)
            scores, ceiling = {}, {}

            def read_out(where: str, shapes: str) -> None:
                for dense_key, into in (("he_pixgene", scores), ("truth_expected", ceiling)):
                    table_key = f"{shapes}_{dense_key}_readout"
                    pg.tl.aggregate(sdata, shapes=shapes, dense_key=dense_key, key_added=table_key,
                                    progress=False)
                    into[where] = pg.tl.evaluate(sdata, predicted=table_key, truth="truth", genes=genes).summary
                    del sdata.tables[table_key]

            read_out("training spots", "spots")
            for b in bins:
                key = f"bins_{b:g}um"
                pg.tl.make_grid(sdata, bin_um=b, key_added=key)
                read_out(f"{b:g} um bins", key)
                del sdata.shapes[key]
        record["n_spots"] = int(sdata.tables["table"].n_obs)
        record["scores"] = {k: rounded(v) for k, v in scores.items()}
        record["ceiling"] = {k: rounded(v) for k, v in ceiling.items()}
        record["fraction_of_ceiling"] = {k: round(scores[k]["PCC@M"] / ceiling[k]["PCC@M"], 3) for k in scores}
        if 8.0 in bins:
            record["pcc_m_8um_over_training_spots"] = round(
                scores["8 um bins"]["PCC@M"] / scores["training spots"]["PCC@M"], 3)
            record["ceiling_8um_over_training_spots"] = round(
                ceiling["8 um bins"]["PCC@M"] / ceiling["training spots"]["PCC@M"], 3)
        log.info("cross-scale %s", record)
        out.append(record)
    return out


# --------------------------------------------------------------------------------------------- report


def mean_over_folds(folds: list[dict], methods: list[str]) -> dict:
    out = {}
    for m in methods:
        rows = [f["methods"][m] for f in folds if m in f["methods"]]
        agg = {}
        for k in ("PCC@F", "PCC@S", "PCC@M", "MSE", "MAE", "time_s", "peak_rss_gb"):
            vals = [r[k] for r in rows if r.get(k) is not None]
            # a mean over some of the folds is not comparable with the others: n/a until every fold has run
            agg[k] = round(float(np.mean(vals)), 4) if len(vals) == len(rows) == len(folds) else None
        agg["time_s"] = agg["time_s"] and round(agg["time_s"], 1)
        out[m] = agg
    return out


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _members(fits: list) -> bool:
    return any(isinstance(i["best_epoch"], list) for _, i in fits)


def _epochs(info: dict) -> str:
    """``best / run`` of a fit, one pair per member for an ensemble."""
    best, run = info["best_epoch"], info["epochs_run"]
    if isinstance(best, list):
        return ", ".join(f"{b} / {r}" for b, r in zip(best, run, strict=True))
    return f"{best} / {run}"


def render(result: dict) -> str:
    if result.get("runs"):
        where = f"Seed {result['seed']}. "  # machine and times: per run, listed below
    else:
        where = (f"Seed {result['seed']}; {result['machine']}; at the end {result['load_average_at_end']}. "
                 f"Total run {result['total_s']:.0f} s. ")
    lines = ["# pixgene accuracy benchmark" + ("" if result.get("complete") else " (partial: the run stopped early)"), "",
             where +
             "Scores on the held-out section's spots, log1p(1e4 x / total) of the 50 training-section HVGs. "
             "The mean predictor is constant, so its Pearson r is undefined (n/a). Time per fold: the method's "
             "whole run (pixgene: fit, dense prediction over the whole held-out section, read-out); peak RSS: "
             "the process that ran the fold, while the method ran (data of the fold included). Each fold runs in "
             "a fresh process; results from runs before that was so are listed per dataset.", ""]
    if result.get("runs"):
        lines += ["Runs whose results are in these tables (a later run's methods replace an earlier one's):", ""]
        lines += [f"- `{r['command']}`: {r['started']} to {r.get('finished', '(stopped early)')}; {r['machine']}"
                  for r in result["runs"]]
        lines.append("")
    # rows made under other conditions than the rest of their table: {method: explanation}, per dataset
    marks = result.get("marks", {})
    for ds, block in result["datasets"].items():
        methods = block["methods"]
        n = len(block["folds"])
        mark = marks.get(ds, {})
        label = {m: f"{m} *" if m in mark else m for m in methods}
        lines += [f"## {ds}: leave one section out ({n} fold{'s' if n > 1 else ''}), mean over folds", "",
                  "| method | PCC@F | PCC@S | PCC@M | MSE | MAE | time per fold (s) | peak RSS (GB) |",
                  "|---|---|---|---|---|---|---|---|"]
        for m in methods:
            a = block["mean"][m]
            lines.append(f"| {label[m]} | " + " | ".join(_fmt(a[k]) for k in ("PCC@F", "PCC@S", "PCC@M", "MSE", "MAE"))
                         + f" | {_fmt(a['time_s'], 0)} | {_fmt(a['peak_rss_gb'], 2)} |")
        by_reason: dict[str, list[str]] = {}
        for m, why in mark.items():
            by_reason.setdefault(why, []).append(f"`{m}`")
        if by_reason:
            lines += ["", "\\* " + "; ".join(f"{', '.join(ms)}: {why}" for why, ms in by_reason.items())]
        lines += ["", "Per fold (PCC@M / PCC@S):", "",
                  "| method | " + " | ".join(f"test {f['test']}" for f in block["folds"]) + " |",
                  "|---|" + "---|" * len(block["folds"])]
        for m in methods:
            cells = []
            for f in block["folds"]:
                r = f["methods"].get(m, {})
                cells.append(f"{_fmt(r.get('PCC@M'))} / {_fmt(r.get('PCC@S'))}")
            lines.append(f"| {label[m]} | " + " | ".join(cells) + " |")
        lines += ["", "Fold wall time (s): " + ", ".join(f"{f['test']} {f['fold_s']:.0f}" for f in block["folds"]),
                  "", "Methods run in a fresh process for their fold (the others shared one process with the "
                      "earlier folds of their run): " + "; ".join(
                          f"{f['test']} " + (", ".join(m for m, r in f["methods"].items() if r.get("own_process"))
                                             or "none") for f in block["folds"]),
                  "", "Every method reads the images at (um/px): " + ", ".join(
                      f"{f['test']} {f.get('encoder_um_per_px', 'n/a')}" for f in block["folds"]), ""]
        for m in methods:
            fits = [(f["test"], f["methods"][m]["training"]) for f in block["folds"]
                    if m in f["methods"] and "fit_s" in f["methods"][m].get("training", {})]
            if fits:
                derived = [t for t, i in fits if i.get("member_of")]
                parent = dict(fits)[derived[0]]["member_of"] if derived else None
                lines += [f"{m} fit alone, s (best epoch / epochs run{', per member' if _members(fits) else ''}): "
                          + ", ".join(f"{t} {i['fit_s']:.0f} ({_epochs(i)})" for t, i in fits)
                          + (f"; {', '.join(derived)}: member 0 of the fold's `{parent}` model "
                             "(the same weights a fit of one member makes), not fitted again: its fit time is that "
                             "fit less the training of the other members" if derived else ""), ""]
    if result.get("notes"):
        lines += [result["notes"], ""]
    if result.get("cross_scale"):
        lines += ["## Cross-scale (synthetic; dense map read out and scored against the truth)", "",
                  "Ceiling: the expected truth (`truth_expected`, the truth without the cell-to-cell variability "
                  "that no image explains) read out over the same shapes and scored against the truth the same "
                  "way; no predictor from the histology beats it on average.", "",
                  "| trained on | read out over | PCC@F | PCC@S | PCC@M | MSE | ceiling PCC@M | fraction of ceiling |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["cross_scale"]:
            ceiling = r.get("ceiling", {})
            for where, s in r["scores"].items():
                c = ceiling.get(where, {}).get("PCC@M")
                frac = r.get("fraction_of_ceiling", {}).get(where)
                trained = f"{r['train_spot_um']:g} um spots" + (
                    f" ({r['method']})" if r.get("method", "pixgene") != "pixgene" else "")
                lines.append(f"| {trained} | {where} | {_fmt(s['PCC@F'])} | "
                             f"{_fmt(s['PCC@S'])} | {_fmt(s['PCC@M'])} | {_fmt(s['MSE'])} | {_fmt(c)} | "
                             f"{_fmt(frac)} |")
            if "pcc_m_8um_over_training_spots" in r:
                lines.append(f"| | 8 um / training spots (PCC@M ratio) | | | "
                             f"{r['pcc_m_8um_over_training_spots']:.3f} | | "
                             f"{_fmt(r.get('ceiling_8um_over_training_spots'))} | |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="*", default=list(FOLDS), choices=list(FOLDS),
                        help="none: only the cross-scale part")
    parser.add_argument("--methods", nargs="+", default=list(STANDARD), choices=list(METHODS),
                        help="default: the baselines, pixgene, pixgene_single and the three ablations")
    parser.add_argument("--folds", nargs="+", default=None, help="test sections to run (default: all)")
    parser.add_argument("--no-cross-scale", action="store_true")
    parser.add_argument("--cross-scale-method", default="pixgene", choices=list(PIXGENE),
                        help="the pixgene variant the cross-scale part fits (default: pixgene's defaults)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default=None, help="suffix of the result files (partial runs)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the existing .json")
    parser.add_argument("--merge", action="store_true",
                        help="update the existing results: the methods and folds run replace theirs, the rest stays")
    parser.add_argument("--fold-json", default=None, help=argparse.SUPPRESS)  # one fold, in a child process
    args = parser.parse_args()
    name = "accuracy" + (f"_{args.tag}" if args.tag else "")
    if args.render:
        result = json.loads((Path(args.out) / f"{name}.json").read_text())
        (Path(args.out) / f"{name}.md").write_text(render(result) + "\n")
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("pixgene", "numba", "lightning", "pytorch_lightning"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.fold_json:
        (ds,), (test,) = args.datasets, args.folds
        fold = run_fold(ds, FOLDS[ds], test, args.methods, args.seed)
        Path(args.fold_json).write_text(json.dumps(fold))
        return

    import torch

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from pixgene._bench import resolve_precision

    precision = {"bf16": "bfloat16 autocast", "32": "float32"}[resolve_precision("auto")]
    machine = (f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
               f"pixgene computes in {precision}, load average at start {os.getloadavg()[0]:.2f}")
    run = {"command": " ".join(["python benchmarks/accuracy.py", *sys.argv[1:]]),
           "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine}
    if args.merge and (out / f"{name}.json").exists():
        result = json.loads((out / f"{name}.json").read_text())
        if result.get("seed") != args.seed:
            raise SystemExit(f"--merge: {name}.json was run with seed {result.get('seed')}, not {args.seed}")
    else:
        result = {"seed": args.seed, "machine": machine, "datasets": {}}
    result.setdefault("runs", []).append(run)

    def write(final: bool = False) -> None:
        """Results so far (after every fold), so a long run that stops early still leaves its numbers."""
        result["total_s"] = round(time.perf_counter() - t0, 1)
        result["complete"] = final
        result["load_average_at_end"] = round(os.getloadavg()[0], 2)
        # the numbers first, so that they outlive any fault of the rendering
        (out / f"{name}.json").write_text(json.dumps(result, indent=2))
        md = render(result)
        (out / f"{name}.md").write_text(md + "\n")
        if final:
            print(md)

    for ds in args.datasets:
        tests = [s for s in FOLDS[ds] if args.folds is None or s in args.folds]
        block = result["datasets"].get(ds)  # only a merge starts from earlier results
        if block is None:
            block = result["datasets"][ds] = {"methods": [], "folds": []}
        block["methods"] = [m for m in METHODS if m in set(block["methods"]) | set(args.methods)]
        for m in args.methods:  # a rerun row is made under this run's conditions
            result.get("marks", {}).get(ds, {}).pop(m, None)
        for t in tests:
            fold = run_fold_apart(ds, t, args.methods, args.seed)
            old = next((f for f in block["folds"] if f["test"] == t), None)
            if old is None:
                block["folds"].append(fold)
                block["folds"].sort(key=lambda f: FOLDS[ds].index(f["test"]))
            else:
                merge_fold(old, fold)
            block["mean"] = mean_over_folds(block["folds"], block["methods"])
            write()
    if not args.no_cross_scale:
        result["cross_scale"] = cross_scale(args.seed, method=args.cross_scale_method)
    run["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    write(final=True)


def merge_fold(old: dict, new: dict) -> None:
    """Put the methods of a new run of a fold into its earlier record (same genes), fold time adjusted."""
    if old["genes"] != new["genes"]:
        raise SystemExit(f"--merge: fold {new['test']} chose other genes than the earlier run")
    kept = sorted(set(old["methods"]) - set(new["methods"]))
    if old.get("encoder_um_per_px") != new["encoder_um_per_px"] and kept:
        raise SystemExit(f"--merge: fold {new['test']} now reads the images at {new['encoder_um_per_px']} um/px, the "
                         f"earlier run at {old.get('encoder_um_per_px')}; rerun its other methods too: {kept}")
    old["encoder_um_per_px"] = new["encoder_um_per_px"]
    for m, record in new["methods"].items():
        previous = old["methods"].get(m)
        old["fold_s"] = round(old["fold_s"] - (previous["time_s"] if previous else 0.0) + record["time_s"], 1)
        old["methods"][m] = record


if __name__ == "__main__":
    main()
