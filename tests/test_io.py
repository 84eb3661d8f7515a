"""pg.io readers: values read back are compared with the files themselves, parsed independently here."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image
from spatialdata.transformations import get_transformation_between_coordinate_systems

import pixgene as pg
from pixgene._core.coords import affine_between, apply_affine
from pixgene._core.units import recorded_um_per_px
from pixgene._core.validate import PixgeneInputError

# -----------------------------------------------------------------------------------------------------------
# helpers: small files in the formats the readers accept, written from arrays the tests keep


def _write_image(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    return path


def _spot_centres(spot_ids: list[str]) -> np.ndarray:
    """x, y of spots on a square grid with a 40 px pitch and a 30 px margin."""
    xy = np.array([[int(v) for v in s.split("x")] for s in spot_ids], dtype=float)
    return 30.0 + 40.0 * (xy - 1)


def _st_files(tmp_path: Path, *, transpose: bool = False, gz: bool = True) -> dict:
    rng = np.random.default_rng(1)
    grid = [f"{x}x{y}" for y in range(1, 5) for x in range(1, 6)]  # 20 spots, 5 x 4
    selected = np.ones(len(grid), dtype=int)
    selected[[0, 7]] = 0
    centres = _spot_centres(grid)
    spots = pd.DataFrame(
        {
            "x": [int(s.split("x")[0]) for s in grid],
            "y": [int(s.split("x")[1]) for s in grid],
            "pixel_x": centres[:, 0],
            "pixel_y": centres[:, 1],
            "selected": selected,
        }
    )
    spots_path = tmp_path / "spots.tsv"
    spots.to_csv(spots_path, sep="\t", index=False)
    genes = ["GeneA", "GeneB", "GeneB", "GeneC"]  # a repeated symbol, as in real tables
    with_counts = grid[:-1]  # the last spot has no counts row
    counts = rng.poisson(5.0, size=(len(with_counts), len(genes)))
    header = "\t" + "\t".join(genes)
    lines = [header] + [
        s + "\t" + "\t".join(map(str, row)) for s, row in zip(with_counts, counts, strict=True)
    ]
    if transpose:
        lines = ["\t" + "\t".join(with_counts)] + [
            g + "\t" + "\t".join(map(str, counts[:, j])) for j, g in enumerate(genes)
        ]
    counts_path = tmp_path / ("counts.tsv.gz" if gz else "counts.tsv")
    text = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(counts_path, "wt") as handle:
            handle.write(text)
    else:
        counts_path.write_text(text)
    pixels = rng.integers(0, 256, size=(200, 240, 3), dtype=np.uint8)
    image_path = _write_image(tmp_path / "he.png", pixels)
    return {
        "counts": counts_path, "spots": spots_path, "image": image_path, "pixels": pixels, "grid": grid,
        "selected": selected, "with_counts": with_counts, "counts_matrix": counts, "genes": genes,
    }


def _xy(shapes) -> np.ndarray:
    return np.c_[shapes.geometry.x, shapes.geometry.y]


def _pixels(sdata, key: str = "he") -> np.ndarray:
    """The (y, x, c) pixels of a single-scale image element."""
    return sdata.images[key].transpose("y", "x", "c").to_numpy()


def _read_10x_h5(path: Path) -> ad.AnnData:
    """scanpy's reader, independent of spatialdata-io; real 10x matrices repeat a few gene symbols."""
    import scanpy as sc

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Variable names are not unique", category=UserWarning)
        return sc.read_10x_h5(path)


# -----------------------------------------------------------------------------------------------------------
# read_st on small files


@pytest.fixture
def st_files(tmp_path):
    return _st_files(tmp_path)


