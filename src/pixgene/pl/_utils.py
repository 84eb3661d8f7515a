"""Shared plotting machinery: one drawing frame (the H&E's pixel space), block-wise raster windows,
shapes placed by their transformations, table values linked to shapes, and save/show handling.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .._core.coords import affine_between, apply_affine, isotropic_scale
from .._core.normalize import row_scale
from .._core.raster import level_for_downsample, rgb_array, scale_levels
from .._core.validate import fail, require_element

logger = logging.getLogger(__name__)

#: (x_min, y_min, x_max, y_max) of a rectangle in some element's pixels
Bounds = tuple[float, float, float, float]

#: backends that cannot open a window; plt.show() on them only warns
_NON_INTERACTIVE = {"agg", "pdf", "ps", "svg", "pgf", "cairo", "template"}


# ----------------------------------------------------------------------------------------------- output
def finish(fig: Any, *, save: str | None, show: bool | None, dpi: float = 150) -> None:
    """Save the figure when asked and show it like scanpy: by default only on an interactive backend."""
    import matplotlib
    import matplotlib.pyplot as plt

    if save is not None:
        fig.savefig(str(save), dpi=dpi, bbox_inches="tight")
        logger.info("saved figure to %s", save)
    if show is None:
        show = save is None and matplotlib.get_backend().lower() not in _NON_INTERACTIVE
    if show:
        plt.show()


def new_axes(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


def panel_size(window: Bounds, width: float = 5.0) -> tuple[float, float]:
    """Figure size for one map panel with the window's aspect ratio (capped so tall slides stay on screen)."""
    x0, y0, x1, y1 = window
    aspect = abs(y1 - y0) / max(abs(x1 - x0), 1e-9)
    return width, float(np.clip(width * aspect, 1.5, 3 * width))


def parse_vmax(vmax: float | str | None, values: np.ndarray, what: str) -> float | None:
    """``"p99"`` means the 99th percentile of the finite values drawn; a number is used as is; None = max."""
    if vmax is None or isinstance(vmax, int | float):
        return None if vmax is None else float(vmax)
    text = str(vmax)
    try:
        if not text.startswith("p"):
            raise ValueError
        q = float(text[1:])
        if not 0 <= q <= 100:
            raise ValueError
    except ValueError:
        fail(what, f"vmax={vmax!r} is neither a number nor a percentile like 'p99'", "Pass vmax=2.5 or 'p99'")
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return None
    return float(np.percentile(finite, q))


def color_limits(values: np.ndarray, vmax: float | str | None, what: str) -> tuple[float, float]:
    """(vmin, vmax) for numeric colours: the smallest finite value and ``vmax`` as parsed (above vmin)."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    low = float(finite.min()) if finite.size else 0.0
    top = parse_vmax(vmax, finite, what)
    if top is None:
        top = float(finite.max()) if finite.size else 1.0
    if not top > low:
        top = low + max(abs(low), 1.0) * 1e-6
    return low, top


# ----------------------------------------------------------------------------------------------- rasters
@dataclass(frozen=True)
class RasterWindow:
    """A block-wise downsampled window of a raster element.

    ``data`` is (c, h, w) float32; ``bounds`` = (x0, y0, x1, y1) is the exact area it covers in the
    element's level-0 intrinsic pixels (grid convention: pixel (i, j) covers [j, j + 1] x [i, i + 1]).
    """

    data: np.ndarray
    bounds: Bounds
    level: int
    block: tuple[int, int]

    @property
    def extent(self) -> Bounds:
        """``imshow`` extent (left, right, bottom, top) in the element's own pixels."""
        x0, y0, x1, y1 = self.bounds
        return (x0, x1, y1, y0)


def level0_size(element: Any) -> tuple[int, int]:
    array = scale_levels(element)[0][0]
    return int(array.sizes["y"]), int(array.sizes["x"])


