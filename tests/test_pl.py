"""pg.pl: what is drawn is checked against references computed directly with numpy."""

from __future__ import annotations

import re
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import anndata as ad  # noqa: E402
import dask.array as da  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from spatialdata.models import Image2DModel, ShapesModel, TableModel  # noqa: E402
from spatialdata.transformations import Affine, Identity, Scale, Sequence, Translation  # noqa: E402

import pixgene as pg  # noqa: E402
from pixgene._core.keys import TOTAL_CHANNEL, TOTAL_OBS  # noqa: E402
from pixgene._core.units import record_um_per_px  # noqa: E402
from pixgene._core.validate import PixgeneInputError  # noqa: E402
from pixgene.data._build import build_spot_sdata  # noqa: E402

H, W = 120, 200
UM_PER_PX = 0.5
SPOT_UM = 10.0  # 20 px wide
GENES = ["A", "B", "C", "D"]
# the dense map: 20 x 30 pixels of 4 H&E pixels each, shifted by (10, 6) H&E pixels
DENSE_SHAPE, DENSE_SCALE, DENSE_SHIFT = (20, 30), 4.0, (10.0, 6.0)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _centers() -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(20, 190, 25.0), np.arange(18, 110, 25.0))
    return np.column_stack([xs.ravel(), ys.ravel()])


def _sdata(image_transformations=None):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(3, H, W), dtype=np.uint8)
    centers = _centers()
    counts = rng.poisson(lam=[3.0, 8.0, 1.0, 20.0], size=(len(centers), len(GENES)))
    obs = pd.DataFrame({"cluster": pd.Categorical(rng.choice(["x", "y"], len(centers)))})
    sdata = build_spot_sdata(
        image,
        centers_px=centers,
        spot_diameter_um=SPOT_UM,
        um_per_px=UM_PER_PX,
        counts=counts,
        var_names=GENES,
        obs_names=[f"s{i}" for i in range(len(centers))],
        obs=obs,
        image_transformations=image_transformations,
    )
    return sdata, image, counts


@pytest.fixture(scope="module")
def slide():
    sdata, image, counts = _sdata()
    rng = np.random.default_rng(1)
    dense = rng.gamma(2.0, 0.05, size=(3, *DENSE_SHAPE)).astype(np.float32)
    to_global = Sequence(
        [Scale([DENSE_SCALE, DENSE_SCALE], axes=("x", "y")), Translation(list(DENSE_SHIFT), axes=("x", "y"))]
    )
    sdata.images["he_pixgene"] = Image2DModel.parse(
        da.from_array(dense, chunks=(3, 8, 8)),
        dims=("c", "y", "x"),
        c_coords=["A", "B", TOTAL_CHANNEL],
        transformations={"global": to_global},
    )
    record_um_per_px(sdata, "he_pixgene", DENSE_SCALE * UM_PER_PX)
    # a read-out table in spot order reversed, to check rows are matched by instance id, not position
    order = np.arange(len(counts))[::-1]
    expected = rng.gamma(2.0, 2.0, size=(len(counts), 3))[order]
    totals = expected.sum(axis=1) * 3.0
    readout = ad.AnnData(
        X=expected,
        obs=pd.DataFrame(
            {"region": pd.Categorical(["spots"] * len(order)), "instance_id": [f"s{i}" for i in order],
             TOTAL_OBS: totals},
            index=[f"s{i}" for i in order],
        ),
        var=pd.DataFrame(index=["A", "B", "C"]),
    )
    sdata.tables["spots_pixgene"] = TableModel.parse(
        readout, region="spots", region_key="region", instance_key="instance_id"
    )
    return {"sdata": sdata, "image": image, "counts": counts, "dense": dense, "expected": expected,
            "totals": totals, "order": order}


