"""pg.tl.segment_cells: nuclei and cells from the H&E alone, against the synthetic slide's true cells."""

from __future__ import annotations

import numpy as np
import pytest

SEGMENTED = "cells_segmented"
#: F1 at IoU 0.5 against the true cells of synthetic(seed=3, size_um=640) measured 0.790 (defaults); the bar
#: leaves a margin for platform differences in the image processing libraries
F1_BAR = 0.72


def match(seg, true, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (seg index, true index) with IoU >= threshold, one-to-one (greedy by IoU), and their IoUs."""
    import shapely

    si, ti = shapely.STRtree(true).query(seg, predicate="intersects")
    inter = shapely.area(shapely.intersection(seg[si], true[ti]))
    iou = inter / (shapely.area(seg[si]) + shapely.area(true[ti]) - inter)
    used_s, used_t, pairs = set(), set(), []
    for k in np.argsort(-iou):
        if iou[k] >= threshold and si[k] not in used_s and ti[k] not in used_t:
            used_s.add(si[k])
            used_t.add(ti[k])
            pairs.append(k)
    pairs = np.asarray(pairs, dtype=int)
    return si[pairs], ti[pairs], iou[pairs]


@pytest.fixture(scope="module")
def segmented(synthetic_small_session):
    from spatialdata import deepcopy

    import pixgene as pg

    sdata = deepcopy(synthetic_small_session)
    pg.tl.segment_cells(sdata, key_added=SEGMENTED, progress=False)
    return sdata


def test_cells_match_the_true_cells(segmented):
    seg = segmented.shapes[SEGMENTED].geometry.values
    true = segmented.shapes["cells"].geometry.values
    s, _, _ = match(seg, true)
    f1 = 2 * len(s) / (len(seg) + len(true))
    assert f1 > F1_BAR, f1
    # about as many cells as there are: neither shattered nor merged wholesale
    assert 0.75 < len(seg) / len(true) < 1.25


def test_polygons_valid_and_not_overlapping(segmented):
    import shapely

    shapes = segmented.shapes[SEGMENTED]
    geometry = shapes.geometry.values
    assert set(shapely.get_type_id(geometry)) == {3}  # polygons
    assert shapely.is_valid(geometry).all()
    a, b = shapely.STRtree(geometry).query(geometry, predicate="intersects")
    pair = a < b
    overlap = shapely.area(shapely.intersection(geometry[a[pair]], geometry[b[pair]])).sum()
    assert overlap <= 1e-9 * shapely.area(geometry).sum()
    assert list(shapes.index) == [f"cell_{i}" for i in range(len(shapes))]
    # ordered by centroid row: the ids are stable under retiling
    assert shapes.index.is_unique


def test_element_carries_the_image_space(segmented):
    from pixgene._core.coords import transformations_of

    shapes = segmented.shapes[SEGMENTED]
    image = transformations_of(segmented.images["he"])
    assert {k: v.to_affine_matrix(("x", "y"), ("x", "y")).tolist() for k, v in transformations_of(shapes).items()} \
        == {k: v.to_affine_matrix(("x", "y"), ("x", "y")).tolist() for k, v in image.items()}
    x0, y0, x1, y1 = shapes.total_bounds
    assert x0 >= 0 and y0 >= 0 and x1 <= 640 and y1 <= 640
    record = segmented.attrs["pixgene"]["segment_cells"][SEGMENTED]
    assert record["nucleus_diameter_um"] == 8.0 and 0.03 <= record["threshold"] < 0.5


def test_areas_in_square_microns(segmented):
    shapes = segmented.shapes[SEGMENTED]
    um = segmented.attrs["pixgene"]["um_per_px"]["he"]
    np.testing.assert_allclose(shapes["cell_area_um2"], shapes.geometry.area * um**2, rtol=1e-9)
    assert (shapes["nucleus_area_um2"] > 0).all()
    # a nucleus lies inside its cell (the polygon cuts 1/8 px per outer corner, hence the slack)
    assert (shapes["nucleus_area_um2"] <= shapes["cell_area_um2"] + 0.5 * np.sqrt(shapes["cell_area_um2"])).all()
    # H&E-like sizes: nuclei of a few tens of um^2, cells of 100-250 um^2
    assert 15 < np.median(shapes["nucleus_area_um2"]) < 80
    assert 80 < np.median(shapes["cell_area_um2"]) < 300


def test_tiled_equals_untiled(synthetic_small, segmented):
    import pixgene as pg

    whole = segmented.shapes[SEGMENTED].geometry.values  # one 512 um tile and the 128 um rest of the row
    tiled = pg.tl.segment_cells(synthetic_small, key_added="tiled", tile_um=160.0, progress=False)
    untiled = pg.tl.segment_cells(synthetic_small, key_added="untiled", tile_um=1024.0, progress=False)
    for a in (tiled.geometry.values, whole):
        b = untiled.geometry.values
        s, _, iou = match(a, b)
        assert abs(len(a) - len(b)) <= 0.01 * len(b)
        assert len(s) >= 0.99 * len(b)  # every cell is there once: none cut or duplicated at a tile border
        assert (iou > 0.99).mean() > 0.97  # and almost all are the very same polygon


def test_microns_not_pixels():
    """The same tissue drawn at 1 and at 0.5 um/px gives the same cells in um^2."""
    import pixgene as pg

    medians = []
    for um in (1.0, 0.5):
        sdata = pg.datasets.synthetic(seed=3, size_um=320.0, um_per_px=um)
        shapes = pg.tl.segment_cells(sdata, key_added=SEGMENTED, progress=False)
        medians.append([len(shapes), np.median(shapes["cell_area_um2"]), np.median(shapes["nucleus_area_um2"])])
    np.testing.assert_allclose(medians[1], medians[0], rtol=0.1)


def test_label_polygons_exact_outlines():
    """Outlines against areas counted by hand: pixels minus 1/8 per convex corner plus 1/8 per concave one."""
    import shapely

    from pixgene.data._segment import label_polygons

    labels = np.zeros((12, 12), dtype=np.int32)
    labels[1:5, 1:6] = 1  # a 4 x 5 rectangle: 20 px, 4 convex corners
    labels[1:5, 6:8] = 2  # its neighbour sharing an edge: 8 px
    labels[6:11, 2:11] = 3  # a ring around label 4
    labels[8, 5:8] = 4
    labels[7:10, 4:9][labels[7:10, 4:9] == 3] = 0  # a gap of background around label 4, inside the ring
    labels[8, 5:8] = 4
    out = label_polygons(labels)
    assert out[1].area == pytest.approx(20 - 4 / 8)
    assert out[2].area == pytest.approx(8 - 4 / 8)
    assert out[1].intersection(out[2]).area == 0 and out[1].touches(out[2])
    assert len(out[3].interiors) == 1 and out[3].is_valid
    # ring: 45 px - 15 (the hole) = 30 px; 4 outer convex corners, 4 concave corners of the hole
    assert out[3].area == pytest.approx(30 - 4 / 8 + 4 / 8)
    assert out[4].area == pytest.approx(3 - 4 / 8) and out[3].intersection(out[4]).area == 0
    # pixel (i, j) covers [j, j + 1] x [i, i + 1]: the rectangle spans x 1-6, y 1-5 (less the corner cuts)
    assert out[1].bounds == (1.0, 1.0, 6.0, 5.0)
    assert shapely.get_num_coordinates(out[1]) == 9  # straight runs carry no vertices: 8 corners, closed


def test_refuses_existing_key(synthetic_small):
    import pixgene as pg
    from pixgene._core.validate import PixgeneInputError

    with pytest.raises(PixgeneInputError, match="overwrite=True"):
        pg.tl.segment_cells(synthetic_small, progress=False)  # "cells" holds the true cells


def test_refuses_non_rgb(synthetic_small):
    from spatialdata.models import Image2DModel

    import pixgene as pg
    from pixgene._core.validate import PixgeneInputError

    synthetic_small.images["grey"] = Image2DModel.parse(np.zeros((1, 64, 64), dtype=np.uint8), dims=("c", "y", "x"))
    with pytest.raises(PixgeneInputError, match="RGB"):
        pg.tl.segment_cells(synthetic_small, image_key="grey", key_added=SEGMENTED, progress=False)
    with pytest.raises(PixgeneInputError, match="not found"):
        pg.tl.segment_cells(synthetic_small, image_key="nope", key_added=SEGMENTED, progress=False)


def test_refuses_missing_or_coarse_scale(synthetic_small):
    import pixgene as pg
    from pixgene._core.validate import PixgeneInputError

    del synthetic_small.attrs["pixgene"]["um_per_px"]["he"]
    with pytest.raises(PixgeneInputError, match="microns per pixel"):
        pg.tl.segment_cells(synthetic_small, key_added=SEGMENTED, progress=False)
    with pytest.raises(PixgeneInputError, match="too coarse"):
        pg.tl.segment_cells(synthetic_small, key_added=SEGMENTED, image_um_per_px=4.0, progress=False)
    with pytest.raises(PixgeneInputError, match="nucleus_diameter_um"):
        pg.tl.segment_cells(synthetic_small, key_added=SEGMENTED, image_um_per_px=1.0, nucleus_diameter_um=-1,
                            progress=False)
    assert SEGMENTED not in synthetic_small.shapes


def test_backed_store_is_written_and_overwritten(tmp_path):
    import spatialdata as sd

    import pixgene as pg

    pg.datasets.synthetic(seed=3, size_um=256.0, n_genes=2, n_noise_genes=0).write(tmp_path / "slide.zarr")
    sdata = sd.read_zarr(tmp_path / "slide.zarr")
    first = pg.tl.segment_cells(sdata, key_added=SEGMENTED, progress=False)
    again = pg.tl.segment_cells(sdata, key_added=SEGMENTED, expand_um=0.0, progress=False, overwrite=True)
    stored = sd.read_zarr(tmp_path / "slide.zarr").shapes[SEGMENTED]
    assert len(stored) == len(again)
    np.testing.assert_allclose(stored["cell_area_um2"], again["cell_area_um2"])
    # expand_um=0 gives the nuclei themselves
    assert again["cell_area_um2"].sum() < 0.5 * first["cell_area_um2"].sum()