def raster_window(
    element: Any,
    *,
    bounds: Bounds | None = None,
    max_px: int = 2000,
    channels: list[str] | None = None,
    name: str = "image",
) -> RasterWindow:
    """Read ``bounds`` (level-0 pixels; default the whole raster) at most ``max_px`` on a side.

    The coarsest pyramid level that is still fine enough is read, cropped and block-averaged through dask,
    so only the small result and a few chunks at a time are ever in memory. Block means keep intensities in
    their units (counts per unit area stay counts per unit area).
    """
    if max_px < 1:
        fail(name, f"max_px={max_px} is not a positive number of pixels", "Pass max_px >= 1, e.g. 2000")
    H0, W0 = level0_size(element)
    x0, y0, x1, y1 = (0.0, 0.0, float(W0), float(H0)) if bounds is None else map(float, bounds)
    x0, x1 = max(x0, 0.0), min(x1, float(W0))
    y0, y1 = max(y0, 0.0), min(y1, float(H0))
    if not (x1 > x0 and y1 > y0):
        fail(
            name,
            f"the requested region {bounds} does not overlap the raster (0, 0, {W0}, {H0})",
            "Pass region=(x_min, y_min, x_max, y_max) inside the image, in the H&E's pixels",
        )
    wanted = max(x1 - x0, y1 - y0) / max_px
    levels = scale_levels(element)
    array, _ = level_for_downsample(element, wanted)
    level = next(i for i, (a, _) in enumerate(levels) if a.sizes == array.sizes)
    # per-axis factors: spatialdata scales each pyramid level by the exact shape ratio of each axis
    sy, sx = H0 / array.sizes["y"], W0 / array.sizes["x"]
    ix0, ix1 = int(math.floor(x0 / sx)), int(math.ceil(x1 / sx - 1e-9))
    iy0, iy1 = int(math.floor(y0 / sy)), int(math.ceil(y1 / sy - 1e-9))
    nx, ny = ix1 - ix0, iy1 - iy0
    k = max(1, math.ceil(max(nx, ny) / max_px))
    kx, ky = min(k, nx), min(k, ny)
    # trimming drops the partial last block; bounds below report exactly what is covered
    nx, ny = (nx // kx) * kx, (ny // ky) * ky
    window = array
    if channels is not None:
        window = window.sel(c=channels)
    window = window.isel(y=slice(iy0, iy0 + ny), x=slice(ix0, ix0 + nx))
    if window.dtype != np.float32:
        window = window.astype(np.float32)
    if kx > 1 or ky > 1:
        window = window.coarsen(y=ky, x=kx, boundary="trim").mean()
    data = np.asarray(window.data.compute() if hasattr(window.data, "compute") else window.data)
    data = data.astype(np.float32, copy=False)
    covered = (ix0 * sx, iy0 * sy, (ix0 + nx) * sx, (iy0 + ny) * sy)
    logger.debug("%s: level %d, blocks %dx%d, drawn %s", name, level, ky, kx, data.shape)
    return RasterWindow(data=data, bounds=covered, level=level, block=(ky, kx))


def rgb01(window: RasterWindow, dtype: Any) -> np.ndarray:
    """(h, w, 3) float in [0, 1] from a block-averaged RGB window, scaled by the source dtype."""
    data = window.data
    if np.issubdtype(dtype, np.integer):
        data = data / float(np.iinfo(dtype).max)
    elif data.size and np.nanmax(data) > 1.5:
        # float images stored in 0-255, judged once on the whole drawn window so all tiles agree
        data = data / 255.0
    return np.clip(np.moveaxis(data, 0, -1), 0.0, 1.0)


@dataclass(frozen=True)
class Frame:
    """The drawing frame: everything is drawn in the H&E's level-0 pixel space."""

    image_key: str
    bounds: Bounds  # the region shown, H&E pixels
    rgb: np.ndarray | None  # (h, w, 3) in [0, 1]
    rgb_window: RasterWindow | None

    def limit(self, ax: Any) -> None:
        x0, y0, x1, y1 = self.bounds
        ax.set_xlim(x0, x1)
        ax.set_ylim(y1, y0)
        ax.set_aspect("equal")

    def draw_image(self, ax: Any, **kwargs: Any) -> Any:
        if self.rgb is None:
            return None
        image = ax.imshow(self.rgb, extent=self.rgb_window.extent, interpolation="nearest", **kwargs)
        self.limit(ax)
        return image


def image_frame(
    sdata: Any,
    image_key: str,
    *,
    region: Bounds | None,
    max_px: int,
    show_image: bool = True,
) -> Frame:
    """Check the H&E element and read the window to draw (never the full-resolution slide)."""
    element = require_element(sdata, image_key, "images")
    rgb_array(element, image_key)  # validates dims and channels before any reading
    H0, W0 = level0_size(element)
    if region is not None:
        region = tuple(float(v) for v in region)
        if len(region) != 4 or not (region[2] > region[0] and region[3] > region[1]):
            fail(
                f"image {image_key!r}",
                f"region={region!r} is not (x_min, y_min, x_max, y_max) with max > min",
                "Pass region=(x_min, y_min, x_max, y_max) in the H&E's pixels",
            )
    bounds = region if region is not None else (0.0, 0.0, float(W0), float(H0))
    if not show_image:
        return Frame(image_key, tuple(map(float, bounds)), None, None)
    window = raster_window(element, bounds=bounds, max_px=max_px, name=f"image {image_key!r}")
    dtype = scale_levels(element)[window.level][0].dtype
    return Frame(image_key, tuple(map(float, bounds)), rgb01(window, dtype), window)


def is_axis_aligned(matrix: np.ndarray) -> bool:
    lin = matrix[:2, :2]
    return bool(np.allclose([lin[0, 1], lin[1, 0]], 0.0, atol=1e-12 * max(1.0, np.abs(lin).max())))


def draw_raster_on(
    ax: Any, window: RasterWindow, matrix: np.ndarray, values: np.ndarray, **kwargs: Any
) -> Any:
    """Draw a 2-D window of another raster, placed into the frame by ``matrix`` (its pixels -> H&E pixels).

    Axis-aligned placements become a plain ``extent`` in H&E pixels; rotations go through an affine
    image transform so the map still lands where its transformation puts it.
    """
    x0, y0, x1, y1 = window.bounds
    if is_axis_aligned(matrix):
        (left, top), (right, bottom) = apply_affine(matrix, np.array([[x0, y0], [x1, y1]]))
        return ax.imshow(values, extent=(left, right, bottom, top), **kwargs)
    from matplotlib.transforms import Affine2D

    transform = Affine2D(matrix) + ax.transData
    return ax.imshow(values, extent=(x0, x1, y1, y0), transform=transform, **kwargs)


def bounds_in(matrix: np.ndarray, bounds: Bounds) -> Bounds:
    """Bounding box, after ``matrix``, of the rectangle ``bounds``."""
    x0, y0, x1, y1 = bounds
    corners = apply_affine(matrix, np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]))
    return (*corners.min(axis=0), *corners.max(axis=0))


