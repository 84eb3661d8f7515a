"""pg.io.read_image on real file formats written here, and pg.io.set_um_per_px / get_um_per_px."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

import pixgene as pg
from pixgene._core.raster import full_resolution, rgb_array, scale_levels
from pixgene._core.validate import PixgeneInputError

#: a coloured square at a known place in every test image
SQUARE = (slice(96, 160), slice(200, 280))
COLOUR = (180, 40, 120)


def _slide(height: int, width: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(200, 256, size=(height, width, channels), dtype=np.uint8)
    img[SQUARE] = COLOUR + (255,) * (channels - 3)
    return img


def _levels(element) -> list[tuple[int, ...]]:
    return [tuple(a.shape) for a, _ in scale_levels(element)]


def test_ome_tiff_pyramid(tmp_path):
    import dask.array as da
    import tifffile

    img = _slide(1024, 768)
    path = tmp_path / "slide.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        meta = {"axes": "YXS", "PhysicalSizeX": 250.0, "PhysicalSizeXUnit": "nm",
                "PhysicalSizeY": 250.0, "PhysicalSizeYUnit": "nm"}
        tw.write(img, subifds=2, tile=(256, 256), photometric="rgb", compression="zlib", metadata=meta)
        tw.write(img[::2, ::2], subfiletype=1, tile=(256, 256), photometric="rgb", compression="zlib")
        tw.write(img[::4, ::4], subfiletype=1, tile=(256, 256), photometric="rgb", compression="zlib")

    sdata = pg.io.read_image(path, image_key="slide", chunks=512)
    element = sdata.images["slide"]
    assert sdata.attrs["pixgene"]["um_per_px"]["slide"] == pytest.approx(0.25)  # 250 nm
    assert _levels(element) == [(3, 1024, 768), (3, 512, 384), (3, 256, 192)]
    assert [f for _, f in scale_levels(element)] == [1.0, 2.0, 4.0]
    full = rgb_array(element, "slide")
    assert isinstance(full.data, da.Array)
    assert full.data.chunks[1:] == ((512, 512), (512, 256))
    assert list(full.coords["c"].values) == ["r", "g", "b"]
    assert tuple(full[:, 100, 210].values) == COLOUR
    np.testing.assert_array_equal(full.values.transpose(1, 2, 0), img)
    # the coarser levels are the file's own, not recomputed: pixel (50, 105) of level 1 is pixel (100, 210)
    level1 = scale_levels(element)[1][0]
    assert tuple(level1[:, 50, 105].values) == COLOUR
    from spatialdata.transformations import get_transformation

    assert get_transformation(element, get_all=True)["global"].to_affine_matrix(("x", "y"), ("x", "y")).tolist() == [
        [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]
    ]


def _write_svs(path, img: np.ndarray, mpp: float) -> None:
    import tifffile

    head = "Aperio Image Library v12.0.15 \r\n"
    base = f"{head}{img.shape[1]}x{img.shape[0]} [0,0 {img.shape[1]}x{img.shape[0]}] (256x256) JPEG/RGB Q=90"
    with tifffile.TiffWriter(path) as tw:
        kw = {"photometric": "rgb", "metadata": None}
        tw.write(img, tile=(256, 256), description=f"{base}|AppMag = 20|MPP = {mpp}", compression="zlib", **kw)
        tw.write(img[::16, ::16], description=f"{head}thumbnail|MPP = {mpp}", **kw)
        tw.write(img[::4, ::4], tile=(256, 256), description=f"{head}level|MPP = {mpp}", compression="zlib", **kw)
        tw.write(np.zeros((64, 64, 3), np.uint8), subfiletype=1, description=f"{head}label 64x64", **kw)
        tw.write(np.zeros((80, 200, 3), np.uint8), subfiletype=9, description=f"{head}macro 200x80", **kw)


def test_svs_like_tiff_with_aperio_mpp(tmp_path):
    img = _slide(1024, 1536)
    path = tmp_path / "slide.svs"
    _write_svs(path, img, 0.5)
    sdata = pg.io.read_image(path)
    element = sdata.images["he"]
    assert sdata.attrs["pixgene"]["um_per_px"]["he"] == 0.5
    # the slide and its pyramid level; the thumbnail, label and macro images are not levels
    assert _levels(element) == [(3, 1024, 1536), (3, 256, 384)]
    assert tuple(full_resolution(element)[:, 150, 270].values) == COLOUR
    assert tuple(scale_levels(element)[1][0][:, 30, 60].values) == COLOUR
    # an explicit value wins over the file's
    assert pg.io.read_image(path, um_per_px=0.2527).attrs["pixgene"]["um_per_px"]["he"] == 0.2527


@pytest.mark.parametrize(("resolution", "unit", "expected"), [(40000, "CENTIMETER", 0.25), (50800, "INCH", 0.5)])
def test_plain_tiff_resolution_tags(tmp_path, resolution, unit, expected):
    import tifffile

    img = _slide(300, 400)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, img, photometric="rgb", resolution=(resolution, resolution), resolutionunit=unit)
    sdata = pg.io.read_image(path)
    assert sdata.attrs["pixgene"]["um_per_px"]["he"] == pytest.approx(expected)
    element = sdata.images["he"]
    assert _levels(element) == [(3, 300, 400)]
    np.testing.assert_array_equal(rgb_array(element, "he").values.transpose(1, 2, 0), img)


def test_screen_resolution_is_not_a_pixel_size(tmp_path):
    import tifffile

    path = tmp_path / "screen.tif"
    tifffile.imwrite(path, _slide(64, 64), photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(PixgeneInputError, match=r"um_per_px=.*") as err:
        pg.io.read_image(path)
    assert "72 dpi" in str(err.value)
    assert pg.io.read_image(path, um_per_px=1.0).attrs["pixgene"]["um_per_px"]["he"] == 1.0


def test_png_and_jpeg_need_um_per_px(tmp_path):
    from PIL import Image

    img = _slide(200, 320)
    for name in ("he.png", "he.jpg"):
        path = tmp_path / name
        Image.fromarray(img).save(path, quality=95)
        with pytest.raises(PixgeneInputError, match="Pass um_per_px="):
            pg.io.read_image(path)
        sdata = pg.io.read_image(path, um_per_px=0.8)
        assert sdata.attrs["pixgene"]["um_per_px"]["he"] == 0.8
        pixel = rgb_array(sdata.images["he"], "he")[:, 128, 240].values.astype(int)
        tolerance = 0 if name.endswith(".png") else 12
        assert np.all(np.abs(pixel - np.array(COLOUR)) <= tolerance), (name, pixel)
    # a physical resolution stored in the file is used (PNG pHYs: 20000 dpi = 1.27 um/px)
    path = tmp_path / "dpi.png"
    Image.fromarray(img).save(path, dpi=(20000, 20000))
    assert pg.io.read_image(path).attrs["pixgene"]["um_per_px"]["he"] == pytest.approx(1.27, rel=1e-3)


def test_large_jpeg_gets_a_pyramid(tmp_path):
    from PIL import Image

    path = tmp_path / "big.jpg"
    Image.fromarray(np.full((64, 4200, 3), 200, np.uint8)).save(path)
    element = pg.io.read_image(path, um_per_px=1.0).images["he"]
    assert _levels(element)[0] == (3, 64, 4200)
    assert len(_levels(element)) == 2


def test_non_rgb_images_are_refused(tmp_path):
    import tifffile
    from PIL import Image

    grey = tmp_path / "grey.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(grey)
    with pytest.raises(PixgeneInputError, match="greyscale"):
        pg.io.read_image(grey, um_per_px=0.5)
    grey_tif = tmp_path / "grey.tif"
    tifffile.imwrite(grey_tif, np.zeros((32, 32), np.uint8))
    with pytest.raises(PixgeneInputError, match="greyscale"):
        pg.io.read_image(grey_tif, um_per_px=0.5)
    fluo = tmp_path / "fluo.ome.tif"
    tifffile.imwrite(fluo, np.zeros((3, 32, 32), np.uint16), ome=True, photometric="minisblack",
                     metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    with pytest.raises(PixgeneInputError, match="3 separate channels.*fluorescence"):
        pg.io.read_image(fluo)
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((2, 32, 32, 3), np.uint8), photometric="rgb")
    with pytest.raises(PixgeneInputError, match="stack"):
        pg.io.read_image(stack, um_per_px=0.5)


def test_rgba_drops_alpha(tmp_path):
    import tifffile

    img = _slide(128, 320, channels=4)
    path = tmp_path / "rgba.tif"
    tifffile.imwrite(path, img, photometric="rgb", extrasamples=["unassalpha"], tile=(64, 64))
    full = rgb_array(pg.io.read_image(path, um_per_px=0.5).images["he"], "he")
    assert full.shape == (3, 128, 320)
    assert tuple(full[:, 100, 210].values) == COLOUR


def test_opening_a_large_pyramid_reads_no_tiles(tmp_path, monkeypatch):
    import tifffile
    from tifffile.tifffile import FileCache

    size, tile = 8192, 256

    def tiles(n: int):
        block = np.full((tile, tile, 3), 220, np.uint8)
        for _ in range((n // tile) ** 2):
            yield block

    path = tmp_path / "large.ome.tif"
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        meta = {"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}
        kw = {"dtype": np.uint8, "tile": (tile, tile), "photometric": "rgb", "compression": "zlib"}
        tw.write(tiles(size), shape=(size, size, 3), subifds=2, metadata=meta, **kw)
        for factor in (2, 4):
            tw.write(tiles(size // factor), shape=(size // factor, size // factor, 3), subfiletype=1, **kw)

    reads = []
    original = FileCache.read
    monkeypatch.setattr(FileCache, "read", lambda self, *a, **k: reads.append(a) or original(self, *a, **k))
    sdata = pg.io.read_image(path, chunks=1024)
    assert reads == []  # opening decoded no tile
    element = sdata.images["he"]
    assert _levels(element) == [(3, 8192, 8192), (3, 4096, 4096), (3, 2048, 2048)]
    full = full_resolution(element)
    assert full.data.numblocks == (1, 8, 8)
    assert scale_levels(element)[2][0].data.numblocks == (1, 2, 2)
    assert int(full[:, 5000:5010, 3000:3010].max().compute()) == 220
    # one dask chunk of 1024 x 1024 px: at most its 16 tiles were read
    assert 1 <= len(reads) <= 16


def test_missing_file_and_unreadable_format(tmp_path, monkeypatch):
    with pytest.raises(PixgeneInputError, match="does not exist"):
        pg.io.read_image(tmp_path / "none.tif")
    odd = tmp_path / "slide.mrxs"
    odd.write_bytes(b"not an image at all")
    monkeypatch.setitem(sys.modules, "openslide", None)  # as if not installed
    with pytest.raises(PixgeneInputError, match="pip install openslide-python openslide-bin"):
        pg.io.read_image(odd)


def test_openslide_fallback(tmp_path, monkeypatch):
    """A format tifffile cannot read goes through openslide's read_region, tile by tile."""
    from PIL import Image

    img = _slide(300, 500)
    calls = []

    class FakeSlide:
        level_count = 2
        level_dimensions = ((500, 300), (250, 150))
        level_downsamples = (1.0, 2.0)
        def __init__(self, filename):
            self.filename = filename
            self.properties = {"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"}

        def read_region(self, location, level, size):
            calls.append((location, level, size))
            (x, y), (w, h), f = location, size, int(self.level_downsamples[level])
            rgb = img[y : y + h * f : f, x : x + w * f : f]
            rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=-1)
            return Image.fromarray(np.ascontiguousarray(rgba), mode="RGBA")

    fake = types.ModuleType("openslide")
    fake.OpenSlide = FakeSlide
    fake.OpenSlideError = type("OpenSlideError", (Exception,), {})
    monkeypatch.setitem(sys.modules, "openslide", fake)
    path = tmp_path / "slide.mrxs"
    path.write_bytes(b"MIRAX index")
    sdata = pg.io.read_image(path, chunks=128)
    assert calls == []
    element = sdata.images["he"]
    assert sdata.attrs["pixgene"]["um_per_px"]["he"] == 0.25
    assert _levels(element) == [(3, 300, 500), (3, 150, 250)]
    np.testing.assert_array_equal(full_resolution(element).values.transpose(1, 2, 0), img)
    assert len(calls) == 3 * 4  # one read_region per 128 px chunk of level 0
    assert {level for _, level, _ in calls} == {0}
    assert tuple(scale_levels(element)[1][0][:, 50, 105].values) == COLOUR
    assert calls[-1] == ((0, 0), 1, (128, 128))  # level 1's first chunk, at level-0 coordinates