def test_read_st_values(st_files):
    sdata = pg.io.read_st(st_files["counts"], st_files["spots"], st_files["image"])
    table = sdata.tables["table"]
    expected = [
        s
        for s, sel in zip(st_files["grid"], st_files["selected"], strict=True)
        if sel and s in st_files["with_counts"]
    ]
    assert list(table.obs_names) == expected and len(expected) == 17
    rows = [st_files["with_counts"].index(s) for s in expected]
    np.testing.assert_array_equal(table.X.toarray(), st_files["counts_matrix"][rows])
    assert list(table.var_names) == ["GeneA", "GeneB", "GeneB-1", "GeneC"]
    # 200 um between centres that are 40 px apart
    assert recorded_um_per_px(sdata, "he") == pytest.approx(5.0)
    spots = sdata.shapes["spots"]
    np.testing.assert_allclose(spots["radius"], 100.0 / 5.0 / 2.0)
    np.testing.assert_allclose(_xy(spots), _spot_centres(expected))
    np.testing.assert_allclose(affine_between(sdata, "spots", "he"), np.eye(3))
    np.testing.assert_array_equal(_pixels(sdata), st_files["pixels"])
    info = table.uns["pixgene"]
    assert info["platform"] == "st" and info["um_per_px_source"] == "pitch"
    np.testing.assert_allclose(info["array_step_px"], [40.0, 40.0])
    assert table.obs["region"].unique().tolist() == ["spots"]
    assert list(table.obs["instance_id"]) == expected


def test_read_st_transposed_plain_counts_and_given_um_per_px(tmp_path):
    files = _st_files(tmp_path, transpose=True, gz=False)
    sdata = pg.io.read_st(
        files["counts"], files["spots"], files["image"], um_per_px=2.0, spot_diameter_um=50.0,
        image_key="img", shapes_key="st", table_key="t",
    )
    table = sdata.tables["t"]
    first = table.obs_names[0]
    expected = files["counts_matrix"][files["with_counts"].index(first)]
    np.testing.assert_array_equal(table[first].X.toarray()[0], expected)
    assert recorded_um_per_px(sdata, "img") == 2.0
    np.testing.assert_allclose(sdata.shapes["st"]["radius"], 12.5)
    assert table.uns["pixgene"]["um_per_px_source"] == "given"


def test_read_st_jpeg_decoding_matches_pillow(tmp_path):
    files = _st_files(tmp_path)
    jpeg = tmp_path / "he.jpg"
    Image.fromarray(files["pixels"]).save(jpeg, quality=90)
    sdata = pg.io.read_st(files["counts"], files["spots"], jpeg)
    reference = np.asarray(Image.open(jpeg).convert("RGB"))
    np.testing.assert_array_equal(_pixels(sdata), reference)


def test_read_st_missing_file(st_files, tmp_path):
    with pytest.raises(PixgeneInputError, match="counts file .*nope.tsv.*does not exist"):
        pg.io.read_st(tmp_path / "nope.tsv", st_files["spots"], st_files["image"])


def test_read_st_spots_table_without_pixel_columns(st_files):
    frame = pd.read_csv(st_files["spots"], sep="\t").drop(columns=["pixel_y"])
    frame.to_csv(st_files["spots"], sep="\t", index=False)
    with pytest.raises(PixgeneInputError, match=r"spots file .*spots.tsv.*no column\(s\) \['pixel_y'\]"):
        pg.io.read_st(st_files["counts"], st_files["spots"], st_files["image"])


def test_read_st_no_shared_spots(st_files):
    frame = pd.read_csv(st_files["spots"], sep="\t")
    frame[["x", "y"]] += 100
    frame.to_csv(st_files["spots"], sep="\t", index=False)
    with pytest.raises(PixgeneInputError, match="counts file .* and spots file .* share no spot"):
        pg.io.read_st(st_files["counts"], st_files["spots"], st_files["image"])


def test_read_st_spots_outside_image(st_files):
    frame = pd.read_csv(st_files["spots"], sep="\t")
    frame["pixel_x"] *= 10
    frame.to_csv(st_files["spots"], sep="\t", index=False)
    match = r"spots file .*spots.tsv.*spot centres lie outside the 240 x 200 px"
    with pytest.raises(PixgeneInputError, match=match):
        pg.io.read_st(st_files["counts"], st_files["spots"], st_files["image"])


