"""Feature standardisation, in one place: per-channel statistics of the encoder's features over the
training tiles, over a slide's own tissue, pooled over slides, and applied to a training cache."""

from __future__ import annotations

import logging

import numpy as np

from ..data import SlideReader, TrainingCache

logger = logging.getLogger(__name__)

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
    from ..data import tissue_mask

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

    from ..nn import inverse_std

    slide_of = np.array([views[0].slide for views in cache.views])
    with torch.inference_mode():  # the cache was written in inference mode
        for si, (means, stds) in enumerate(stats):
            for f, i in zip(cache.features, cache.levels, strict=True):
                mean = means[i].float()[:, None, None]
                inv = inverse_std(stds[i])[:, None, None]
                for t in np.flatnonzero(slide_of == si):  # tile by tile: no float32 copy of a whole slide's cache
                    f[t] = ((f[t].float() - mean) * inv).to(f.dtype)
