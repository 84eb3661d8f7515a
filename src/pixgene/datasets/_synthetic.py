"""A procedurally drawn H&E-like tissue with known per-pixel gene expression: pixgene's built-in demo data.

Everything is laid out in microns (x to the right, y down, origin at the image's top-left corner):

1. smooth random fields on a coarse grid decide the tissue outline, its holes and its regions (tumour nests,
   stroma, lymphoid aggregates, adipose tissue, a gland of ducts) and small vessels;
2. cells are placed with region-specific spacing (jittered hexagonal lattices, so Poisson-disc-like), typed by
   region and neighbourhood, and own Voronoi territories clipped to a per-type radius and to the tissue;
3. each cell's expected counts per gene follow its type *and* its neighbourhood, spread uniformly over its
   territory: that is the ground-truth intensity lambda_g(x) in expected UMI counts per square micron;
4. the H&E image is rendered from the same cells by Beer-Lambert mixing of hematoxylin and eosin;
5. Visium-like spots integrate lambda over exact disks and are Poisson-sampled.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from typing import Any

import numpy as np

from .._core.keys import (
    BINS_KEY,
    BINS_TABLE_KEY,
    CELLS_KEY,
    EXPECTED_TRUTH_KEY,
    IMAGE_KEY,
    INSTANCE_KEY,
    REGION_KEY,
    SPOTS_KEY,
    TABLE_KEY,
    TOTAL_CHANNEL,
    TRUTH_KEY,
    UNS_KEY,
)
from .._core.units import record_um_per_px, validate_um_per_px
from .._core.validate import check_positive, fail

logger = logging.getLogger(__name__)

__all__ = ["synthetic", "CELL_TYPES"]

CELL_TYPES = ("tumour", "epithelial", "fibroblast", "endothelial", "lymphocyte", "macrophage", "adipocyte")
TUMOUR, EPITHELIAL, FIBROBLAST, ENDOTHELIAL, LYMPHOCYTE, MACROPHAGE, ADIPOCYTE = range(len(CELL_TYPES))

#: spacing of the coarse grid on which the layout's smooth fields live, microns
_FIELD_UM = 4.0
#: lumen kinds and the thickness of the wall their lining cells sit in, microns
_DUCT, _VESSEL = 0, 1
_DUCT_WALL_UM, _VESSEL_WALL_UM = 13.0, 3.0
#: a side of the image or truth grid above this many pixels would need several gigabytes of memory
_MAX_SIDE_PX = 8192

# Per cell type, in the order of CELL_TYPES. Sizes in microns; densities are optical densities (natural log).
_TERRITORY_UM = np.array([11.0, 9.0, 9.0, 7.0, 6.0, 10.0, 48.0])
_NUCLEUS_A_UM = np.array([5.4, 4.2, 6.5, 5.5, 2.9, 4.4, 4.5])
_NUCLEUS_B_UM = np.array([4.1, 2.5, 1.5, 1.4, 2.7, 3.2, 1.3])
_NUCLEUS_H = np.array([0.75, 1.2, 1.45, 1.3, 1.85, 0.95, 1.2])
# vesicular nuclei (tumour) have a dark membrane and a pale centre; lymphocytes are solid
_NUCLEUS_RIM = np.array([0.9, 0.3, 0.0, 0.0, 0.05, 0.35, 0.0])
_NUCLEOLUS_H = np.array([0.9, 0.35, 0.0, 0.0, 0.0, 0.25, 0.0])
_PLEOMORPHISM = np.array([0.11, 0.04, 0.05, 0.03, 0.03, 0.08, 0.02])
# how far from the nucleus the cell's own cytoplasm shows; beyond it the extracellular matrix shows through
_CYTO_UM = np.array([11.0, 9.0, 0.0, 0.0, 0.0, 7.0, 48.0])
_CYTO_H = np.array([0.2, 0.1, 0.0, 0.0, 0.0, 0.1, 0.0])
_CYTO_E = np.array([0.45, 0.5, 0.0, 0.0, 0.0, 0.5, 0.015])
# cell-to-cell membranes visible in epithelia and, as the only eosin, around fat vacuoles
_MEMBRANE_E = np.array([0.18, 0.2, 0.0, 0.0, 0.0, 0.0, 0.7])

# Stain optical-density vectors (RGB absorbance per unit concentration; Ruifrok & Johnston style)
_HEMATOXYLIN = np.array([0.65, 0.70, 0.29])
_EOSIN = np.array([0.12, 0.85, 0.38])

#: sequencing depth: expected counts per cell scale so that a 55 um spot collects a few hundred to a few
#: thousand counts over the default 40 genes (the relative levels below are what carries meaning)
_DEPTH = 2.5

#: neighbourhood features that drive expression, each scaled to [0, 1]
FEATURES = ("lymphocyte_fraction", "tumour_fraction", "nest_core", "nest_edge", "tumour_proximity")

# Designed gene programs (the first genes): kind, base counts per cell by type, driving feature, extra counts
# per cell at feature = 1 by type, fraction of cells expressing. The remaining genes get random programs.
_DESIGNED = (
    ("marker", {"tumour": 14.0, "epithelial": 2.0}, None, {}, 1.0),
    ("marker", {"lymphocyte": 9.0}, None, {}, 1.0),
    ("marker", {"fibroblast": 20.0, "endothelial": 1.5}, None, {}, 1.0),
    # hypoxia: only cells deep inside large nests, i.e. cell type x nest geometry
    ("neighbourhood", {"tumour": 0.3}, "nest_core", {"tumour": 10.0}, 1.0),
    # interferon response of tumour cells and macrophages to nearby lymphocytes
    (
        "neighbourhood",
        {"tumour": 0.2, "macrophage": 1.0},
        "lymphocyte_fraction",
        {"tumour": 14.0, "macrophage": 6.0},
        1.0,
    ),
    ("marker", {"endothelial": 12.0}, None, {}, 1.0),
    ("marker", {"macrophage": 9.0, "tumour": 0.1}, None, {}, 1.0),
    # cancer-associated fibroblasts: fibroblasts near tumour
    ("neighbourhood", {"fibroblast": 0.5}, "tumour_proximity", {"fibroblast": 8.0}, 1.0),
    ("marker", {"adipocyte": 60.0}, None, {}, 1.0),
    ("marker", {"epithelial": 12.0, "tumour": 0.8}, None, {}, 1.0),
    # exhaustion of lymphocytes among tumour cells
    ("neighbourhood", {"lymphocyte": 0.2}, "tumour_fraction", {"lymphocyte": 6.0}, 1.0),
    # proliferation: a sparse cycling subset, more at the invasive nest edge
    ("sparse", {"tumour": 0.3, "lymphocyte": 0.2}, "nest_edge", {"tumour": 8.0}, 0.3),
)


def synthetic(
    seed: int = 0,
    *,
    size_um: float = 2048.0,
    um_per_px: float = 1.0,
    n_genes: int = 30,
    n_noise_genes: int = 10,
    spot_diameter_um: float = 55.0,
    spot_pitch_um: float = 100.0,
    truth_um_per_px: float = 2.0,
    counts_scale: float = 1.0,
    expected_truth: bool = False,
    bins_um: float | None = None,
) -> Any:
    """A synthetic H&E section with Visium-like spots, segmented cells and ground-truth expression everywhere.

    The tissue (tumour nests, fibrous stroma, lymphoid aggregates, adipose tissue, ducts, vessels, holes and
    a white background) is drawn from smooth random fields. Every cell's expected counts depend on its type
    and on its neighbourhood (fraction of lymphocytes or tumour cells within 50 um, depth inside a tumour
    nest, distance to tumour), so the image shows *where* expression is likely but does not determine it
    pixel by pixel. ``n_noise_genes`` more genes follow smooth random fields unrelated to the histology.

    Parameters
    ----------
    seed
        Seed of the random generator; the same seed gives identical image, cells, truth and counts.
    size_um
        Side of the square image, microns.
    um_per_px
        Microns per pixel of the H&E image.
    n_genes
        Genes driven by cell type and neighbourhood, named ``GENE00``, ``GENE01``, ...
    n_noise_genes
        Genes following smooth random fields, named ``NOISE00``, ...
    spot_diameter_um, spot_pitch_um
        Spot diameter and centre-to-centre distance of the hexagonal spot grid, microns.
    truth_um_per_px
        Microns per pixel of the ground-truth intensity map.
    counts_scale
        Capture efficiency: spot counts are Poisson(counts_scale x integral of the truth over the spot).
    expected_truth
        Also store ``images["truth_expected"]``: the truth's expectation given each cell's type, size and
        neighbourhood, i.e. without the cell-to-cell variability that no image explains (which cells express a
        gene, and how much each one deviates from its kind). It is the best any predictor from the histology
        can do, so scores of a prediction are best read next to this map's scores against the truth. The
        image, truth, cells and counts are the same with or without it.
    bins_um
        Also measure the tissue as Visium HD does: square bins of ``bins_um`` microns on a grid from the image's
        top-left corner, kept where the bin's centre is in tissue, counts Poisson(counts_scale x integral of
        the truth over the bin) (``shapes["bins"]`` and ``tables["bins_table"]``). The image, truth, cells and
        spot counts are the same with or without them.

    Returns
    -------
    SpatialData with

    - ``images["he"]``: uint8 RGB (c, y, x) H&E image; its microns per pixel in
      ``attrs["pixgene"]["um_per_px"]["he"]``.
    - ``shapes["spots"]``: circles (``radius`` in image pixels) in the image's pixel space, centres in tissue.
    - ``tables["table"]``: raw spot counts (X), ``obs`` ``array_row``/``array_col`` and the link to the
      spots, ``layers["expected"]`` = counts_scale x truth integral (the Poisson means), ``obsm["spatial"]``
      (pixels), ``uns["pixgene"]`` (platform ``"synthetic"``, spot diameter, image key, library id).
    - ``shapes["cells"]``: cell territories (polygons in image pixels, index ``cell_{i}``, column
      ``cell_type``).
    - ``images["truth"]``: float32 (c, y, x) expected counts per square micron at ``truth_um_per_px``;
      channels are the gene names then ``pixgene_total_counts`` (their sum); overlays the image in every
      coordinate system; its microns per pixel in ``attrs["pixgene"]["um_per_px"]["truth"]``.
    - ``shapes["bins"]``, ``tables["bins_table"]`` (with ``bins_um``): square bins (polygons in image pixels,
      index ``bin_{row}_{col}``) and their raw counts, ``layers["expected"]`` the Poisson means.
    - ``images["truth_expected"]`` (with ``expected_truth=True``): like ``truth``, the expected intensity
      given the histology (same smooth fields for the ``NOISE`` genes).
    - ``attrs["pixgene"]["synthetic"]``: the seed and parameters, the cell types, the neighbourhood features,
      and per gene its program (``kind``, expressing ``cell_types``, driving ``feature`` and the
      ``feature_cell_types`` it acts on).
    """
    _check_parameters(
        size_um=size_um,
        um_per_px=um_per_px,
        n_genes=n_genes,
        n_noise_genes=n_noise_genes,
        spot_diameter_um=spot_diameter_um,
        spot_pitch_um=spot_pitch_um,
        truth_um_per_px=truth_um_per_px,
        counts_scale=counts_scale,
    )
    if bins_um is not None and not (np.isfinite(bins_um) and 0 < bins_um <= size_um / 2):
        fail("pg.datasets.synthetic", f"bins_um={bins_um!r} is not a bin size in (0, size_um / 2]",
             "Pass bins_um such as 16.0 (Visium HD's 16 um bins), or None for no bins")
    started = time.perf_counter()
    # independent streams: changing how the image is drawn does not change the cells, truth or counts
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(7)]
    rng_layout, rng_cells, rng_expr, rng_noise, rng_render, rng_counts, rng_bins = streams

    tick = _Ticker("synthetic")
    layout = _draw_layout(rng_layout, float(size_um))
    tick("layout")
    cells = _place_cells(rng_cells, layout)
    tick("cells")
    polygons, areas = _territories(cells, layout)
    tick("territories")
    features = _neighbourhood_features(cells, layout)
    gene_names, programs, cell_counts, cell_expected = _cell_expression(
        rng_expr, cells["type"], areas, features, n_genes
    )
    tick("expression")

    image_shape = (_n_px(size_um, um_per_px),) * 2
    truth_shape = (_n_px(size_um, truth_um_per_px),) * 2
    supersample = max(1, int(np.ceil(truth_um_per_px / um_per_px - 1e-9)))
    fine_um = truth_um_per_px / supersample
    fine_shape = tuple(n * supersample for n in truth_shape)
    if abs(fine_um - um_per_px) < 1e-9 * um_per_px:
        # the truth's sub-samples are the image pixels: one territory raster serves both
        shared = tuple(max(a, b) for a, b in zip(image_shape, fine_shape))
        labels, dist2 = _territory_raster(cells, layout, shared, um_per_px)
        image_labels = (labels[: image_shape[0], : image_shape[1]], dist2[: image_shape[0], : image_shape[1]])
        fine_labels = labels[: fine_shape[0], : fine_shape[1]]
    else:
        image_labels = _territory_raster(cells, layout, image_shape, um_per_px)
        fine_labels = _territory_raster(cells, layout, fine_shape, fine_um)[0]
    tick("territory rasters")

    noise_names = [f"NOISE{i:0{max(2, len(str(n_noise_genes - 1)))}d}" for i in range(n_noise_genes)]
    raster = functools.partial(
        _truth_raster,
        layout=layout,
        fine_labels=fine_labels,
        supersample=supersample,
        truth_shape=truth_shape,
        truth_um=truth_um_per_px,
        n_noise=n_noise_genes,
    )
    # a copy of the noise stream draws the NOISE genes' fields exactly as the truth does
    expected = None
    if expected_truth:
        expected = raster(copy.deepcopy(rng_noise), cell_intensity=cell_expected / areas[:, None])
    truth = raster(rng_noise, cell_intensity=cell_counts / areas[:, None])
    tick("truth")
    image = _render_he(rng_render, layout, cells, image_labels, image_shape, um_per_px)
    tick("image")

    sdata = _assemble(
        rng_counts,
        image=image,
        truth=truth,
        polygons=polygons,
        cell_types=cells["type"],
        gene_names=gene_names + noise_names,
        layout=layout,
        um_per_px=um_per_px,
        truth_um_per_px=truth_um_per_px,
        spot_diameter_um=spot_diameter_um,
        spot_pitch_um=spot_pitch_um,
        counts_scale=counts_scale,
        expected_map=expected,
    )
    tick("assemble")
    if bins_um is not None:
        _add_bins(sdata, rng_bins, truth=truth, layout=layout, gene_names=gene_names + noise_names,
                  bins_um=float(bins_um), um_per_px=um_per_px, truth_um_per_px=truth_um_per_px,
                  counts_scale=counts_scale)
        tick("bins")
    for name in noise_names:
        programs[name] = {"kind": "noise", "cell_types": [], "feature": None, "feature_cell_types": []}
    record = dict(sdata.attrs.get(UNS_KEY, {}))
    record["synthetic"] = {
        "seed": int(seed),
        "size_um": float(size_um),
        "um_per_px": float(um_per_px),
        "n_genes": int(n_genes),
        "n_noise_genes": int(n_noise_genes),
        "spot_diameter_um": float(spot_diameter_um),
        "spot_pitch_um": float(spot_pitch_um),
        "truth_um_per_px": float(truth_um_per_px),
        "counts_scale": float(counts_scale),
        "expected_truth": bool(expected_truth),
        "bins_um": None if bins_um is None else float(bins_um),
        "cell_types": list(CELL_TYPES),
        "features": list(FEATURES),
        "gene_programs": programs,
    }
    sdata.attrs[UNS_KEY] = record
    logger.info(
        "synthetic tissue (seed %d): %d x %d px, %d cells, %d spots, %d genes in %.2f s",
        seed, image_shape[1], image_shape[0], len(cells["type"]), sdata.tables[TABLE_KEY].n_obs,
        len(gene_names) + n_noise_genes, time.perf_counter() - started,
    )
    return sdata


def _check_parameters(
    *,
    size_um,
    um_per_px,
    n_genes,
    n_noise_genes,
    spot_diameter_um,
    spot_pitch_um,
    truth_um_per_px,
    counts_scale,
) -> None:
    where = "pg.datasets.synthetic"
    for name, value in (
        ("size_um", size_um), ("spot_diameter_um", spot_diameter_um), ("spot_pitch_um", spot_pitch_um),
        ("truth_um_per_px", truth_um_per_px), ("counts_scale", counts_scale),
    ):
        check_positive(value, name, where)
    validate_um_per_px(um_per_px, IMAGE_KEY)
    validate_um_per_px(truth_um_per_px, TRUTH_KEY)
    if int(n_genes) != n_genes or int(n_noise_genes) != n_noise_genes or n_genes < 0 or n_noise_genes < 0:
        fail(
            where,
            f"n_genes={n_genes!r} and n_noise_genes={n_noise_genes!r} must be counts",
            "Pass integers >= 0",
        )
    if n_genes + n_noise_genes < 1:
        fail(where, "no genes were requested", "Pass n_genes >= 1 or n_noise_genes >= 1")
    if spot_pitch_um < spot_diameter_um:
        fail(
            where,
            f"spot_pitch_um={spot_pitch_um} is smaller than spot_diameter_um={spot_diameter_um}, "
            "so spots overlap",
            "Pass a pitch at least as large as the diameter",
        )
    if size_um < 2 * spot_pitch_um or size_um < 256:
        fail(
            where,
            f"size_um={size_um} leaves no room for a tissue with spots",
            "Pass size_um >= 256 and at least two spot pitches",
        )
    for name, value in (("um_per_px", um_per_px), ("truth_um_per_px", truth_um_per_px)):
        if size_um / value > _MAX_SIDE_PX:
            fail(
                where,
                f"size_um / {name} = {size_um / value:.0f} pixels a side is more than {_MAX_SIDE_PX}",
                f"Pass a smaller size_um or a larger {name}",
            )


def _n_px(size_um: float, um_per_px: float) -> int:
    return int(np.ceil(size_um / um_per_px - 1e-9))


# ----------------------------------------------------------------------------------------------------------
# smooth random fields on the coarse layout grid


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], corr_um: float) -> np.ndarray:
    """Gaussian random field on the layout grid with unit variance and correlation length ``corr_um``.

    Drawn by FFT filtering on a grid of about six points per correlation length (then interpolated), padded
    and cropped so the FFT's periodic wrap-around does not tie opposite edges together.
    """
    from scipy import fft

    step = max(_FIELD_UM, corr_um / 6.0)
    corr = corr_um / step
    n = shape if step == _FIELD_UM else tuple(int(np.ceil(m * _FIELD_UM / step)) + 1 for m in shape)
    pad = int(np.ceil(2 * corr))
    big = (n[0] + 2 * pad, n[1] + 2 * pad)
    ky = fft.fftfreq(big[0])[:, None]
    kx = fft.rfftfreq(big[1])[None, :]
    spectrum = fft.rfft2(rng.standard_normal(big)) * np.exp(-2 * np.pi**2 * corr**2 * (kx**2 + ky**2))
    field = fft.irfft2(spectrum, s=big)[pad : pad + n[0], pad : pad + n[1]]
    if step > _FIELD_UM:
        field = _resample(field, shape, _FIELD_UM, in_um=step)
    return ((field - field.mean()) / max(float(field.std()), 1e-12)).astype(np.float64)


def _at(field: np.ndarray, xy_um: np.ndarray) -> np.ndarray:
    """Bilinear value of a coarse-grid field at points (x, y) in microns (coarse pixel centres at +0.5)."""
    from scipy import ndimage

    xy_um = np.asarray(xy_um, dtype=float).reshape(-1, 2)
    coords = np.stack([xy_um[:, 1] / _FIELD_UM - 0.5, xy_um[:, 0] / _FIELD_UM - 0.5])
    return ndimage.map_coordinates(field, coords, order=1, mode="nearest")


def _interp_matrix(n_out: int, out_um: float, n_in: int, in_um: float):
    import scipy.sparse as sp

    from .._core.raster import linear_weights

    lo, hi, w = linear_weights(n_out, n_in, out_um / in_um)
    rows = np.concatenate([np.arange(n_out)] * 2)
    return sp.csr_matrix((np.concatenate([1 - w, w]), (rows, np.concatenate([lo, hi]))), shape=(n_out, n_in))


def _resample(
    field: np.ndarray, shape: tuple[int, int], out_um: float, in_um: float = _FIELD_UM
) -> np.ndarray:
    """A coarse field (pixels of ``in_um``) bilinearly interpolated at the pixel centres of a finer grid."""
    ry = _interp_matrix(shape[0], out_um, field.shape[0], in_um)
    rx = _interp_matrix(shape[1], out_um, field.shape[1], in_um)
    field = np.asarray(field, dtype=np.float32)
    return np.ascontiguousarray((rx.astype(np.float32) @ (ry.astype(np.float32) @ field).T).T)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# ----------------------------------------------------------------------------------------------------------
# layout: tissue, regions, ducts and vessels


def _ellipse_polygons(cx, cy, a, b, theta, n_vertices: int = 48):
    import shapely

    t = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)
    cx, cy, a, b, theta = (np.asarray(v, dtype=float)[:, None] for v in (cx, cy, a, b, theta))
    x = cx + a * np.cos(t) * np.cos(theta) - b * np.sin(t) * np.sin(theta)
    y = cy + a * np.cos(t) * np.sin(theta) + b * np.sin(t) * np.cos(theta)
    return shapely.polygons(np.stack([x, y], axis=-1))


def _in_ellipses(xy: np.ndarray, ellipses: dict[str, np.ndarray], grow: float = 0.0) -> np.ndarray:
    """Index of the ellipse (semi-axes grown by ``grow``) containing each point, -1 for none."""
    from scipy.spatial import cKDTree

    inside = np.full(len(xy), -1, dtype=np.int64)
    if len(ellipses["cx"]) == 0 or len(xy) == 0:
        return inside
    tree = cKDTree(xy)
    for k, (cx, cy, a, b, th) in enumerate(
        zip(ellipses["cx"], ellipses["cy"], ellipses["a"] + grow, ellipses["b"] + grow, ellipses["theta"])
    ):
        idx = np.asarray(tree.query_ball_point([cx, cy], a), dtype=np.int64)
        if idx.size == 0:
            continue
        dx, dy = xy[idx, 0] - cx, xy[idx, 1] - cy
        u = (dx * np.cos(th) + dy * np.sin(th)) / a
        v = (-dx * np.sin(th) + dy * np.cos(th)) / b
        inside[idx[u * u + v * v <= 1.0]] = k
    return inside


def _tissue_polygon(tissue_field: np.ndarray):
    """The region {field > 0} as a (multi)polygon in microns, traced along the bilinear zero level."""
    import shapely
    from skimage import measure

    padded = np.pad(tissue_field, 1, constant_values=-1.0)
    rings = []
    for contour in measure.find_contours(padded, 0.0):
        if len(contour) < 4:
            continue
        xy = np.stack([(contour[:, 1] - 0.5) * _FIELD_UM, (contour[:, 0] - 0.5) * _FIELD_UM], axis=1)
        ring = shapely.make_valid(shapely.Polygon(xy))
        if ring.area > 0:
            rings.append(ring)
    # nested level-set contours alternate between outlines and holes: their even-odd union is {field > 0}
    rings.sort(key=lambda g: -g.area)
    tissue = shapely.Polygon()
    for ring in rings:
        tissue = shapely.symmetric_difference(tissue, ring)
    parts = shapely.get_parts(shapely.make_valid(tissue))
    # drop crumbs smaller than a few cells
    parts = [p for p in parts if p.geom_type == "Polygon" and p.area > 400]
    return shapely.simplify(shapely.MultiPolygon(parts), 0.25).buffer(0)


def _place_lumens(
    rng, layout, n_target, inside, *, radius_range, ratio_range, wall_um, centre=None, spread=None
) -> dict[str, np.ndarray]:
    """Elliptical lumens (centre, semi-axes, angle) by rejection sampling, clear of each other's walls.

    A lumen is kept where ``inside`` holds for its centre and the four extreme points of its wall.
    """
    size = layout["size_um"]
    placed = {k: [] for k in ("cx", "cy", "a", "b", "theta")}
    for _ in range(40 * max(n_target, 1)):
        if len(placed["cx"]) >= n_target:
            break
        if centre is None:
            cx, cy = rng.uniform(0, size, 2)
        else:
            r, phi = spread * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
            cx, cy = centre[0] + r * np.cos(phi), centre[1] + r * np.sin(phi)
        a = rng.uniform(*radius_range)
        b = a * rng.uniform(*ratio_range)
        outer = a + wall_um
        probe = np.array([[cx, cy], [cx + outer, cy], [cx - outer, cy], [cx, cy + outer], [cx, cy - outer]])
        if not np.all(inside(probe)):
            continue
        others = layout["lumens"]
        taken = np.concatenate([others["cx"], placed["cx"]]), np.concatenate([others["cy"], placed["cy"]])
        reach = np.concatenate([others["a"] + others["wall"], np.asarray(placed["a"]) + wall_um])
        if np.any(np.hypot(taken[0] - cx, taken[1] - cy) < reach + outer + 6.0):
            continue
        for key, value in zip(("cx", "cy", "a", "b", "theta"), (cx, cy, a, b, rng.uniform(0, np.pi))):
            placed[key].append(value)
    return {k: np.asarray(v, dtype=float) for k, v in placed.items()}


def _draw_layout(rng: np.random.Generator, size_um: float) -> dict[str, Any]:
    from scipy import ndimage

    n = int(np.ceil(size_um / _FIELD_UM))
    shape = (n, n)
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) * _FIELD_UM
    centre = size_um / 2 + rng.normal(0, 0.03 * size_um, 2)
    half_axes = size_um * rng.uniform(0.38, 0.46, 2)
    rr = np.hypot((xx - centre[0]) / half_axes[0], (yy - centre[1]) / half_axes[1])
    outline = 1.0 - rr**2 + 0.4 * _smooth_field(rng, shape, 260.0) + 0.12 * _smooth_field(rng, shape, 70.0)
    holes = 2.9 - _smooth_field(rng, shape, 45.0)  # a few small tears/holes where this dips below zero
    tissue_field = np.minimum(outline, 0.5 * holes)
    zone = _smooth_field(rng, shape, 450.0)  # tumour gathers on one side of the section, fat on the other
    tumour_field = _smooth_field(rng, shape, 100.0) + 0.9 * zone - 0.8
    adipose_field = _smooth_field(rng, shape, 160.0) - 0.8 * zone - 1.1
    hot_field = _smooth_field(rng, shape, 220.0)  # immune-hot versus immune-cold parts of the tumour
    stroma_density = _smooth_field(rng, shape, 80.0)
    # bundles keep their direction over hundreds of microns and bend gently
    fibre_angle = rng.uniform(0, np.pi) + 0.6 * np.pi * _smooth_field(rng, shape, 300.0)
    fibre_angle += 0.15 * _smooth_field(rng, shape, 40.0)
    in_tissue = tissue_field > 0

    # lymphoid aggregates: roundish blobs away from tumour and from the tissue edge
    lymph_field = np.full(shape, -1.0)
    edge_depth = ndimage.distance_transform_edt(in_tissue) * _FIELD_UM
    n_aggregates = max(1, int(round(in_tissue.sum() * _FIELD_UM**2 / 2.5e6)))
    blob_noise = _smooth_field(rng, shape, 60.0)
    for _ in range(n_aggregates):
        radius = rng.uniform(120.0, 190.0) * min(1.0, size_um / 1500.0)
        ok = np.flatnonzero(((edge_depth > radius) & (tumour_field < -0.3)).ravel())
        if ok.size == 0:
            ok = np.flatnonzero(in_tissue.ravel())
        if ok.size == 0:
            break
        pick = rng.choice(ok)
        ax, ay = xx.ravel()[pick], yy.ravel()[pick]
        blob = 1.0 - np.hypot(xx - ax, yy - ay) ** 2 / radius**2 + 0.3 * blob_noise
        lymph_field = np.maximum(lymph_field, blob)

    layout: dict[str, Any] = {
        "size_um": size_um,
        "tissue_field": tissue_field,
        "tumour_field": tumour_field,
        "adipose_field": adipose_field,
        "lymph_field": lymph_field,
        "hot_field": hot_field,
        "stroma_density": stroma_density,
        "fibre_angle": fibre_angle,
        "lumens": {k: np.zeros(0) for k in ("cx", "cy", "a", "b", "theta", "wall", "kind")},
    }
    region = _region_grid(layout)
    layout["region"] = region
    tumour = region == 2
    if tumour.any():
        layout["nest_depth"] = ndimage.distance_transform_edt(tumour) * _FIELD_UM
        layout["tumour_distance"] = ndimage.distance_transform_edt(~tumour) * _FIELD_UM
    else:
        layout["nest_depth"] = np.zeros(shape)
        layout["tumour_distance"] = np.full(shape, 1e6)

    import shapely

    tissue = _tissue_polygon(tissue_field)
    shapely.prepare(tissue)
    layout["tissue"] = tissue

    def in_stroma(xy):
        return (_region_at(layout, xy) == 1) & shapely.contains_xy(tissue, xy[:, 0], xy[:, 1])

    def in_stroma_or_fat(xy):
        return np.isin(_region_at(layout, xy), (1, 4)) & shapely.contains_xy(tissue, xy[:, 0], xy[:, 1])

    # a gland: ducts (lumen lined by one layer of epithelium) clustered in stroma away from the tumour
    far = (region == 1) & (layout["tumour_distance"] > 120) & (edge_depth > 100)
    stroma_area = (region == 1).sum() * _FIELD_UM**2
    if far.any():
        pick = rng.choice(np.flatnonzero(far.ravel()))
        ducts = _place_lumens(
            rng,
            layout,
            max(2, int(round(stroma_area / 2.0e5))),
            in_stroma,
            radius_range=(14.0, 38.0),
            ratio_range=(0.5, 1.0),
            wall_um=_DUCT_WALL_UM,
            centre=(xx.ravel()[pick], yy.ravel()[pick]),
            spread=min(260.0, 0.15 * size_um),
        )
        _add_lumens(layout, ducts, wall_um=_DUCT_WALL_UM, kind=_DUCT)
    vessels = _place_lumens(
        rng,
        layout,
        int(round(stroma_area / 6.0e4)),
        in_stroma_or_fat,
        radius_range=(4.0, 13.0),
        ratio_range=(0.45, 1.0),
        wall_um=_VESSEL_WALL_UM,
    )
    _add_lumens(layout, vessels, wall_um=_VESSEL_WALL_UM, kind=_VESSEL)

    lumens = layout["lumens"]
    polygons = _ellipse_polygons(lumens["cx"], lumens["cy"], lumens["a"], lumens["b"], lumens["theta"])
    clip = shapely.difference(tissue, shapely.union_all(polygons)) if len(polygons) else tissue
    shapely.prepare(clip)
    layout["clip"] = clip  # where cells may live: tissue without lumens
    return layout


def _add_lumens(layout, placed, *, wall_um, kind):
    lumens = layout["lumens"]
    n = len(placed["cx"])
    for key in ("cx", "cy", "a", "b", "theta"):
        lumens[key] = np.concatenate([lumens[key], placed[key]])
    lumens["wall"] = np.concatenate([lumens["wall"], np.full(n, wall_um)])
    lumens["kind"] = np.concatenate([lumens["kind"], np.full(n, kind, dtype=float)])


def _region_rules(tissue, lymph, tumour, adipose):
    """0 outside, 1 stroma, 2 tumour, 3 lymphoid, 4 adipose; one rule for grid and points alike."""
    region = np.where(tissue > 0, 1, 0).astype(np.int8)
    region[(region == 1) & (adipose > 0)] = 4
    region[(region > 0) & (tumour > 0)] = 2
    region[(region > 0) & (lymph > 0)] = 3
    return region


_REGION_FIELDS = ("tissue_field", "lymph_field", "tumour_field", "adipose_field")


def _region_grid(layout):
    return _region_rules(*(layout[k] for k in _REGION_FIELDS))


def _region_at(layout, xy):
    return _region_rules(*(_at(layout[k], xy) for k in _REGION_FIELDS))


# ----------------------------------------------------------------------------------------------------------
# cells


def _lattice(rng: np.random.Generator, size_um: float, spacing: float, jitter: float = 0.35) -> np.ndarray:
    """A jittered hexagonal lattice: points at least (1 - 2 jitter) x spacing apart, Poisson-disc-like."""
    dy = spacing * np.sqrt(3) / 2
    off = rng.uniform(0, spacing, 2)
    rows = np.arange(int(size_um / dy) + 3)
    cols = np.arange(int(size_um / spacing) + 3)
    x = cols[None, :] * spacing + off[0] - spacing + (rows[:, None] % 2) * spacing / 2
    y = np.broadcast_to(rows[:, None] * dy + off[1] - dy, x.shape)
    pts = np.stack([x.ravel(), y.ravel()], axis=1)
    r = jitter * spacing * np.sqrt(rng.uniform(size=len(pts)))
    phi = rng.uniform(0, 2 * np.pi, len(pts))
    pts = pts + np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1)
    keep = np.all((pts >= 0) & (pts < size_um), axis=1)
    return pts[keep]


def _ring_cells(rng, lumens, kind, spacing, offset_um):
    """Cells evenly spaced around the lumens of one kind, ``offset_um`` outside the lumen edge."""
    sel = np.flatnonzero(lumens["kind"] == kind)
    xy, angle = [], []
    for k in sel:
        a, b = lumens["a"][k] + offset_um, lumens["b"][k] + offset_um
        perimeter = np.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b)))
        m = max(3, int(round(perimeter / spacing)))
        t = np.linspace(0, 2 * np.pi, m, endpoint=False) + rng.uniform(0, 2 * np.pi)
        t += rng.normal(0, 0.1, m) / m
        th = lumens["theta"][k]
        px, py = a * np.cos(t), b * np.sin(t)
        x = lumens["cx"][k] + px * np.cos(th) - py * np.sin(th)
        y = lumens["cy"][k] + px * np.sin(th) + py * np.cos(th)
        xy.append(np.stack([x, y], axis=1))
        # outward normal of the ellipse, in image coordinates
        angle.append(np.arctan2(a * np.sin(t), b * np.cos(t)) + th)
    if not xy:
        return np.zeros((0, 2)), np.zeros(0)
    return np.concatenate(xy), np.concatenate(angle)


def _place_cells(rng: np.random.Generator, layout: dict[str, Any]) -> dict[str, np.ndarray]:
    import shapely
    from scipy.spatial import cKDTree

    size = layout["size_um"]
    lumens = layout["lumens"]
    groups = []  # (xy, type, orientation or nan), highest priority first

    duct_xy, duct_normal = _ring_cells(rng, lumens, _DUCT, 8.5, 5.0)
    groups.append((duct_xy, np.full(len(duct_xy), EPITHELIAL), duct_normal))
    vessel_xy, vessel_normal = _ring_cells(rng, lumens, _VESSEL, 13.0, 1.6)
    groups.append((vessel_xy, np.full(len(vessel_xy), ENDOTHELIAL), vessel_normal + np.pi / 2))

    def candidates(spacing, region, jitter=0.35):
        pts = _lattice(rng, size, spacing, jitter)
        return pts[_region_at(layout, pts) == region]

    tumour = candidates(12.0, 2)
    hot = _sigmoid(2.5 * _at(layout["hot_field"], tumour) - 0.5)
    tumour_types = np.full(len(tumour), TUMOUR)
    u = rng.uniform(size=len(tumour))
    tumour_types[u < 0.03 + 0.3 * hot] = LYMPHOCYTE  # tumour-infiltrating lymphocytes, more in hot nests
    tumour_types[(u >= 0.03 + 0.3 * hot) & (u < 0.06 + 0.3 * hot)] = MACROPHAGE
    groups.append((tumour, tumour_types, np.full(len(tumour), np.nan)))

    lymphoid = candidates(7.0, 3)
    lymphoid_types = rng.choice([LYMPHOCYTE, MACROPHAGE, ENDOTHELIAL], len(lymphoid), p=[0.9, 0.06, 0.04])
    groups.append((lymphoid, lymphoid_types, np.full(len(lymphoid), np.nan)))

    fat = candidates(62.0, 4, jitter=0.3)
    groups.append((fat, np.full(len(fat), ADIPOCYTE), np.full(len(fat), np.nan)))

    stroma = candidates(19.0, 1)
    density = 0.55 + 0.4 * _sigmoid(2 * _at(layout["stroma_density"], stroma))
    stroma = stroma[rng.uniform(size=len(stroma)) < density]
    stroma_types = rng.choice([FIBROBLAST, MACROPHAGE, LYMPHOCYTE], len(stroma), p=[0.8, 0.1, 0.1])
    # stromal nuclei lie along the collagen bundles
    groups.append((stroma, stroma_types, _at(layout["fibre_angle"], stroma)))

    # lymphocytes in the stroma around the tumour, denser around immune-hot parts
    tils = candidates(9.0, 1)
    near = np.exp(-_at(layout["tumour_distance"], tils) / 60.0)
    tils = tils[rng.uniform(size=len(tils)) < 0.6 * near * _sigmoid(2 * _at(layout["hot_field"], tils) + 0.5)]
    groups.append((tils, np.full(len(tils), LYMPHOCYTE), np.full(len(tils), np.nan)))

    xy = np.concatenate([g[0] for g in groups])
    types = np.concatenate([g[1] for g in groups]).astype(np.int8)
    angle = np.concatenate([g[2] for g in groups])
    n_ring = len(duct_xy) + len(vessel_xy)
    # lattice cells must leave the ducts' epithelium and the vessel walls to their lining cells
    blocked = _in_ellipses(xy, lumens, grow=0.0) >= 0
    walls = {**lumens, "a": lumens["a"] + lumens["wall"], "b": lumens["b"] + lumens["wall"]}
    blocked |= (_in_ellipses(xy, walls) >= 0) & (np.arange(len(xy)) >= n_ring)
    keep = ~blocked & shapely.contains_xy(layout["clip"], xy[:, 0], xy[:, 1])
    xy, types, angle = xy[keep], types[keep], angle[keep]
    # where two placements meet, the lower-priority (later) point of a too-close pair gives way
    pairs = cKDTree(xy).query_pairs(4.5, output_type="ndarray")
    drop = np.zeros(len(xy), dtype=bool)
    drop[pairs.max(axis=1)] = True
    xy, types, angle = xy[~drop], types[~drop], angle[~drop]
    order = np.lexsort((xy[:, 0], xy[:, 1]))  # row-major order reads naturally in tables
    xy, types, angle = xy[order], types[order], angle[order]
    random_angle = rng.uniform(0, np.pi, len(xy))
    angle = np.where(np.isnan(angle), random_angle, angle)
    return {"xy": xy, "type": types, "angle": angle}


def _territories(cells, layout):
    """Voronoi cells clipped to each type's radius and to the tissue without lumens (microns); their areas."""
    import shapely

    xy = cells["xy"]
    radius = _TERRITORY_UM[cells["type"]]
    size = layout["size_um"]
    frame = shapely.box(-size, -size, 2 * size, 2 * size)
    voronoi = shapely.voronoi_polygons(shapely.multipoints(xy), extend_to=frame, ordered=True)
    voronoi = shapely.get_parts(voronoi)
    coords, owner = shapely.get_coordinates(voronoi, return_index=True)
    reach = np.zeros(len(xy))
    np.maximum.at(reach, owner, np.hypot(*(coords - xy[owner]).T))
    # only cells whose Voronoi polygon pokes out of the disk need the (slow) intersection
    poke = np.flatnonzero(reach > radius)
    polys = voronoi.copy()
    disks = shapely.buffer(shapely.points(xy[poke]), radius[poke], quad_segs=16)
    polys[poke] = shapely.intersection(voronoi[poke], disks)
    clip = layout["clip"]
    cut = np.flatnonzero(~shapely.contains(clip, polys))
    polys[cut] = shapely.intersection(polys[cut], clip)
    bad = np.flatnonzero(~np.isin(shapely.get_type_id(polys), (3, 6)))
    for i in bad:  # an intersection may add slivers of lines or points: keep the polygonal parts
        parts = [p for p in shapely.get_parts(polys[i]) if p.geom_type == "Polygon" and p.area > 0]
        polys[i] = parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)
    return polys, shapely.area(polys)