def test_read_st_non_numeric_counts(st_files, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("\tA\tB\n1x1\t1\tNA?\n2x1\t3\t4\n")
    with pytest.raises(PixgeneInputError, match="counts file .*bad.tsv.*not a table of numbers"):
        pg.io.read_st(bad, st_files["spots"], st_files["image"])


def test_read_st_normalised_counts_rejected(st_files, tmp_path):
    bad = tmp_path / "lognorm.tsv"
    bad.write_text("\tA\tB\n1x2\t0.5\t1.25\n2x1\t3.5\t4.1\n")
    with pytest.raises(PixgeneInputError, match="table 'table'.*not integers"):
        pg.io.read_st(bad, st_files["spots"], st_files["image"])


# -----------------------------------------------------------------------------------------------------------
# read_visium on a small Space Ranger folder

SCALEFACTORS = {
    "spot_diameter_fullres": 30.0,
    "tissue_hires_scalef": 0.2,
    "tissue_lowres_scalef": 0.06,
    "fiducial_diameter_fullres": 45.0,
}
FULLRES_HW = (600, 700)


def _write_10x_h5(path: Path, counts: np.ndarray, barcodes: list[str], genes: list[str]) -> None:
    """The Space Ranger v3 HDF5 layout: a genes x barcodes CSC matrix, i.e. barcodes x genes CSR arrays."""
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
        handle.attrs["library_ids"] = np.array(["lib"], dtype="S")


def _spaceranger(
    root: Path, *, prefix: str = "", fullres: bool = False, hires: bool = True, header: bool = False
) -> dict:
    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    (root / "spatial").mkdir()
    rows, cols = np.meshgrid(np.arange(6), np.arange(8), indexing="ij")
    n = rows.size
    barcodes = [f"AAAC{i:04d}-1" for i in range(n)]
    in_tissue = (rng.random(n) < 0.7).astype(int)
    # full-resolution pixel centres: array position on a 60 px lattice, offset into the image
    pxl_row = 80 + 70 * rows.ravel()
    pxl_col = 90 + 60 * cols.ravel()
    positions = pd.DataFrame(
        {"barcode": barcodes, "in_tissue": in_tissue, "array_row": rows.ravel(), "array_col": cols.ravel(),
         "pxl_row_in_fullres": pxl_row, "pxl_col_in_fullres": pxl_col}
    )
    # Space Ranger 1 writes tissue_positions_list.csv without a header, Space Ranger 2 tissue_positions.csv with one
    name = "tissue_positions.csv" if header else "tissue_positions_list.csv"
    positions.to_csv(root / "spatial" / f"{prefix}{name}", header=header, index=False)
    genes = ["Actb", "Gapdh", "Myh4", "Myh4"]
    # a filtered matrix: in-tissue barcodes only
    counted = [b for b, t in zip(barcodes, in_tissue, strict=True) if t]
    counts = rng.poisson(4.0, size=(len(counted), len(genes)))
    _write_10x_h5(root / f"{prefix}filtered_feature_bc_matrix.h5", counts, counted, genes)
    (root / "spatial" / f"{prefix}scalefactors_json.json").write_text(json.dumps(SCALEFACTORS))
    images = {}
    for res, scale in (("hires", 0.2), ("lowres", 0.06)):
        if res == "hires" and not hires:
            continue
        shape = (round(FULLRES_HW[0] * scale), round(FULLRES_HW[1] * scale), 3)
        images[res] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        _write_image(root / "spatial" / f"{prefix}tissue_{res}_image.png", images[res])
    if fullres:
        images["fullres"] = rng.integers(0, 256, size=(*FULLRES_HW, 3), dtype=np.uint8)
        _write_image(root / "fullres.png", images["fullres"])
    return {
        "positions": positions.set_index("barcode"), "counted": counted, "counts": counts, "images": images
    }


@pytest.mark.parametrize("prefix,header", [("", False), ("S1_", False), ("", True)])
@pytest.mark.parametrize("image", ["auto", "lowres"])
def test_read_visium_values(tmp_path, prefix, header, image):
    files = _spaceranger(tmp_path / "outs", prefix=prefix, header=header)
    sdata = pg.io.read_visium(tmp_path / "outs", image=image)
    resolution = "hires" if image == "auto" else "lowres"
    scale = SCALEFACTORS[f"tissue_{resolution}_scalef"]
    dataset_id = prefix.rstrip("_") or "outs"

    table = sdata.tables["table"]
    assert list(table.obs_names) == files["counted"]
    np.testing.assert_array_equal(table.X.toarray(), files["counts"])
    assert list(table.var_names) == ["Actb", "Gapdh", "Myh4", "Myh4-1"]
    pos = files["positions"].loc[files["counted"]]
    expected_xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float) * scale
    spots = sdata.shapes["spots"]
    np.testing.assert_allclose(_xy(spots), expected_xy)
    np.testing.assert_allclose(table.obsm["spatial"], expected_xy)
    np.testing.assert_allclose(spots["radius"], 30.0 * scale / 2)
    assert recorded_um_per_px(sdata, "he") == pytest.approx(55.0 / (30.0 * scale))
    np.testing.assert_array_equal(_pixels(sdata), files["images"][resolution])
    # spots overlay the image in every coordinate system, and the image maps to full-resolution pixels
    np.testing.assert_allclose(affine_between(sdata, "spots", "he"), np.eye(3))
    for cs in (dataset_id, "global"):
        to_fullres = get_transformation_between_coordinate_systems(sdata, sdata.images["he"], cs)
        m = to_fullres.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
        np.testing.assert_allclose(m, np.diag([1 / scale, 1 / scale, 1.0]))
    assert table.uns["pixgene"]["image"] == resolution
    assert table.uns["pixgene"]["library_id"] == dataset_id
    np.testing.assert_array_equal(table.obs["array_row"], pos["array_row"])


