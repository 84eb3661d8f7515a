"""Read a dense expression map out over shapes or labels: expected counts per cell, bin or spot."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._core.keys import (
    AREA_OBS,
    CELLS_KEY,
    COVERAGE_OBS,
    INSTANCE_KEY,
    REGION_KEY,
    SD_LAYER,
    TOTAL_CHANNEL,
    TOTAL_OBS,
    TOTAL_SD_OBS,
    UNS_KEY,
    member_channel,
    member_layer,
    members_key,
    quantile_layer,
    readout_key,
)
from .._core.keys import (
    dense_key as default_dense_key,
)
from .._core.nb import nb_mixture_quantiles, nb_quantiles, pooled_theta
from .._core.validate import check_not_exists, fail, require_element

logger = logging.getLogger(__name__)

_POINT, _POLYGON, _MULTIPOLYGON = 0, 3, 6
#: delta degrees of freedom of the members' standard deviation (``layers["pixgene_sd"]``): the members are the
#: ensemble itself, not a sample of some larger one, and their mixture's variance (mean of the members'
#: variances plus the variance of their means, ddof 0) is what ``interval_kind="mixture"`` draws on
SD_DDOF = 0
INTERVAL_KINDS = ("nb", "mixture")


def aggregate(
    sdata: Any,
    *,
    shapes: str = CELLS_KEY,
    dense_key: str | None = None,
    image_key: str | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
    block_px: int = 2048,
    uncertainty: bool | None = None,
    interval: float | Sequence[float] | None = None,
    interval_kind: str = "nb",
    keep_members: bool = False,
    inplace: bool = True,
    progress: bool = True,
) -> Any:
    """Expected counts of every gene in every shape: the exact integral of the dense map over the shape.

    The map (counts per um^2, piecewise constant on its pixels) is integrated over circles, polygons
    (holes included) or the regions of a labels raster, exactly, block by block, so maps far larger than
    memory work. Overlapping shapes each get their full integral. Normalise after aggregating, by the
    predicted library size: :func:`pixgene.pp.log_normalize` (``log1p(1e4 x / obs["pixgene_total_counts"])``,
    as :func:`pixgene.tl.evaluate` compares with measured data). ``sc.pp.normalize_total`` would divide by the
    sum of the modelled genes, which is not a library size and scores lower.

    Parameters
    ----------
    sdata
        SpatialData with the dense map and the shapes or labels.
    shapes
        Name of a shapes element (circles with a ``radius`` column, or polygons / multipolygons) or of a
        labels element (one region per non-zero label id, each label pixel counted with its exact area).
    dense_key
        Dense map image element. Default: ``dense_key(image_key)`` when ``image_key`` is given, else the
        only image element whose name ends with ``"_pixgene"``.
    image_key
        H&E image the map was predicted from (only used to derive ``dense_key``).
    key_added
        Name of the new table; default :func:`pixgene._core.keys.readout_key` (``f"{shapes}_pixgene"``).
    overwrite
        Replace an existing element or table named ``key_added``.
    block_px
        Side, in map pixels, of the map blocks read at a time (memory ~ block_px^2 x channels).
    uncertainty
        Read the members' own maps out too (stored by ``pg.tl.predict_dense(uncertainty=True)`` as
        ``f"{dense_key}_members"``) and add the members' spread: ``layers["pixgene_sd"]``. Default: when the
        map has them. The members' maps are read in a second pass, in blocks of ``block_px / sqrt(n_members)``
        so that a block holds about as much as one of the mean map's; ``X`` is exactly what it is without them.
    interval
        Count-level predictive interval(s) of each shape: a central probability (``0.9``) or several
        (``(0.5, 0.9)``); each adds the layers of its two quantiles (``0.9``: ``"pixgene_q05"`` and
        ``"pixgene_q95"``). Default: none. The counts follow a negative binomial with the fitted inverse
        dispersion ``theta`` of each gene (recorded with the map by ``predict_dense``) and mean the shape's
        expected count, on the scale of the model's training slides (their capture efficiencies' geometric
        mean: scale ``X`` and the quantiles' means yourself for a slide sequenced deeper or shallower, as
        ``benchmarks/uncertainty.py`` does with :func:`nb_quantiles`).
    interval_kind
        ``"nb"``: one negative binomial of mean ``X`` and the members' geometric mean ``theta``;
        ``"mixture"``: the equal mixture of the members' negative binomials, each of mean the member's own
        read-out and with its own ``theta`` (needs the members' maps): wider where the members disagree.
    keep_members
        Also store each member's own read-out as ``layers[f"pixgene_member{k}"]`` (needs the members' maps).
    inplace
        Store the table in ``sdata.tables[key_added]`` (and write it to the zarr store when ``sdata`` is
        backed by one); otherwise only return it.
    progress
        Show a tqdm progress bar over map (or labels) blocks.

    Returns
    -------
    AnnData annotating ``shapes`` (region ``shapes``, region_key ``"region"``, instance_key
    ``"instance_id"``) with:

    - ``X``: float32 (n, genes) expected counts (the map's gene channels; not the total channel).
    - ``obs["pixgene_total_counts"]``: integral of the total-count channel (only when the map has one).
    - ``obs["pixgene_coverage"]``: fraction of the shape's area that lies on the map.
    - ``obs["pixgene_area_um2"]``: full area of the shape in um^2.
    - ``obs["region"]`` (categorical) and ``obs["instance_id"]``: the shapes' key and index (label ids
      for labels).
    - ``obsm["spatial"]``: centroids in the shapes' own intrinsic coordinates.
    - ``uns["pixgene"]``: ``params`` (every argument), ``dense_key`` and ``dense`` (the map's metadata from
      ``sdata.attrs["pixgene"]["dense"]``).

    With the members' maps (``uncertainty``):

    - ``layers["pixgene_sd"]``: float32 (n, genes), the standard deviation across the members (ddof 0) of
      their own expected counts: each member's map integrated over the shape, exactly, then the spread of
      those integrals (not an integral of a per-pixel spread, which would overstate it).
    - ``obs["pixgene_total_counts_sd"]``: the same for the total-count channel.
    - ``layers[f"pixgene_member{k}"]`` with ``keep_members``.
    - ``uns["pixgene"]["uncertainty"]``: ``members_key``, ``n_members``, ``ddof``.

    With ``interval``: ``layers[quantile_layer(q)]`` float32 (n, genes) for each quantile ``q`` (whole counts),
    and ``uns["pixgene"]["interval"]``: ``levels``, ``quantiles``, ``kind``, ``layers`` and ``theta`` (the
    inverse dispersion per gene the ``"nb"`` kind used, or per member and gene for ``"mixture"``).

    Shapes entirely off the map get zero counts and coverage 0; drop them before normalising
    (``adata[adata.obs["pixgene_coverage"] > 0]``), as scanpy warns about cells with zero counts.
    """
    from .._core.coords import affine_between
    from .._core.raster import full_resolution

    is_labels = shapes in sdata.labels
    if not is_labels and shapes not in sdata.shapes:
        have = ", ".join(map(repr, sorted([*sdata.shapes, *sdata.labels]))) or "none"
        cells = ("Make cells from the H&E with pg.tl.segment_cells(sdata), or bring in a segmentation made "
                 "elsewhere (GeoJSON, label mask, Xenium cell boundaries) with pg.io.read_cells(sdata, path); "
                 if "cell" in str(shapes).lower() else "")
        fail(
            f"shapes {shapes!r}",
            f"not found among the shapes or labels elements (they are: {have})",
            f"{cells}Pass shapes=<name of a shapes or labels element>, or make square bins with "
            "pg.tl.make_grid(sdata, bin_um=8)",
        )
    dense_key = _resolve_dense_key(sdata, dense_key, image_key)
    dense = full_resolution(require_element(sdata, dense_key, "images"))
    if tuple(dense.dims) != ("c", "y", "x"):
        fail(f"image {dense_key!r}", f"has dims {tuple(dense.dims)}, not ('c', 'y', 'x')", "Pass a dense map")
    if int(block_px) < 1:
        fail("aggregate", f"block_px={block_px!r} is not a positive integer", "Pass block_px >= 1")
    key_added = readout_key(shapes) if key_added is None else key_added
    if inplace:
        check_not_exists(sdata, key_added, overwrite)
    um_per_px = _map_um_per_px(sdata, dense_key, image_key)
    channels = [str(c) for c in dense.coords["c"].values]
    if not any(c != TOTAL_CHANNEL for c in channels):
        fail(f"image {dense_key!r}", "has no gene channels", "Pass a dense map with gene names as channels")
    meta = _dense_meta(sdata, dense_key)
    levels = _interval_levels(interval)
    if interval_kind not in INTERVAL_KINDS:
        fail("interval_kind", f"{interval_kind!r} is not one of {INTERVAL_KINDS}",
             "Pass interval_kind='nb' or 'mixture'")
    members = _members_map(sdata, dense_key, dense, channels, meta, uncertainty,
                           needed_by=("keep_members=True" if keep_members else
                                      "interval_kind='mixture'" if levels and interval_kind == "mixture" else None))
    theta = None
    if levels:
        theta = meta.get("nb_theta")
        if not theta:
            fail(f"image {dense_key!r}", "has no negative-binomial dispersion recorded (a map of a model fitted "
                 "with likelihood='poisson', of a list of models, or not made by pg.tl.predict_dense)",
                 "Pass interval=None, or predict the map again with one model fitted with likelihood='nb'")
        theta = np.asarray(theta, dtype=np.float64)
        if theta.shape[-1] != len(channels) or (members is not None and theta.shape[0] != members[1]):
            fail(f"image {dense_key!r}", f"its recorded dispersion (shape {theta.shape}) does not match its "
                 f"{len(channels)} channels", "Predict the map again with pg.tl.predict_dense")
    affine = affine_between(sdata, shapes, dense_key)
    if is_labels:
        labels = _checked_labels(sdata, shapes)
    else:
        mapped, radii, centroids = _shapes_in_map_pixels(sdata, shapes, affine)

    params = {
        "shapes": shapes,
        "dense_key": dense_key,
        "image_key": image_key,
        "key_added": key_added,
        "overwrite": bool(overwrite),
        "block_px": int(block_px),
        "uncertainty": uncertainty if uncertainty is None else bool(uncertainty),
        "interval": None if not levels else list(levels),
        "interval_kind": interval_kind,
        "keep_members": bool(keep_members),
        "inplace": bool(inplace),
        "progress": bool(progress),
    }
    if is_labels:
        from ..data import integrate_labels

        result = integrate_labels(
            dense.data, labels.data, affine, um_per_px=um_per_px, block_px=int(block_px), progress=progress
        )
        if len(result.label_ids) == 0:
            fail(f"labels {shapes!r}", "contain no non-zero label", "Pass labels with segmented regions")
        instance_ids, centroids = result.label_ids, result.centroids
        if members is not None:
            member_values = integrate_labels(
                members[0], labels.data, affine, um_per_px=um_per_px,
                block_px=_members_block(block_px, members[1]), progress=progress,
            ).values
    else:
        from ..data import integrate_map

        result = integrate_map(
            dense.data, mapped, um_per_px=um_per_px, radii=radii, block_px=int(block_px), progress=progress
        )
        instance_ids = sdata.shapes[shapes].index.to_numpy()
        if members is not None:
            member_values = integrate_map(
                members[0], mapped, um_per_px=um_per_px, radii=radii,
                block_px=_members_block(block_px, members[1]), progress=progress,
            ).values
    adata = _build_table(sdata, shapes, dense_key, channels, instance_ids, result, centroids, params)
    genes = list(adata.var_names)
    gene_cols = [channels.index(g) for g in genes]
    per_member = None
    if members is not None:
        n_members = members[1]
        per_member = member_values.reshape(len(member_values), n_members, len(channels))
        spread = per_member.std(axis=1, ddof=SD_DDOF)
        adata.layers[SD_LAYER] = np.ascontiguousarray(spread[:, gene_cols], dtype=np.float32)
        if TOTAL_CHANNEL in channels:
            adata.obs[TOTAL_SD_OBS] = spread[:, channels.index(TOTAL_CHANNEL)]
        if keep_members:
            for k in range(n_members):
                adata.layers[member_layer(k)] = np.ascontiguousarray(per_member[:, k, gene_cols], dtype=np.float32)
        adata.uns[UNS_KEY]["uncertainty"] = {"members_key": members[2], "n_members": n_members, "ddof": SD_DDOF}
    if levels:
        quantiles = sorted({round(q, 12) for p in levels for q in ((1 - p) / 2, (1 + p) / 2)})
        if interval_kind == "nb":
            theta_used = pooled_theta(theta[:, gene_cols])
            mu = np.asarray(adata.X, dtype=np.float64)
            values = {q: nb_quantiles(mu, theta_used, q) for q in quantiles}
        else:
            theta_used = theta[:, gene_cols]
            mu = per_member[:, :, gene_cols]
            values = {q: nb_mixture_quantiles(mu, theta_used, q) for q in quantiles}
        names = {q: quantile_layer(q) for q in quantiles}
        for q in quantiles:
            adata.layers[names[q]] = values[q].astype(np.float32)
        adata.uns[UNS_KEY]["interval"] = {
            "levels": list(levels), "quantiles": quantiles, "kind": interval_kind,
            "layers": [names[q] for q in quantiles], "theta": np.asarray(theta_used).tolist(),
        }
    if inplace:
        sdata.tables[key_added] = adata
        if sdata.is_backed():
            with warnings.catch_warnings():
                # anndata's notice about a future zarr default; nothing a user of pixgene can act on
                warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)
                sdata.write_element(key_added, overwrite=overwrite)
    logger.info("read %r out over %d %s into table %r", dense_key, adata.n_obs, shapes, key_added)
    return adata


def _dense_meta(sdata: Any, dense_key: str) -> dict:
    return dict(((getattr(sdata, "attrs", None) or {}).get(UNS_KEY, {}).get("dense", {}) or {}).get(dense_key) or {})


def _interval_levels(interval: Any) -> tuple[float, ...]:
    """``interval`` as a tuple of central probabilities in (0, 1) (empty for None)."""
    if interval is None:
        return ()
    values = [interval] if np.ndim(interval) == 0 else list(interval)
    ok = bool(values) and all(
        isinstance(v, float | int | np.floating | np.integer) and not isinstance(v, bool) and 0 < v < 1
        for v in values)
    if not ok:
        fail("interval", f"{interval!r} is not a probability in (0, 1) or a list of them",
             "Pass interval=0.9, or interval=(0.5, 0.9)")
    return tuple(sorted({float(v) for v in values}))


def _members_map(sdata, dense_key, dense, channels, meta, uncertainty, needed_by):
    """``(members' map (M * C, H, W), M, key)`` to read out, or None; checked against the mean map."""
    from .._core.raster import full_resolution

    if uncertainty is not None and not isinstance(uncertainty, bool | np.bool_):
        fail("uncertainty", f"{uncertainty!r} is not True, False or None", "Pass uncertainty=True, False or None")
    record = meta.get("uncertainty") or {}
    key = record.get("members_key", members_key(dense_key))
    have = bool(record) and key in sdata.images
    if uncertainty is None:
        uncertainty = have or needed_by is not None
    if not uncertainty:
        if needed_by is not None:
            fail("aggregate", f"{needed_by} needs the members' maps, but uncertainty=False was passed",
                 "Pass uncertainty=True (or leave it None)")
        return None
    if not have:
        fail(f"image {dense_key!r}", f"has no members' maps ({key!r})" + (f", which {needed_by} needs"
                                                                         if needed_by else ""),
             "Predict it with pg.tl.predict_dense(..., uncertainty=True) from a model of several members")
    element = full_resolution(sdata.images[key])
    n_members = int(record.get("n_members", 0))
    expected = [member_channel(k, c) for k in range(n_members) for c in channels]
    got = [str(c) for c in element.coords["c"].values]
    if tuple(element.dims) != ("c", "y", "x") or got != expected:
        fail(f"image {key!r}", f"does not hold {n_members} members' maps of the channels of {dense_key!r}",
             "Predict the map again with pg.tl.predict_dense(..., uncertainty=True)")
    if (element.sizes["y"], element.sizes["x"]) != (dense.sizes["y"], dense.sizes["x"]):
        fail(f"image {key!r}", f"is not on the grid of {dense_key!r}",
             "Predict the map again with pg.tl.predict_dense(..., uncertainty=True)")
    return element.data, n_members, key


def _members_block(block_px: int, n_members: int) -> int:
    """Block side for the members' map: about as much memory per block as the mean map's."""
    return max(64, int(int(block_px) / np.sqrt(n_members)))


def _resolve_dense_key(sdata: Any, dense_key: str | None, image_key: str | None) -> str:
    if dense_key is not None:
        require_element(sdata, dense_key, "images")
        return dense_key
    if image_key is not None:
        key = default_dense_key(image_key)
        if key not in sdata.images:
            fail(
                f"image {key!r}",
                f"not found: no dense map was made from image {image_key!r}",
                "Run pg.tl.predict_dense first, or pass dense_key=... explicitly",
            )
        return key
    candidates = [k for k in sdata.images if str(k).endswith(default_dense_key(""))]
    if len(candidates) != 1:
        found = ", ".join(map(repr, candidates)) if candidates else "none"
        fail(
            "aggregate",
            f"cannot tell which dense map to read: image elements ending with '_pixgene' are {found}",
            "Pass dense_key=... (or image_key=... of the H&E the map was predicted from)",
        )
    return candidates[0]


def _map_um_per_px(sdata: Any, dense_key: str, image_key: str | None) -> float:
    """Microns per map pixel: recorded for the map, else the H&E's, carried through the transformation."""
    from .._core.coords import affine_between, isotropic_scale
    from .._core.units import recorded_um_per_px, validate_um_per_px

    recorded = recorded_um_per_px(sdata, dense_key)
    if recorded is not None:
        return validate_um_per_px(recorded, dense_key)
    meta = (getattr(sdata, "attrs", None) or {}).get(UNS_KEY, {}).get("dense", {}).get(dense_key, {})
    source = image_key or meta.get("image_key")
    source_um = recorded_um_per_px(sdata, source) if source is not None and source in sdata.images else None
    if source_um is None:
        fail(
            f"image {dense_key!r}",
            "its microns per pixel are not recorded (sdata.attrs['pixgene']['um_per_px'])",
            "Make the map with pg.tl.predict_dense, or record the value with "
            "pixgene._core.units.record_um_per_px(sdata, dense_key, um_per_px)",
        )
    scale = isotropic_scale(affine_between(sdata, dense_key, source), f"image {dense_key!r}")
    return validate_um_per_px(source_um * scale, dense_key)


def _shapes_in_map_pixels(sdata: Any, shapes_key: str, affine: np.ndarray):
    """Validated shapes carried into map pixels: (geometries, radii or None, centroids in own coordinates)."""
    import shapely

    from .._core.coords import apply_affine, isotropic_scale

    frame = sdata.shapes[shapes_key]
    where = f"shapes {shapes_key!r}"
    if len(frame) == 0:
        fail(where, "is empty", "Pass a shapes element with at least one shape")
    geoms = np.asarray(frame.geometry, dtype=object)
    if any(g is None for g in geoms) or shapely.is_empty(geoms).any():
        fail(where, "contains missing or empty geometries", "Drop or repair them first")
    types = shapely.get_type_id(geoms)
    unsupported = ~np.isin(types, (_POINT, _POLYGON, _MULTIPOLYGON))
    if unsupported.any():
        kinds = sorted({g.geom_type for g in geoms[unsupported]})
        fail(where, f"contains {kinds} geometries", "Use circles (points with a radius) or polygons")
    is_point = types == _POINT
    radii = None
    if is_point.any():
        if "radius" not in frame.columns:
            fail(where, "are points without a 'radius' column", "Parse them as circles with a radius")
        radii = frame["radius"].to_numpy(dtype=float) * isotropic_scale(affine, where)
        if not np.all(np.isfinite(radii[is_point]) & (radii[is_point] > 0)):
            fail(where, "has circles with a missing or non-positive radius", "Fix the radius column")
    # circle centres and polygon vertices are carried into map pixels by the same affine
    mapped = shapely.transform(geoms, lambda xy: apply_affine(affine, xy))
    return mapped, radii, shapely.get_coordinates(shapely.centroid(geoms))


def _checked_labels(sdata: Any, labels_key: str) -> Any:
    from .._core.raster import full_resolution

    labels = full_resolution(sdata.labels[labels_key])
    if tuple(labels.dims) != ("y", "x"):
        fail(f"labels {labels_key!r}", f"has dims {tuple(labels.dims)}, not ('y', 'x')", "Pass 2-D labels")
    if not np.issubdtype(labels.dtype, np.integer):
        fail(f"labels {labels_key!r}", f"has dtype {labels.dtype}, not integer", "Pass integer label ids")
    return labels


def _build_table(sdata, region, dense_key, channels, instance_ids, result, centroids, params):
    import anndata as ad
    import pandas as pd
    from spatialdata.models import TableModel

    genes = [c for c in channels if c != TOTAL_CHANNEL]
    values, covered, area = result.values, result.covered_um2, result.area_um2
    names = pd.Index([str(i) for i in instance_ids], dtype=str)
    obs = pd.DataFrame(index=names)
    if TOTAL_CHANNEL in channels:
        obs[TOTAL_OBS] = values[:, channels.index(TOTAL_CHANNEL)]
    obs[COVERAGE_OBS] = np.where(area > 0, covered / np.where(area > 0, area, 1.0), 0.0)
    obs[AREA_OBS] = area
    obs[REGION_KEY] = pd.Categorical([region] * len(names), categories=[region])
    obs[INSTANCE_KEY] = instance_ids
    adata = ad.AnnData(
        X=np.ascontiguousarray(values[:, [channels.index(g) for g in genes]], dtype=np.float32),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(genes, dtype=str)),
    )
    adata.obsm["spatial"] = np.asarray(centroids, dtype=np.float64)
    dense_meta = (getattr(sdata, "attrs", None) or {}).get(UNS_KEY, {}).get("dense", {}).get(dense_key, {})
    adata.uns[UNS_KEY] = {
        "params": dict(params),
        "dense_key": dense_key,
        "dense": copy.deepcopy(dict(dense_meta)),
    }
    return TableModel.parse(adata, region=region, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
