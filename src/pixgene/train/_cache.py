"""Encoding the training tiles: every tile and view through the frozen encoder, once, into a cache."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..data import SlideSpots, TileView, TrainingCache, dihedral, plan_tiles, spots_inside, stain_jitter

logger = logging.getLogger(__name__)

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