def test_read_visium_survives_zarr(tmp_path):
    import spatialdata

    _spaceranger(tmp_path / "outs", prefix="S1_")
    sdata = pg.io.read_visium(tmp_path / "outs")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)
        sdata.write(tmp_path / "slide.zarr")
    back = spatialdata.read_zarr(tmp_path / "slide.zarr")
    assert recorded_um_per_px(back, "he") == recorded_um_per_px(sdata, "he")
    np.testing.assert_allclose(affine_between(back, "spots", "he"), np.eye(3))
    np.testing.assert_allclose(_xy(back.shapes["spots"]), _xy(sdata.shapes["spots"]))
    assert (back.tables["table"].X != sdata.tables["table"].X).nnz == 0
    assert back.tables["table"].uns["pixgene"]["scalefactors"]["tissue_hires_scalef"] == 0.2


def test_affine_between_checks_every_shared_coordinate_system(tmp_path):
    from spatialdata.transformations import Scale, set_transformation

    _spaceranger(tmp_path / "outs")
    sdata = pg.io.read_visium(tmp_path / "outs")
    # three coordinate systems link spots and image; spatialdata alone refuses to choose between them
    assert len(set(sdata.images["he"].attrs["transform"]) & set(sdata.shapes["spots"].attrs["transform"])) == 3
    np.testing.assert_allclose(affine_between(sdata, "spots", "he"), np.eye(3))
    set_transformation(sdata.shapes["spots"], Scale([2.0, 2.0], axes=("x", "y")), to_coordinate_system="global")
    with pytest.raises(PixgeneInputError, match="elements 'spots' and 'he': their transformations disagree"):
        affine_between(sdata, "spots", "he")


def test_read_visium_fullres_and_auto_fallback(tmp_path):
    files = _spaceranger(tmp_path / "outs", fullres=True, hires=False)
    sdata = pg.io.read_visium(tmp_path / "outs", fullres_image_file="fullres.png")
    pos = files["positions"].loc[files["counted"]]
    spots = sdata.shapes["spots"]
    np.testing.assert_allclose(_xy(spots), pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float))
    assert recorded_um_per_px(sdata, "he") == pytest.approx(55.0 / 30.0)
    np.testing.assert_array_equal(_pixels(sdata), files["images"]["fullres"])
    # without the full-resolution image and no hires image, "auto" falls back to lowres
    lowres = pg.io.read_visium(tmp_path / "outs", image="auto")
    assert lowres.tables["table"].uns["pixgene"]["image"] == "lowres"
    with pytest.raises(PixgeneInputError, match="has no hires image"):
        pg.io.read_visium(tmp_path / "outs", image="hires")
    with pytest.raises(PixgeneInputError, match="image='fullres' needs the full-resolution image"):
        pg.io.read_visium(tmp_path / "outs", image="fullres")


