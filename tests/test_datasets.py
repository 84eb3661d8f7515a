"""pg.datasets loaders: locating the data, checksums, section names, and the values of what they load."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pixgene._core.coords import affine_between
from pixgene._core.units import recorded_um_per_px
from pixgene._core.validate import PixgeneInputError
from pixgene.datasets import _paths, _real


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No data anywhere: no environment variable, and searches start in an empty folder."""
    monkeypatch.delenv(_paths.DATA_DIR_ENV, raising=False)
    empty = tmp_path / "empty" / "project"
    empty.mkdir(parents=True)
    monkeypatch.setattr(_paths, "search_starts", lambda: [empty])
    return empty


@pytest.fixture
def clear_cache(monkeypatch):
    monkeypatch.setattr(_paths, "_VERIFIED", {})


def test_missing_data_names_every_place_searched(nowhere):
    with pytest.raises(PixgeneInputError) as excinfo:
        _real.her2st("C2")
    message = str(excinfo.value)
    assert message.startswith("dataset 'her2st': its folder was not found")
    assert "$PIXGENE_DATA_DIR (not set)" in message
    assert f"'shared/data' folder in {nowhere.resolve()} or any of its parents" in message
    assert "Set $PIXGENE_DATA_DIR" in message


def test_env_dir_and_shared_data_walk(tmp_path, monkeypatch, nowhere):
    env_root = tmp_path / "mydata"
    (env_root / "st_mob").mkdir(parents=True)
    monkeypatch.setenv(_paths.DATA_DIR_ENV, str(env_root))
    assert _paths.dataset_dir("st_mob") == env_root / "st_mob"
    # a dataset missing from $PIXGENE_DATA_DIR is looked for in ../shared/data next
    shared = tmp_path / "empty" / "shared" / "data"
    (shared / "her2st").mkdir(parents=True)
    assert _paths.dataset_dir("her2st") == shared.resolve() / "her2st"
    with pytest.raises(PixgeneInputError, match=f"PIXGENE_DATA_DIR={env_root}"):
        _paths.dataset_dir("visium_scmuscle")


def test_checksum_verified_once_and_again_after_a_change(tmp_path, monkeypatch, clear_cache):
    target = tmp_path / "f.txt"
    target.write_bytes(b"pixgene")
    digest = hashlib.sha256(b"pixgene").hexdigest()
    calls = []
    real_sha = _paths.sha256_of
    monkeypatch.setattr(_paths, "sha256_of", lambda p: calls.append(p) or real_sha(p))
    assert _paths.verify_file(target, digest) == target
    assert _paths.verify_file(target, digest) == target
    assert len(calls) == 1  # the second load trusts the cached result for the unchanged file
    target.write_bytes(b"pixgene!")
    match = f"file '{target}': its SHA-256 checksum is .*expected {digest}"
    with pytest.raises(PixgeneInputError, match=match):
        _paths.verify_file(target, digest)
    assert len(calls) == 2


def test_corrupt_dataset_file_is_named(tmp_path, monkeypatch, nowhere, clear_cache):
    root = tmp_path / "data"
    for sub in ("counts", "spots", "images"):
        (root / "her2st" / sub).mkdir(parents=True)
    with gzip.open(root / "her2st" / "counts" / "C2.tsv.gz", "wt") as handle:
        handle.write("\tA\n10x21\t3\n")
    monkeypatch.setenv(_paths.DATA_DIR_ENV, str(root))
    with pytest.raises(PixgeneInputError, match=r"file '.*her2st/counts/C2.tsv.gz': its SHA-256 checksum is"):
        _real.her2st("C2")
    (root / "her2st" / "counts" / "C2.tsv.gz").unlink()
    with pytest.raises(PixgeneInputError, match=r"file '.*her2st/counts/C2.tsv.gz': is missing"):
        _real.her2st("C2")


@pytest.mark.parametrize(
    "loader,name,known",
    [
        (_real.her2st, "C9", "C2"),
        (_real.st_mob, "MOB4", "MOB1"),
        (_real.visium_scmuscle, "Vis5A", "Vis5A_2dpi"),
    ],
)
def test_unknown_section(loader, name, known):
    match = f"{name!r}: is not part of this dataset. Choose one of .*{known}"
    with pytest.raises(PixgeneInputError, match=match):
        loader(name)


def test_public_names():
    import pixgene as pg

    assert pg.datasets.her2st is _real.her2st
    assert pg.datasets.st_mob is _real.st_mob
    assert pg.datasets.visium_scmuscle is _real.visium_scmuscle


# -----------------------------------------------------------------------------------------------------------
# the real data


