"""``pg.tl.fit(spots=...)`` and ``pg.tl.reconstruct``: training on part of a slide's spots, and predicting the
rest of the section."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import shapely

import pixgene as pg
from pixgene._core.validate import PixgeneInputError
from pixgene.data import linked_table_rows, prepare_spot_slide, select_slide_spots, spot_selection

#: tiny fits: plumbing, not accuracy
FAST = dict(max_epochs=1, n_members=1, decoder=pg.tl.DecoderConfig(width=8),
            training=pg.tl.TrainConfig(n_views=1, tile_context_px=0))
GENES = ["GENE00", "GENE01", "GENE02"]
#: the spots left of this x (spots' own coordinates, 1 um/px) are kept as measured: 4 of the 7
CUT = 160.0


def _slide():
    """The 320 um synthetic slide (7 spots) with a polygon region ``"left"`` holding the spots left of CUT."""
    import geopandas as gpd
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    sdata = pg.datasets.synthetic(seed=3, size_um=320.0)
    region = gpd.GeoDataFrame(geometry=[shapely.box(-10, -10, CUT, 330)])
    sdata.shapes["left"] = ShapesModel.parse(region, transformations={"global": Identity()})
    return sdata


def _mask(sdata) -> np.ndarray:
    return sdata.shapes["spots"].geometry.x.to_numpy() < CUT


def _scaled(sdata, which: np.ndarray, factor: float):
    """A copy of ``sdata`` whose spots ``which`` (a mask over the shapes' rows) have ``factor`` times their
    counts (every gene)."""
    from spatialdata import deepcopy

    out = deepcopy(sdata)
    table = out.tables["table"]
    rows = linked_table_rows(table, out.shapes["spots"], table_key="table", shapes_key="spots")[which]
    X = sp.csr_matrix(table.X, dtype=np.float32).toarray()
    X[rows] *= factor
    table.X = sp.csr_matrix(X)
    return out


@pytest.fixture(scope="module")
def masked_fit():
    """A slide and the model fitted on its spots left of CUT (given as a boolean mask)."""
    sdata = _slide()
    return sdata, pg.tl.fit(sdata, genes=GENES, spots=_mask(sdata), random_state=1, progress=False, **FAST)


def test_mask_ids_and_region_select_the_same_spots():
    sdata = _slide()
    shapes = sdata.shapes["spots"]
    mask = _mask(sdata)
    assert 0 < mask.sum() < len(mask)
    ids = list(shapes.index[mask])
    forms = {
        "mask": mask, "mask as a list": mask.tolist(), "mask as a Series": pd.Series(mask, index=shapes.index),
        "ids": ids, "ids as an Index": shapes.index[mask], "ids as an array": np.asarray(ids),
        "region": "left", "polygon": shapely.box(0, 0, CUT, 320),
    }
    for name, form in forms.items():
        got, how = spot_selection(sdata, "spots", form)
        assert np.array_equal(got, mask), name
    assert spot_selection(sdata, "spots", "left")[1] == "region 'left'"
    slide = prepare_spot_slide(sdata, image_key="he", shapes_key="spots", table_key="table")
    part = select_slide_spots(slide, "left")
    assert part.selection["ids"] == ids and part.selection["n"] == len(ids) == len(part.centers)
    assert part.selection["of"] == len(shapes) and part.table.n_obs == len(ids)
    assert list(part.table.obs["instance_id"]) == ids and np.array_equal(part.centers, slide.centers[mask])
    assert part.sdata is sdata  # the same slide, not a copy


def test_a_model_fitted_on_some_spots_never_saw_the_others(masked_fit):
    """The record lists exactly the selected ids; the other spots' counts do not change the model (ten times
    their counts, the same model id), while one selected spot's counts do. Mask, ids and region fit the same
    spots: the same model."""
    sdata, model = masked_fit
    mask = _mask(sdata)
    ids = list(sdata.shapes["spots"].index[mask])
    record = model.training["slides"][0]
    assert record["n_spots"] == mask.sum() and record["spots"]["ids"] == ids
    assert record["spots"]["how"] == "mask" and record["spots"]["of"] == len(mask)

    masked_louder = _scaled(sdata, ~mask, 10.0)
    same = pg.tl.fit(masked_louder, genes=GENES, spots=ids, random_state=1, progress=False, **FAST)
    assert same.model_id == model.model_id
    assert same.training["slides"][0]["spots"]["ids"] == ids
    assert same.training["slides"][0]["spots"]["sha256"] == record["spots"]["sha256"]

    one = np.zeros(len(mask), dtype=bool)
    one[np.flatnonzero(mask)[0]] = True
    changed = pg.tl.fit(_scaled(sdata, one, 3.0), genes=GENES, spots="left", random_state=1, progress=False,
                        **FAST)
    assert changed.training["slides"][0]["spots"]["ids"] == ids
    assert changed.model_id != model.model_id


def test_genes_chosen_when_none_are_given_come_from_the_selected_spots_only():
    from pixgene.tl._fit import resolve_genes

    sdata = _slide()
    mask = _mask(sdata)
    louder = _scaled(sdata, ~mask, 10.0)
    # the unselected spots' counts, changed in one gene only, would change a choice made on every spot
    table = louder.tables["table"]
    rows = linked_table_rows(table, louder.shapes["spots"], table_key="table", shapes_key="spots")[~mask]
    X = table.X.toarray()
    X[rows, 7] += 50
    table.X = sp.csr_matrix(X)
    chosen = []
    for sd in (sdata, louder):
        slide = select_slide_spots(prepare_spot_slide(sd, image_key="he", shapes_key="spots", table_key="table"),
                                   mask)
        chosen.append(resolve_genes(None, [slide]))
        marked = sd.tables["table"].var
        assert marked.index[marked["pixgene_selected"]].tolist() == sorted(chosen[-1], key=list(marked.index).index)
        assert sd.tables["table"].uns["pixgene"]["select_genes"]["n_spots"] == mask.sum()
    assert chosen[0] == chosen[1]


def test_fit_refuses_bad_spot_selections_before_any_work(monkeypatch):
    import pixgene.train

    monkeypatch.setattr(pixgene.train, "fit_model", lambda *a, **k: pytest.fail("the fit ran"))
    sdata = _slide()
    mask = _mask(sdata)
    fit = dict(genes=GENES, progress=False, **FAST)
    cases = [
        (mask[:-1], r"spots \(over shapes 'spots'\): the boolean mask has 6 entries, the shapes have 7 rows"),
        (["spot_0_2", "nope"], r"1 of the 2 ids given are not in the shapes' index, e\.g\. \['nope'\]"),
        (np.zeros(len(mask), dtype=bool), "the mask selects none of the 7 spots"),
        ([], "the ids given select none"),
        (shapely.box(1000, 1000, 1100, 1100), "the polygon holds none of the 7 spot centres"),
        ("spots", r"spots \(region 'spots'\): shapes 'spots' is not an element of polygons \(it holds Point\)"),
        ("nowhere", "shape 'nowhere': not found"),
        (shapely.Point(3, 3), "a Point is not a region"),
        ({"a": 1}, "a dict is not a selection of spots"),
    ]
    for spots, message in cases:
        with pytest.raises(PixgeneInputError, match=message):
            pg.tl.fit(sdata, spots=spots, **fit)
    other = pg.datasets.synthetic(seed=5, size_um=320.0)
    n_other = len(other.shapes["spots"])
    with pytest.raises(PixgeneInputError, match=r"spots of slide 1 \(over shapes 'spots'\): the boolean mask"):
        pg.tl.fit([sdata, other], spots=[mask, np.ones(n_other + 1, dtype=bool)], **fit)


def test_several_slides_take_one_selection_each_or_one_for_all():
    from pixgene.tl._fit import spots_per_slide

    a, b = _slide(), pg.datasets.synthetic(seed=5, size_um=320.0)
    mask_a, mask_b = _mask(a), np.ones(len(b.shapes["spots"]), dtype=bool)
    assert spots_per_slide([mask_a, None], [a, b], "spots") == [mask_a, None]
    assert spots_per_slide(("left", mask_b), [a, b], "spots") == ["left", mask_b]
    ids = ["spot_0_2", "spot_1_1"]  # two ids, two slides: one list of ids for both
    assert spots_per_slide(ids, [a, b], "spots") == [ids, ids]
    assert spots_per_slide("left", [a, b], "spots") == ["left", "left"]
    assert spots_per_slide([mask_a], [a], "spots") == [mask_a]
    assert spots_per_slide(["spot_0_2"], [a], "spots") == [["spot_0_2"]]


def test_spots_without_counts_are_never_selected():
    sdata = _slide()
    table = sdata.tables["table"]
    sdata.tables["table"] = table[table.obs["instance_id"] != "spot_0_2"].copy()
    slide = prepare_spot_slide(sdata, image_key="he", shapes_key="spots", table_key="table")
    with pytest.raises(PixgeneInputError, match="1 of the ids given have no counts in table 'table'"):
        select_slide_spots(slide, ["spot_0_2", "spot_1_1"])
    with pytest.raises(PixgeneInputError, match="selects 1 spot\\(s\\), none with counts"):
        select_slide_spots(slide, sdata.shapes["spots"].index == "spot_0_2")
    part = select_slide_spots(slide, "left")  # the region's spot without counts is left out
    assert "spot_0_2" not in part.selection["ids"] and part.selection["of"] == 6


def test_reconstruct_reads_out_every_spot_with_the_model_fit_makes(masked_fit):
    """The reconstructed table covers every spot, flags the measured ones, and comes from the model
    ``pg.tl.fit(spots=...)`` makes with the same settings (the same id); nothing is remembered for the slide
    and no dense map is left in it; the unmeasured rows score against the measured table."""
    fitted_sdata, model = masked_fit
    sdata = _slide()
    mask = _mask(sdata)
    before = set(sdata.images)
    table = pg.tl.reconstruct(sdata, mask, genes=GENES, random_state=1, progress=False, **FAST)
    assert sdata.tables["spots_reconstructed"] is table
    assert list(table.obs_names) == [str(i) for i in sdata.shapes["spots"].index]
    assert table.obs["pixgene_measured"].dtype == bool
    assert np.array_equal(table.obs["pixgene_measured"].to_numpy(), mask)
    info = table.uns["pixgene"]
    assert info["model_id"] == model.model_id
    assert info["n_measured"] == mask.sum() and info["n_unmeasured"] == (~mask).sum()
    assert info["measured"]["ids"] == list(sdata.shapes["spots"].index[mask])
    assert set(sdata.images) == before and "model" not in sdata.attrs.get("pixgene", {})
    assert (table.X > 0).all() and table.uns["spatialdata_attrs"]["region"] == "spots"
    sdata.tables["held_out"] = table[~table.obs["pixgene_measured"]].copy()
    scores = pg.tl.evaluate(sdata, predicted="held_out", measured="table")
    assert set(scores.per_gene.index) == set(GENES)
    with pytest.raises(PixgeneInputError, match="already exists"):
        pg.tl.reconstruct(sdata, mask, genes=GENES, progress=False, **FAST)


def test_reconstruct_trains_with_other_slides_too():
    sdata, other = _slide(), pg.datasets.synthetic(seed=5, size_um=320.0)
    table = pg.tl.reconstruct(sdata, "left", genes=GENES, train_with=other, key_added="rec", progress=False,
                              **FAST)
    info = table.uns["pixgene"]
    assert info["params"]["train_with"] == 1 and info["n_train_spots_other_slides"] == len(other.shapes["spots"])
    assert info["measured"]["how"] == "region 'left'"
    assert np.array_equal(table.obs["pixgene_measured"].to_numpy(), _mask(sdata))


def test_reconstruct_with_uncertainty_reads_out_the_members_spread_of_the_model_fit_makes():
    """uncertainty=True and interval=0.9: the reconstructed table's members' SD and NB quantiles are those of the
    same model fitted with ``pg.tl.fit(spots=...)``, its map predicted with ``uncertainty=True`` and read out by
    ``aggregate``; and the SD equals the SD of the members' own read-outs (``keep_members``) computed here."""
    two = dict(FAST, n_members=2)
    sdata = _slide()
    mask = _mask(sdata)
    table = pg.tl.reconstruct(sdata, mask, genes=GENES, random_state=1, uncertainty=True, interval=0.9,
                              progress=False, **two)
    reference = _slide()
    model = pg.tl.fit(reference, genes=GENES, spots=mask, random_state=1, progress=False, **two)
    assert table.uns["pixgene"]["model_id"] == model.model_id
    pg.tl.predict_dense(reference, model, uncertainty=True, progress=False)
    expected = pg.tl.aggregate(reference, shapes="spots", interval=0.9, keep_members=True, progress=False)
    np.testing.assert_allclose(table.X, expected.X, rtol=1e-6)
    np.testing.assert_allclose(table.layers["pixgene_sd"], expected.layers["pixgene_sd"], rtol=1e-5, atol=1e-9)
    members = np.stack([expected.layers[f"pixgene_member{k}"] for k in range(2)])
    np.testing.assert_allclose(table.layers["pixgene_sd"], members.std(axis=0), rtol=1e-4, atol=1e-7)
    assert (table.layers["pixgene_sd"] > 0).any()
    for q in ("pixgene_q05", "pixgene_q95"):
        np.testing.assert_array_equal(table.layers[q], expected.layers[q])
    assert (table.layers["pixgene_q05"] <= table.layers["pixgene_q95"]).all()
    assert table.uns["pixgene"]["interval"]["levels"] == [0.9]