# ----------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class PlacedShapes:
    """Shapes of one element placed in the H&E's pixels; ``index`` = the shapes' index, in order."""

    index: pd.Index
    kind: str  # "circle" or "polygon"
    centers: np.ndarray  # (n, 2) x, y in H&E pixels
    lo: np.ndarray  # (n, 2) bounding box corners in H&E pixels, to draw only what is in view
    hi: np.ndarray
    radii: np.ndarray | None = None  # (n,) in H&E pixels, circles only
    rings: list[np.ndarray] | None = None  # exteriors (k, 2) of every polygon part, polygons only
    ring_owner: np.ndarray | None = None  # position of the shape each ring belongs to


def place_shapes(sdata: Any, shapes_key: str, image_key: str) -> PlacedShapes:
    """Place a shapes element in the H&E's pixel space through the transformations they share."""
    import shapely

    shapes = require_element(sdata, shapes_key, "shapes")
    matrix = affine_between(sdata, shapes_key, image_key)
    geom_types = set(shapes.geometry.geom_type.unique())
    if geom_types <= {"Point"}:
        if "radius" not in shapes.columns:
            fail(
                f"shapes {shapes_key!r}",
                "are points without a 'radius' column",
                "Parse circles with ShapesModel.parse(..., radius=...)",
            )
        scale = isotropic_scale(matrix, f"shapes {shapes_key!r}")
        centers = apply_affine(matrix, shapely.get_coordinates(shapes.geometry.values))
        radii = shapes["radius"].to_numpy(dtype=float) * scale
        return PlacedShapes(
            shapes.index, "circle", centers, centers - radii[:, None], centers + radii[:, None], radii=radii
        )
    if geom_types <= {"Polygon", "MultiPolygon"}:
        # vectorised through shapely: Visium HD and cell segmentations have 10^5-10^6 polygons
        parts, owner = shapely.get_parts(shapes.geometry.values, return_index=True)
        coords, ring = shapely.get_coordinates(shapely.get_exterior_ring(parts), return_index=True)
        rings = np.split(apply_affine(matrix, coords), np.flatnonzero(np.diff(ring)) + 1)
        x0, y0, x1, y1 = shapes.geometry.bounds.to_numpy().T
        corners = apply_affine(matrix, np.stack([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]).transpose(0, 2, 1))
        centroids = shapes.geometry.centroid
        xy = np.column_stack([centroids.x.to_numpy(), centroids.y.to_numpy()])
        return PlacedShapes(
            shapes.index, "polygon", apply_affine(matrix, xy), corners.min(axis=0), corners.max(axis=0),
            rings=rings, ring_owner=np.asarray(owner, dtype=np.int64),
        )
    fail(
        f"shapes {shapes_key!r}",
        f"have geometry types {sorted(geom_types)}; only circles and polygons can be drawn",
        "Pass circles (points with a radius) or polygons",
    )


