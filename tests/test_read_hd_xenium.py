"""pg.io.read_visium_hd and pg.io.read_xenium on small folders in the layouts spatialdata-io reads.

The folders are written here file by file (10x HDF5 matrices, parquet tables, GeoJSON, a zarr zip store,
(OME-)TIFF and PNG images), and the values read back are compared with what was written.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import shapely
from PIL import Image
from spatialdata.transformations import get_transformation_between_coordinate_systems

import pixgene as pg
from pixgene._core.coords import affine_between
from pixgene._core.units import recorded_um_per_px
from pixgene._core.validate import PixgeneInputError

# -----------------------------------------------------------------------------------------------------------
# writers shared by both layouts


def _write_10x_h5(path: Path, counts: np.ndarray, barcodes: list[str], genes: list[str]) -> None:
    """10x's HDF5 feature-barcode matrix: a genes x barcodes CSC matrix, i.e. barcodes x genes CSR arrays."""
    matrix = sp.csr_matrix(counts)
    with h5py.File(path, "w") as handle:
        group = handle.create_group("matrix")
        group["barcodes"] = np.array(barcodes, dtype="S")
        group["data"] = matrix.data.astype(np.int32)
        group["indices"] = matrix.indices.astype(np.int64)
        group["indptr"] = matrix.indptr.astype(np.int64)
        group["shape"] = np.array([len(genes), len(barcodes)], dtype=np.int32)
        features = group.create_group("features")
        features["id"] = np.array([f"ENSG{i:05d}" for i in range(len(genes))], dtype="S")
        features["name"] = np.array(genes, dtype="S")
        features["feature_type"] = np.array(["Gene Expression"] * len(genes), dtype="S")
        features["genome"] = np.array(["GRCh38"] * len(genes), dtype="S")
        features["_all_tag_keys"] = np.array(["genome"], dtype="S")


def _pixels(sdata, key: str = "he") -> np.ndarray:
    """(y, x, c) pixels of the image's full-resolution level."""
    from pixgene._core.raster import full_resolution

    return np.asarray(full_resolution(sdata.images[key]).transpose("y", "x", "c").values)


def _centres(shapes) -> np.ndarray:
    bounds = shapely.bounds(np.asarray(shapes.geometry, dtype=object))
    return (bounds[:, :2] + bounds[:, 2:]) / 2


# -----------------------------------------------------------------------------------------------------------
# a Space Ranger HD folder: 2, 8 and 16 um bins on one grid (the coarser ones sum the 2 um counts), the
# full-resolution image at 0.5 um/px, hires / lowres images at 1/4 and 1/8, and Space Ranger 4's cells

HD_UM_PER_PX = 0.5
HD_HW = (240, 320)
HD_ORIGIN = (8.0, 4.0)  # x, y of the bin grid's corner in full-resolution pixels
HD_HIRES, HD_LOWRES = 0.25, 0.125
HD_GENES = ["G0", "G1", "G2", "G3", "G3"]  # a repeated symbol, as in real matrices
HD_GRID = (48, 64)  # rows, columns of 2 um bins
MARKER = np.array([7, 201, 13], dtype=np.uint8)
#: the 8 um bin painted with MARKER in the images
MARKED_BIN = "s_008um_00005_00007-1"
#: Space Ranger 4 cells: (cell id, centre x, centre y) in full-resolution pixels; 12 x 10 px rectangles
HD_CELLS = [(1, 100, 80), (2, 150, 120), (3, 200, 90)]


def _hd_bin_square(row: int, col: int, side_px: float) -> tuple[float, float, float, float]:
    x0, y0 = HD_ORIGIN[0] + col * side_px, HD_ORIGIN[1] + row * side_px
    return x0, y0, x0 + side_px, y0 + side_px


