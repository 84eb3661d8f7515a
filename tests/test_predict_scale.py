"""Out-of-core dense prediction: tiling exactness, resuming, skipped background, float16, distributed, CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import pixgene as pg
from pixgene._core.raster import full_resolution, to_float01
from pixgene._core.validate import PixgeneInputError

#: a cheap configuration for the tests that compare two runs of the same settings (not tiling exactness)
FAST = {"chunk_px": 40, "halo_px": 64, "progress": False}


def _model(block: str = "conv", width: int = 8, genes=("A", "B", "C"), um_per_px: float | None = None,
           seed: int = 0):
    """An untrained PixNet on the bundled encoder, its outputs scaled to a realistic ~1e-2 counts per um^2."""
    import torch

    from pixgene.model._pixnet import PixNet, build_module
    from pixgene.nn import build_encoder

    encoder = build_encoder("efficientnet_lite0", weights="default", um_per_px=um_per_px)
    config = encoder.config()
    decoder = {"width": width, "out_stride": 4, "block": block}
    torch.manual_seed(seed)
    n = len(genes) + 1
    module = build_module(config, "default", n_outputs=n, decoder_config=decoder, encoder=encoder)
    module.head.set_scale(torch.full((n,), 1e-2))
    return PixNet(module, genes=list(genes), encoder_config=config, encoder_weights="default",
                  decoder_config=decoder)


@pytest.fixture(scope="module")
def model():
    return _model()


class CountingCalls:
    """Replaces ``model.predict_intensity`` on the instance; counts calls and can fail at a given call."""

    def __init__(self, model, fail_at: int | None = None) -> None:
        self.model, self.fail_at, self.calls = model, fail_at, 0
        self.original = model.predict_intensity

    def __call__(self, tiles, tta=1):
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("interrupted on purpose")
        self.calls += 1
        return self.original(tiles, tta)

    def __enter__(self):
        self.model.predict_intensity = self
        return self

    def __exit__(self, *exc):
        vars(self.model).pop("predict_intensity", None)


def _backed(sdata, path):
    import spatialdata as sd

    sd.deepcopy(sdata).write(path)  # writing would bind ``sdata`` itself to the store
    return sd.read_zarr(path)


def _values(element) -> np.ndarray:
    return np.asarray(full_resolution(element).values)


def _tiled_vs_one_pass(sdata, model, key: str, whole_image=None) -> float:
    """Relative max difference between predict_dense (default halo, 2 x 2 chunks, at the model's output um/px)
    and one whole-image pass (``whole_image``: the image as the encoder reads it, default read at 1 um/px)."""
    from pixgene.data._reader import BACKGROUND, SlideReader
    from pixgene.infer._tiling import tiling_halo

    halo, edge_error = tiling_halo(model)
    assert halo % model.alignment == 0 and edge_error < 1e-4
    # 80 output px = 320 encoder px: chunk edges that do not all fall on the alignment grid
    el = pg.tl.predict_dense(sdata, model, key_added=key, um_per_px=model.out_um_per_px, chunk_px=80,
                             skip_background=False, scale_factors=None, progress=False)
    tiled = _values(el)
    assert sdata.attrs["pixgene"]["dense"][key]["halo_px"] == halo
    if whole_image is None:
        reader = SlideReader(sdata.images["he"], image_um=1.0, target_um=model.encoder_um_per_px)
        whole_image = reader.read(0, 0, reader.shape[1], reader.shape[0])
    pad = halo + 2 * model.alignment  # white glass around the slide, as the tiles see it
    padded = np.pad(whole_image, ((0, 0), (pad, pad), (pad, pad)), constant_values=BACKGROUND)
    whole = model.predict_intensity(padded)
    s = pad // model.out_stride
    whole = whole[:, s : s + tiled.shape[1], s : s + tiled.shape[2]]
    return float(np.abs(tiled - whole).max() / np.abs(whole).max())


def test_tiled_map_equals_one_pass_within_1e4(model, synthetic_small):
    """Chunks read with the measured halo and cropped equal one pass over the whole white-padded image."""
    assert _tiled_vs_one_pass(synthetic_small, model, "tiled") < 1e-4


@pytest.mark.slow
def test_tiled_map_of_the_default_architecture_equals_one_pass(fitted_session):
    """The same with a fitted model of the default architecture (fusion decoder, 128 px alignment)."""
    sdata, model = fitted_session
    try:
        # a bfloat16 model (the default where the CPU has it) agrees to its rounding, not to 1e-4
        tolerance = 1e-4 if model.module.precision == "32" else 1e-2
        assert _tiled_vs_one_pass(sdata, model, "tiled_fusion") < tolerance
    finally:
        del sdata.images["tiled_fusion"]


def test_bfloat16_model_probes_its_halo_in_float32_and_tiles_within_its_rounding(synthetic_small):
    """A bfloat16 model gets the halo of the same weights in float32 (its rounding does not make the probe
    think the receptive field never ends), and its tiled map agrees with one bfloat16 pass to about 1e-3."""
    from pixgene.infer._tiling import edge_error_profile, tiling_halo

    fp32 = _model()
    bf16 = _model()
    bf16.module.precision = "bf16"
    halo, error = tiling_halo(fp32)
    assert tiling_halo(bf16) == (halo, error)
    np.testing.assert_array_equal(edge_error_profile(bf16), edge_error_profile(fp32))
    assert bf16.module.precision == "bf16"  # the probe restores it
    tile = np.random.default_rng(4).random((3, 128, 128)).astype(np.float32)
    a, b = fp32.predict_intensity(tile), bf16.predict_intensity(tile)
    assert 1e-4 < np.abs(a - b).max() / np.abs(a).max() < 5e-2  # it does compute in bfloat16
    assert _tiled_vs_one_pass(synthetic_small, bf16, "tiled_bf16") < 1e-2


def test_coarse_image_is_encoded_at_its_own_um_per_px(tmp_path):
    """A 2 um/px slide: fit reads it as it is (no upsampling for the 1 um/px encoder), the saved model keeps that
    um/px, and its dense map equals one pass of the model over the raw image pixels."""
    from pixgene.tl import PixNet
    from pixgene.train import working_um_per_px

    assert working_um_per_px(1.0, [0.73, 0.5]) == 1.0  # finer images: the encoder's own um/px
    assert working_um_per_px(1.0, [5.2, 4.46]) == 4.46  # coarser: the finest slide as it is
    assert working_um_per_px(0.5, [0.73]) == 0.73
    assert working_um_per_px(1.0, [4.46], requested=2.0) == 2.0
    sdata = pg.datasets.synthetic(seed=3, size_um=640.0, um_per_px=2.0)
    model = pg.tl.fit(sdata, genes=['GENE00', 'GENE01'], max_epochs=1, precision='32', progress=False, decoder=pg.tl.DecoderConfig(block='conv', width=8), training=pg.tl.TrainConfig(n_views=1))
    assert model.encoder_um_per_px == 2.0 and model.out_um_per_px == 8.0
    model.save(tmp_path / "m")
    assert PixNet.load(tmp_path / "m").encoder_um_per_px == 2.0
    raw = to_float01(np.asarray(full_resolution(sdata.images["he"]).values))
    assert raw.shape[1:] == (320, 320)
    assert _tiled_vs_one_pass(sdata, model, "coarse", whole_image=raw) < 1e-4


def test_halo_is_measured_once_per_model(model):
    from pixgene.infer._tiling import HALO_SAFETY, TILING_TOLERANCE, edge_error_profile, tiling_halo

    vars(model).pop("_tiling_halo_cache", None)  # measured afresh here, whatever ran before
    with CountingCalls(model) as counter:
        halo, err = tiling_halo(model)
        first = counter.calls
        assert tiling_halo(model) == (halo, err)
        assert counter.calls == first == 3  # the whole probe strip and its two cuts
    profile = edge_error_profile(model)
    assert np.all(np.diff(profile) <= 0)
    s = model.out_stride
    # the chosen halo is the first aligned distance where the profile is 16x under the tolerance
    assert HALO_SAFETY == 16.0 and TILING_TOLERANCE == 1e-4
    assert profile[halo // s] <= 6.25e-6 and (halo == 0 or profile[(halo - model.alignment) // s] > 6.25e-6)


def test_background_chunks_are_zero_and_never_computed(model, synthetic_small):
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    from pixgene.infer._tiling import chunk_blocks

    he = synthetic_small.images["he"]
    glass = np.asarray(he.values).copy()
    glass[:, 320:, 320:] = 255  # a quarter of the slide is bare glass: 4 of the 16 chunks at least
    synthetic_small.images["he"] = Image2DModel.parse(glass, dims=("c", "y", "x"),
                                                      transformations=get_transformation(he, get_all=True))
    with CountingCalls(model) as counter:
        skipped = _values(pg.tl.predict_dense(synthetic_small, model, key_added="skip", **FAST))
    meta = synthetic_small.attrs["pixgene"]["dense"]["skip"]["chunks"]
    assert meta["background"] >= 4 and counter.calls == meta["tissue"]
    everything = pg.tl.predict_dense(synthetic_small, model, key_added="all", skip_background=False, **FAST)
    full = _values(everything)
    n_zero = 0
    for oy0, oy1, ox0, ox1 in chunk_blocks(full.shape[1:], FAST["chunk_px"]):
        block = skipped[:, oy0:oy1, ox0:ox1]
        if np.all(block == 0):
            n_zero += 1
        else:
            np.testing.assert_array_equal(block, full[:, oy0:oy1, ox0:ox1])
    assert n_zero == meta["background"] and full.min() > 0


def test_float16_map_is_close_to_float32(model, synthetic_small):
    f32 = _values(pg.tl.predict_dense(synthetic_small, model, key_added="f32", **FAST))
    el = pg.tl.predict_dense(synthetic_small, model, key_added="f16", dtype="float16", **FAST)
    assert full_resolution(el).dtype == np.float16
    f16 = _values(el).astype(np.float32)
    tissue = f32 > 0
    assert tissue.mean() > 0.3 and np.all(f16[~tissue] == 0)
    # half precision keeps 11 significant bits: relative rounding of at most 2^-11
    np.testing.assert_allclose(f16[tissue], f32[tissue], rtol=2.0**-11, atol=0)


def test_interrupted_run_resumes_without_recomputing(model, synthetic_small, tmp_path):
    import spatialdata as sd

    ref = _backed(synthetic_small, tmp_path / "ref.zarr")
    reference = _values(pg.tl.predict_dense(ref, model, **FAST))
    n_tissue = ref.attrs["pixgene"]["dense"]["he_pixgene"]["chunks"]["tissue"]
    path = tmp_path / "slide.zarr"
    backed = _backed(synthetic_small, path)
    with CountingCalls(model, fail_at=4), pytest.raises(RuntimeError, match="on purpose"):
        pg.tl.predict_dense(backed, model, **FAST)
    partial = tmp_path / "slide.zarr.pixgene-partial" / "he_pixgene"
    assert len(list((partial / "done").iterdir())) == 4
    assert "he_pixgene" not in backed.images and "he_pixgene" not in sd.read_zarr(path).images
    with CountingCalls(model) as counter:
        resumed = pg.tl.predict_dense(backed, model, **FAST)
    assert counter.calls == n_tissue - 4
    np.testing.assert_array_equal(_values(resumed), reference)
    np.testing.assert_array_equal(_values(sd.read_zarr(path).images["he_pixgene"]), reference)
    assert not partial.parent.exists()


def test_changed_parameters_discard_the_partial_map(model, synthetic_small, tmp_path):
    backed = _backed(synthetic_small, tmp_path / "slide.zarr")
    with CountingCalls(model, fail_at=3), pytest.raises(RuntimeError):
        pg.tl.predict_dense(backed, model, **FAST)
    with CountingCalls(model) as counter:
        out = pg.tl.predict_dense(backed, model, **{**FAST, "halo_px": 96})
    assert counter.calls == backed.attrs["pixgene"]["dense"]["he_pixgene"]["chunks"]["tissue"]
    fresh = pg.tl.predict_dense(synthetic_small, model, **{**FAST, "halo_px": 96})
    np.testing.assert_array_equal(_values(out), _values(fresh))


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_map(model, synthetic_small, tmp_path):
    """SIGKILL in the middle of a run (no cleanup at all), then a new process finishes it."""
    import spatialdata as sd

    model_dir = tmp_path / "model"
    model.save(model_dir)
    reference = _values(pg.tl.predict_dense(_backed(synthetic_small, tmp_path / "ref.zarr"), model, **FAST))
    path = tmp_path / "slide.zarr"
    _backed(synthetic_small, path)
    script = textwrap.dedent(f"""
        import os, signal
        import spatialdata as sd
        import pixgene as pg
        model = pg.tl.PixNet.load({str(model_dir)!r})
        original, calls = model.predict_intensity, []
        def dying(tiles, tta=1):
            if len(calls) == 5:
                os.kill(os.getpid(), signal.SIGKILL)
            calls.append(1)
            return original(tiles, tta)
        model.predict_intensity = dying
        pg.tl.predict_dense(sd.read_zarr({str(path)!r}), model, **{FAST!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    partial = tmp_path / "slide.zarr.pixgene-partial" / "he_pixgene"
    assert len(os.listdir(partial / "done")) == 5
    loaded = pg.tl.PixNet.load(model_dir)
    with CountingCalls(loaded) as counter:
        pg.tl.predict_dense(sd.read_zarr(path), loaded, **FAST)
    n_tissue = sd.read_zarr(path).attrs["pixgene"]["dense"]["he_pixgene"]["chunks"]["tissue"]
    assert counter.calls == n_tissue - 5
    np.testing.assert_array_equal(_values(sd.read_zarr(path).images["he_pixgene"]), reference)


@pytest.mark.slow
def test_distributed_equals_local(model, synthetic_small, tmp_path):
    from distributed import Client, LocalCluster

    backed = _backed(synthetic_small, tmp_path / "cluster.zarr")
    local = _values(pg.tl.predict_dense(_backed(synthetic_small, tmp_path / "local.zarr"), model, **FAST))
    in_memory = _values(pg.tl.predict_dense(synthetic_small, model, **FAST))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        with CountingCalls(model) as counter:  # the workers run their own copies, never this one
            distributed = _values(pg.tl.predict_dense(backed, model, **FAST))
        assert counter.calls == 0
        workers_ran = client.run(lambda: True)
    assert len(workers_ran) == 2
    np.testing.assert_array_equal(distributed, local)
    np.testing.assert_array_equal(in_memory, local)


def test_list_of_models_predicts_the_mean_of_their_maps(model, synthetic_small, tmp_path):
    """Two models reading the slide at 1 and 2 um/px: the list's map is the mean of the two maps predicted
    apart (each with its own halo and tile size), on an in-memory and a zarr-backed slide alike, and a run cut
    short resumes to the same map."""
    import spatialdata as sd

    coarse = _model(um_per_px=2.0, seed=1)
    assert coarse.encoder_um_per_px == 2.0 and coarse.out_um_per_px == 8.0
    kw = {"chunk_px": 40, "progress": False}
    a = _values(pg.tl.predict_dense(synthetic_small, model, key_added="a", **kw))
    b = _values(pg.tl.predict_dense(synthetic_small, coarse, key_added="b", **kw))
    assert np.abs(a - b).max() > 0.1 * np.abs(a).max()  # two different maps
    both = _values(pg.tl.predict_dense(synthetic_small, [model, coarse], key_added="both", **kw))
    np.testing.assert_allclose(both, (a.astype(np.float64) + b) / 2, rtol=1e-6, atol=1e-6 * np.abs(a).max())
    record = synthetic_small.attrs["pixgene"]["dense"]
    assert record["both"]["model_ids"] == [model.model_id, coarse.model_id]
    assert record["both"]["model_id"] == f"{model.model_id}+{coarse.model_id}"
    assert record["both"]["halo_px"] == [record["a"]["halo_px"], record["b"]["halo_px"]]
    assert record["both"]["tile_px"] == [record["a"]["tile_px"], record["b"]["tile_px"]]
    weighted = _values(pg.tl.predict_dense(synthetic_small, [model, coarse], weights=[3, 2], key_added="w",
                                           **kw))
    np.testing.assert_allclose(weighted, (3 * a.astype(np.float64) + 2 * b) / 5, rtol=1e-6,
                               atol=1e-6 * np.abs(a).max())
    record = synthetic_small.attrs["pixgene"]["dense"]
    assert record["w"]["weights"] == [0.6, 0.4] and record["both"]["weights"] == [0.5, 0.5]
    # expected counts average: the mean map's read-out over spots is the mean of the two read-outs
    reads = {k: pg.tl.aggregate(synthetic_small, shapes="spots", dense_key=k, key_added=f"spots_{k}",
                                progress=False).X for k in ("a", "b", "both")}
    np.testing.assert_allclose(reads["both"], (reads["a"] + reads["b"]) / 2, rtol=1e-5)

    path = tmp_path / "ensemble.zarr"
    backed = _backed(synthetic_small, path)
    with CountingCalls(coarse, fail_at=3), pytest.raises(RuntimeError, match="on purpose"):
        pg.tl.predict_dense(backed, [model, coarse], key_added="again", **kw)
    done = len(os.listdir(Path(str(path) + ".pixgene-partial") / "again" / "done"))
    assert done == 3  # the fourth chunk's second model failed: that chunk was not written
    with CountingCalls(model) as counter:
        resumed = _values(pg.tl.predict_dense(sd.read_zarr(path), [model, coarse], key_added="again", **kw))
    n_tissue = sd.read_zarr(path).attrs["pixgene"]["dense"]["again"]["chunks"]["tissue"]
    assert counter.calls == n_tissue - 3
    np.testing.assert_array_equal(resumed, both)


def test_list_of_models_is_checked_before_any_work(model, synthetic_small):
    from pixgene._core.validate import PixgeneInputError

    other_genes = _model(genes=("A", "B", "D"))
    with CountingCalls(model) as counter:
        differ = r"model: item 1 predicts other outputs than item 0 \(C, D\)"
        with pytest.raises(PixgeneInputError, match=differ):
            pg.tl.predict_dense(synthetic_small, [model, other_genes], **FAST)
        with pytest.raises(PixgeneInputError, match="same genes in another order"):
            pg.tl.predict_dense(synthetic_small, [model, _model(genes=("B", "A", "C"))], **FAST)
        with pytest.raises(PixgeneInputError, match="model: is an empty list"):
            pg.tl.predict_dense(synthetic_small, [], **FAST)
        with pytest.raises(PixgeneInputError, match=r"model: is a str \(item 1\), not a PixNet"):
            pg.tl.predict_dense(synthetic_small, [model, "model_dir"], **FAST)
        with pytest.raises(PixgeneInputError, match="weights: were given for a single model"):
            pg.tl.predict_dense(synthetic_small, model, weights=[1.0], **FAST)
        one_weight = r"weights: \[1\] is not one number per model \(2 models\)"
        with pytest.raises(PixgeneInputError, match=one_weight):
            pg.tl.predict_dense(synthetic_small, [model, model], weights=[1], **FAST)
        with pytest.raises(PixgeneInputError, match="not one number per model"):
            pg.tl.predict_dense(synthetic_small, [model, model], weights=["a", "b"], **FAST)
        with pytest.raises(PixgeneInputError, match="are not all positive and finite"):
            pg.tl.predict_dense(synthetic_small, [model, model], weights=[1, 0], **FAST)
    assert counter.calls == 0 and "he_pixgene" not in synthetic_small.images


@pytest.mark.slow
def test_distributed_list_of_models_equals_local(model, synthetic_small, tmp_path):
    from distributed import Client, LocalCluster

    models = [model, _model(um_per_px=2.0, seed=1)]
    backed = _backed(synthetic_small, tmp_path / "cluster.zarr")
    local = _values(pg.tl.predict_dense(synthetic_small, models, **FAST))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        distributed = _values(pg.tl.predict_dense(backed, models, **FAST))
        assert len(client.run(lambda: True)) == 2
    np.testing.assert_array_equal(distributed, local)


def test_cli_predict_on_an_image_file(model, synthetic_small, tmp_path, capsys):
    import spatialdata as sd
    from PIL import Image

    from pixgene.cli import main

    rgb = np.asarray(synthetic_small.images["he"].values)[:, :256, :320]
    image_file = tmp_path / "slide.png"
    Image.fromarray(np.moveaxis(rgb, 0, -1)).save(image_file)
    model_dir = tmp_path / "model"
    model.save(model_dir)
    out = tmp_path / "out.zarr"
    code = main(["predict", "--model", str(model_dir), "--image", str(image_file), "--out", str(out),
                 "--image-um-per-px", "1.0", "--um-per-px", "4"])
    assert code == 0
    assert "predicting dense map" in capsys.readouterr().err  # the progress bar
    written = sd.read_zarr(out)
    got = _values(written.images["he_pixgene"])
    assert got.shape == (len(model.outputs), 64, 80)
    from spatialdata.models import Image2DModel

    same = sd.SpatialData(images={"he": Image2DModel.parse(rgb, dims=("c", "y", "x"))})
    from pixgene._core.units import record_um_per_px

    record_um_per_px(same, "he", 1.0)
    expected = _values(pg.tl.predict_dense(same, pg.tl.PixNet.load(model_dir), progress=False))
    np.testing.assert_array_equal(got, expected)
    assert written.attrs["pixgene"]["dense"]["he_pixgene"]["model_id"] == model.model_id

    coarse_dir = tmp_path / "coarse"
    _model(um_per_px=2.0, seed=1).save(coarse_dir)
    both = tmp_path / "both.zarr"
    assert main(["predict", "--model", str(model_dir), str(coarse_dir), "--image", str(image_file), "--out",
                 str(both), "--image-um-per-px", "1.0", "--um-per-px", "4"]) == 0
    expected = pg.tl.predict_dense(same, [pg.tl.PixNet.load(model_dir), pg.tl.PixNet.load(coarse_dir)],
                                   key_added="both", progress=False)
    np.testing.assert_array_equal(_values(sd.read_zarr(both).images["he_pixgene"]), _values(expected))


def _turned_back(predict, tiles, axes_flip=(), quarter_turns=0, transpose=False):
    """The map of the tiles transformed with numpy (flips, then quarter turns, or a transpose), turned
    back."""
    x = np.flip(tiles, axes_flip) if axes_flip else tiles
    x = np.rot90(x, quarter_turns, axes=(-2, -1))
    x = np.swapaxes(x, -1, -2) if transpose else x
    y = predict(np.ascontiguousarray(x))
    y = np.swapaxes(y, -1, -2) if transpose else y
    y = np.rot90(y, -quarter_turns, axes=(-2, -1))
    return np.flip(y, axes_flip) if axes_flip else y


def test_test_time_transforms_average_the_maps_of_the_turned_tiles(model):
    """tta=2 / 4 / 8 against the maps of the tiles turned with numpy (half turn, mirror images, quarter turns,
    transposes), each turned back and averaged; a tta=8 map of a transposed tile is the transposed map."""
    rng = np.random.default_rng(0)
    tiles = rng.random((2, 3, 128, 128), dtype=np.float32)
    plain = model.predict_intensity
    half = _turned_back(plain, tiles, quarter_turns=2)
    mirrors = [_turned_back(plain, tiles, axes_flip=(-1,)), _turned_back(plain, tiles, axes_flip=(-2,))]
    turns = [_turned_back(plain, tiles, quarter_turns=k) for k in (1, 3)]
    transposes = [_turned_back(plain, tiles, transpose=True), _turned_back(plain, tiles, quarter_turns=2,
                                                                             transpose=True)]
    maps = [plain(tiles), half]
    for n, more in ((2, []), (4, mirrors), (8, turns + transposes)):
        maps += more
        expected = np.mean(maps, axis=0)
        got = model.predict_intensity(tiles, tta=n)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    assert np.abs(half - maps[0]).max() > 1e-3 * np.abs(maps[0]).max()  # the transforms do change the map
    rect = rng.random((1, 3, 96, 160), dtype=np.float32)  # quarter turns swap the sides of a non-square tile
    by_hand = np.mean([plain(rect), _turned_back(plain, rect, quarter_turns=2),
                       _turned_back(plain, rect, axes_flip=(-1,)), _turned_back(plain, rect, axes_flip=(-2,)),
                       *[_turned_back(plain, rect, quarter_turns=k) for k in (1, 3)],
                       _turned_back(plain, rect, transpose=True),
                       _turned_back(plain, rect, quarter_turns=2, transpose=True)], axis=0)
    got = model.predict_intensity(rect, tta=8)
    np.testing.assert_allclose(got, by_hand, rtol=1e-5, atol=1e-6 * np.abs(by_hand).max())
    one = model.predict_intensity(tiles[0], tta=8)
    turned = model.predict_intensity(np.ascontiguousarray(np.swapaxes(tiles[0], -1, -2)), tta=8)
    np.testing.assert_allclose(turned, np.swapaxes(one, -1, -2), rtol=1e-5, atol=1e-6 * np.abs(one).max())


def test_dense_map_with_test_time_transforms(model, synthetic_small):
    """predict_dense(tta=4) equals a run whose model call averages the numpy-turned tiles' maps itself; the
    choice is recorded, and an unsupported one fails before any chunk is predicted."""
    got = pg.tl.predict_dense(synthetic_small, model, key_added="tta4", tta=np.int64(4), **FAST)
    recorded = synthetic_small.attrs["pixgene"]["dense"]["tta4"]["tta"]
    assert recorded == 4 and type(recorded) is int  # stored as JSON
    original = model.predict_intensity

    def by_hand(tiles, tta=1):
        assert tta == 1
        flips = ((), (-2, -1), (-1,), (-2,))
        return np.mean([_turned_back(original, tiles, axes_flip=axes) for axes in flips], axis=0)

    model.predict_intensity = by_hand
    try:
        expected = pg.tl.predict_dense(synthetic_small, model, key_added="by_hand", **FAST)
    finally:
        vars(model).pop("predict_intensity", None)
    np.testing.assert_allclose(_values(got), _values(expected), rtol=1e-5,
                               atol=1e-6 * np.abs(_values(expected)).max())
    plain = _values(pg.tl.predict_dense(synthetic_small, model, key_added="plain", **FAST))
    assert not np.allclose(_values(got), plain, rtol=1e-3)
    for bad in (3, 2.0, True):
        with CountingCalls(model) as counter, pytest.raises(PixgeneInputError, match=f"tta: {bad!r} is not"):
            pg.tl.predict_dense(synthetic_small, model, key_added="bad", tta=bad, **FAST)
        assert counter.calls == 0 and "bad" not in synthetic_small.images


def test_smooth_window_model_is_saved_restored_and_tiles_like_one_pass(synthetic_small, tmp_path):
    """A fit with ``smooth_windows=True`` builds blended-grid attention, keeps it through save/load, and its map
    predicted chunk by chunk equals one pass over the whole image (shifted windows cut by a chunk's edge lie
    inside the measured halo)."""
    from pixgene.nn._decoder import WindowAttention
    from pixgene.tl import PixNet

    model = pg.tl.fit(synthetic_small, genes=['GENE00', 'GENE01'], max_epochs=1, precision='32', progress=False, random_state=0, decoder=pg.tl.DecoderConfig(width=16, smooth_windows=True), training=pg.tl.TrainConfig(n_views=1))
    attention = [m for m in model.module.modules() if isinstance(m, WindowAttention)]
    assert attention and all(m.smooth for m in attention)
    model.save(tmp_path / "m")
    loaded = PixNet.load(tmp_path / "m")
    assert all(m.smooth for m in loaded.module.modules() if isinstance(m, WindowAttention))
    tile = np.random.default_rng(2).random((3, 256, 256)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict_intensity(tile), model.predict_intensity(tile))
    assert _tiled_vs_one_pass(synthetic_small, model, "tiled_smooth") < 1e-4