def in_view(placed: PlacedShapes, bounds: Bounds) -> np.ndarray:
    """Shapes whose bounding box meets the shown region (large slides: draw only what is visible)."""
    x0, y0, x1, y1 = bounds
    lo, hi = placed.lo, placed.hi
    return (hi[:, 0] >= x0) & (lo[:, 0] <= x1) & (hi[:, 1] >= y0) & (lo[:, 1] <= y1)


def draw_shapes(
    ax: Any,
    placed: PlacedShapes,
    bounds: Bounds,
    *,
    values: np.ndarray | None = None,
    colors: np.ndarray | None = None,
    cmap: Any = None,
    vmin: float | None = None,
    vmax: float | None = None,
    outline: str = "#00e5ff",
    linewidth: float = 0.6,
    alpha: float = 1.0,
    na_color: str = "lightgrey",
) -> Any:
    """Add the visible shapes as one collection: outlines only, by numeric values, or by colours.

    Circles are one EllipseCollection sized in data units (the true radius in H&E pixels), polygons one
    PolyCollection of their exteriors; both draw 100k shapes in about a second, where per-shape patches
    take ten times longer.
    """
    import matplotlib as mpl
    from matplotlib.collections import EllipseCollection, PolyCollection

    keep = np.flatnonzero(in_view(placed, bounds))
    if placed.kind == "circle":
        diameters = 2.0 * placed.radii[keep]
        collection = EllipseCollection(
            diameters, diameters, np.zeros(len(keep)), units="xy",
            offsets=placed.centers[keep], offset_transform=ax.transData,
        )
        owner = keep
    else:
        drawn = np.flatnonzero(in_view(placed, bounds)[placed.ring_owner])
        owner = placed.ring_owner[drawn]
        collection = PolyCollection([placed.rings[i] for i in drawn], closed=True)
    if values is None and colors is None:
        collection.set_facecolor("none")
        collection.set_edgecolor(outline)
        collection.set_linewidth(linewidth)
    elif colors is not None:
        collection.set_facecolor(np.asarray(colors, dtype=object)[owner].tolist())
        collection.set_edgecolor("none")
        collection.set_alpha(alpha)
    else:
        cmap = mpl.colormaps[cmap] if isinstance(cmap, str) else cmap
        collection.set_cmap(cmap.with_extremes(bad=na_color))
        collection.set_array(np.ma.masked_invalid(np.asarray(values, dtype=float)[owner]))
        collection.set_clim(vmin, vmax)
        collection.set_edgecolor("none")
        collection.set_alpha(alpha)
    ax.add_collection(collection)
    return collection