def _write_spaceranger_hd(root: Path, *, cell_counts: bool = True) -> dict:
    rng = np.random.default_rng(5)
    root.mkdir(parents=True)
    with h5py.File(root / "feature_slice.h5", "w") as handle:
        handle.attrs["metadata_json"] = json.dumps({"hd_layout_json": json.dumps({"file_format": "1.0"})})
    n_rows, n_cols = HD_GRID
    counts_2um = rng.poisson(0.4, size=(n_rows, n_cols, len(HD_GENES)))
    yy, xx = np.mgrid[0:n_rows, 0:n_cols]
    tissue_2um = (yy - 24) ** 2 + (xx - 30) ** 2 < 22**2
    scalefactors = {}
    bins = {}
    for size in (2, 8, 16):
        k = size // 2
        counts = counts_2um.reshape(n_rows // k, k, n_cols // k, k, -1).sum((1, 3)).reshape(-1, len(HD_GENES))
        tissue = tissue_2um.reshape(n_rows // k, k, n_cols // k, k).any((1, 3)).ravel()
        rows, cols = (a.ravel() for a in np.meshgrid(np.arange(n_rows // k), np.arange(n_cols // k), indexing="ij"))
        side = size / HD_UM_PER_PX
        barcodes = [f"s_{size:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)]
        positions = pd.DataFrame({
            "barcode": barcodes, "in_tissue": tissue.astype(np.int32), "array_row": rows, "array_col": cols,
            "pxl_row_in_fullres": HD_ORIGIN[1] + (rows + 0.5) * side,
            "pxl_col_in_fullres": HD_ORIGIN[0] + (cols + 0.5) * side,
        })
        folder = root / "binned_outputs" / f"square_{size:03d}um"
        (folder / "spatial").mkdir(parents=True)
        positions.to_parquet(folder / "spatial" / "tissue_positions.parquet", index=False)
        scalefactors[size] = {
            "spot_diameter_fullres": side, "bin_size_um": float(size), "microns_per_pixel": HD_UM_PER_PX,
            "regist_target_img_scalef": HD_HIRES, "tissue_lowres_scalef": HD_LOWRES,
            "fiducial_diameter_fullres": 200.0, "tissue_hires_scalef": HD_HIRES,
        }
        (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors[size]))
        kept = [b for b, t in zip(barcodes, tissue, strict=True) if t]
        _write_10x_h5(folder / "filtered_feature_bc_matrix.h5", counts[tissue], kept, HD_GENES)
        bins[size] = {"positions": positions.set_index("barcode"), "barcodes": kept, "counts": counts[tissue]}

    fullres = rng.integers(0, 256, size=(*HD_HW, 3), dtype=np.uint8)
    x0, y0, x1, y1 = (int(v) for v in _hd_bin_square(5, 7, 8 / HD_UM_PER_PX))  # MARKED_BIN
    fullres[y0:y1, x0:x1] = MARKER
    (root / "spatial").mkdir()
    images = {"fullres": fullres}
    for res, scale in (("hires", HD_HIRES), ("lowres", HD_LOWRES)):
        size = (round(HD_HW[1] * scale), round(HD_HW[0] * scale))
        images[res] = np.asarray(Image.fromarray(fullres).resize(size, Image.NEAREST))
        Image.fromarray(images[res]).save(root / "spatial" / f"tissue_{res}_image.png")
    (root / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors[2]))
    import tifffile

    tifffile.imwrite(root.parent / "he_fullres.tif", fullres, photometric="rgb")

    seg = root / "segmented_outputs"
    (seg / "spatial").mkdir(parents=True)
    (seg / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors[2]))
    features = []
    for cell_id, cx, cy in HD_CELLS:
        ring = [[cx - 6, cy - 5], [cx + 6, cy - 5], [cx + 6, cy + 5], [cx - 6, cy + 5], [cx - 6, cy - 5]]
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                         "properties": {"cell_id": cell_id}})
    (seg / "cell_segmentations.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    cell_counts_matrix = rng.poisson(3, size=(len(HD_CELLS), len(HD_GENES)))
    if cell_counts:
        cell_ids = [f"cellid_{cell_id:09d}-1" for cell_id, _, _ in HD_CELLS]
        _write_10x_h5(seg / "filtered_feature_cell_matrix.h5", cell_counts_matrix, cell_ids, HD_GENES)
    return {"bins": bins, "images": images, "cell_counts": cell_counts_matrix, "fullres_file": root.parent / "he_fullres.tif"}


@pytest.fixture(scope="module")
def hd_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("hd") / "outs"
    return root, _write_spaceranger_hd(root)


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


def test_read_visium_hd_fullres_values(hd_folder):
    root, files = hd_folder
    sdata = pg.io.read_visium_hd(root, fullres_image_file=files["fullres_file"])
    assert set(sdata.shapes) == {"bins_002um", "bins_008um", "bins_016um", "cells"}
    assert set(sdata.tables) == {"bins_002um_table", "bins_008um_table", "bins_016um_table", "cells_table"}
    assert recorded_um_per_px(sdata, "he") == pytest.approx(HD_UM_PER_PX)
    np.testing.assert_array_equal(_pixels(sdata), files["images"]["fullres"])
    # the marked 8 um bin's centre, in microns of the full-resolution image, lands on the marker
    bin_um = (np.array(_hd_bin_square(5, 7, 16.0)[:2]) + 8.0) * HD_UM_PER_PX
    x, y = (bin_um / recorded_um_per_px(sdata, "he")).astype(int)
    np.testing.assert_array_equal(_pixels(sdata)[y, x], MARKER)

    for size, written in files["bins"].items():
        key = pg.io._visium_hd.hd_bins_key(size)
        shapes, table = sdata.shapes[key], sdata.tables[f"{key}_table"]
        assert len(shapes) == table.n_obs == len(written["barcodes"])
        assert list(shapes.index) == written["barcodes"] == list(table.obs_names)
        # every bin is a square of size x size microns, centred on Space Ranger's position
        np.testing.assert_allclose(shapes.geometry.area * HD_UM_PER_PX**2, float(size) ** 2)
        pos = written["positions"].loc[written["barcodes"]]
        expected = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
        np.testing.assert_allclose(_centres(shapes), expected)
        np.testing.assert_allclose(table.obsm["spatial"], expected)
        np.testing.assert_array_equal(table.X.toarray(), written["counts"])
        assert table.X.dtype == np.float32
        assert list(table.var_names) == ["G0", "G1", "G2", "G3", "G3-1"]
        attrs = table.uns["spatialdata_attrs"]
        assert (attrs["region"], attrs["region_key"], attrs["instance_key"]) == (key, "region", "instance_id")
        assert list(table.obs["instance_id"]) == written["barcodes"]
        np.testing.assert_array_equal(table.obs["array_row"], pos["array_row"])
        assert table.uns["pixgene"]["bin_size_um"] == size and table.uns["pixgene"]["image"] == "fullres"
        np.testing.assert_allclose(affine_between(sdata, key, "he"), np.eye(3))
    # one count read back by barcode
    b8 = files["bins"][8]
    row = b8["barcodes"].index(MARKED_BIN)
    assert sdata.tables["bins_008um_table"][MARKED_BIN].X.toarray()[0, 2] == b8["counts"][row, 2]

    cells, cells_table = sdata.shapes["cells"], sdata.tables["cells_table"]
    assert list(cells.index) == [f"cellid_{i:09d}-1" for i, _, _ in HD_CELLS]
    np.testing.assert_allclose(_centres(cells), [[x, y] for _, x, y in HD_CELLS])
    np.testing.assert_allclose(cells.geometry.area * HD_UM_PER_PX**2, 12 * 10 * HD_UM_PER_PX**2)  # 30 um^2
    np.testing.assert_array_equal(cells_table.X.toarray(), files["cell_counts"])
    assert cells_table.uns["spatialdata_attrs"]["region"] == "cells"
    # full-resolution pixels are the "global" and the dataset's coordinate system
    for cs in ("global", "outs"):
        m = get_transformation_between_coordinate_systems(sdata, sdata.images["he"], cs)
        np.testing.assert_allclose(m.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), np.eye(3))


def test_read_visium_hd_hires_and_zarr(hd_folder, tmp_path):
    import spatialdata

    root, files = hd_folder
    sdata = pg.io.read_visium_hd(root, bin_sizes=(8, 16), dataset_id="slide1")
    assert set(sdata.shapes) == {"bins_008um", "bins_016um", "cells"}
    # no full-resolution image in the folder: the hires image, and its pixel size
    assert recorded_um_per_px(sdata, "he") == pytest.approx(HD_UM_PER_PX / HD_HIRES)
    np.testing.assert_array_equal(_pixels(sdata), files["images"]["hires"])
    bin_um = (np.array(_hd_bin_square(5, 7, 16.0)[:2]) + 8.0) * HD_UM_PER_PX
    x, y = (bin_um / recorded_um_per_px(sdata, "he")).astype(int)
    np.testing.assert_array_equal(_pixels(sdata)[y, x], MARKER)
    table = sdata.tables["bins_016um_table"]
    written = files["bins"][16]
    pos = written["positions"].loc[written["barcodes"]]
    fullres = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
    np.testing.assert_allclose(_centres(sdata.shapes["bins_016um"]), fullres * HD_HIRES)
    np.testing.assert_allclose(table.obsm["spatial_fullres"], fullres)
    np.testing.assert_allclose(sdata.shapes["bins_016um"].geometry.area * (HD_UM_PER_PX / HD_HIRES) ** 2, 256.0)
    # the hires image maps to full-resolution pixels in "global" and the dataset's coordinate system
    for cs in ("global", "slide1"):
        m = get_transformation_between_coordinate_systems(sdata, sdata.images["he"], cs)
        m = m.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
        np.testing.assert_allclose(m, np.diag([1 / HD_HIRES, 1 / HD_HIRES, 1.0]))
    np.testing.assert_allclose(affine_between(sdata, "bins_016um", "he"), np.eye(3))

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)
        sdata.write(tmp_path / "hd.zarr")
    back = spatialdata.read_zarr(tmp_path / "hd.zarr")
    assert recorded_um_per_px(back, "he") == pytest.approx(HD_UM_PER_PX / HD_HIRES)
    assert (back.tables["bins_008um_table"].X != sdata.tables["bins_008um_table"].X).nnz == 0
    np.testing.assert_allclose(affine_between(back, "bins_008um", "he"), np.eye(3))