def _scan_territories(cx, cy, reach, label, dist2):  # pragma: no cover - compiled by numba
    """Nearest centre of every pixel among the centres that reach it (all in pixel units)."""
    H, W = label.shape
    for k in range(cx.size):
        r = reach[k]
        i0, i1 = max(int(math.floor(cy[k] - r)), 0), min(int(math.ceil(cy[k] + r)), H - 1)
        j0, j1 = max(int(math.floor(cx[k] - r)), 0), min(int(math.ceil(cx[k] + r)), W - 1)
        for i in range(i0, i1 + 1):
            dy = i + 0.5 - cy[k]
            for j in range(j0, j1 + 1):
                dx = j + 0.5 - cx[k]
                d2 = dx * dx + dy * dy
                if d2 <= r * r and d2 < dist2[i, j]:
                    dist2[i, j] = d2
                    label[i, j] = k


@functools.cache
def _compiled(name: str):
    """The numba-compiled version of a kernel in this module (compiled once, cached on disk)."""
    import numba

    return numba.njit(cache=True, nogil=True)(globals()[name])


def _territory_raster(cells, layout, shape, grid_um):
    """Per pixel centre: the cell whose territory contains it (-1 for none) and the squared distance (um^2).

    Same definition as the polygons: nearest cell centre, within that cell's radius, inside the tissue.
    """
    from scipy.spatial import cKDTree

    xy, types = cells["xy"], cells["type"]
    radius = _TERRITORY_UM[types]
    # a centre must scan as far as a larger territory next to it reaches, or it could not block that one
    reach = radius.copy()
    for r_big in np.unique(radius):
        big = radius >= r_big
        if big.all():
            continue
        dist, _ = cKDTree(xy[big]).query(xy, distance_upper_bound=2 * r_big)
        reach[np.isfinite(dist)] = np.maximum(reach[np.isfinite(dist)], r_big)
    label = np.full(shape, -1, dtype=np.int32)
    dist2 = np.full(shape, np.inf, dtype=np.float32)
    _compiled("_scan_territories")(xy[:, 0] / grid_um, xy[:, 1] / grid_um, reach / grid_um, label, dist2)
    dist2 *= grid_um**2
    valid = label >= 0
    valid[valid] = dist2[valid] <= radius[label[valid]] ** 2
    valid &= _rasterize(layout["clip"], shape, grid_um)
    label[~valid] = -1
    return label, dist2