def test_read_visium_bad_inputs(tmp_path):
    with pytest.raises(PixgeneInputError, match="Space Ranger folder .*missing.* does not exist"):
        pg.io.read_visium(tmp_path / "missing")

    files = _spaceranger(tmp_path / "outs")
    positions_file = tmp_path / "outs" / "spatial" / "tissue_positions_list.csv"
    original = positions_file.read_text()

    positions_file.write_text(original.replace("AAAC", "TTTT"))
    match = "counts file .* and tissue positions file .* share no barcode"
    with pytest.raises(PixgeneInputError, match=match):
        pg.io.read_visium(tmp_path / "outs")

    first = files["counted"][0]
    positions_file.write_text(original.replace(first, "GGGG0000-1"))
    with pytest.raises(PixgeneInputError, match="do not match: 1 of .* counts barcodes have no position"):
        pg.io.read_visium(tmp_path / "outs")

    positions_file.write_text(original)
    scalefactors = tmp_path / "outs" / "spatial" / "scalefactors_json.json"
    scalefactors.write_text(json.dumps({**SCALEFACTORS, "tissue_hires_scalef": 2.0}))
    with pytest.raises(PixgeneInputError, match="tissue positions file .* spot centres lie outside"):
        pg.io.read_visium(tmp_path / "outs")

    scalefactors.write_text(json.dumps({"tissue_hires_scalef": 0.2, "tissue_lowres_scalef": 0.06}))
    with pytest.raises(PixgeneInputError, match=r"scale factors file .* lacks \['spot_diameter_fullres'\]"):
        pg.io.read_visium(tmp_path / "outs")

    (tmp_path / "outs" / "filtered_feature_bc_matrix.h5").unlink()
    match = "Space Ranger folder .* has no .*filtered_feature_bc_matrix.h5"
    with pytest.raises(PixgeneInputError, match=match):
        pg.io.read_visium(tmp_path / "outs")


# -----------------------------------------------------------------------------------------------------------
# from_anndata on a small scanpy-style AnnData


def _scanpy_adata(files: dict, *, float_image: bool = True) -> ad.AnnData:
    pos = files["positions"].loc[files["counted"]]
    adata = ad.AnnData(
        X=sp.csr_matrix(files["counts"].astype(np.float32)),
        obs=pos[["in_tissue", "array_row", "array_col"]].copy(),
        var=pd.DataFrame(index=["Actb", "Gapdh", "Myh4", "Myh4-1"]),
    )
    adata.obsm["spatial"] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    images = {k: (v.astype(np.float32) / 255 if float_image else v) for k, v in files["images"].items()}
    adata.uns["spatial"] = {"lib": {"images": images, "scalefactors": dict(SCALEFACTORS)}}
    return adata


def test_from_anndata_values(tmp_path):
    files = _spaceranger(tmp_path / "outs")
    adata = _scanpy_adata(files)
    for image, res in (("auto", "hires"), ("lowres", "lowres")):
        sdata = pg.io.from_anndata(adata, image=image)
        scale = SCALEFACTORS[f"tissue_{res}_scalef"]
        spots = sdata.shapes["spots"]
        np.testing.assert_allclose(_xy(spots), adata.obsm["spatial"] * scale)
        np.testing.assert_allclose(spots["radius"], 30.0 * scale / 2)
        assert recorded_um_per_px(sdata, "he") == pytest.approx(55.0 / (30.0 * scale))
        np.testing.assert_array_equal(sdata.tables["table"].X.toarray(), files["counts"])
        np.testing.assert_allclose(affine_between(sdata, "spots", "he"), np.eye(3))
        to_fullres = get_transformation_between_coordinate_systems(sdata, sdata.images["he"], "lib")
        np.testing.assert_allclose(
            to_fullres.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")),
            np.diag([1 / scale, 1 / scale, 1.0]),
        )
        np.testing.assert_allclose(_pixels(sdata), files["images"][res].astype(np.float32) / 255)
    assert "spatial" in adata.uns and adata.n_obs == len(files["counted"])  # input untouched


def test_from_anndata_keeps_in_tissue_only(tmp_path):
    files = _spaceranger(tmp_path / "outs")
    adata = _scanpy_adata(files, float_image=False)
    adata.obs["in_tissue"] = np.r_[0, 0, np.ones(adata.n_obs - 2, dtype=int)]
    sdata = pg.io.from_anndata(adata, library_id="lib", image="lowres")
    assert list(sdata.tables["table"].obs_names) == list(adata.obs_names[2:])