def test_reconstruct_refuses_bad_input_before_any_work(monkeypatch):
    import pixgene.train

    monkeypatch.setattr(pixgene.train, "fit_model", lambda *a, **k: pytest.fail("the fit ran"))
    sdata = _slide()
    mask = _mask(sdata)
    with pytest.raises(PixgeneInputError, match=r"measured \(over shapes 'spots'\): the boolean mask has 3"):
        pg.tl.reconstruct(sdata, mask[:3], genes=GENES)
    with pytest.raises(PixgeneInputError, match="measured.*the region 'left'|measured.*holds none"):
        pg.tl.reconstruct(sdata, shapely.box(1000, 1000, 1001, 1001), genes=GENES)
    with pytest.raises(PixgeneInputError, match="does not pass on to its fit: checkpoint_dir"):
        pg.tl.reconstruct(sdata, mask, genes=GENES, checkpoint_dir="x")
    with pytest.raises(PixgeneInputError, match="holds the section being reconstructed"):
        pg.tl.reconstruct(sdata, mask, genes=GENES, train_with=[sdata])
    with pytest.raises(PixgeneInputError, match="um_per_px"):
        pg.tl.reconstruct(sdata, mask, genes=GENES, um_per_px=0)
    with pytest.raises(PixgeneInputError, match="missing"):
        pg.tl.reconstruct(sdata, mask, genes=["NOPE"])
    with pytest.raises(PixgeneInputError, match="uncertainty.*n_members=1"):
        pg.tl.reconstruct(sdata, mask, genes=GENES, uncertainty=True, n_members=1)
    with pytest.raises(PixgeneInputError, match="uncertainty.*not True or False"):
        pg.tl.reconstruct(sdata, mask, genes=GENES, uncertainty="yes")
    with pytest.raises(PixgeneInputError, match="interval"):
        pg.tl.reconstruct(sdata, mask, genes=GENES, interval=1.5)
    with pytest.raises(PixgeneInputError, match="'mixture' needs the members' maps"):
        pg.tl.reconstruct(sdata, mask, genes=GENES, interval=0.9, interval_kind="mixture")
    sdata.tables["spots_reconstructed"] = sdata.tables["table"].copy()
    with pytest.raises(PixgeneInputError, match="already exists"):
        pg.tl.reconstruct(sdata, mask, genes=GENES)