def _block_mean(array: np.ndarray, k: int) -> np.ndarray:
    """(c, y, x) -> block means over k x k, trimming partial blocks (reference written independently)."""
    c, h, w = array.shape
    h, w = (h // k) * k, (w // k) * k
    return array[:, :h, :w].astype(np.float64).reshape(c, h // k, k, w // k, k).mean(axis=(2, 4))


def _circles(ax):
    from matplotlib.collections import EllipseCollection

    (collection,) = [c for c in ax.collections if isinstance(c, EllipseCollection)]
    assert collection.get_offset_transform() == ax.transData  # centres and sizes in H&E pixels
    return collection, np.asarray(collection.get_offsets()), np.asarray(collection.get_widths()) / 2


# ------------------------------------------------------------------------------------------------ spots
def test_spots_image_is_block_mean_of_he(slide):
    ax = pg.pl.spots(slide["sdata"], max_px=50)
    (image,) = ax.images
    expected = np.moveaxis(_block_mean(slide["image"], 4), 0, -1) / 255.0  # ceil(200 / 50) = 4
    np.testing.assert_allclose(np.asarray(image.get_array()), expected, atol=1e-6)
    assert image.get_extent() == [0.0, W, H, 0.0]
    assert ax.get_xlim() == (0.0, W) and ax.get_ylim() == (H, 0.0)


def test_spots_circles_at_true_centres_and_radius(slide):
    ax = pg.pl.spots(slide["sdata"], max_px=100)
    collection, centers, radii = _circles(ax)
    np.testing.assert_allclose(centers, _centers(), atol=1e-6)
    np.testing.assert_allclose(radii, SPOT_UM / UM_PER_PX / 2, rtol=1e-6)
    assert np.all(collection.get_facecolor()[:, 3] == 0)  # outlines only
    assert "0.5 µm/px, spot Ø 10 µm = 20 px" in ax.get_title()


def test_spots_placed_through_non_identity_transformations():
    # the image maps its pixels to microns; the spots live in microns shifted by (5, -3)
    sdata, _, _ = _sdata(image_transformations={"global": Scale([UM_PER_PX, UM_PER_PX], axes=("x", "y"))})
    raw = _centers() * 0.3 + 4.0
    sdata.shapes["spots"] = ShapesModel.parse(
        raw, geometry=0, radius=np.full(len(raw), 7.0), index=sdata.shapes["spots"].index,
        transformations={"global": Translation([5.0, -3.0], axes=("x", "y"))},
    )
    ax = pg.pl.spots(sdata, color="A")
    _, centers, radii = _circles(ax)
    np.testing.assert_allclose(centers, (raw + [5.0, -3.0]) / UM_PER_PX, atol=1e-6)
    np.testing.assert_allclose(radii, 7.0 / UM_PER_PX, rtol=1e-6)
    # drawn diameter 28 px = 14 um disagrees with the table's 10 um spots, and the title says so
    assert "says 10 µm!" in ax.get_title()


def test_spots_multiscale_image_reads_a_coarse_level():
    sdata, image, _ = _sdata()
    sdata.images["he"] = Image2DModel.parse(
        image, dims=("c", "y", "x"), scale_factors=[2, 2], transformations={"global": Identity()}
    )
    ax = pg.pl.spots(sdata, max_px=40)  # factor 5: level 2 (4x), then 2 x 2 blocks
    level2 = np.asarray(sdata.images["he"]["scale2"]["image"].values)
    expected = np.moveaxis(_block_mean(level2, 2), 0, -1) / 255.0
    (drawn,) = ax.images
    np.testing.assert_allclose(np.asarray(drawn.get_array()), expected, atol=1e-6)
    assert drawn.get_extent() == [0.0, W, H, 0.0]


def test_spots_colour_by_gene_and_category(slide):
    sdata, counts = slide["sdata"], slide["counts"]
    ax = pg.pl.spots(sdata, color="B", vmax=None)
    collection, _, _ = _circles(ax)
    np.testing.assert_allclose(np.asarray(collection.get_array()), np.log1p(counts[:, 1]))
    assert collection.get_clim() == (np.log1p(counts[:, 1].min()), np.log1p(counts[:, 1].max()))
    ax = pg.pl.spots(sdata, color="B", log1p=False, vmax="p90")
    collection, _, _ = _circles(ax)
    assert collection.get_clim()[1] == pytest.approx(np.percentile(counts[:, 1], 90))

    ax = pg.pl.spots(sdata, color="cluster")
    collection, _, _ = _circles(ax)
    clusters = sdata.tables["table"].obs["cluster"].to_numpy()
    faces = collection.get_facecolor()[:, :3]
    for label in ("x", "y"):
        assert len(np.unique(faces[clusters == label], axis=0)) == 1
    assert not np.allclose(faces[clusters == "x"][0], faces[clusters == "y"][0])
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["x", "y"]


def test_spots_region_crops_image_and_shapes(slide):
    ax = pg.pl.spots(slide["sdata"], region=(50, 20, 150, 100), max_px=1000)
    (image,) = ax.images
    np.testing.assert_allclose(
        np.asarray(image.get_array()),
        np.moveaxis(slide["image"][:, 20:100, 50:150], 0, -1) / 255.0,
        atol=1e-6,
    )
    _, centers, _ = _circles(ax)
    c, r = _centers(), SPOT_UM / UM_PER_PX / 2
    visible = (c[:, 0] + r >= 50) & (c[:, 0] - r <= 150) & (c[:, 1] + r >= 20) & (c[:, 1] - r <= 100)
    np.testing.assert_allclose(centers, c[visible])


def test_polygons_drawn_by_transformed_exteriors(slide):
    import geopandas as gpd
    from shapely.geometry import MultiPolygon, Polygon

    def square(x, y):
        return Polygon([(x, y), (x + 4, y), (x + 4, y + 6), (x, y + 6)])

    cells = [square(3, 2), MultiPolygon([square(20, 10), square(30, 10)]), square(200, 200)]
    sdata = slide["sdata"]
    sdata.shapes["cells"] = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=cells), transformations={"global": Scale([2.0, 2.0], axes=("x", "y"))}
    )
    try:
        ax = pg.pl.spots(sdata, shapes_key="cells")
    finally:
        del sdata.shapes["cells"]
    (collection,) = ax.collections
    # the last cell lands at (400, 400), outside the 200 x 120 image, so it is not drawn
    expected = [square(3, 2), square(20, 10), square(30, 10)]
    assert len(collection.get_paths()) == len(expected)
    for path, ring in zip(collection.get_paths(), expected, strict=True):
        np.testing.assert_allclose(path.vertices[:5], np.asarray(ring.exterior.coords) * 2.0)
    assert "3 polygons" in ax.get_title()