def test_from_anndata_bad_inputs(tmp_path):
    files = _spaceranger(tmp_path / "outs")
    adata = _scanpy_adata(files)
    with pytest.raises(PixgeneInputError, match=r'adata.obsm\["spatial"\]: is missing'):
        pg.io.from_anndata(ad.AnnData(X=adata.X, uns=adata.uns))
    no_spatial = adata.copy()
    del no_spatial.uns["spatial"]
    with pytest.raises(PixgeneInputError, match=r'adata.uns\["spatial"\]: is missing or empty'):
        pg.io.from_anndata(no_spatial)
    two = adata.copy()
    two.uns["spatial"]["other"] = two.uns["spatial"]["lib"]
    with pytest.raises(PixgeneInputError, match="holds several libraries"):
        pg.io.from_anndata(two)
    no_scale = adata.copy()
    del no_scale.uns["spatial"]["lib"]["scalefactors"]["tissue_hires_scalef"]
    with pytest.raises(PixgeneInputError, match=r"\"scalefactors\"\]: lacks 'tissue_hires_scalef'"):
        pg.io.from_anndata(no_scale)
    far = adata.copy()
    far.obsm["spatial"] = far.obsm["spatial"] * 100
    with pytest.raises(PixgeneInputError, match=r'adata.obsm\["spatial"\]: .* spot centres lie outside'):
        pg.io.from_anndata(far)
    with pytest.raises(PixgeneInputError, match="library_id 'nope'"):
        pg.io.from_anndata(adata, library_id="nope")


# -----------------------------------------------------------------------------------------------------------
# the real data (../shared/data or $PIXGENE_DATA_DIR)


def _real(name: str) -> Path:
    from pixgene.datasets._paths import dataset_dir

    try:
        return dataset_dir(name)
    except PixgeneInputError as err:
        pytest.skip(f"real data not available: {err}")


@pytest.fixture(scope="session")
def her2st_c2():
    root = _real("her2st")
    files = (root / "counts/C2.tsv.gz", root / "spots/C2_selection.tsv", root / "images/C2_5714_HE_BT_C2.jpg")
    return files, pg.io.read_st(*files)


def _nearest_neighbour_px(xy: np.ndarray) -> float:
    """Median nearest-neighbour distance by brute force (the reader uses a k-d tree)."""
    d = np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return float(np.median(d.min(1)))


@pytest.mark.data
def test_read_st_her2st(her2st_c2):
    (counts, spots_file, image), sdata = her2st_c2
    raw = pd.read_csv(counts, sep="\t", index_col=0)
    spots = pd.read_csv(spots_file, sep="\t")
    spots.index = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    expected = spots.index[(spots["selected"] == 1) & spots.index.isin(raw.index)]
    table = sdata.tables["table"]
    assert table.n_obs == len(expected) == 187
    assert table.n_vars == raw.shape[1]
    some = expected[[0, 100, 186]]
    np.testing.assert_array_equal(table[some].X.toarray(), raw.loc[some].to_numpy())
    assert int(table.X.sum()) == int(raw.loc[expected].to_numpy().sum())

    um_per_px = recorded_um_per_px(sdata, "he")
    assert um_per_px == pytest.approx(0.73, abs=0.01)
    assert um_per_px == pytest.approx(200.0 / _nearest_neighbour_px(spots[["pixel_x", "pixel_y"]].to_numpy()))
    shapes = sdata.shapes["spots"]
    centres = _xy(shapes)
    height, width = pg.io._st.image_size(Path(image))
    np.testing.assert_allclose(
        apply_affine(affine_between(sdata, "spots", "he"), centres),
        spots.loc[list(shapes.index), ["pixel_x", "pixel_y"]].to_numpy(),
    )
    assert (centres >= 0).all() and (centres[:, 0] <= width).all() and (centres[:, 1] <= height).all()
    np.testing.assert_allclose(shapes["radius"], 50.0 / um_per_px)
    assert sdata.images["he"]["scale0"].image.shape == (3, height, width)


@pytest.mark.data
def test_read_st_mob_alignment_table():
    root = _real("st_mob")
    sdata = pg.io.read_st(
        root / "MOB1.tsv", root / "alignment_table_MOB1.tsv", root / "MOB1.jpg", pitch_um=200.0 / np.sqrt(2)
    )
    raw = pd.read_csv(root / "MOB1.tsv", sep="\t", index_col=0)
    align = pd.read_csv(root / "alignment_table_MOB1.tsv", sep="\t")
    align.index = align["x"].astype(str) + "x" + align["y"].astype(str)
    expected = align.index[(align["selected"] == 1) & align.index.isin(raw.index)]
    table = sdata.tables["table"]
    assert table.n_obs == len(expected) == 379
    np.testing.assert_array_equal(table[expected[:5]].X.toarray(), raw.loc[expected[:5]].to_numpy())
    assert 4.0 < recorded_um_per_px(sdata, "he") < 5.0
    shapes = sdata.shapes["spots"]
    np.testing.assert_allclose(_xy(shapes), align.loc[list(shapes.index), ["pixel_x", "pixel_y"]].to_numpy())