#: the smallest training that still runs every step of fit on the readers' output
FAST_FIT = {'max_epochs': 1, 'n_members': 1, 'progress': False, 'decoder': pg.tl.DecoderConfig(width=8, standardize_features=False), 'training': pg.tl.TrainConfig(n_views=1, tile_context_px=0)}


def test_fit_trains_on_hd_bins(hd_folder):
    root, files = hd_folder
    sdata = pg.io.read_visium_hd(root, bin_sizes=(8, 16), fullres_image_file=files["fullres_file"])
    for size in (8, 16):
        key = pg.io._visium_hd.hd_bins_key(size)
        model = pg.tl.fit(sdata, shapes_key=key, table_key=f"{key}_table", genes=["G0", "G1"], **FAST_FIT)
        slide = model.training["slides"][0]
        assert slide["n_spots"] == len(files["bins"][size]["barcodes"])
        assert slide["um_per_px"] == pytest.approx(HD_UM_PER_PX)
        assert slide["spot_diameter_um"] == pytest.approx(size)  # a polygon's longer side


def test_read_visium_hd_cells_without_counts_and_bad_inputs(tmp_path):
    root = tmp_path / "outs"
    _write_spaceranger_hd(root, cell_counts=False)
    sdata = pg.io.read_visium_hd(root, bin_sizes=(16,), image="lowres")
    assert "cells" in sdata.shapes and "cells_table" not in sdata.tables
    np.testing.assert_allclose(_centres(sdata.shapes["cells"]), [[x * HD_LOWRES, y * HD_LOWRES] for _, x, y in HD_CELLS])
    only_cells = pg.io.read_visium_hd(root, bin_sizes=(), image="lowres")
    assert set(only_cells.shapes) == {"cells"}
    assert recorded_um_per_px(only_cells, "he") == pytest.approx(HD_UM_PER_PX / HD_LOWRES)

    with pytest.raises(PixgeneInputError, match="Space Ranger HD folder .*missing.* does not exist"):
        pg.io.read_visium_hd(tmp_path / "missing")
    with pytest.raises(PixgeneInputError, match=r"no binned_outputs/square_NNNum folder for bin size\(s\) \[4\] um"
                       r" \(it has \[2, 8, 16\]\)"):
        pg.io.read_visium_hd(root, bin_sizes=(4, 8))
    with pytest.raises(PixgeneInputError, match="bin_sizes=.* is not a list of whole numbers"):
        pg.io.read_visium_hd(root, bin_sizes=(2.5,))
    with pytest.raises(PixgeneInputError, match="image='fullres' needs the full-resolution image"):
        pg.io.read_visium_hd(root, image="fullres")
    with pytest.raises(PixgeneInputError, match="full-resolution image .*nope.tif.* does not exist"):
        pg.io.read_visium_hd(root, fullres_image_file="nope.tif")

    scalefactors = root / "binned_outputs" / "square_016um" / "spatial" / "scalefactors_json.json"
    good = scalefactors.read_text()
    scalefactors.write_text(json.dumps({**json.loads(good), "microns_per_pixel": 0.3}))
    with pytest.raises(PixgeneInputError, match="microns_per_pixel=0.3 disagrees with bin_size_um"):
        pg.io.read_visium_hd(root, bin_sizes=(16,))
    scalefactors.write_text(good)

    positions = root / "binned_outputs" / "square_016um" / "spatial" / "tissue_positions.parquet"
    frame = pd.read_parquet(positions)
    frame.rename(columns={"pxl_row_in_fullres": "y"}).to_parquet(positions, index=False)
    with pytest.raises(PixgeneInputError, match="tissue positions file .* has columns .*'y'"):
        pg.io.read_visium_hd(root, bin_sizes=(16,))
    positions.unlink()
    with pytest.raises(PixgeneInputError, match="has no binned_outputs/square_016um/spatial/tissue_positions.parquet"):
        pg.io.read_visium_hd(root, bin_sizes=(16,))
    # a prefixed feature slice names the dataset
    (root / "feature_slice.h5").rename(root / "S1_feature_slice.h5")
    prefixed = pg.io.read_visium_hd(root, bin_sizes=(8,), cells=False)
    assert set(prefixed.shapes) == {"bins_008um"}
    assert prefixed.tables["bins_008um_table"].uns["pixgene"]["library_id"] == "S1"
    assert "S1" in prefixed.images["he"].attrs["transform"]
    with pytest.raises(PixgeneInputError, match="dataset_id='other': differs from the prefix of S1_feature_slice"):
        pg.io.read_visium_hd(root, bin_sizes=(8,), dataset_id="other")
    (root / "S1_feature_slice.h5").unlink()
    with pytest.raises(PixgeneInputError, match="has no feature_slice.h5"):
        pg.io.read_visium_hd(root, bin_sizes=(8,))


