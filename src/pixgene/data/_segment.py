"""Nucleus and cell segmentation of H&E tiles by classical image processing (no model, nothing to download).

Building blocks on numpy arrays with every size in pixels (the caller converts microns with the image's
microns per pixel); :func:`pixgene.tl.segment_cells` runs them tile by tile over a SpatialData image:

1. :func:`hematoxylin`: the hematoxylin optical density of every pixel, by colour deconvolution with
   Ruifrok & Johnston's stain vectors (``skimage.color.rgb2hed``);
2. :func:`nuclei_threshold`: one threshold for the whole slide, Otsu's on a sample of its tissue pixels, never
   below :data:`MIN_THRESHOLD_OD` (so that tissue without nuclei is not cut at noise);
3. :func:`nucleus_mask`: a light Gaussian smoothing, the threshold, plus pale nuclei that stand out from
   their own neighbourhood by :data:`LOCAL_CONTRAST` of the threshold (pale stromal nuclei next to dark
   tumour nuclei: one global threshold finds only one of the two); holes up to a nucleus filled
   (vesicular nuclei have pale centres); specks smaller than a small nucleus removed;
4. :func:`split_nuclei`: touching nuclei split by a watershed of the distance transform from
   ``skimage.feature.peak_local_max`` markers at least a minimum distance apart;
5. :func:`expand_cells`: every nucleus grown by a fixed distance into a cell, without overlaps
   (``skimage.segmentation.expand_labels``, as Xenium Ranger and sopa do);
6. :func:`label_polygons`: each label's outline as a valid shapely polygon in pixel coordinates.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: hematoxylin optical density (``rgb2hed`` units) below which no pixel is a nucleus, whatever Otsu says. For
#: scale: glass is ~0, eosin-stained stroma 0.01-0.06, pale nuclei ~0.1, dark (lymphocyte) nuclei 0.2-0.4
MIN_THRESHOLD_OD = 0.03
#: a pixel below the slide's threshold is still nuclear where its smoothed density exceeds its neighbourhood's
#: (a Gaussian of about a nucleus diameter over the densities capped at the threshold) by this share of the
#: threshold; 0.4 finds the pale, elongated stromal nuclei of real H&E beside dark tumour nests
LOCAL_CONTRAST = 0.4


def hematoxylin(rgb: np.ndarray) -> np.ndarray:
    """(y, x, 3) RGB in [0, 1] -> (y, x) float32 hematoxylin optical density (``rgb2hed``'s first channel)."""
    from skimage.color import rgb2hed

    return np.asarray(rgb2hed(np.asarray(rgb, dtype=np.float32))[..., 0], dtype=np.float32)


def nuclei_threshold(samples: np.ndarray) -> float:
    """Otsu's threshold of hematoxylin densities sampled over the tissue, at least :data:`MIN_THRESHOLD_OD`."""
    from skimage.filters import threshold_otsu

    samples = np.asarray(samples, dtype=np.float64).ravel()
    samples = samples[np.isfinite(samples)]
    if samples.size == 0 or np.ptp(samples) <= 0:
        return MIN_THRESHOLD_OD
    return float(max(threshold_otsu(samples, nbins=512), MIN_THRESHOLD_OD))


def nucleus_mask(
    density: np.ndarray,
    threshold: float,
    *,
    sigma_px: float,
    min_area_px: float,
    max_hole_px: float,
    background_sigma_px: float = 0.0,
    contrast: float = LOCAL_CONTRAST,
) -> np.ndarray:
    """Boolean nucleus mask of a hematoxylin density tile.

    ``density`` is smoothed (Gaussian, ``sigma_px``) and thresholded; with ``background_sigma_px`` > 0, pixels
    whose smoothed density exceeds the local background (a Gaussian of ``background_sigma_px`` over the
    densities capped at ``threshold``) by ``contrast`` x ``threshold`` are nuclear too (never below
    :data:`MIN_THRESHOLD_OD`). Holes of up to ``max_hole_px`` are filled (background touching the tile's edge
    is never a hole) and 4-connected objects smaller than ``min_area_px`` dropped.
    """
    from scipy import ndimage

    smooth = np.asarray(density, dtype=np.float32)
    if sigma_px > 0:
        smooth = ndimage.gaussian_filter(smooth, sigma_px)
    mask = smooth > threshold
    if background_sigma_px > 0 and contrast > 0:
        background = ndimage.gaussian_filter(np.minimum(smooth, np.float32(threshold)), background_sigma_px)
        mask |= (smooth - background > contrast * threshold) & (smooth > MIN_THRESHOLD_OD)
    holes, n = ndimage.label(~mask)
    if n:
        sizes = np.bincount(holes.ravel(), minlength=n + 1)
        fill = sizes <= max_hole_px
        fill[0] = False
        edge = np.unique(np.r_[holes[0], holes[-1], holes[:, 0], holes[:, -1]])
        fill[edge] = False  # background reaching the tile's edge is not known to be enclosed
        mask |= fill[holes]
    comps, n = ndimage.label(mask)
    if n:
        keep = np.bincount(comps.ravel(), minlength=n + 1) >= min_area_px
        keep[0] = False
        mask = keep[comps]
    return mask


def split_nuclei(mask: np.ndarray, *, min_distance_px: float) -> np.ndarray:
    """int32 labels (0 = background, 1..n) of the nuclei in ``mask``, touching ones split apart.

    Markers are the peaks of the distance transform (smoothed by a Gaussian of half a pixel, so that the
    plateaus of a discrete transform do not give rows of peaks) at least ``min_distance_px`` apart
    (``skimage.feature.peak_local_max``); a component left without a peak (a small one beside a larger one)
    gets its most interior pixel. The
    watershed of the negated distance from the markers, inside ``mask``, splits each component at its necks.
    """
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    comps, n = ndimage.label(mask)
    if n == 0:
        return np.zeros(mask.shape, dtype=np.int32)
    dist = ndimage.gaussian_filter(ndimage.distance_transform_edt(mask).astype(np.float32), 0.5) * mask
    md = max(1, round(min_distance_px))
    # one call over the whole tile (per-component calls cost ~0.5 ms each): background has distance 0
    peaks = peak_local_max(dist, min_distance=md, threshold_abs=1e-3, exclude_border=False)
    markers = np.zeros(mask.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    has = np.zeros(n + 1, dtype=bool)
    has[comps[tuple(peaks.T)]] = True
    missing = np.flatnonzero(~has[1:]) + 1
    if len(missing):
        where = ndimage.maximum_position(dist, comps, missing)
        for k, (i, j) in enumerate(where):
            markers[i, j] = len(peaks) + 1 + k
    return watershed(-dist, markers, mask=mask).astype(np.int32, copy=False)


def expand_cells(nuclei: np.ndarray, distance_px: float) -> np.ndarray:
    """Cells: every nucleus grown by up to ``distance_px`` without overlaps, each pixel going to the nearest
    nucleus (``skimage.segmentation.expand_labels``; Xenium Ranger and sopa expand nuclei the same way)."""
    from skimage.segmentation import expand_labels

    cells = expand_labels(nuclei, distance=float(distance_px)) if distance_px > 0 else nuclei.copy()
    return cells.astype(np.int32, copy=False)


def label_polygons(labels: np.ndarray, ids: np.ndarray | None = None, *, tolerance: float = 0.0) -> dict:
    """``{label id: shapely Polygon}`` outlining each label (of ``ids``, default all) in pixel coordinates.

    Coordinates are (x, y) = (column, row) in the array's pixel space, pixel ``(i, j)`` covering
    ``[j, j + 1] x [i, i + 1]``. The outline is the 0.5 iso-line of the label's indicator
    (``skimage.measure.find_contours``): it runs through the midpoints between the label's pixel centres and
    its neighbours', so two labels that share an edge share that outline and neighbouring polygons never
    overlap (each pixel corner on the outside is cut at 45 degrees: the polygon's area is the label's pixel
    count minus 1/8 pixel per convex corner plus 1/8 per concave one). Vertices on straight runs are dropped
    (exactly, which keeps the no-overlap property); ``tolerance`` > 0 simplifies further within that many
    pixels (topology preserved). Only the largest 4-connected piece of a label is outlined, with its holes;
    every polygon returned is valid.
    """
    import shapely
    from scipy import ndimage
    from skimage.measure import find_contours

    labels = np.asarray(labels)
    if ids is None:
        ids = np.unique(labels)
        ids = ids[ids > 0]
    boxes = ndimage.find_objects(labels)
    kept, polygons = [], []
    for lab in np.asarray(ids, dtype=np.int64):
        box = boxes[lab - 1] if 0 < lab <= len(boxes) else None
        if box is None:
            continue
        r0, c0 = box[0].start, box[1].start
        crop = np.zeros((box[0].stop - r0 + 2, box[1].stop - c0 + 2), dtype=np.float32)
        crop[1:-1, 1:-1] = labels[box] == lab
        rings = [c for c in find_contours(crop, 0.5) if len(c) >= 4]
        if len(rings) > 1:
            pieces, n = ndimage.label(crop)
            if n > 1:  # several pieces: outline the largest
                crop = (pieces == (np.argmax(np.bincount(pieces.ravel())[1:]) + 1)).astype(np.float32)
                rings = [c for c in find_contours(crop, 0.5) if len(c) >= 4]
        if not rings:
            continue
        # (row, col) in the padded crop -> (x, y) pixel coordinates with pixel centres at +0.5
        rings = [_drop_collinear(np.column_stack([c[:, 1] + (c0 - 0.5), c[:, 0] + (r0 - 0.5)])) for c in rings]
        k = int(np.argmax([np.ptp(r[:, 0]) + np.ptp(r[:, 1]) for r in rings]))  # the outer ring spans the most
        polygons.append(shapely.Polygon(rings[k], holes=[r for i, r in enumerate(rings) if i != k] or None))
        kept.append(int(lab))
    polygons = np.asarray(polygons, dtype=object)
    if tolerance > 0 and len(polygons):
        polygons = shapely.simplify(polygons, tolerance, preserve_topology=True)
    out = {}
    valid = shapely.is_valid(polygons) if len(polygons) else np.zeros(0, dtype=bool)
    for lab, polygon, ok in zip(kept, polygons, valid, strict=True):
        if not ok:
            polygon = _largest_polygon(shapely.make_valid(polygon))
        if polygon is not None and not polygon.is_empty and polygon.area > 0:
            out[lab] = polygon
    return out


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """A closed ring (first point repeated last) without the vertices whose neighbours are in line with them."""
    d = np.diff(ring, axis=0)  # d[k] = edge from vertex k to k + 1; vertex k sits between d[k - 1] and d[k]
    din = np.concatenate([d[-1:], d[:-1]])
    cross = din[:, 0] * d[:, 1] - din[:, 1] * d[:, 0]
    pts = ring[:-1][np.abs(cross) > 1e-9]
    return np.vstack([pts, pts[:1]]) if len(pts) >= 3 else ring


def _largest_polygon(geometry: Any):
    import shapely

    parts = [p for p in shapely.get_parts(geometry) if p.geom_type == "Polygon" and p.area > 0]
    if not parts:
        return None
    return max(parts, key=lambda p: p.area)