def test_set_and_get_um_per_px(tmp_path):
    from spatialdata.transformations import Affine, Scale, Sequence, Translation, set_transformation

    img = _slide(64, 64)
    import tifffile

    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, img, photometric="rgb")
    sdata = pg.io.read_image(path, um_per_px=0.5)
    assert pg.io.get_um_per_px(sdata, "he") == 0.5
    assert pg.io.set_um_per_px(sdata, "he", 0.3) == 0.3
    assert pg.io.get_um_per_px(sdata, "he") == 0.3
    assert sdata.attrs["pixgene"]["um_per_px"]["he"] == 0.3
    with pytest.raises(PixgeneInputError, match="not found"):
        pg.io.set_um_per_px(sdata, "nope", 0.3)
    with pytest.raises(PixgeneInputError, match="plausible range"):
        pg.io.set_um_per_px(sdata, "he", 500.0)

    # not recorded: derived from the scale of a transformation to a system in microns
    del sdata.attrs["pixgene"]["um_per_px"]["he"]
    with pytest.raises(PixgeneInputError, match="coordinate_system="):
        pg.io.get_um_per_px(sdata, "he")
    to_um = Sequence([Scale([0.4, 0.4], axes=("x", "y")), Translation([100.0, 50.0], axes=("x", "y"))])
    set_transformation(sdata.images["he"], to_um, to_coordinate_system="aligned")
    assert pg.io.get_um_per_px(sdata, "he", coordinate_system="aligned") == pytest.approx(0.4)
    with pytest.raises(PixgeneInputError, match="no transformation to coordinate system 'other'"):
        pg.io.get_um_per_px(sdata, "he", coordinate_system="other")
    rotated = Affine(np.array([[0.0, -0.7, 0.0], [0.7, 0.0, 0.0], [0.0, 0.0, 1.0]]), ("x", "y"), ("x", "y"))
    set_transformation(sdata.images["he"], rotated, to_coordinate_system="microns")
    assert pg.io.get_um_per_px(sdata, "he") == pytest.approx(0.7)  # found by its name
    stretched = Scale([0.4, 0.8], axes=("x", "y"))
    set_transformation(sdata.images["he"], stretched, to_coordinate_system="skewed")
    with pytest.raises(PixgeneInputError, match="scales x and y differently"):
        pg.io.get_um_per_px(sdata, "he", coordinate_system="skewed")
