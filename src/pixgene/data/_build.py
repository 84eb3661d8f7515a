"""Assemble the pixgene data model: RGB image, circle spots in image pixels, linked raw-count table."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._core.keys import IMAGE_KEY, INSTANCE_KEY, REGION_KEY, SPOTS_KEY, TABLE_KEY, UNS_KEY
from .._core.units import record_um_per_px, validate_um_per_px
from .._core.validate import check_raw_counts, fail

logger = logging.getLogger(__name__)

#: images larger than this on a side get a multiscale pyramid
MULTISCALE_ABOVE_PX = 4096


def parse_rgb_image(image: Any, *, name: str, transformations: dict | None = None, chunks: int = 1024) -> Any:
    """(y, x, 3) or (3, y, x) array to a spatialdata image element (dims c, y, x; multiscale when large)."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    array = image if hasattr(image, "dask") else np.asarray(image)
    if array.ndim != 3 or 3 not in (array.shape[0], array.shape[-1]):
        fail(f"image {name!r}", f"has shape {array.shape}, not an RGB (y, x, 3) or (3, y, x) array", "Pass RGB")
    if array.shape[0] != 3:
        array = array.transpose(2, 0, 1)
        if isinstance(array, np.ndarray):
            # channel planes contiguous: every later read of a region is a plain slice, not a strided gather
            array = np.ascontiguousarray(array)
    scale_factors = None
    if max(array.shape[1:]) > MULTISCALE_ABOVE_PX:
        n = int(np.ceil(np.log2(max(array.shape[1:]) / MULTISCALE_ABOVE_PX)))
        scale_factors = [2] * n
    return Image2DModel.parse(
        array,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations=transformations or {"global": Identity()},
        scale_factors=scale_factors,
        chunks=(3, chunks, chunks),
    )


def build_spot_sdata(
    image: Any,
    *,
    centers_px: np.ndarray,
    spot_diameter_um: float,
    um_per_px: float,
    counts: Any,
    var_names: Sequence[str],
    obs_names: Sequence[str],
    obs: pd.DataFrame | None = None,
    platform: str = "unknown",
    image_key: str = IMAGE_KEY,
    shapes_key: str = SPOTS_KEY,
    table_key: str = TABLE_KEY,
    image_transformations: dict | None = None,
    library_id: str | None = None,
) -> Any:
    """Build a SpatialData in the pixgene data model.

    ``centers_px`` are (x, y) spot centres in the image's pixel space; the spots get the image's own
    transformations so they overlay it in every coordinate system.
    """
    import anndata as ad
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel

    um_per_px = validate_um_per_px(um_per_px, image_key)
    centers_px = np.asarray(centers_px, dtype=float)
    obs_names = pd.Index([str(o) for o in obs_names])
    if centers_px.shape != (len(obs_names), 2):
        fail(f"shapes {shapes_key!r}", f"{centers_px.shape} centres for {len(obs_names)} spots", "Give one (x, y) each")
    X = sp.csr_matrix(counts)
    if X.shape != (len(obs_names), len(var_names)):
        fail(f"table {table_key!r}", f"counts shape {X.shape} != (spots, genes)", "Align counts with spots and genes")
    check_raw_counts(X, f"table {table_key!r}")
    X = X.astype(np.float32)

    img = parse_rgb_image(image, name=image_key, transformations=image_transformations)
    radius_px = spot_diameter_um / um_per_px / 2.0
    from .._core.coords import transformations_of

    shapes = ShapesModel.parse(
        centers_px,
        geometry=0,
        radius=np.full(len(obs_names), radius_px),
        index=obs_names,
        transformations=transformations_of(img),
    )
    obs = pd.DataFrame(index=obs_names) if obs is None else obs.copy()
    obs.index = obs_names
    obs[REGION_KEY] = pd.Categorical([shapes_key] * len(obs_names))
    obs[INSTANCE_KEY] = obs_names.to_numpy()
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index([str(v) for v in var_names])))
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    adata.obsm["spatial"] = centers_px.copy()
    adata.uns[UNS_KEY] = {
        "platform": platform,
        "spot_diameter_um": float(spot_diameter_um),
        "image_key": image_key,
        "library_id": library_id or image_key,
    }
    table = TableModel.parse(adata, region=shapes_key, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    sdata = SpatialData(images={image_key: img}, shapes={shapes_key: shapes}, tables={table_key: table})
    record_um_per_px(sdata, image_key, um_per_px)
    logger.info(
        "built %s slide: %d spots x %d genes, %.4g um/px, spot diameter %.1f px",
        platform, X.shape[0], X.shape[1], um_per_px, 2 * radius_px,
    )
    return sdata