# -----------------------------------------------------------------------------------------------------------
# a Xenium folder (XOA 2 layout) and a post-Xenium H&E at 0.5 um/px, turned by 90 degrees against the slide

XE_PIXEL_SIZE = 0.2125
HE_UM_PER_PX = 0.5
HE_HW = (200, 360)
#: H&E pixels (x, y) -> Xenium microns: u = 0.5 * R90 p + t
HE_TO_UM = np.array([[0.0, -HE_UM_PER_PX, 95.0], [HE_UM_PER_PX, 0.0, -5.0], [0.0, 0.0, 1.0]])
#: the alignment Xenium Explorer writes: H&E pixels -> morphology pixels
ALIGNMENT = np.diag([1 / XE_PIXEL_SIZE, 1 / XE_PIXEL_SIZE, 1.0]) @ HE_TO_UM
XE_GENES = ["ACTB", "EPCAM", "PTPRC", "VIM"]
CELL_HALF_UM = 4.0
#: the cell centred on this micron position has the H&E painted with MARKER under it
MARKED_UM = (46.0, 58.0)


def _cell_id(prefix: int) -> str:
    """Xenium's string form of a cell id (the uint32 prefix in shifted hex, then the dataset suffix)."""
    return "".join(chr(ord("a") + ((prefix >> s) & 0xF)) for s in range(28, -4, -4)) + "-1"