# ------------------------------------------------------------------------------------------------ dense
def test_dense_extent_is_map_footprint_and_values_block_means(slide):
    fig = pg.pl.dense(slide["sdata"], ["A", TOTAL_CHANNEL], max_px=10)
    panels = [a for a in fig.axes if a.get_title() in ("A", TOTAL_CHANNEL)]
    assert [p.get_title() for p in panels] == ["A", TOTAL_CHANNEL]
    k = 3  # ceil(30 / 10); 20 rows trim to 18
    blocks = _block_mean(slide["dense"], k)
    sx, (tx, ty) = DENSE_SCALE, DENSE_SHIFT
    for panel, channel in zip(panels, (0, 2), strict=True):
        he, overlay = panel.images
        np.testing.assert_allclose(overlay.get_extent(), [tx, tx + 30 * sx, ty + 18 * sx, ty], atol=1e-9)
        np.testing.assert_allclose(np.asarray(overlay.get_array()), blocks[channel], rtol=1e-5)
        assert overlay.get_clim() == pytest.approx((0.0, np.percentile(blocks[channel], 99)), rel=1e-5)
        assert he.get_extent() == [0.0, W, H, 0.0]
    assert "2 µm/px" in fig._suptitle.get_text()
    assert any(a.get_ylabel() == "counts / µm²" for a in fig.axes)


def test_dense_full_resolution_and_region(slide):
    fig = pg.pl.dense(slide["sdata"], "B", region=(30, 20, 90, 60), vmax=0.5)
    overlay = fig.axes[0].images[1]
    # region in map pixels: x (30-10)/4 = 5 .. 20, y (20-6)/4 = 3.5 .. 13.5 -> rows 3..14
    np.testing.assert_allclose(overlay.get_extent(), [30.0, 90.0, 6 + 14 * 4.0, 6 + 3 * 4.0])
    np.testing.assert_allclose(np.asarray(overlay.get_array()), slide["dense"][1, 3:14, 5:20], rtol=1e-6)
    assert overlay.get_clim() == (0.0, 0.5)
    assert fig.axes[0].get_xlim() == (30.0, 90.0)


def test_dense_multiscale_map_reads_a_coarse_level(slide):
    sdata = slide["sdata"]
    sdata.images["pyr"] = Image2DModel.parse(
        slide["dense"], dims=("c", "y", "x"), c_coords=["A", "B", TOTAL_CHANNEL], scale_factors=[2],
        transformations={"global": sdata.images["he_pixgene"].attrs["transform"]["global"]},
    )
    try:
        fig = pg.pl.dense(sdata, "B", dense_key="pyr", max_px=15)  # factor 2: level 1 (10 x 15), read whole
    finally:
        del sdata.images["pyr"]
    overlay = fig.axes[0].images[1]
    expected = Image2DModel.parse(slide["dense"], dims=("c", "y", "x"), scale_factors=[2])["scale1"]["image"]
    np.testing.assert_allclose(np.asarray(overlay.get_array()), expected.values[1], rtol=1e-6)
    tx, ty = DENSE_SHIFT
    np.testing.assert_allclose(overlay.get_extent(), [tx, tx + 30 * DENSE_SCALE, ty + 20 * DENSE_SCALE, ty])