def _rasterize(geometry, shape, grid_um) -> np.ndarray:
    """Boolean raster of the pixels whose centre lies inside a (multi)polygon given in microns.

    Scanline fill with the even-odd rule over all rings at once, so holes and islands need no special care;
    the cost grows with the pixels and the boundary crossings, not with pixels x vertices.
    """
    import shapely

    H, W = shape
    rings = shapely.get_rings(shapely.get_parts(geometry))
    coords, ring_of = shapely.get_coordinates(rings, return_index=True)
    if len(coords) == 0:
        return np.zeros(shape, dtype=bool)
    xy = coords / grid_um - 0.5  # pixel centres at integer positions
    same_ring = ring_of[:-1] == ring_of[1:]
    x0, y0 = xy[:-1][same_ring].T
    x1, y1 = xy[1:][same_ring].T
    # each edge crosses the rows whose centre lies in [min(y0, y1), max(y0, y1))
    lo = np.ceil(np.minimum(y0, y1)).astype(np.int64)
    hi = np.ceil(np.maximum(y0, y1)).astype(np.int64)
    lo, hi = np.clip(lo, 0, H), np.clip(hi, 0, H)
    n = hi - lo
    edge = np.repeat(np.arange(len(n)), n)
    row = lo[edge] + np.arange(len(edge)) - np.repeat(np.cumsum(n) - n, n)
    x = x0[edge] + (row - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    order = np.lexsort((x, row))
    row, x = row[order], x[order]
    # consecutive crossings on a row pair up into filled runs [x_start, x_end)
    start, end = slice(0, None, 2), slice(1, None, 2)
    col_a = np.clip(np.ceil(x[start]), 0, W).astype(np.int64)
    col_b = np.clip(np.ceil(x[end]), 0, W).astype(np.int64)
    mask = np.zeros(shape, dtype=bool)
    if len(col_a) == 0:
        return mask
    r0, r1 = int(row.min()), int(row.max()) + 1
    c0, c1 = int(col_a.min()), int(col_b.max())
    diff = np.zeros((r1 - r0, c1 - c0 + 1), dtype=np.int32)
    np.add.at(diff, (row[start] - r0, col_a - c0), 1)
    np.add.at(diff, (row[end] - r0, col_b - c0), -1)
    mask[r0:r1, c0:c1] = np.cumsum(diff[:, :-1], axis=1) > 0
    return mask


def _neighbourhood_features(cells, layout) -> dict[str, np.ndarray]:
    from scipy.spatial import cKDTree

    xy, types = cells["xy"], cells["type"]
    tree = cKDTree(xy)
    n_all = tree.query_ball_point(xy, 50.0, return_length=True) - 1
    features = {}
    for name, cell_type in (("lymphocyte_fraction", LYMPHOCYTE), ("tumour_fraction", TUMOUR)):
        sub = xy[types == cell_type]
        n_type = np.zeros(len(xy))
        if len(sub):
            n_type = cKDTree(sub).query_ball_point(xy, 50.0, return_length=True) - (types == cell_type)
        features[name] = np.where(n_all > 0, n_type / np.maximum(n_all, 1), 0.0)
    depth = _at(layout["nest_depth"], xy)
    features["nest_core"] = _sigmoid((depth - 45.0) / 8.0) * (depth > 0)
    features["nest_edge"] = np.exp(-depth / 20.0) * (depth > 0)
    features["tumour_proximity"] = np.exp(-_at(layout["tumour_distance"], xy) / 40.0)
    return features


def _cell_expression(rng, types, areas, features, n_genes):
    """Expected counts per cell and gene, driven by cell type and neighbourhood; each gene's program; and the
    counts' expectation over what no image explains (size noise, cell-to-cell noise, which cells express)."""
    n_types = len(CELL_TYPES)
    programs = []
    for g in range(n_genes):
        if g < len(_DESIGNED):
            kind, base, feature, extra, fraction = _DESIGNED[g]
            base_vec = np.zeros(n_types)
            extra_vec = np.zeros(n_types)
            for name, value in base.items():
                base_vec[CELL_TYPES.index(name)] = value
            for name, value in extra.items():
                extra_vec[CELL_TYPES.index(name)] = value
            base_vec += 0.01 * base_vec.max()  # ambient background everywhere
        else:
            # random programs: common cell types are chosen more often, like genes picked for being variable
            abundance = np.sqrt(np.bincount(types, minlength=n_types) + 1.0)
            moderate = rng.uniform() < 0.6
            magnitude = np.exp(rng.uniform(0.0, np.log(6.0)) if moderate else rng.uniform(np.log(0.1), 0.0))
            chosen = rng.choice(n_types, rng.integers(1, 4), replace=False, p=abundance / abundance.sum())
            base_vec = np.full(n_types, 0.02 * magnitude)
            base_vec[chosen] = magnitude * rng.uniform(0.3, 1.0, len(chosen))
            extra_vec = np.zeros(n_types)
            feature = None
            target = int(rng.choice(chosen))
            # modulate only by a feature that actually varies among the target type's cells
            of_target = types == target
            varying = [f for f in FEATURES if of_target.any() and np.std(features[f][of_target]) > 0.05]
            if rng.uniform() < 0.4 and varying:
                feature = str(varying[rng.integers(len(varying))])
                extra_vec[target] = magnitude * rng.uniform(1.5, 4.0)
            fraction = rng.uniform(0.5, 1.0) if moderate else rng.uniform(0.2, 0.7)
            kind = "neighbourhood" if feature else ("moderate" if moderate else "low")
        programs.append((kind, base_vec, feature, extra_vec, fraction))

    type_area = np.ones(n_types)
    for t in np.unique(types):
        type_area[t] = np.median(areas[types == t])
    explained_size = np.sqrt(areas / type_area[types])
    size_factor = explained_size * rng.lognormal(-0.5 * 0.15**2, 0.15, len(types))
    counts = np.zeros((len(types), n_genes), dtype=np.float64)
    # E[size noise] = E[cell noise] = 1 (mean-one log-normals), E[expressing] = fraction
    expected = np.zeros_like(counts)
    records = {}
    width = max(2, len(str(n_genes - 1)))
    names = [f"GENE{g:0{width}d}" for g in range(n_genes)]
    for g, (kind, base_vec, feature, extra_vec, fraction) in enumerate(programs):
        mean = base_vec[types] + (extra_vec[types] * features[feature] if feature else 0.0)
        expressing = rng.uniform(size=len(types)) < fraction
        noise = rng.lognormal(-0.5 * 0.3**2, 0.3, len(types))  # cell-to-cell variability no image explains
        counts[:, g] = _DEPTH * size_factor * mean * noise * expressing
        expected[:, g] = _DEPTH * explained_size * mean * fraction
        peak = base_vec + extra_vec
        records[names[g]] = {
            "kind": kind,
            "cell_types": [CELL_TYPES[t] for t in np.flatnonzero(peak > 0.1 * peak.max())],
            "feature": feature,
            "feature_cell_types": [CELL_TYPES[t] for t in np.flatnonzero(extra_vec > 0)],
        }
    return names, records, counts, expected


# ----------------------------------------------------------------------------------------------------------
# ground truth


def _truth_raster(rng, layout, fine_labels, *, supersample, truth_shape, truth_um, cell_intensity, n_noise):
    """(genes + 1, H, W) float32 intensity; a truth pixel averages its supersample^2 sub-pixels."""
    import scipy.sparse as sp

    H, W = truth_shape
    s = supersample
    blocks = fine_labels.reshape(H, s, W, s).transpose(0, 2, 1, 3).reshape(H * W, s * s)
    valid = blocks >= 0
    indptr = np.concatenate([[0], np.cumsum(valid.sum(axis=1))])
    # rows: truth pixels; entries: the area fraction each cell covers (duplicates add up in products)
    fraction = sp.csr_matrix(
        (np.full(int(indptr[-1]), 1.0 / (s * s), dtype=np.float32), blocks[valid], indptr),
        shape=(H * W, len(cell_intensity)),
    )
    n_cell_genes = cell_intensity.shape[1]
    truth = np.empty((n_cell_genes + n_noise + 1, H, W), dtype=np.float32)
    intensity = np.asfortranarray(cell_intensity, dtype=np.float32)
    for g in range(n_cell_genes):
        truth[g] = (fraction @ intensity[:, g]).reshape(H, W)
    covered = np.asarray(fraction.sum(axis=1), dtype=np.float32).reshape(H, W)
    field_shape = layout["tissue_field"].shape
    for g in range(n_noise):
        level = _DEPTH * float(np.exp(rng.uniform(np.log(0.001), np.log(0.008))))
        field = _smooth_field(rng, field_shape, rng.uniform(120.0, 400.0))
        # log-normal field with mean ``level`` where cells cover the pixel
        lognormal = np.exp(0.8 * _resample(field, truth_shape, truth_um) - 0.32)
        truth[n_cell_genes + g] = level * lognormal * covered
    truth[-1] = truth[:-1].sum(axis=0, dtype=np.float64)
    return truth


# ----------------------------------------------------------------------------------------------------------
# H&E rendering


def _stamp_ellipses(
    target, mask, cx, cy, a, b, theta, dens, rim, e2, p2, e3, p3, dot_x, dot_y, dot_dens, dot_sigma
):  # pragma: no cover - compiled by numba
    """Soft-edged, irregular ellipses drawn with max() into ``target``, coverage into ``mask`` (pixel units).

    The outline radius is modulated by 2nd and 3rd angular harmonics (``e2``, ``e3``); ``rim`` darkens a band
    just inside the outline (a nuclear membrane); ``dot_*`` adds a Gaussian dot (a nucleolus) at an offset.
    """
    H, W = target.shape
    for k in range(cx.size):
        ext = a[k] * (1.0 + abs(e2[k]) + abs(e3[k])) + 2.0
        i0, i1 = max(int(cy[k] - ext), 0), min(int(cy[k] + ext) + 1, H - 1)
        j0, j1 = max(int(cx[k] - ext), 0), min(int(cx[k] + ext) + 1, W - 1)
        ct, st = math.cos(theta[k]), math.sin(theta[k])
        for i in range(i0, i1 + 1):
            dy = i + 0.5 - cy[k]
            for j in range(j0, j1 + 1):
                dx = j + 0.5 - cx[k]
                u = (dx * ct + dy * st) / a[k]
                v = (-dx * st + dy * ct) / b[k]
                phi = math.atan2(v, u)
                rho = math.sqrt(u * u + v * v) / (
                    1.0 + e2[k] * math.cos(2 * phi + p2[k]) + e3[k] * math.cos(3 * phi + p3[k])
                )
                m = min(max((1.0 - rho) * b[k] / 0.8 + 0.5, 0.0), 1.0)
                if m <= 0.0:
                    continue
                val = dens[k] * (1.0 + rim[k] * math.exp(-(((rho - 0.85) / 0.14) ** 2)))
                if dot_dens[k] > 0:
                    ex, ey = dx - dot_x[k], dy - dot_y[k]
                    val += dot_dens[k] * math.exp(-(ex * ex + ey * ey) / (2 * dot_sigma * dot_sigma))
                val *= m
                if val > target[i, j]:
                    target[i, j] = val
                if m > mask[i, j]:
                    mask[i, j] = m


def _stamp(
    target, mask, centres_px, a_px, b_px, theta, density, *, rim=0.0, harmonics=None, dot=None, dot_px=1.0
):
    """Draw ellipses into ``target`` (max) and their coverage into ``mask``; see :func:`_stamp_ellipses`.

    ``harmonics`` = (e2, phase2, e3, phase3) deform the outlines; ``dot`` = (dx, dy, density) adds nucleoli.
    Per-ellipse values may be scalars; everything is in pixels of ``target``.
    """
    n = len(centres_px)

    def column(value):
        return np.ascontiguousarray(np.broadcast_to(np.asarray(value, dtype=np.float64), (n,)))

    harmonics = (0.0,) * 4 if harmonics is None else harmonics
    dot = (0.0,) * 3 if dot is None else dot
    values = (centres_px[:, 0], centres_px[:, 1], a_px, b_px, theta, density, rim, *harmonics, *dot)
    _compiled("_stamp_ellipses")(target, mask, *(column(v) for v in values), float(dot_px))


def _fibre_and_grain(rng, shape, um_per_px, angle_px):
    """Collagen-like fibres following a smooth orientation field, and fine chromatin grain (unit variance)."""
    from scipy import fft

    white = fft.rfft2(rng.standard_normal(shape, dtype=np.float32), workers=2)
    ky = fft.fftfreq(shape[0], d=um_per_px)[:, None].astype(np.float32)
    kx = fft.rfftfreq(shape[1], d=um_per_px)[None, :].astype(np.float32)
    along, across = 9.0, 1.3  # microns: long thin bundles
    fibres = np.zeros(shape, dtype=np.float32)
    weights = np.zeros(shape, dtype=np.float32)
    # steer between six oriented bands; smooth weights avoid visible seams where the orientation turns
    for orientation in np.arange(6) * np.pi / 6:
        c, s = float(np.cos(orientation)), float(np.sin(orientation))
        fu = kx * c + ky * s
        fn = -kx * s + ky * c
        kernel = np.exp(-2 * np.pi**2 * (along**2 * fu**2 + across**2 * fn**2))
        band = fft.irfft2(white * kernel, s=shape, workers=2)
        band *= 1.0 / max(float(band.std()), 1e-12)
        w = ((1.0 + np.cos(2 * (angle_px - np.float32(orientation)))) / 2) ** 3
        fibres += w * band
        weights += w * w
    fibres /= np.sqrt(np.maximum(weights, 1e-6))
    grain = fft.irfft2(white * np.exp(-2 * np.pi**2 * 0.45**2 * (kx**2 + ky**2)), s=shape, workers=2)
    grain /= max(float(grain.std()), 1e-12)
    return fibres, grain.astype(np.float32)


def _render_he(rng, layout, cells, image_labels, shape, um_per_px) -> np.ndarray:
    """(H, W, 3) uint8 H&E image of the layout and cells."""
    from scipy import ndimage

    f32 = np.float32
    p = um_per_px
    label, dist2 = image_labels
    types = cells["type"]
    n_cells = len(types)
    tick = _Ticker("render")
    tissue_px = _rasterize(layout["tissue"], shape, p)
    region = layout["region"]
    loose = _resample(np.isin(region, (1, 4)).astype(f32), shape, p)
    nests = _resample((region == 2).astype(f32), shape, p)
    lymphoid = _resample((region == 3).astype(f32), shape, p)
    angle = _resample(layout["fibre_angle"], shape, p)
    tick("regions")
    fibres, grain = _fibre_and_grain(rng, shape, p, angle)
    tick("fibres")

    # extracellular matrix: dense wavy collagen in stroma, thin septa in tumour, loose mesh in lymphoid tissue
    collagen = np.clip(f32(0.5) + f32(0.16) * fibres, 0.0, 1.0)
    clefts = f32(1) / (f32(1) + np.exp(f32(-5) * (fibres + f32(1.8))))  # pale cracks between collagen bundles
    e = loose * (collagen * (f32(0.3) + f32(0.7) * clefts))
    e += nests * (f32(0.4) + f32(0.12) * fibres) + lymphoid * (f32(0.22) + f32(0.05) * grain)
    h = f32(0.04) * loose + f32(0.06) * nests + f32(0.1) * lymphoid
    tick("matrix")

    # each cell's own cytoplasm near its nucleus, fading into the matrix
    own = label >= 0
    t = np.where(own, types[np.maximum(label, 0)], 0).astype(np.int8)
    reach = np.where(own, _CYTO_UM.astype(f32)[t], f32(0))
    weight = np.clip(reach - np.sqrt(dist2, where=own, out=np.zeros(shape, f32)), 0.0, 1.0)
    texture = f32(1) + f32(0.12) * grain
    e += weight * (_CYTO_E.astype(f32)[t] * texture - e)
    h += weight * (_CYTO_H.astype(f32)[t] * texture - h)
    tick("cytoplasm")

    # cell borders: between neighbouring territories and at a territory's outer edge
    border = np.zeros(shape, dtype=bool)
    for axis in (0, 1):
        change = np.diff(label, axis=axis) != 0
        lead, trail = [slice(None)] * 2, [slice(None)] * 2
        lead[axis], trail[axis] = slice(1, None), slice(None, -1)
        border[tuple(lead)] |= change  # both sides of a boundary, so every territory is closed by a membrane
        border[tuple(trail)] |= change
    border &= own
    membrane = np.where(border, _MEMBRANE_E.astype(f32)[t], f32(0))
    # fat vacuoles are outlined by nothing but their membranes, so those must be wide enough to see
    fat_membrane = np.where(t == ADIPOCYTE, membrane, f32(0))
    fat_membrane = ndimage.maximum_filter(fat_membrane, size=max(2, int(round(1.5 / p))))
    membrane = np.maximum(membrane, fat_membrane)
    np.maximum(e, membrane * (f32(1) + f32(0.2) * grain), out=e)
    tick("membranes")

    # lumens: ducts hold pale secretion, vessels plasma and red blood cells
    lumens = layout["lumens"]
    for kind, lumen_e in ((_DUCT, 0.1 + 0.05 * grain), (_VESSEL, f32(0.15))):
        sel = np.flatnonzero(lumens["kind"] == kind)
        if sel.size == 0:
            continue
        inside = _rasterize(
            _ellipse_polygons(*(lumens[k][sel] for k in ("cx", "cy", "a", "b", "theta"))), shape, p
        )
        e = np.where(inside, lumen_e, e)
        h = np.where(inside, f32(0.01), h)
    rbc = []
    for k in np.flatnonzero(lumens["kind"] == _VESSEL):
        a_k = lumens["a"][k]
        pts = _lattice(rng, 2 * a_k + 8, 6.2, 0.3) - (a_k + 4) + [lumens["cx"][k], lumens["cy"][k]]
        one = {key: lumens[key][k : k + 1] for key in ("cx", "cy", "a", "b", "theta")}
        one["a"], one["b"] = np.maximum(one["a"] - 2.8, 0.5), np.maximum(one["b"] - 2.8, 0.5)
        rbc.append(pts[(_in_ellipses(pts, one) == 0) & (rng.uniform(size=len(pts)) < 0.8)])
    rbc = np.concatenate(rbc) if rbc else np.zeros((0, 2))
    if len(rbc):
        n = len(rbc)
        radius = rng.uniform(3.2, 3.8, n) / p
        red = np.zeros(shape, dtype=f32)
        # biconcave discs: the darker rim comes from the same membrane term as a nucleus's
        _stamp(
            red, np.zeros(shape, dtype=f32), rbc / p, radius, radius * rng.uniform(0.85, 1, n),
            rng.uniform(0, np.pi, n), 0.75, rim=0.45,
        )
        np.maximum(e, red, out=e)
    tick("lumens")

    # nuclei
    nuc_h = np.zeros(shape, dtype=f32)
    nuc_mask = np.zeros(shape, dtype=f32)
    a = _NUCLEUS_A_UM[types] * rng.lognormal(0, 0.1, n_cells)
    b = np.minimum(_NUCLEUS_B_UM[types] * rng.lognormal(0, 0.1, n_cells), a)
    tumour = types == TUMOUR
    a[tumour] *= rng.lognormal(0, 0.12, tumour.sum())  # anisonucleosis
    pleo = _PLEOMORPHISM[types]
    centre = cells["xy"].copy()
    theta = cells["angle"].copy()
    fat_cells = np.flatnonzero(types == ADIPOCYTE)
    if len(fat_cells) > 1:
        from scipy.spatial import cKDTree

        # an adipocyte's nucleus is squeezed by the fat vacuole against a membrane it shares with a neighbour
        dist, nearest = cKDTree(centre).query(centre[fat_cells], k=2)
        towards = centre[nearest[:, 1]] - centre[fat_cells]
        centre[fat_cells] += towards * ((dist[:, 1] / 2 - 2.5) / np.maximum(dist[:, 1], 1e-9))[:, None]
        theta[fat_cells] = np.arctan2(towards[:, 1], towards[:, 0]) + np.pi / 2
    dens = _NUCLEUS_H[types] * rng.lognormal(0, 0.12, n_cells)
    dot_r = 0.3 * a * rng.uniform(size=n_cells)
    dot_phi = rng.uniform(0, 2 * np.pi, n_cells)
    harmonics = (
        pleo * rng.standard_normal(n_cells),
        rng.uniform(0, 2 * np.pi, n_cells),
        0.6 * pleo * rng.standard_normal(n_cells),
        rng.uniform(0, 2 * np.pi, n_cells),
    )
    nucleoli = (
        dot_r * np.cos(dot_phi) / p,
        dot_r * np.sin(dot_phi) / p,
        _NUCLEOLUS_H[types] * rng.uniform(0.5, 1.0, n_cells),
    )
    _stamp(
        nuc_h, nuc_mask, centre / p, a / p, b / p, theta, dens,
        rim=_NUCLEUS_RIM[types], harmonics=harmonics, dot=nucleoli, dot_px=0.55 / p,
    )
    nuc_h *= f32(1) + f32(0.3) * grain  # chromatin clumps
    h = h * (f32(1) - nuc_mask) + nuc_h
    e *= f32(1) - f32(0.75) * nuc_mask
    tick("nuclei")

    # outside the section there is only glass; staining drifts slowly across the slide
    drift = _resample(_smooth_field(rng, layout["tissue_field"].shape, 600.0), shape, p)
    h_scale, e_scale = rng.uniform(0.85, 1.15), rng.uniform(0.8, 1.2)
    h *= np.where(tissue_px, f32(h_scale) * (f32(1) + f32(0.08) * drift), f32(0))
    e *= np.where(tissue_px, f32(e_scale) * (f32(1) - f32(0.08) * drift), f32(0))
    h = ndimage.gaussian_filter(h, 0.45 / p)
    e = ndimage.gaussian_filter(e, 0.45 / p)
    h_vec = _HEMATOXYLIN + rng.normal(0, 0.03, 3)
    e_vec = _EOSIN + rng.normal(0, 0.03, 3)
    h_vec, e_vec = (np.abs(v) / np.linalg.norm(v) for v in (h_vec, e_vec))
    glass = np.array([0.015, 0.02, 0.015]) * rng.uniform(0.6, 1.4)
    rgb = np.empty((*shape, 3), dtype=np.uint8)
    for c in range(3):
        od = h * f32(h_vec[c]) + e * f32(e_vec[c]) + f32(glass[c])
        value = f32(255) * np.exp(-od) + f32(2.5) * rng.standard_normal(shape, dtype=f32)  # scanner noise
        rgb[..., c] = np.clip(value, 0, 255)
    tick("stain")
    return rgb


def _peak_rss_mb() -> float:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except ImportError:  # pragma: no cover - not on POSIX
        return float("nan")


class _Ticker:
    """Debug-level timing of the generator's steps (wall and CPU seconds)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.last = (time.perf_counter(), time.process_time())

    def __call__(self, step: str) -> None:
        now = (time.perf_counter(), time.process_time())
        logger.debug(
            "%s %s: %.3f s wall, %.3f s cpu, peak rss %.0f MB", self.what, step, now[0] - self.last[0],
            now[1] - self.last[1], _peak_rss_mb(),
        )
        self.last = now


# ----------------------------------------------------------------------------------------------------------
# spots and assembly


def _spot_grid(size_um, pitch_um, diameter_um):
    """Visium-like hexagonal grid (array_row, array_col, centres in microns) kept wholly inside the image."""
    dy = pitch_um * np.sqrt(3) / 2
    margin = diameter_um / 2 + 1.0
    rows = np.arange(int((size_um - 2 * margin) / dy) + 1)
    cols = np.arange(int((size_um - 2 * margin) / pitch_um) + 1)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    x = margin + cc * pitch_um + (rr % 2) * pitch_um / 2
    y = margin + rr * dy
    keep = x <= size_um - margin
    # Visium numbers columns in half-pitch steps so neighbours in a row differ by 2
    return rr[keep], 2 * cc[keep] + rr[keep] % 2, np.stack([x[keep], y[keep]], axis=1)


def _assemble(
    rng,
    *,
    image,
    truth,
    polygons,
    cell_types,
    gene_names,
    layout,
    um_per_px,
    truth_um_per_px,
    spot_diameter_um,
    spot_pitch_um,
    counts_scale,
    expected_map=None,
):
    import geopandas as gpd
    import pandas as pd
    import shapely
    from spatialdata.models import Image2DModel, ShapesModel
    from spatialdata.transformations import Scale, Sequence

    from .._core.coords import transformations_of
    from ..data import build_spot_sdata, circle_weights

    rows, cols, centres_um = _spot_grid(layout["size_um"], spot_pitch_um, spot_diameter_um)
    keep = shapely.contains_xy(layout["tissue"], centres_um[:, 0], centres_um[:, 1])
    rows, cols, centres_um = rows[keep], cols[keep], centres_um[keep]
    if len(centres_um) == 0:
        fail(
            "pg.datasets.synthetic",
            "no spot centre fell on the tissue",
            "Pass a larger size_um or a smaller spot_pitch_um",
        )

    n_genes = len(gene_names)
    H, W = truth.shape[1:]
    weights = circle_weights(centres_um / truth_um_per_px, spot_diameter_um / 2 / truth_um_per_px, (H, W))
    weights = weights * truth_um_per_px**2  # pixel^2 -> um^2, so weights @ intensity is expected counts
    expected = np.stack([weights @ truth[g].ravel().astype(np.float64) for g in range(n_genes)], axis=1)
    expected *= counts_scale
    counts = rng.poisson(expected)

    obs_names = [f"spot_{r}_{c}" for r, c in zip(rows, cols)]
    obs = pd.DataFrame({"array_row": rows, "array_col": cols}, index=obs_names)
    sdata = build_spot_sdata(
        image,
        centers_px=centres_um / um_per_px,
        spot_diameter_um=spot_diameter_um,
        um_per_px=um_per_px,
        counts=counts,
        var_names=gene_names,
        obs_names=obs_names,
        obs=obs,
        platform="synthetic",
        image_key=IMAGE_KEY,
        shapes_key=SPOTS_KEY,
        table_key=TABLE_KEY,
    )
    sdata.tables[TABLE_KEY].layers["expected"] = expected.astype(np.float32)

    image_transformations = transformations_of(sdata.images[IMAGE_KEY])
    to_px = 1.0 / um_per_px
    cells = gpd.GeoDataFrame(
        {"cell_type": pd.Categorical([CELL_TYPES[t] for t in cell_types], categories=list(CELL_TYPES))},
        geometry=shapely.transform(polygons, lambda c: c * to_px),
        index=[f"cell_{i}" for i in range(len(polygons))],
    )
    sdata.shapes[CELLS_KEY] = ShapesModel.parse(cells, transformations=image_transformations)

    factor = truth_um_per_px / um_per_px
    truth_transformations = {
        cs: Sequence([Scale([factor, factor], axes=("x", "y")), t]) for cs, t in image_transformations.items()
    }
    for key, values in ((TRUTH_KEY, truth), (EXPECTED_TRUTH_KEY, expected_map)):
        if values is None:
            continue
        sdata.images[key] = Image2DModel.parse(
            values,
            dims=("c", "y", "x"),
            c_coords=[*gene_names, TOTAL_CHANNEL],
            transformations=truth_transformations,
            chunks=(values.shape[0], 512, 512),
        )
        record_um_per_px(sdata, key, truth_um_per_px)
    return sdata


def _add_bins(sdata, rng, *, truth, layout, gene_names, bins_um, um_per_px, truth_um_per_px, counts_scale):
    """Square bins (Visium HD-like) over the tissue, with Poisson counts of the truth's integral over each."""
    import anndata as ad
    import geopandas as gpd
    import pandas as pd
    import scipy.sparse as sp
    import shapely
    from spatialdata.models import ShapesModel, TableModel

    from .._core.coords import transformations_of
    from ..data import polygon_weights

    n = int(np.floor(layout["size_um"] / bins_um + 1e-9))
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    x0, y0 = cols * bins_um, rows * bins_um
    keep = shapely.contains_xy(layout["tissue"], x0 + bins_um / 2, y0 + bins_um / 2)
    rows, cols, x0, y0 = rows[keep], cols[keep], x0[keep], y0[keep]
    squares_um = shapely.box(x0, y0, x0 + bins_um, y0 + bins_um)
    H, W = truth.shape[1:]
    weights = polygon_weights(shapely.transform(squares_um, lambda c: c / truth_um_per_px), (H, W))
    weights = weights * truth_um_per_px**2
    expected = np.stack([weights @ truth[g].ravel().astype(np.float64) for g in range(len(gene_names))], axis=1)
    expected *= counts_scale
    counts = rng.poisson(expected)
    names = pd.Index([f"bin_{r}_{c}" for r, c in zip(rows, cols, strict=True)])
    transformations = transformations_of(sdata.images[IMAGE_KEY])
    bins = gpd.GeoDataFrame({"array_row": rows, "array_col": cols},
                            geometry=shapely.transform(squares_um, lambda c: c / um_per_px), index=names)
    sdata.shapes[BINS_KEY] = ShapesModel.parse(bins, transformations=transformations)
    obs = pd.DataFrame({"array_row": rows, "array_col": cols, REGION_KEY: pd.Categorical([BINS_KEY] * len(names)),
                        INSTANCE_KEY: names.to_numpy()}, index=names)
    adata = ad.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), obs=obs,
                       var=pd.DataFrame(index=pd.Index(gene_names, dtype=str)))
    adata.layers["expected"] = expected.astype(np.float32)
    adata.obsm["spatial"] = np.column_stack([x0 + bins_um / 2, y0 + bins_um / 2]) / um_per_px
    adata.uns[UNS_KEY] = {"platform": "synthetic_bins", "bin_um": float(bins_um), "image_key": IMAGE_KEY}
    sdata.tables[BINS_TABLE_KEY] = TableModel.parse(adata, region=BINS_KEY, region_key=REGION_KEY,
                                                    instance_key=INSTANCE_KEY)