def _write_xenium(root: Path, *, he_name: str = "he.ome.tif", ome: bool = True) -> dict:
    import tifffile
    import zarr

    rng = np.random.default_rng(9)
    root.mkdir(parents=True)
    (root / "experiment.xenium").write_text(json.dumps(
        {"run_name": "run1", "analysis_sw_version": "xenium-2.0.0.10", "pixel_size": XE_PIXEL_SIZE}))
    ux, uy = np.meshgrid(10.0 + 12.0 * np.arange(7), 10.0 + 12.0 * np.arange(14), indexing="ij")
    cx, cy = ux.ravel(), uy.ravel()
    n = len(cx)
    prefixes = (np.arange(n, dtype=np.uint32) + 1) * 1031
    ids = [_cell_id(int(p)) for p in prefixes]
    counts = rng.poisson(4.0, size=(n, len(XE_GENES)))
    _write_10x_h5(root / "cell_feature_matrix.h5", counts, ids, XE_GENES)
    area = (2 * CELL_HALF_UM) ** 2
    pd.DataFrame({
        "cell_id": ids, "x_centroid": cx, "y_centroid": cy, "transcript_counts": counts.sum(1),
        "control_probe_counts": np.zeros(n, int), "cell_area": np.full(n, area), "nucleus_area": np.full(n, area / 4),
    }).to_parquet(root / "cells.parquet", index=False)
    rows = []
    for i in range(n):
        h = CELL_HALF_UM
        ring = [(-h, -h), (h, -h), (h, h), (-h, h), (-h, -h)]
        rows += [{"cell_id": ids[i], "vertex_x": cx[i] + dx, "vertex_y": cy[i] + dy, "label_id": i + 1}
                 for dx, dy in ring]
    boundaries = pd.DataFrame(rows)
    boundaries.to_parquet(root / "cell_boundaries.parquet", index=False)
    nuclei = boundaries.assign(vertex_x=lambda f: (f.vertex_x - np.repeat(cx, 5)) / 2 + np.repeat(cx, 5),
                               vertex_y=lambda f: (f.vertex_y - np.repeat(cy, 5)) / 2 + np.repeat(cy, 5))
    nuclei.to_parquet(root / "nucleus_boundaries.parquet", index=False)
    # cells.zarr.zip (zarr v2, as Xenium writes it): cell ids and summary, polygon -> cell mappings
    store = zarr.storage.ZipStore(root / "cells.zarr.zip", mode="w")
    group = zarr.open_group(store, mode="w", zarr_format=2)
    group.create_array("cell_id", data=np.column_stack([prefixes, np.ones(n, np.uint32)]))
    columns = ["cell_centroid_x", "cell_centroid_y", "cell_area", "nucleus_centroid_x", "nucleus_centroid_y",
               "nucleus_area", "z_level", "nucleus_count"]
    summary = np.column_stack([cx, cy, np.full(n, area), cx, cy, np.full(n, area / 4), np.zeros(n), np.ones(n)])
    group.create_array("cell_summary", data=summary, attributes={"column_names": columns})
    for mask in (0, 1):
        group.create_array(f"polygon_sets/{mask}/cell_index", data=np.arange(n, dtype=np.uint32))
    store.close()

    he = rng.integers(0, 256, size=(*HE_HW, 3), dtype=np.uint8)
    mx, my = (np.linalg.inv(HE_TO_UM) @ [*MARKED_UM, 1.0])[:2]
    he[int(my) - 2:int(my) + 2, int(mx) - 2:int(mx) + 2] = MARKER
    he_path = root / he_name
    if ome:
        metadata = {"axes": "YXS", "PhysicalSizeX": HE_UM_PER_PX, "PhysicalSizeY": HE_UM_PER_PX,
                    "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}
        tifffile.imwrite(he_path, he, photometric="rgb", ome=True, metadata=metadata)
    else:
        tifffile.imwrite(he_path, he, photometric="rgb")
    alignment_path = root / "he_imagealignment.csv"
    np.savetxt(alignment_path, ALIGNMENT, delimiter=",")
    return {"ids": ids, "counts": counts, "um": np.column_stack([cx, cy]), "he": he, "he_path": he_path,
            "alignment": alignment_path, "marked": ids[int(np.flatnonzero((cx == MARKED_UM[0]) & (cy == MARKED_UM[1]))[0])]}


@pytest.fixture(scope="module")
def xenium_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("xenium") / "outs"
    return root, _write_xenium(root)


def test_read_xenium_values(xenium_folder):
    root, files = xenium_folder
    sdata = pg.io.read_xenium(root, he_image=files["he_path"], alignment=files["alignment"])
    assert set(sdata.images) == {"he"} and set(sdata.shapes) == {"cells"} and set(sdata.tables) == {"table"}
    assert recorded_um_per_px(sdata, "he") == pytest.approx(HE_UM_PER_PX)
    np.testing.assert_array_equal(_pixels(sdata), files["he"])
    cells, table = sdata.shapes["cells"], sdata.tables["table"]
    assert len(cells) == table.n_obs == len(files["ids"])
    assert list(cells.index) == list(table.obs_names) == files["ids"]
    # cell centres: Xenium microns carried into H&E pixels, and the pixel there is the one painted
    expected = (np.linalg.inv(HE_TO_UM) @ np.c_[files["um"], np.ones(len(files["um"]))].T).T[:, :2]
    np.testing.assert_allclose(_centres(cells), expected, atol=1e-9)
    x, y = _centres(cells)[files["ids"].index(files["marked"])]
    np.testing.assert_array_equal(_pixels(sdata)[int(y), int(x)], MARKER)
    # 8 x 8 um cells
    np.testing.assert_allclose(cells.geometry.area * recorded_um_per_px(sdata, "he") ** 2, 64.0)
    np.testing.assert_array_equal(table.X.toarray(), files["counts"])
    assert table[files["marked"]].X.toarray()[0, 1] == files["counts"][files["ids"].index(files["marked"]), 1]
    assert list(table.var_names) == XE_GENES
    np.testing.assert_allclose(table.obsm["spatial_um"], files["um"])
    np.testing.assert_allclose(table.obs["cell_area"], 64.0)
    attrs = table.uns["spatialdata_attrs"]
    assert (attrs["region"], attrs["instance_key"]) == ("cells", "instance_id")
    info = table.uns["pixgene"]
    assert info["platform"] == "xenium" and info["library_id"] == "run1"
    assert info["ome_um_per_px"] == pytest.approx(HE_UM_PER_PX)
    np.testing.assert_allclose(info["alignment"], ALIGNMENT)
    # the H&E sits in Xenium's "global" (morphology pixels) through the alignment; the cells overlay it
    m = get_transformation_between_coordinate_systems(sdata, sdata.images["he"], "global")
    np.testing.assert_allclose(m.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), ALIGNMENT)
    np.testing.assert_allclose(affine_between(sdata, "cells", "he"), np.eye(3))