def test_dense_rotated_map_lands_where_its_transformation_puts_it(slide):
    sdata = slide["sdata"]
    angle = np.deg2rad(30)
    c, s = 2 * np.cos(angle), 2 * np.sin(angle)
    matrix = np.array([[c, -s, 60.0], [s, c, 5.0], [0, 0, 1]])
    sdata.images["rot"] = Image2DModel.parse(
        slide["dense"], dims=("c", "y", "x"), c_coords=["A", "B", TOTAL_CHANNEL],
        transformations={"global": Affine(matrix, input_axes=("x", "y"), output_axes=("x", "y"))},
    )
    try:
        fig = pg.pl.dense(sdata, "A", dense_key="rot")
    finally:
        del sdata.images["rot"]
    ax = fig.axes[0]
    overlay = ax.images[1]
    corner = np.array([[30.0, 20.0]])  # the map's far corner, in its own pixels
    drawn = overlay.get_transform().transform(corner)
    expected = ax.transData.transform(corner @ matrix[:2, :2].T + matrix[:2, 2])
    np.testing.assert_allclose(drawn, expected, atol=1e-6)


def test_dense_bad_input(slide):
    with pytest.raises(PixgeneInputError, match="missing"):
        pg.pl.dense(slide["sdata"], ["A", "NOPE"])
    with pytest.raises(PixgeneInputError, match="predict_dense"):
        pg.pl.dense(slide["sdata"], "A", dense_key="absent")
    with pytest.raises(PixgeneInputError, match="does not overlap"):
        pg.pl.spots(slide["sdata"], region=(500, 500, 600, 600))


# ------------------------------------------------------------------------------------ measured vs predicted
def test_measured_vs_predicted_pearson_matches_numpy(slide):
    import scanpy as sc

    sdata = slide["sdata"]
    fig = pg.pl.measured_vs_predicted(sdata, "B", vmax=None, share_scale=True)
    measured = sdata.tables["table"].copy()
    sc.pp.normalize_total(measured, target_sum=1e4)
    sc.pp.log1p(measured)
    m = np.asarray(measured[:, "B"].X.toarray()).ravel()
    # read-out rows are in reverse spot order
    p = np.empty(len(m))
    p[slide["order"]] = np.log1p(1e4 * slide["expected"][:, 1] / slide["totals"])
    r = float(re.search(r"Pearson r = (-?[0-9.]+)", fig._suptitle.get_text()).group(1))
    assert r == pytest.approx(np.corrcoef(m, p)[0, 1], abs=5e-4)
    left, right = (a for a in fig.axes if a.get_title().startswith(("measured", "predicted")))
    np.testing.assert_allclose(np.asarray(left.collections[0].get_array()), m, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(right.collections[0].get_array()), p, rtol=1e-10)
    lo, hi = min(m.min(), p.min()), max(m.max(), p.max())
    assert left.collections[0].get_clim() == pytest.approx((lo, hi))


def test_measured_vs_predicted_without_total_uses_row_sum(slide):
    sdata = slide["sdata"]
    table = sdata.tables["spots_pixgene"]
    readout = ad.AnnData(X=table.X.copy(), obs=table.obs.drop(columns=[TOTAL_OBS]), var=table.var.copy())
    sdata.tables["bare"] = TableModel.parse(
        readout, region="spots", region_key="region", instance_key="instance_id"
    )
    try:
        fig = pg.pl.measured_vs_predicted(sdata, "A", predicted="bare", share_scale=False)
    finally:
        del sdata.tables["bare"]
    right = [a for a in fig.axes if a.get_title().startswith("predicted")][0]
    p = np.empty(len(slide["order"]))
    p[slide["order"]] = np.log1p(1e4 * slide["expected"][:, 0] / slide["expected"].sum(axis=1))
    np.testing.assert_allclose(np.asarray(right.collections[0].get_array()), p, rtol=1e-10)
    with pytest.raises(PixgeneInputError, match="missing"):
        pg.pl.measured_vs_predicted(sdata, "D")  # not in the read-out table