def _root(name: str) -> Path:
    try:
        return _paths.dataset_dir(name)
    except PixgeneInputError as err:
        pytest.skip(f"real data not available: {err}")


@pytest.mark.data
@pytest.mark.parametrize("dataset", sorted(_real._CHECKSUMS))
def test_embedded_checksums_match_the_files(dataset, clear_cache):
    root = _root(dataset)
    for name, expected in _real._CHECKSUMS[dataset].items():
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == expected, name


@pytest.fixture(scope="session")
def her2st_c4():
    _root("her2st")
    return _real.her2st("C4")


@pytest.mark.data
def test_her2st_section(her2st_c4):
    root = _root("her2st")
    sdata = her2st_c4
    raw = pd.read_csv(root / "counts" / "C4.tsv.gz", sep="\t", index_col=0)
    spots = pd.read_csv(root / "spots" / "C4_selection.tsv", sep="\t")
    spots.index = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    kept = spots.index[spots.index.isin(raw.index)]
    table = sdata.tables["table"]
    assert table.n_obs == len(kept) == 184 and table.n_vars == raw.shape[1]
    spot = kept[42]
    np.testing.assert_array_equal(table[spot].X.toarray()[0], raw.loc[spot].to_numpy())
    assert recorded_um_per_px(sdata, "he") == pytest.approx(0.73, abs=0.01)
    shapes = sdata.shapes["spots"]
    np.testing.assert_allclose(shapes.loc[spot].geometry.x, spots.loc[spot, "pixel_x"])
    np.testing.assert_allclose(shapes.loc[spot].geometry.y, spots.loc[spot, "pixel_y"])
    np.testing.assert_allclose(affine_between(sdata, "spots", "he"), np.eye(3))
    assert table.uns["pixgene"]["library_id"] == "her2st_C4"
    np.testing.assert_allclose(shapes["radius"] * 2 * recorded_um_per_px(sdata, "he"), 100.0)


@pytest.mark.data
def test_st_mob_section():
    root = _root("st_mob")
    sdata = _real.st_mob("MOB2", image_key="img", shapes_key="st_spots", table_key="counts")
    raw = pd.read_csv(root / "MOB2.tsv", sep="\t", index_col=0)
    align = pd.read_csv(root / "alignment_table_MOB2.tsv", sep="\t")
    align.index = align["x"].astype(str) + "x" + align["y"].astype(str)
    selected = align.index[(align["selected"] == 1) & align.index.isin(raw.index)]
    table = sdata.tables["counts"]
    assert table.n_obs == len(selected) == 407 and table.n_vars == 1000
    np.testing.assert_array_equal(table[selected[:3]].X.toarray(), raw.loc[selected[:3]].to_numpy())
    # 2k array: nearest centres 141.4 um apart; the README's "about 4-5 um per pixel"
    assert 4.0 < recorded_um_per_px(sdata, "img") < 5.0
    shapes = sdata.shapes["st_spots"]
    xy = np.c_[shapes.geometry.x, shapes.geometry.y]
    assert (xy > 0).all() and (xy < 1905).all()


@pytest.mark.data
def test_visium_scmuscle_sample():
    root = _root("visium_scmuscle") / "Vis7B_5dpi"
    sdata = _real.visium_scmuscle("Vis7B_5dpi")
    positions = pd.read_csv(root / "spatial" / "tissue_positions_list.csv", header=None, index_col=0)
    scalefactors = json.loads((root / "spatial" / "scalefactors_json.json").read_text())
    table = sdata.tables["table"]
    assert table.n_obs == int((positions[1] == 1).sum()) == 1011
    shapes = sdata.shapes["spots"]
    np.testing.assert_allclose(
        np.c_[shapes.geometry.x, shapes.geometry.y],
        positions.loc[list(shapes.index), [5, 4]].to_numpy() * scalefactors["tissue_lowres_scalef"],
    )
    um_per_px = recorded_um_per_px(sdata, "he")
    diameter_px = scalefactors["spot_diameter_fullres"] * scalefactors["tissue_lowres_scalef"]
    assert um_per_px == pytest.approx(55.0 / diameter_px)
    assert 10.5 < um_per_px < 12.0
    assert table.uns["pixgene"]["library_id"] == "Vis7B"


@pytest.mark.data
def test_repeated_load_skips_hashing(monkeypatch, clear_cache):
    _root("st_mob")
    calls = []
    real_sha = _paths.sha256_of
    monkeypatch.setattr(_paths, "sha256_of", lambda p: calls.append(p) or real_sha(p))
    _real.st_mob("MOB3")
    assert len(calls) == 3
    _real.st_mob("MOB3")
    assert len(calls) == 3
    assert os.fspath(calls[0]).endswith("MOB3.tsv")