def test_fit_trains_on_xenium_cells(xenium_folder):
    root, files = xenium_folder
    sdata = pg.io.read_xenium(root, he_image=files["he_path"], alignment=files["alignment"])
    model = pg.tl.fit(sdata, shapes_key="cells", table_key="table", genes=["ACTB", "VIM"], **FAST_FIT)
    slide = model.training["slides"][0]
    assert slide["n_spots"] == len(files["ids"])
    assert slide["um_per_px"] == pytest.approx(HE_UM_PER_PX)
    assert slide["spot_diameter_um"] == pytest.approx(2 * CELL_HALF_UM)


def test_read_xenium_found_files_nuclei_transcripts_and_plain_tiff(tmp_path):
    root = tmp_path / "outs"
    files = _write_xenium(root, he_name="run1_he_image.ome.tif", ome=False)
    files["alignment"].rename(root / "run1_he_imagealignment.csv")
    pd.DataFrame({
        "x_location": [46.0, 47.0], "y_location": [58.0, 59.0], "z_location": [1.0, 1.0],
        "feature_name": ["ACTB", "VIM"], "cell_id": [files["marked"]] * 2, "qv": [40.0, 40.0],
        "overlaps_nucleus": [1, 0],
    }).to_parquet(root / "transcripts.parquet", index=False)
    # the H&E and its alignment found by Xenium's names; a plain TIFF has no OME pixel size
    sdata = pg.io.read_xenium(root, nuclei=True, transcripts=True)
    assert recorded_um_per_px(sdata, "he") == pytest.approx(HE_UM_PER_PX)
    assert sdata.tables["table"].uns["pixgene"]["ome_um_per_px"] is None
    nuclei = sdata.shapes["nuclei"]
    assert len(nuclei) == len(files["ids"]) and list(nuclei["cell_id"]) == files["ids"]
    np.testing.assert_allclose(nuclei.geometry.area * HE_UM_PER_PX**2, 16.0)
    np.testing.assert_allclose(_centres(nuclei), _centres(sdata.shapes["cells"]), atol=1e-9)
    assert len(sdata.points["transcripts"]) == 2
    np.testing.assert_allclose(affine_between(sdata, "transcripts", "he"), np.linalg.inv(HE_TO_UM), atol=1e-9)

    import spatialdata

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)
        sdata.write(tmp_path / "xenium.zarr")
    back = spatialdata.read_zarr(tmp_path / "xenium.zarr")
    assert recorded_um_per_px(back, "he") == pytest.approx(HE_UM_PER_PX)
    np.testing.assert_allclose(affine_between(back, "cells", "he"), np.eye(3))
    np.testing.assert_allclose(_centres(back.shapes["cells"]), _centres(sdata.shapes["cells"]))
    assert (back.tables["table"].X != sdata.tables["table"].X).nnz == 0