# ------------------------------------------------------------------------------------------- scores, curves
def test_gene_scores_marks_are_quantiles_over_all_genes():
    rng = np.random.default_rng(3)
    values = rng.uniform(-0.2, 0.9, 80)
    values[5] = np.nan
    scores = pd.DataFrame(
        {"pearson": values, "mse": rng.uniform(size=80)}, index=[f"g{i}" for i in range(80)]
    )
    ax = pg.pl.gene_scores(scores, n_top=20)
    finite = values[np.isfinite(values)]
    lines = [line for line in ax.get_lines() if "@" in line.get_label()]
    marks = {line.get_label().split(" =")[0]: line.get_ydata()[0] for line in lines}
    assert marks == pytest.approx({
        "PCC@F (Q1)": np.quantile(finite, 0.25),
        "PCC@S (median)": np.median(finite),
        "PCC@M (mean)": finite.mean(),
    })
    heights = [bar.get_height() for bar in ax.patches]
    np.testing.assert_allclose(heights, np.sort(finite)[::-1][:20])
    assert [t.get_text() for t in ax.get_xticklabels()][0] == scores["pearson"].idxmax()

    ax = pg.pl.gene_scores(scores, metric="mse", kind="strip")
    offsets = ax.collections[0].get_offsets()[:, 1]
    np.testing.assert_allclose(np.sort(offsets), np.sort(scores["mse"].to_numpy()))
    with pytest.raises(PixgeneInputError, match="no column"):
        pg.pl.gene_scores(scores, metric="spearman")


def test_training_curves_mark_best_epoch():
    history = [
        {"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": v, "train_mse": 0.5 / (e + 1), "val_mse": v}
        for e, v in enumerate([0.9, 0.5, None, 0.4, 0.45])
    ]
    ax = pg.pl.training_curves(history)
    best = [line for line in ax.get_lines() if line.get_label().startswith("best epoch")]
    assert len(best) == 1 and best[0].get_xdata()[0] == 3
    val = [line for line in ax.get_lines() if line.get_label() == "val_loss"][0]
    np.testing.assert_allclose(val.get_xdata(), [0, 1, 3, 4])
    np.testing.assert_allclose(val.get_ydata(), [0.9, 0.5, 0.4, 0.45])
    assert {line.get_label() for line in ax.get_lines()} >= {"train_mse", "val_mse"}
    no_val = pg.pl.training_curves([{"epoch": e, "train_loss": [3, 1, 2][e]} for e in range(3)])
    assert [line.get_xdata()[0] for line in no_val.get_lines() if line.get_label().startswith("best")] == [1]


# --------------------------------------------------------------------------------------------- output
def test_save_writes_png(slide, tmp_path):
    path = tmp_path / "spots.png"
    pg.pl.spots(slide["sdata"], color="A", save=str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path = tmp_path / "dense.png"
    pg.pl.dense(slide["sdata"], "A", save=path)
    assert plt.imread(path).ndim == 3


def test_import_pl_stays_light():
    code = (
        "import sys, pixgene as pg; pg.pl; "
        "print('torch' in sys.modules, 'matplotlib.pyplot' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = run.stdout.split()
    assert out == ["False", "False"]


def test_training_curves_draw_each_member_of_an_ensemble_or_one():
    val = {0: [0.9, 0.5, 0.6], 1: [0.8, 0.85, 0.7]}
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": v, "train_mse": 0.1, "member": k}
               for k in (0, 1) for e, v in enumerate(val[k])]
    ax = pg.pl.training_curves(history)
    best = {line.get_label(): line.get_xdata()[0] for line in ax.get_lines() if line.get_label().startswith("best")}
    assert best == {"best epoch 1 (member 0) (val_loss 0.5)": 1, "best epoch 2 (member 1) (val_loss 0.7)": 2}
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_allclose(lines["val_loss (member 1)"].get_ydata(), val[1])
    assert "train_mse" not in lines  # per-term curves only for one member
    one = pg.pl.training_curves(history, member=1)
    labels = [line.get_label() for line in one.get_lines()]
    assert "train_mse" in labels and [b for b in labels if b.startswith("best")] == ["best epoch 2 (val_loss 0.7)"]
    with pytest.raises(PixgeneInputError, match="member"):
        pg.pl.training_curves(history, member=2)
