"""pg.io.read_cells: GeoJSON, label masks and Xenium cell boundaries placed over an image."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import pixgene as pg
from pixgene._core.coords import transformations_of
from pixgene._core.validate import PixgeneInputError
from pixgene.io._cells import label_polygons

HEIGHT, WIDTH, UM_PER_PX = 400, 600, 0.5


@pytest.fixture
def slide(tmp_path):
    """A 600 x 400 px RGB image at 0.5 um/px."""
    import tifffile

    path = tmp_path / "he.tif"
    tifffile.imwrite(path, np.full((HEIGHT, WIDTH, 3), 230, np.uint8), photometric="rgb")
    return pg.io.read_image(path, um_per_px=UM_PER_PX)


def _square(x0, y0, x1, y1):
    return [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]


def test_geojson_feature_collection(slide, tmp_path):
    features = [
        {"type": "Feature", "id": "c-a", "geometry": {"type": "Polygon", "coordinates": _square(10, 20, 30, 60)},
         "properties": {"objectType": "cell", "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
        {"type": "Feature", "id": "c-b",
         "geometry": {"type": "Polygon", "coordinates": _square(100, 100, 140, 140) + _square(110, 110, 120, 120)},
         "properties": {"objectType": "cell", "classification": {"name": "Stroma"}}},
        {"type": "Feature", "id": "c-c",
         "geometry": {"type": "MultiPolygon", "coordinates": [_square(300, 200, 310, 210), _square(320, 200, 330, 205)]},
         "properties": {"objectType": "cell"}},
        {"type": "Feature", "id": "p", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}},
    ]
    path = tmp_path / "cells.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    cells = pg.io.read_cells(slide, path)
    assert cells is slide.shapes["cells"]
    assert list(cells.index) == ["c-a", "c-b", "c-c"]  # the point is dropped
    assert list(cells["classification"]) == ["Tumor", "Stroma", None]
    assert list(cells["object_type"]) == ["cell"] * 3
    np.testing.assert_allclose(cells.area.to_numpy(), [20 * 40, 40 * 40 - 10 * 10, 100 + 50])
    um_per_px = pg.io.get_um_per_px(slide, "he")
    assert cells.area["c-a"] * um_per_px**2 == pytest.approx(800 * 0.25)  # 200 um^2
    assert cells.geometry["c-a"].bounds == (10.0, 20.0, 30.0, 60.0)  # image pixels, as written
    assert set(transformations_of(cells)) == set(transformations_of(slide.images["he"])) == {"global"}


def test_geojson_list_of_features_with_cell_id(slide, tmp_path):
    features = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": _square(10 * i, 10, 10 * i + 8, 18)},
         "properties": {"cell_id": 100 + i}}
        for i in range(1, 4)
    ]
    path = tmp_path / "cells.json"
    path.write_text(json.dumps(features))
    cells = pg.io.read_cells(slide, path, key_added="sr_cells")
    assert list(cells.index) == ["101", "102", "103"]
    np.testing.assert_allclose(cells.area.to_numpy(), 64.0)


def test_label_mask_outlines_are_exact(slide, tmp_path):
    import tifffile

    mask = np.zeros((HEIGHT, WIDTH), np.uint16)
    mask[10:20, 30:45] = 1  # 150 px
    mask[100:130, 200:240] = 2  # 1200 px with a 5 x 6 hole of background
    mask[110:115, 210:216] = 0
    mask[300:310, 500:510] = 5  # an L shape of 100 - 25 px
    mask[300:305, 505:510] = 0
    mask[350, 50] = 7  # two pixels touching at a corner: one cell in two parts
    mask[351, 51] = 7
    expected = {1: 150, 2: 1200 - 30, 5: 75, 7: 2}
    for key, source in (("from_array", mask), ("from_npy", tmp_path / "m.npy"), ("from_tif", tmp_path / "m.tif")):
        np.save(tmp_path / "m.npy", mask)
        tifffile.imwrite(tmp_path / "m.tif", mask)
        cells = pg.io.read_cells(slide, source, key_added=key)
        assert list(cells.index) == ["1", "2", "5", "7"]
        assert list(cells["label"]) == [1, 2, 5, 7]
        np.testing.assert_array_equal(cells.area.to_numpy(), [expected[i] for i in (1, 2, 5, 7)])
    assert cells.geometry["1"].bounds == (30.0, 10.0, 45.0, 20.0)  # pixel edges: col 30..44, row 10..19
    assert len(cells.geometry["2"].interiors) == 1
    assert cells.geometry["7"].geom_type == "MultiPolygon"
    assert cells.is_valid.all()


def test_label_polygons_match_pixel_counts_on_random_masks():
    import shapely

    rng = np.random.default_rng(1)
    for _ in range(40):
        mask = rng.integers(0, 4, size=rng.integers(3, 20, size=2))
        ids, polygons = label_polygons(mask)
        labels, counts = np.unique(mask[mask > 0], return_counts=True)
        np.testing.assert_array_equal(ids, labels)
        np.testing.assert_array_equal(shapely.area(polygons), counts)
        assert shapely.is_valid(polygons).all()
        for label, polygon in zip(ids, polygons, strict=True):
            yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
            inside = shapely.contains_xy(polygon, xx + 0.5, yy + 0.5)
            np.testing.assert_array_equal(inside, mask == label)


def test_mask_at_half_resolution(slide):
    mask = np.zeros((HEIGHT // 2, WIDTH // 2), np.int32)
    mask[5:10, 15:25] = 3  # 50 mask px = 200 image px
    mask[50:52, 60:61] = 4  # 2 mask px = 8 image px
    cells = pg.io.read_cells(slide, mask)
    np.testing.assert_array_equal(cells.area.to_numpy(), [200.0, 8.0])
    assert cells.geometry["3"].bounds == (30.0, 10.0, 50.0, 20.0)
    # the same mask stated by its pixel size
    again = pg.io.read_cells(slide, mask, key_added="stated", mask_um_per_px=2 * UM_PER_PX)
    assert again.geometry.geom_equals(cells.geometry).all()
    with pytest.raises(PixgeneInputError, match="mask_um_per_px"):
        pg.io.read_cells(slide, np.ones((HEIGHT // 2 + 7, WIDTH // 3), np.int32), key_added="odd")


def test_mask_at_a_pyramid_level(tmp_path):
    import tifffile

    path = tmp_path / "pyramid.ome.tif"
    img = np.full((600, 900, 3), 230, np.uint8)
    with tifffile.TiffWriter(path, ome=True) as tw:
        meta = {"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25}
        tw.write(img, subifds=1, tile=(256, 256), photometric="rgb", metadata=meta)
        tw.write(img[::3, ::3], subfiletype=1, tile=(256, 256), photometric="rgb")
    sdata = pg.io.read_image(path)
    mask = np.zeros((200, 300), np.uint8)
    mask[10:12, 20:23] = 9  # 6 level-1 px = 54 full-resolution px
    cells = pg.io.read_cells(sdata, mask)
    assert cells.area["9"] == 54.0
    assert cells.geometry["9"].bounds == (60.0, 30.0, 69.0, 36.0)


def test_xenium_cell_boundaries_parquet(slide, tmp_path):
    # vertices in microns; Xenium repeats the first vertex at the end of each cell
    frame = pd.DataFrame({
        "cell_id": ["aaa-1"] * 5 + ["bbb-1"] * 5,
        "vertex_x": [10.0, 20.0, 20.0, 10.0, 10.0, 100.0, 112.5, 112.5, 100.0, 100.0],
        "vertex_y": [5.0, 5.0, 15.0, 15.0, 5.0, 50.0, 50.0, 70.0, 70.0, 50.0],
        "label_id": [1] * 5 + [2] * 5,
    })
    path = tmp_path / "cell_boundaries.parquet"
    frame.to_parquet(path)
    cells = pg.io.read_cells(slide, path)
    assert list(cells.index) == ["aaa-1", "bbb-1"]
    # (112.5 um, 70 um) at 0.5 um/px is pixel (225, 140)
    assert cells.geometry["bbb-1"].bounds == (200.0, 100.0, 225.0, 140.0)
    assert cells.area["aaa-1"] * UM_PER_PX**2 == pytest.approx(100.0)  # 10 x 10 um

    # an image registered to the microns through a coordinate system: vertices map through its inverse
    from spatialdata.transformations import Scale, Sequence, Translation, set_transformation

    to_um = Sequence([Scale([0.25, 0.25], axes=("x", "y")), Translation([5.0, 0.0], axes=("x", "y"))])
    set_transformation(slide.images["he"], to_um, to_coordinate_system="xenium_um")
    registered = pg.io.read_cells(slide, path, key_added="registered", coordinate_system="xenium_um")
    assert registered.geometry["aaa-1"].bounds == (20.0, 20.0, 60.0, 60.0)  # ((10 - 5) / 0.25, 5 / 0.25)
    # an explicit affine (microns to pixels) wins
    shifted = pg.io.read_cells(slide, frame, key_added="shifted", affine=[[2, 0, 1], [0, 2, 3]])
    assert shifted.geometry["aaa-1"].bounds == (21.0, 13.0, 41.0, 33.0)


def test_labels_and_shapes_elements_are_placed_by_their_transformations(slide):
    import geopandas as gpd
    import shapely
    from spatialdata.models import Labels2DModel, ShapesModel
    from spatialdata.transformations import Scale

    mask = np.zeros((HEIGHT // 2, WIDTH // 2), np.int32)
    mask[5:10, 15:25] = 3
    double = {"global": Scale([2.0, 2.0], axes=("x", "y"))}
    slide.labels["cell_labels"] = Labels2DModel.parse(mask, dims=("y", "x"), transformations=double)
    cells = pg.io.read_cells(slide, "cell_labels")
    assert cells.geometry["3"].bounds == (30.0, 10.0, 50.0, 20.0)
    assert cells.area["3"] == 200.0

    # boundaries in microns, with the scale to the image's pixels as their transformation (as spatialdata-io)
    frame = gpd.GeoDataFrame(geometry=[shapely.box(10, 5, 20, 15)], index=["x1"])
    to_px = {"global": Scale([1 / UM_PER_PX, 1 / UM_PER_PX], axes=("x", "y"))}
    slide.shapes["cell_boundaries"] = ShapesModel.parse(frame, transformations=to_px)
    placed = pg.io.read_cells(slide, "cell_boundaries", key_added="placed")
    assert placed.geometry["x1"].bounds == (20.0, 10.0, 40.0, 30.0)
    assert transformations_of(placed)["global"].to_affine_matrix(("x", "y"), ("x", "y"))[0, 0] == 1.0


def test_xenium_cell_in_two_parts(slide):
    frame = pd.DataFrame({
        "cell_id": [b"c1"] * 8,
        "label_id": [1] * 4 + [2] * 4,
        "vertex_x": [1.0, 2.0, 2.0, 1.0, 5.0, 6.0, 6.0, 5.0],
        "vertex_y": [1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 2.0, 2.0],
    })
    cells = pg.io.read_cells(slide, frame)
    assert list(cells.index) == ["c1"]
    assert cells.geometry["c1"].geom_type == "MultiPolygon"
    assert cells.area["c1"] == pytest.approx(8.0)  # two 1 um^2 squares, 4 px^2 each


def test_bad_segmentations_are_refused(slide, tmp_path):
    # a segmentation in microns read with a pixel size 10x too small lands far outside the image
    frame = pd.DataFrame({"cell_id": ["a"] * 4 + ["b"] * 4,
                          "vertex_x": [100.0, 110, 110, 100, 250, 260, 260, 250],
                          "vertex_y": [100.0, 100, 110, 110, 150, 150, 160, 160]})
    with pytest.raises(PixgeneInputError, match=r"2 of 2 cells lie outside image 'he'.*x 2000.0 to 5200.0") as err:
        pg.io.read_cells(slide, frame, image_um_per_px=0.05)
    assert "um_per_px" in str(err.value)
    features = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": _square(700, 10, 720, 30)}}]
    with pytest.raises(PixgeneInputError, match="outside image"):
        pg.io.read_cells(slide, features)
    with pytest.raises(PixgeneInputError, match="is empty"):
        pg.io.read_cells(slide, np.zeros((HEIGHT, WIDTH), np.int32))
    with pytest.raises(PixgeneInputError, match="boolean"):
        pg.io.read_cells(slide, np.ones((HEIGHT, WIDTH), bool))
    with pytest.raises(PixgeneInputError, match="no Polygon or MultiPolygon"):
        pg.io.read_cells(slide, {"type": "FeatureCollection", "features": []})
    with pytest.raises(PixgeneInputError, match="does not exist"):
        pg.io.read_cells(slide, tmp_path / "missing.geojson")
    with pytest.raises(PixgeneInputError, match="not found"):
        pg.io.read_cells(slide, features, image_key="nope")
    assert "cells" not in slide.shapes  # nothing was written by the refused calls

    mask = np.zeros((HEIGHT, WIDTH), np.int32)
    mask[10:20, 10:20] = 1
    pg.io.read_cells(slide, mask)
    mask[10:30, 10:20] = 1
    with pytest.raises(PixgeneInputError, match="already exists"):
        pg.io.read_cells(slide, mask)
    assert slide.shapes["cells"].area["1"] == 100.0
    assert pg.io.read_cells(slide, mask, overwrite=True).area["1"] == 200.0
    assert slide.shapes["cells"].area["1"] == 200.0
    with pytest.raises(PixgeneInputError, match="shapes element cannot take its name"):
        pg.io.read_cells(slide, mask, key_added="he", overwrite=True)
