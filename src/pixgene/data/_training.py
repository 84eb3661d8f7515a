"""Training tiles: where to cut them, their cached frozen-encoder features and their spot operators."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ._augment import dihedral, stain_jitter
from ._geometry import concat_ranges, spot_weights
from ._reader import SlideReader

logger = logging.getLogger(__name__)


@dataclass
class SlideSpots:
    """One training slide in encoder pixels."""

    name: str
    reader: SlideReader
    centers: np.ndarray  # (n, 2) x, y in encoder pixels
    radius: float | np.ndarray  # encoder pixels: circles' radius, or each polygon's half extent
    counts: np.ndarray  # (n, G + 1): selected genes then the library size
    train_mask: np.ndarray  # (n,) bool; False = held out for validation
    slide_index: int = 0
    #: (n,) shapely polygons in encoder pixels when the spots are polygons (square bins, ...); None for circles
    polygons: np.ndarray | None = None

    def area_operator(self, ids: np.ndarray, scale: float, corner: tuple[int, int], stride: int, n_out: int):
        """Sparse (len(ids), n_out * n_out) exact overlap areas (output px^2) of spots ``ids`` with the output
        pixels of a view read at ``scale`` encoder pixels per pixel, its top-left corner at ``corner`` (view
        pixels)."""
        radius = self.radius if np.ndim(self.radius) == 0 else self.radius[ids]
        polygons = None if self.polygons is None else self.polygons[ids]
        return spot_weights(self.centers[ids], radius, polygons, (n_out, n_out), scale=scale, corner=corner,
                            stride=stride)


def plan_tiles(centers: np.ndarray, radius, tile: int, margin: int) -> np.ndarray:
    """Top-left corners of few tiles such that every spot lies fully inside the core of at least one.

    ``radius`` is one value for every spot or one per spot (a polygon's half extent). Candidates on a grid fine
    enough that each spot fits some candidate; then a greedy set cover (the candidate that holds the most spots
    not yet covered, the first in row-major order on ties). Each spot's candidates are found from its position
    on the grid, so memory and time grow with the number of spots, not with spots x candidates.
    """
    centers = np.asarray(centers, dtype=float).reshape(-1, 2)
    n = len(centers)
    r = np.broadcast_to(np.asarray(radius, dtype=float), (n,))
    r_max = float(r.max()) if n else float(np.max(radius, initial=0.0))
    core = tile - 2 * margin
    if 2 * r_max > core:
        raise ValueError(f"spots of diameter {2 * r_max:.0f} px do not fit a {tile} px tile with margin {margin}")
    if n == 0:
        return np.zeros((0, 2), dtype=int)
    step = max(8, int((core - 2 * r_max) // 2))
    lo = np.floor(centers.min(0) - tile).astype(int)
    hi = np.ceil(centers.max(0)).astype(int)
    axes = [np.arange(lo[k], hi[k] + 1, step) for k in (0, 1)]
    nx_all = len(axes[0])
    pairs = [_candidate_pairs(centers[i : i + _PLAN_CHUNK], r[i : i + _PLAN_CHUNK], i, axes, lo, step, tile,
                              margin) for i in range(0, n, _PLAN_CHUNK)]
    cand = np.concatenate([c for c, _ in pairs])  # grouped by spot, spots in order
    spot = np.concatenate([j for _, j in pairs])
    spot_start = np.searchsorted(spot, np.arange(n + 1))
    by_cand = np.argsort(cand, kind="stable")
    cand_spots = spot[by_cand]
    cand_start = np.searchsorted(cand[by_cand], np.arange(nx_all * len(axes[1]) + 1))
    gain = np.bincount(cand, minlength=nx_all * len(axes[1]))
    uncovered = np.ones(n, dtype=bool)
    chosen = []
    while True:
        best = int(np.argmax(gain))
        if gain[best] == 0:
            break
        chosen.append((axes[0][best % nx_all], axes[1][best // nx_all]))
        newly = cand_spots[cand_start[best] : cand_start[best + 1]]
        newly = newly[uncovered[newly]]
        uncovered[newly] = False
        # every candidate that held a newly covered spot gains one spot less
        np.subtract.at(gain, cand[concat_ranges(spot_start[newly], spot_start[newly + 1])], 1)
    return np.asarray(chosen, dtype=int).reshape(-1, 2)


#: spots whose candidate tiles are listed at a time (bounds the memory of planning a grid of many bins)
_PLAN_CHUNK = 32768


def _candidate_pairs(centers, r, first_spot, axes, lo, step, tile, margin) -> tuple[np.ndarray, np.ndarray]:
    """(candidate, spot) of every candidate corner whose tile core holds a spot: each spot's range of corners
    on the grid, one wider on each side, then the exact comparison :func:`spots_inside` makes."""
    lims = []
    for k in (0, 1):
        a = np.floor((centers[:, k] + r - tile + margin - lo[k]) / step).astype(np.int64) - 1
        z = np.floor((centers[:, k] - r - margin - lo[k]) / step).astype(np.int64) + 1
        lims.append((np.clip(a, 0, len(axes[k]) - 1), np.clip(z, 0, len(axes[k]) - 1)))
    (x_a, x_z), (y_a, y_z) = lims
    nx = np.maximum(x_z - x_a + 1, 0)
    per_spot = nx * np.maximum(y_z - y_a + 1, 0)
    spot = np.repeat(np.arange(len(centers)), per_spot)
    k = concat_ranges(np.zeros(len(centers), dtype=np.int64), per_spot)
    ix = x_a[spot] + k % np.maximum(nx, 1)[spot]
    iy = y_a[spot] + k // np.maximum(nx, 1)[spot]
    cx, cy, rr = centers[spot, 0], centers[spot, 1], r[spot]
    gx, gy = axes[0][ix], axes[1][iy]
    ok = ((cx >= gx + margin + rr) & (cx <= gx + tile - margin - rr)
          & (cy >= gy + margin + rr) & (cy <= gy + tile - margin - rr))
    return (iy * len(axes[0]) + ix)[ok], spot[ok] + first_spot


def spots_inside(corners: np.ndarray, centers: np.ndarray, radius, tile: int, margin: int) -> np.ndarray:
    """(n_corners, n_spots): whether each spot (``radius`` one value or one per spot) lies in each tile's core."""
    r = np.asarray(radius, dtype=float)
    if r.ndim:
        r = r[None, :, None]
    lo = corners[:, None, :] + margin + r
    hi = corners[:, None, :] + tile - margin - r
    c = centers[None, :, :]
    return np.all((c >= lo) & (c <= hi), axis=-1)


@dataclass
class TileView:
    slide: int
    spot_ids: np.ndarray  # indices into the slide's spots
    rows: np.ndarray  # nonzero entries of the (spots x output pixels) area operator, um^2
    cols: np.ndarray
    weights: np.ndarray
    dihedral: int


@dataclass
class TrainingCache:
    """Frozen-encoder features of every (tile, view), and what each view supervises."""

    features: list | None  # per decoder level: tensor (n_tiles, n_views, C, h, w) float16; None if images
    views: list[list[TileView]]  # [tile][view]
    slides: list[SlideSpots]
    tile: int
    out_stride: int
    levels: list[int] = field(default_factory=list)
    images: object = None  # (n_tiles, n_views, 3, tile, tile) uint8 when the encoder is fine-tuned
    #: ``expand(k, cached, (tile, tile))`` -> decoder level ``k`` when ``features`` hold the encoder's compact
    #: form (a ViT's token grids); None when they are the levels themselves
    expand: object = None

    @property
    def n_tiles(self) -> int:
        return len(self.views)

    def level(self, k: int, cached):
        """Decoder level ``k`` of a batch of cached entries (B, C, h, w): float32, expanded if compact."""
        import torch

        x = cached.float()
        if self.expand is None:
            return x
        return self.expand(k, x, (self.tile, self.tile)).contiguous(memory_format=torch.channels_last)


def build_cache(
    slides: list[SlideSpots],
    module,
    *,
    tile: int,
    margin: int,
    n_views: int,
    stain_strength: float,
    rng: np.random.Generator,
    scale_jitter: float = 0.0,
    keep_images: bool = False,
    context: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    store=None,
) -> TrainingCache:
    """Encode every training tile ``n_views`` times (view 0 plain; others dihedral + shift + stain jitter, and
    with ``scale_jitter`` > 0 a magnification drawn from [1 - scale_jitter, 1 + scale_jitter]).

    A view at scale ``s`` is read on a grid of ``s`` encoder pixels per pixel, centred on its tile; spot
    centres and radii are divided by ``s`` and the output pixels' areas multiplied by ``s**2``, so the spot
    integrals stay exact. ``keep_images`` stores the views' pixels (uint8) instead of their features, for
    fine-tuning the encoder.

    ``context`` > 0 (encoder pixels, a multiple of the encoder's coarsest stride) encodes each view with that
    much more image on every side and keeps the features of the tile itself: the encoder then sees around a
    tile what it sees there when a whole slide is predicted (tiles with a wide halo), instead of the padding
    at the tile's edge. Not with ``keep_images`` or an encoder with a compact form.

    ``store`` (a :class:`pixgene.tl._feature_cache.FeatureCache` of these inputs) supplies the features when it
    holds them, and otherwise receives them once encoded. The views are drawn from ``rng`` either way; the stain
    jitter's draws are then skipped, so ``rng`` is left where an encoding would leave it only when one runs.
    """
    import torch
    from tqdm.auto import tqdm

    s = module.out_stride
    out_um = slides[0].reader.target_um * s
    levels = module.used_levels
    # a ViT's token grids are cached instead of the pyramid resampled from them (several times smaller)
    encoder = getattr(module, "encoder", None)
    compact = encoder is not None and not getattr(encoder, "compact_is_pyramid", True)
    if context:
        if keep_images or compact:
            raise ValueError("context is for cached features of a pyramid encoder (not fine-tuning, not compact)")
        if context < 0 or any(context % encoder.reductions[i] or tile % encoder.reductions[i] for i in levels):
            raise ValueError(f"context {context} and tile {tile} must be multiples of the levels' strides")
    jobs = []  # (slide, x0, y0, view, dihedral, jitter, scale)
    for si, slide in enumerate(slides):
        corners = plan_tiles(slide.centers, slide.radius, tile, margin)
        for x0, y0 in corners:
            tile_jobs = []
            ids = spots_inside(np.array([[x0, y0]]), slide.centers, slide.radius, tile, margin)[0]
            for v in range(n_views):
                d = 0 if v == 0 else int(rng.integers(0, 8))
                scale = 1.0 if v == 0 or scale_jitter <= 0 else float(rng.uniform(1 - scale_jitter, 1 + scale_jitter))
                # the tile's centre stays put on the slide; coordinates below are in pixels of the view's grid
                cx, cy = round((x0 + tile / 2) / scale - tile / 2), round((y0 + tile / 2) / scale - tile / 2)
                r = slide.radius[ids] if np.ndim(slide.radius) else slide.radius
                shift = (0, 0) if v == 0 else _random_shift(slide.centers[ids] / scale, r / scale,
                                                            cx, cy, tile, margin, s, rng)
                tile_jobs.append((si, int(cx + shift[0]), int(cy + shift[1]), v, d, v > 0, scale))
            jobs.append(tile_jobs)
    logger.info("training on %d tiles x %d views of %d px", len(jobs), n_views, tile)

    views: list[list[TileView]] = []
    feats = None
    if store is not None:
        if keep_images:
            raise ValueError("a feature store holds encoded features, not the pixels kept for fine-tuning")
        feats = store.load(len(jobs), n_views, list(levels))
    pixels = torch.empty((len(jobs), n_views, 3, tile, tile), dtype=torch.uint8) if keep_images else None
    flat = [j for tile_jobs in jobs for j in tile_jobs]
    device = next(module.parameters()).device
    if feats is None:  # not supplied by the store: encode (or read) every view
        desc = "reading training tiles" if keep_images else "encoding training tiles"
        bar = tqdm(total=len(flat), desc=desc, unit="view", disable=not progress)

        def read_batch(start: int) -> list:
            images = []
            for si, x0, y0, _, d, jitter, scale in flat[start : start + batch_size]:
                side = tile + 2 * context
                img = slides[si].reader.read(x0 - context, y0 - context, side, side, scale=scale)
                if jitter and stain_strength > 0:
                    img = stain_jitter(img, rng, stain_strength)
                images.append(dihedral(torch.from_numpy(img), d))
            return images

        # one thread reads (and jitters) the next batch while this one is encoded: numpy and the reads release
        # the GIL; a single worker keeps the batches, and so the draws from ``rng``, in order
        with torch.inference_mode(), ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(read_batch, 0)
            for start in range(0, len(flat), batch_size):
                images = pending.result()
                if start + batch_size < len(flat):
                    pending = pool.submit(read_batch, start + batch_size)
                if keep_images:
                    for k, img in enumerate(images):
                        t, v = divmod(start + k, n_views)
                        pixels[t, v] = (img * 255 + 0.5).clamp(0, 255).to(torch.uint8)
                    bar.update(len(images))
                    continue
                x = torch.stack(images).to(device)
                out = module.encode_compact(x) if compact else module.encode(x)
                if context:
                    # the tile's own cells of every level (the dihedral turned the read square about its
                    # centre)
                    out = list(out)
                    for i in levels:
                        a, n = context // encoder.reductions[i], tile // encoder.reductions[i]
                        out[i] = out[i][..., a : a + n, a : a + n]
                # one device-to-host copy per level and batch
                out = {i: out[i].to("cpu", torch.float16) for i in levels}
                if feats is None:
                    feats = [
                        torch.empty((len(jobs), n_views, *out[i].shape[1:]), dtype=torch.float16) for i in levels
                    ]
                for k in range(len(images)):
                    t, v = divmod(start + k, n_views)
                    for f, i in zip(feats, levels, strict=True):
                        f[t, v] = out[i][k]
                bar.update(len(images))
        bar.close()
        if store is not None:
            store.save(feats, list(levels))

    for tile_jobs in jobs:
        tile_views = []
        for si, x0, y0, _, d, _, scale in tile_jobs:
            slide = slides[si]
            centers, radius = slide.centers / scale, slide.radius / scale
            ids = np.flatnonzero(spots_inside(np.array([[x0, y0]]), centers, radius, tile, margin)[0])
            op = slide.area_operator(ids, scale, (x0, y0), s, tile // s).tocoo()
            tile_views.append(
                TileView(si, ids, op.row.astype(np.int64), op.col.astype(np.int64),
                         op.data * (out_um * scale) ** 2, d)
            )
        views.append(tile_views)
    return TrainingCache(features=feats, views=views, slides=slides, tile=tile, out_stride=s, levels=levels,
                         images=pixels, expand=encoder.expand_level if compact and feats is not None else None)


def _random_shift(c, radius, x0, y0, tile, margin, stride, rng) -> tuple[int, int]:
    """A shift (multiple of the output stride) that keeps the spots ``c`` fully inside the tile's core."""
    if len(c) == 0:
        return 0, 0
    r = np.broadcast_to(np.asarray(radius, dtype=float), (len(c),))[:, None]  # one radius, or one per spot
    c_hi, c_lo = (c + r).max(0), (c - r).min(0)
    lo = (c_hi + margin - tile) - np.array([x0, y0])  # most negative allowed shift
    hi = (c_lo - margin) - np.array([x0, y0])
    lo, hi = np.ceil(lo / stride), np.floor(hi / stride)
    dx = int(rng.integers(int(lo[0]), int(hi[0]) + 1)) if hi[0] >= lo[0] else 0
    dy = int(rng.integers(int(lo[1]), int(hi[1]) + 1)) if hi[1] >= lo[1] else 0
    return dx * stride, dy * stride


class _Moments:
    """Running per-channel sums (float64) of feature maps, for means and standard deviations."""

    def __init__(self) -> None:
        self.sums: dict = {}
        self.squares: dict = {}
        self.counts: dict[int, int] = {}

    def add(self, i: int, x) -> None:  # x (..., C, h, w)
        x = x.float().movedim(-3, 0).reshape(x.shape[-3], -1)
        self.sums[i] = self.sums.get(i, 0) + x.sum(1).double()
        self.squares[i] = self.squares.get(i, 0) + x.square().sum(1).double()
        self.counts[i] = self.counts.get(i, 0) + x.shape[1]

    def result(self) -> tuple[dict, dict]:
        means = {i: self.sums[i] / self.counts[i] for i in self.sums}
        stds = {i: (self.squares[i] / self.counts[i] - means[i].square()).clamp_min(0).sqrt().float() for i in means}
        return {i: m.float() for i, m in means.items()}, stds


def feature_stats(cache: TrainingCache, module) -> tuple[dict, dict]:
    """Per-channel mean and standard deviation of every cached decoder level over all tiles and views.

    With a fine-tuned encoder (pixels cached instead of features) the frozen encoder is run once over the plain
    view of every tile.
    """
    import torch

    moments = _Moments()
    chunk = 16
    if cache.features is not None:
        for f, i in zip(cache.features, cache.levels, strict=True):
            step = chunk if cache.expand is None else max(1, chunk // f.shape[1])  # expanded levels are larger
            for t in range(0, f.shape[0], step):
                moments.add(i, cache.level(i, f[t : t + step].flatten(0, 1)))
    else:
        device = next(module.encoder.parameters()).device
        with torch.inference_mode():
            for t in range(0, cache.images.shape[0], chunk):
                out = module.encode(cache.images[t : t + chunk, 0].float().div(255.0).to(device))
                for i in cache.levels:
                    moments.add(i, out[i].cpu())
    return moments.result()


#: tiles (centred on random tissue) whose features give a slide's own channel statistics
SLIDE_STATS_TILES = 32


def stats_tile_corners(mask: np.ndarray, mask_factor: float, reader: SlideReader, tile: int, n_tiles: int,
                       seed: int = 0) -> np.ndarray:
    """Top-left corners (encoder pixels) of up to ``n_tiles`` tiles centred on distinct random tissue pixels of
    ``mask`` (mask pixel = ``mask_factor`` image pixels), in a fixed order for a given seed."""
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return np.zeros((0, 2), dtype=int)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(rows), size=min(n_tiles, len(rows)), replace=False))
    centres = np.column_stack([cols[pick] + 0.5, rows[pick] + 0.5]) * mask_factor / reader.factor
    return np.round(centres - tile / 2).astype(int)


def slide_feature_stats(
    sdata,
    image_key: str,
    reader: SlideReader,
    module,
    *,
    image_um: float | None = None,
    mask: tuple[np.ndarray, float] | None = None,
    tile: int = 256,
    n_tiles: int = SLIDE_STATS_TILES,
    batch_size: int = 8,
    seed: int = 0,
) -> tuple[dict, dict]:
    """One slide's own per-channel mean and standard deviation of the decoder's encoder levels.

    Computed over the plain (unaugmented) pixels of up to ``n_tiles`` tiles of ``tile`` encoder pixels, centred
    on random pixels of the slide's tissue mask. Training and prediction call this same function, so a slide is
    standardised the same way whether its spots were measured or not: what differs between slides in staining
    and scanning (a shift or rescaling of every channel) is taken out before the decoder.
    ``mask`` is the slide's ``tissue_mask`` (``(mask, factor)``) when the caller already has it.
    """
    import torch

    from .._core.validate import fail
    from ._mask import tissue_mask

    mask, mask_factor = mask if mask is not None else tissue_mask(sdata, image_key, image_um_per_px=image_um)
    corners = stats_tile_corners(mask, mask_factor, reader, tile, n_tiles, seed)
    if len(corners) == 0:
        fail(f"image {image_key!r}", "the tissue mask found no tissue to take the slide's feature statistics from",
             "Check the image (pg.pl can show it), or fit with standardize_features='training' (the training "
             "slides' statistics, applied to every slide)")
    moments = _Moments()
    device = next(module.encoder.parameters()).device
    levels = module.used_levels
    with torch.inference_mode():
        for start in range(0, len(corners), batch_size):
            batch = corners[start : start + batch_size]
            images = torch.stack([torch.from_numpy(reader.read(int(x0), int(y0), tile, tile)) for x0, y0 in batch])
            out = module.encode(images.to(device))
            for i in levels:
                moments.add(i, out[i].cpu())
    return moments.result()


def pool_stats(stats: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """Mean and standard deviation of the equal-weight mixture of several slides' ``(means, stds)``."""
    means = {i: sum(m[i].double() for m, _ in stats) / len(stats) for i in stats[0][0]}
    second = {i: sum(s[i].double().square() + m[i].double().square() for m, s in stats) / len(stats) for i in means}
    stds = {i: (second[i] - means[i].square()).clamp_min(0).sqrt().float() for i in means}
    return {i: m.float() for i, m in means.items()}, stds


def standardize_cache(cache: TrainingCache, stats: list[tuple[dict, dict]]) -> None:
    """Standardise the cached features of every slide's tiles, in place, with that slide's ``(means, stds)``.

    Compact (token-grid) entries are standardised as they are: each level is a resampling whose weights sum to
    one, which commutes with a per-channel shift and scale.
    """
    import torch

    from ..nn._decoder import inverse_std

    slide_of = np.array([views[0].slide for views in cache.views])
    with torch.inference_mode():  # the cache was written in inference mode
        for si, (means, stds) in enumerate(stats):
            for f, i in zip(cache.features, cache.levels, strict=True):
                mean = means[i].float()[:, None, None]
                inv = inverse_std(stds[i])[:, None, None]
                for t in np.flatnonzero(slide_of == si):  # tile by tile: no float32 copy of a whole slide's cache
                    f[t] = ((f[t].float() - mean) * inv).to(f.dtype)
