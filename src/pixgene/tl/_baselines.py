"""Controls to compare against: a colour-only dense map (per-pixel ridge on smoothed RGB)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .._core.keys import IMAGE_KEY, SPOTS_KEY, TABLE_KEY, TOTAL_CHANNEL, UNS_KEY
from .._core.units import record_um_per_px
from .._core.validate import check_genes, check_not_exists
from ..data import prepare_spot_slide

logger = logging.getLogger(__name__)


def colour_features(rgb: np.ndarray, sigmas_px: list[float]) -> np.ndarray:
    """RGB and optical density, each Gaussian-smoothed at several scales: (n_features, H, W)."""
    from scipy import ndimage

    od = -np.log(np.clip(rgb, 1.0 / 255, 1.0))
    planes = [*rgb, *od]
    feats = [ndimage.gaussian_filter(p, s) for s in sigmas_px for p in planes]
    return np.stack(feats).astype(np.float32)


def colour_control(
    sdata: Any,
    *,
    genes: list[str],
    image_key: str = IMAGE_KEY,
    shapes_key: str = SPOTS_KEY,
    table_key: str = TABLE_KEY,
    um_per_px: float = 4.0,
    sigmas_um: tuple[float, ...] = (4.0, 16.0, 48.0),
    alpha: float = 1.0,
    key_added: str | None = None,
    overwrite: bool = False,
):
    """A colour-only control map: ridge regression of spot counts on spot integrals of smoothed colour.

    The model is linear in count space, so the same weights give a per-pixel intensity
    ``max(0, features(x) @ w + b)`` per um^2 and the map is read out like any pixgene map. It sees pixel colour
    only (no morphology or context beyond the smoothing), which is what a dense model has to beat.
    Demo-sized images only: the map is computed in memory.

    Returns
    -------
    The new image element ``f"{image_key}_colour_control"`` (genes then ``pixgene_total_counts``).
    """
    from sklearn.linear_model import Ridge
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale, Sequence

    from .._core.coords import transformations_of
    from ..data import SlideReader

    key = key_added or f"{image_key}_colour_control"
    check_not_exists(sdata, key, overwrite)
    slide = prepare_spot_slide(sdata, image_key=image_key, shapes_key=shapes_key, table_key=table_key)
    genes = check_genes(genes, slide.table.var_names, f"table {table_key!r}")
    reader = SlideReader(sdata.images[image_key], image_um=slide.um_per_px, target_um=um_per_px, name=image_key)
    H, W = reader.shape
    rgb = reader.read(0, 0, W, H)
    feats = colour_features(rgb, [s / um_per_px for s in sigmas_um])
    flat = feats.reshape(len(feats), -1)
    mean, std = flat.mean(1, keepdims=True), flat.std(1, keepdims=True) + 1e-6
    flat = (flat - mean) / std
    ops = slide.area_operator(reader.factor, (H, W)) * um_per_px**2
    area = np.asarray(ops.sum(1)).ravel()
    design = np.column_stack([ops @ flat.T, area])  # spot integrals of each feature, and of 1 (intercept)
    X = slide.table[:, genes].X
    counts = np.column_stack([X.toarray() if hasattr(X, "toarray") else X, np.asarray(slide.table.X.sum(1)).ravel()])
    ridge = Ridge(alpha=alpha, fit_intercept=False).fit(design / area[:, None], counts / area[:, None])
    coef = ridge.coef_  # (outputs, features + 1), per um^2
    lam = np.maximum(coef[:, :-1] @ flat + coef[:, -1:], 0.0).reshape(len(coef), H, W).astype(np.float32)
    f = um_per_px / slide.um_per_px
    transformations = {
        cs: Sequence([Scale([f, f], axes=("y", "x")), t]) for cs, t in transformations_of(sdata.images[image_key]).items()
    }
    element = Image2DModel.parse(lam, dims=("c", "y", "x"), c_coords=[*genes, TOTAL_CHANNEL],
                                 transformations=transformations)
    if overwrite and key in sdata.images:
        del sdata.images[key]
    sdata.images[key] = element
    record_um_per_px(sdata, key, um_per_px)
    record = dict(sdata.attrs.get(UNS_KEY, {}))
    record["dense"] = {**record.get("dense", {}), key: {"model_id": "colour_control", "genes": list(genes),
                                                        "um_per_px": um_per_px}}
    sdata.attrs[UNS_KEY] = record
    return element