@pytest.mark.data
@pytest.mark.parametrize("sample,library", [("Vis5A_2dpi", "Vis5A"), ("Vis7B_5dpi", "Vis7B")])
def test_read_visium_scmuscle(sample, library):
    folder = _real("visium_scmuscle") / sample
    sdata = pg.io.read_visium(folder)
    positions = pd.read_csv(folder / "spatial/tissue_positions_list.csv", header=None, index_col=0)
    scalefactors = json.loads((folder / "spatial/scalefactors_json.json").read_text())
    raw = _read_10x_h5(folder / f"{library}_filtered_feature_bc_matrix.h5")
    in_tissue = positions.index[positions[1] == 1]
    expected = raw.obs_names[raw.obs_names.isin(in_tissue)]

    table = sdata.tables["table"]
    assert list(table.obs_names) == list(expected)
    assert table.n_obs == {"Vis5A": 982, "Vis7B": 1011}[library] and table.n_vars == 33217
    np.testing.assert_array_equal(table[expected[:3]].X.toarray(), raw[expected[:3]].X.toarray())
    scale = scalefactors["tissue_lowres_scalef"]
    shapes = sdata.shapes["spots"]
    np.testing.assert_allclose(_xy(shapes), positions.loc[list(shapes.index), [5, 4]].to_numpy() * scale)
    np.testing.assert_allclose(affine_between(sdata, "spots", "he"), np.eye(3))
    np.testing.assert_allclose(shapes["radius"] * 2, scalefactors["spot_diameter_fullres"] * scale)
    assert recorded_um_per_px(sdata, "he") == pytest.approx(11.3, abs=0.1)
    assert table.uns["pixgene"]["image"] == "lowres"
    with Image.open(folder / "spatial/tissue_lowres_image.png") as img:
        width, height = img.size
        np.testing.assert_array_equal(_pixels(sdata), np.asarray(img.convert("RGB")))
    centres = _xy(shapes)
    assert (centres >= 0).all() and (centres[:, 0] <= width).all() and (centres[:, 1] <= height).all()
    # in spatialdata-io's full-resolution coordinate system the spots sit on the file's pixel positions
    to_fullres = get_transformation_between_coordinate_systems(sdata, sdata.shapes["spots"], library)
    m = to_fullres.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    np.testing.assert_allclose(
        apply_affine(m, centres), positions.loc[list(shapes.index), [5, 4]].to_numpy(), rtol=1e-9
    )


@pytest.mark.data
def test_from_anndata_real_visium():
    folder = _real("visium_scmuscle") / "Vis5A_2dpi"
    adata = _read_10x_h5(folder / "Vis5A_filtered_feature_bc_matrix.h5")
    adata.var_names_make_unique()
    positions = pd.read_csv(folder / "spatial/tissue_positions_list.csv", header=None, index_col=0)
    positions.columns = ["in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    adata.obs = adata.obs.join(positions)
    adata.obsm["spatial"] = adata.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    scalefactors = json.loads((folder / "spatial/scalefactors_json.json").read_text())
    with Image.open(folder / "spatial/tissue_lowres_image.png") as img:
        lowres = np.asarray(img.convert("RGB"), dtype=np.float32) / 255
    adata.uns["spatial"] = {"Vis5A": {"images": {"lowres": lowres}, "scalefactors": scalefactors}}

    sdata = pg.io.from_anndata(adata)
    shapes = sdata.shapes["spots"]
    np.testing.assert_allclose(
        _xy(shapes),
        positions.loc[list(shapes.index), ["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
        * scalefactors["tissue_lowres_scalef"],
    )
    assert sdata.tables["table"].uns["pixgene"]["image"] == "lowres"
    assert recorded_um_per_px(sdata, "he") == pytest.approx(
        55.0 / (scalefactors["spot_diameter_fullres"] * scalefactors["tissue_lowres_scalef"])
    )
    # the same slide through the Space Ranger reader lands on the same spots and counts
    reference = pg.io.read_visium(folder)
    ref_shapes = reference.shapes["spots"]
    np.testing.assert_allclose(shapes.geometry.x, ref_shapes.loc[shapes.index].geometry.x)
    diff = sdata.tables["table"].X - reference.tables["table"][shapes.index].X
    assert abs(diff).sum() == 0