# ----------------------------------------------------------------------------------------------- tables
def table_region(table: Any, table_key: str, shapes_key: str | None) -> tuple[str, str, str]:
    """(shapes_key, region_key, instance_key) of a table, the shapes key checked or derived."""
    attrs = table.uns.get("spatialdata_attrs", {})
    region, region_key, instance_key = attrs.get("region"), attrs.get("region_key"), attrs.get("instance_key")
    if region is None or region_key is None or instance_key is None:
        fail(
            f"table {table_key!r}",
            "is not linked to a shapes element (no region / region_key / instance_key)",
            "Parse it with TableModel.parse(adata, region=..., region_key=..., instance_key=...)",
        )
    regions = [region] if isinstance(region, str) else list(region)
    if shapes_key is None:
        if len(regions) != 1:
            fail(
                f"table {table_key!r}",
                f"annotates several elements {regions}",
                "Pass shapes_key=... to choose which one to draw",
            )
        shapes_key = regions[0]
    elif shapes_key not in regions:
        fail(
            f"table {table_key!r}",
            f"does not annotate shapes {shapes_key!r} (it annotates {regions})",
            "Pass the table that annotates these shapes, or the shapes this table annotates",
        )
    return shapes_key, region_key, instance_key


def rows_for_shapes(sdata: Any, table_key: str, shapes_key: str, index: pd.Index) -> np.ndarray:
    """For each shape in ``index``, the row of ``table_key`` that annotates it, or -1."""
    table = require_element(sdata, table_key, "tables")
    _, region_key, instance_key = table_region(table, table_key, shapes_key)
    obs = table.obs
    mine = np.flatnonzero((obs[region_key].astype(str) == shapes_key).to_numpy())
    instances = pd.Index(obs[instance_key].to_numpy()[mine])
    pos = instances.get_indexer(index)
    if np.all(pos < 0) and len(index):
        # ids written as strings on one side and integers on the other still name the same shapes
        pos = pd.Index(instances.astype(str)).get_indexer(index.astype(str))
    if np.all(pos < 0) and len(index):
        fail(
            f"table {table_key!r}",
            f"has no row whose {instance_key!r} matches an index value of shapes {shapes_key!r}",
            "Check that the table's instance ids are the shapes' index",
        )
    rows = np.full(len(index), -1, dtype=np.int64)
    rows[pos >= 0] = mine[pos[pos >= 0]]
    return rows


def column_vector(X: Any, column: int) -> np.ndarray:
    import scipy.sparse as sp

    col = X[:, column]
    col = col.toarray() if sp.issparse(col) else np.asarray(col)
    return np.asarray(col, dtype=float).ravel()


def row_totals(X: Any) -> np.ndarray:
    return np.asarray(X.sum(axis=1), dtype=float).ravel()


def by_shape(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Table values re-ordered to the shapes; NaN where no row annotates a shape."""
    out = np.full(len(rows), np.nan)
    out[rows >= 0] = np.asarray(values, dtype=float)[rows[rows >= 0]]
    return out


def log_normalise(counts: np.ndarray, totals: np.ndarray, target: float = 1e4) -> np.ndarray:
    """log1p(target * counts / total) (as the scores take it), NaN where the total is not positive: such a shape
    is left blank, not drawn as zero expression."""
    totals = np.asarray(totals, dtype=float)
    values = np.log1p(np.asarray(counts, dtype=float) * row_scale(totals, target))
    return np.where(totals > 0, values, np.nan)
