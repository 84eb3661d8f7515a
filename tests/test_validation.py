"""Every bad input is refused before any work, with a message naming the element, the problem and the fix."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import pixgene as pg
from pixgene._core.validate import PixgeneInputError

GENES = ["GENE00", "GENE01"]


def _fit(sdata, **kw):
    return pg.tl.fit(sdata, genes=kw.pop("genes", GENES), max_epochs=1, progress=False,
                     decoder=pg.tl.DecoderConfig(width=16), training=pg.tl.TrainConfig(n_views=1), **kw)


def _fit_plain(sdata, **kw):
    return pg.tl.fit(sdata, genes=GENES, max_epochs=1, progress=False, **kw)


def _elements(sdata):
    return {k: list(getattr(sdata, k)) for k in ("images", "shapes", "tables")}, dict(sdata.attrs)


def test_image_without_three_colour_channels(synthetic_small):
    from spatialdata.models import Image2DModel

    he = synthetic_small.images["he"]
    synthetic_small.images["he"] = Image2DModel.parse(
        np.concatenate([he.values, he.values[:1]]), dims=("c", "y", "x"), c_coords=list("rgba")
    )
    with pytest.raises(PixgeneInputError, match=r"image 'he'.*4 channel\(s\).*RGB"):
        _fit(synthetic_small)


def test_spots_outside_the_image(synthetic_small):
    from spatialdata.transformations import Translation, set_transformation

    set_transformation(synthetic_small.shapes["spots"], Translation([5000.0, 0.0], axes=("x", "y")), "global")
    with pytest.raises(PixgeneInputError, match=r"shapes 'spots'.*outside image 'he'.*transformations"):
        _fit(synthetic_small)


def test_table_not_linked_to_the_spots(synthetic_small):
    table = synthetic_small.tables["table"]
    table.uns["spatialdata_attrs"]["region"] = "cells"
    table.obs["region"] = table.obs["region"].cat.rename_categories(["cells"])
    with pytest.raises(PixgeneInputError, match=r"table 'table'.*does not annotate the shapes 'spots'.*region="):
        _fit(synthetic_small)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda x: x * -1.0, "negative"),
        (lambda x: np.where(x > 3, np.nan, x), "NaN or infinite"),
        (lambda x: np.log1p(x), "normalised or log-transformed"),
    ],
)
def test_counts_that_are_not_raw(synthetic_small, change, message):
    table = synthetic_small.tables["table"]
    table.X = sp.csr_matrix(change(table.X.toarray()))
    with pytest.raises(PixgeneInputError, match=rf"table 'table'.*{message}"):
        _fit(synthetic_small)


def test_requested_genes_missing(synthetic_small):
    with pytest.raises(PixgeneInputError, match=r"table 'table'.*missing, e.g. \['NOPE'\].*var_names"):
        _fit(synthetic_small, genes=["GENE00", "NOPE"])


def test_empty_gene_list(synthetic_small):
    with pytest.raises(PixgeneInputError, match="gene list is empty"):
        _fit(synthetic_small, genes=[])


def test_config_objects_of_the_wrong_type(synthetic_small):
    with pytest.raises(PixgeneInputError, match="decoder: is a str, not a DecoderConfig.*block='conv'"):
        _fit_plain(synthetic_small, decoder="conv")
    with pytest.raises(PixgeneInputError, match="training: is a dict, not a TrainConfig"):
        _fit_plain(synthetic_small, training={"n_views": 1})
    with pytest.raises(PixgeneInputError, match="image_um_per_px: 2 values for 1 slides"):
        _fit_plain(synthetic_small, image_um_per_px=[1.0, 1.0])


def test_image_with_nan_pixels(synthetic_small):
    from spatialdata.models import Image2DModel

    pixels = synthetic_small.images["he"].values.astype(np.float32) / 255
    pixels[1, 40:42, 17] = np.nan
    synthetic_small.images["he"] = Image2DModel.parse(pixels, dims=("c", "y", "x"), chunks=64)
    with pytest.raises(PixgeneInputError, match=r"image 'he': 2 pixel value\(s\) are NaN or infinite.*fillna"):
        _fit(synthetic_small)


def test_um_per_px_neither_given_nor_derivable(synthetic_small):
    synthetic_small.attrs["pixgene"]["um_per_px"].pop("he")
    synthetic_small.tables["table"].uns["pixgene"].pop("spot_diameter_um")
    with pytest.raises(PixgeneInputError, match=r"image 'he'.*microns per pixel.*um_per_px="):
        _fit(synthetic_small)


def test_um_per_px_derived_from_spot_diameter(synthetic_small):
    from pixgene._core.units import resolve_um_per_px

    synthetic_small.attrs["pixgene"]["um_per_px"].pop("he")
    assert resolve_um_per_px(synthetic_small, "he", shapes_key="spots", table_key="table") == pytest.approx(1.0)


def test_existing_outputs_are_not_replaced(fitted_session):
    sdata, model = fitted_session
    if "he_pixgene" not in sdata.images:
        pg.tl.predict_dense(sdata, model, progress=False)
    before = _elements(sdata)
    with pytest.raises(PixgeneInputError, match=r"image 'he_pixgene'.*already exists.*overwrite=True"):
        pg.tl.predict_dense(sdata, model, progress=False)
    sdata.tables["spots_pixgene"] = sdata.tables["table"]
    try:
        with pytest.raises(PixgeneInputError, match=r"'spots_pixgene'.*already exists.*overwrite=True"):
            pg.tl.aggregate(sdata, shapes="spots", dense_key="he_pixgene")
    finally:
        del sdata.tables["spots_pixgene"]
    assert _elements(sdata) == before


def test_predict_without_a_model(synthetic_small):
    with pytest.raises(PixgeneInputError, match=r"model.*pg.tl.fit"):
        pg.tl.predict_dense(synthetic_small)


def test_bad_input_leaves_the_store_untouched(synthetic_small, tmp_path):
    import spatialdata as sd

    path = tmp_path / "s.zarr"
    synthetic_small.write(path)
    backed = sd.read_zarr(path)
    listing = sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))
    with pytest.raises(PixgeneInputError):
        _fit(backed, genes=["NOPE"])
    with pytest.raises(PixgeneInputError):
        pg.tl.predict_dense(backed, key_added="he")
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*")) == listing


DECODER_OPTIONS = {"standardize_features", "attention_window", "smooth_windows", "block", "width", "out_stride"}
FIT_OPTIONS = {"max_epochs", "encoder_um_per_px", "n_members", "precision"}


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"likelihood": "gaussian"}, "likelihood"),
        ({"scale_jitter": 0.5}, "scale_jitter"),
        ({"finetune_levels": -1}, "finetune_levels"),
        ({"finetune_levels": np.int64(1), "tile_context_px": 64}, "tile_context_px"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"max_epochs": True}, "max_epochs"),
        ({"n_members": 2.0}, "n_members"),
        ({"patience": 2.5}, "patience"),
        ({"batch_size": 0}, "batch_size"),
        ({"loss_weights": {"l1": 1.0}}, "loss_weights"),
        ({"encoder_um_per_px": 0.0}, "encoder_um_per_px"),
        ({"precision": "fp16"}, "precision"),
        ({"standardize_features": "yes"}, "standardize_features"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"ema_decay": -0.1}, "ema_decay"),
        ({"ema_decay": True}, "ema_decay"),
        ({"attention_window": 5}, "attention_window"),
        ({"attention_window": 0}, "attention_window"),
        ({"smooth_windows": "yes"}, "smooth_windows"),
        ({"block": "unet"}, "block"),
    ],
)
def test_bad_fit_options_fail_before_work(synthetic_small, option, message):
    """Options of fit itself are checked by fit; those of the decoder and training configs when the config is
    made (a numpy integer counts as an integer everywhere, a bool never does)."""
    before = _elements(synthetic_small)
    with pytest.raises(PixgeneInputError, match=message):
        decoder = {k: v for k, v in option.items() if k in DECODER_OPTIONS}
        training = {k: v for k, v in option.items() if k not in DECODER_OPTIONS | FIT_OPTIONS}
        own = {k: v for k, v in option.items() if k in FIT_OPTIONS}
        pg.tl.fit(synthetic_small, genes=GENES, progress=False, decoder=pg.tl.DecoderConfig(**decoder),
                  training=pg.tl.TrainConfig(**training), **own)
    assert _elements(synthetic_small) == before


def test_aggregate_over_cells_a_slide_does_not_have_names_the_ways_to_make_them(synthetic_small):
    del synthetic_small.shapes["cells"]
    with pytest.raises(PixgeneInputError, match=r"shapes 'cells': not found .*'spots'.*segment_cells.*read_cells"
                                                r".*make_grid"):
        pg.tl.aggregate(synthetic_small, shapes="cells")
    with pytest.raises(PixgeneInputError, match=r"shapes 'nuclei'.*make_grid") as err:
        pg.tl.aggregate(synthetic_small, shapes="nuclei")
    assert "segment_cells" not in str(err.value)