def test_read_xenium_cells_off_the_image(xenium_folder):
    root, files = xenium_folder
    # the H&E shifted 50 um right: the cells left of it fall off and are left out
    shifted = np.diag([1 / XE_PIXEL_SIZE, 1 / XE_PIXEL_SIZE, 1.0]) @ np.array(
        [[0.0, -HE_UM_PER_PX, 95.0], [HE_UM_PER_PX, 0.0, 45.0], [0.0, 0.0, 1.0]])
    with pytest.warns(UserWarning, match=r"\d+ of 98 cells lie outside the H&E image"):
        sdata = pg.io.read_xenium(root, he_image=files["he_path"], alignment=shifted)
    kept = files["um"][:, 1] >= 45.0
    assert sdata.tables["table"].n_obs == kept.sum() == 77
    assert list(sdata.shapes["cells"].index) == [i for i, k in zip(files["ids"], kept, strict=True) if k]
    # the inverse matrix (morphology -> H&E) puts every cell off the image
    with pytest.raises(PixgeneInputError, match="only 3 of the 98 cell centres fall on the H&E image .*fewer than min_fraction_on_image=0.5"), \
            pytest.warns(UserWarning, match="its OME metadata give 0.5 um/px but the alignment matrix gives 0.0903"):
        pg.io.read_xenium(root, he_image=files["he_path"], alignment=np.linalg.inv(ALIGNMENT))


def test_read_xenium_bad_inputs(xenium_folder, tmp_path):
    root, files = xenium_folder
    he = files["he_path"]
    bad = tmp_path / "bad_alignment.csv"
    np.savetxt(bad, ALIGNMENT[:2], delimiter=",")
    with pytest.raises(PixgeneInputError, match=r"alignment file .*bad_alignment.csv.* has shape \(2, 3\), not the "
                       "3x3 affine matrix"):
        pg.io.read_xenium(root, he_image=he, alignment=bad)
    # checked before any work: the folder below lacks everything but would be reported only after
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PixgeneInputError, match=r"alignment: has shape \(4, 4\)"):
        pg.io.read_xenium(empty, he_image=he, alignment=np.eye(4))
    with pytest.raises(PixgeneInputError, match="is not affine"):
        pg.io.read_xenium(root, he_image=he, alignment=np.array([[1, 0, 0], [0, 1, 0], [0.1, 0, 1.0]]))
    with pytest.raises(PixgeneInputError, match="scales the H&E's x and y differently"):
        pg.io.read_xenium(root, he_image=he, alignment=np.diag([2.0, 3.0, 1.0]))
    bad.write_text("1,0,0\n0,1,zero\n0,0,1\n")
    with pytest.raises(PixgeneInputError, match="has a line that is not numbers"):
        pg.io.read_xenium(root, he_image=he, alignment=bad)
    with pytest.raises(PixgeneInputError, match="H&E image .*nope.ome.tif.* does not exist"):
        pg.io.read_xenium(root, he_image="nope.ome.tif", alignment=files["alignment"])
    with pytest.raises(PixgeneInputError, match="has no alignment file next to it"):
        pg.io.read_xenium(root, he_image=he)
    with pytest.raises(PixgeneInputError, match="Xenium folder .*empty.* has no experiment.xenium"):
        pg.io.read_xenium(empty, he_image=he, alignment=files["alignment"])

    folder = _copy(root, tmp_path)
    (folder / "cells.zarr.zip").unlink()
    (folder / "cell_boundaries.parquet").unlink()
    with pytest.raises(PixgeneInputError, match=r"lacks \['cell_boundaries.parquet', 'cells.zarr.zip'\]"):
        pg.io.read_xenium(folder, he_image=he, alignment=files["alignment"])
    with pytest.raises(PixgeneInputError, match=r"has no '\*he_image.ome.tif'"):
        pg.io.read_xenium(folder)
    grey = tmp_path / "grey.tif"
    import tifffile

    tifffile.imwrite(grey, np.zeros((20, 30), np.uint8))
    with pytest.raises(PixgeneInputError, match="H&E image .*grey.tif.* not an RGB image"):
        pg.io.read_xenium(root, he_image=grey, alignment=files["alignment"])
    png = tmp_path / "he.png"
    Image.fromarray(files["he"]).save(png)
    with pytest.raises(PixgeneInputError, match="H&E image .*he.png.* cannot be read as a TIFF"):
        pg.io.read_xenium(root, he_image=png, alignment=files["alignment"])
