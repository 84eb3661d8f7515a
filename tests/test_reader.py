"""SlideReader: regions resampled to the encoder's pixel size, checked against scipy.ndimage references."""

import numpy as np
import pytest


def _element(img):
    from spatialdata.models import Image2DModel

    return Image2DModel.parse(img, dims=("c", "y", "x"), c_coords=["r", "g", "b"])


def _ndimage_reference(img, r, x0, y0, w, h):
    """Gaussian pre-filter (sigma (r - 1) / 2) then bilinear sampling at the target pixel centres; white outside."""
    from scipy import ndimage

    pad = int(np.ceil(2 * max(r, 1.0))) + 2
    lx0, ly0 = int(np.floor(x0 * r)) - pad, int(np.floor(y0 * r)) - pad
    lx1, ly1 = int(np.ceil((x0 + w) * r)) + pad, int(np.ceil((y0 + h) * r)) + pad
    win = np.ones((3, ly1 - ly0, lx1 - lx0), np.float32)
    H, W = img.shape[1:]
    sx0, sy0, sx1, sy1 = max(lx0, 0), max(ly0, 0), min(lx1, W), min(ly1, H)
    win[:, sy0 - ly0 : sy1 - ly0, sx0 - lx0 : sx1 - lx0] = img[:, sy0:sy1, sx0:sx1] / 255
    ys = (np.arange(h) + y0 + 0.5) * r - 0.5 - ly0
    xs = (np.arange(w) + x0 + 0.5) * r - 0.5 - lx0
    sigma = max(0.0, (r - 1) / 2)
    grid = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([
        ndimage.map_coordinates(ndimage.gaussian_filter(win[c], sigma) if sigma else win[c], grid, order=1,
                                mode="nearest")
        for c in range(3)
    ])


@pytest.mark.parametrize("factor", [0.7, 1.37, 2.5, 5.3])
def test_non_integer_factors_match_filter_then_interpolate(factor):
    from pixgene.data._reader import SlideReader

    img = (np.random.default_rng(0).random((3, 700, 600)) * 255).astype(np.uint8)
    reader = SlideReader(_element(img), image_um=1.0, target_um=factor)
    for x0, y0, w, h in [(10, 20, 90, 70), (-30, -20, 64, 48), (reader.shape[1] - 20, reader.shape[0] - 15, 40, 30)]:
        np.testing.assert_allclose(reader.read(x0, y0, w, h), _ndimage_reference(img, factor, x0, y0, w, h),
                                   atol=1e-5)


@pytest.mark.parametrize("factor", [2, 3])
def test_integer_factors_are_exact_area_means(factor):
    from pixgene.data._reader import SlideReader

    img = (np.random.default_rng(1).random((3, 300, 330)) * 255).astype(np.uint8)
    reader = SlideReader(_element(img), image_um=0.5, target_um=0.5 * factor)
    got = reader.read(7, 5, 40, 30)
    f = factor
    block = img[:, 5 * f : (5 + 30) * f, 7 * f : (7 + 40) * f].astype(np.float64) / 255
    ref = block.reshape(3, 30, f, 40, f).mean((2, 4))
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_scaled_read_equals_a_reader_at_the_scaled_pixel_size():
    from pixgene.data._reader import SlideReader

    img = (np.random.default_rng(2).random((3, 500, 500)) * 255).astype(np.uint8)
    base = SlideReader(_element(img), image_um=1.0, target_um=1.0)
    scaled = SlideReader(_element(img), image_um=1.0, target_um=1.15)
    np.testing.assert_allclose(base.read(20, 30, 64, 64, scale=1.15), scaled.read(20, 30, 64, 64), atol=1e-6)


def test_lazy_small_levels_are_loaded_once_and_not_pickled():
    import pickle

    import dask.array as da

    from pixgene.data._reader import SlideReader

    img = (np.random.default_rng(3).random((3, 256, 256)) * 255).astype(np.uint8)
    lazy = da.from_array(img, chunks=(3, 64, 64)) + np.uint8(0)  # a computed (not stored) array
    reader = SlideReader(_element(lazy), image_um=1.0, target_um=1.0)
    first = reader.read(5, 5, 32, 32)
    assert isinstance(reader._pixels, np.ndarray)
    np.testing.assert_array_equal(first, img[:, 5:37, 5:37] / np.float32(255))
    copy = pickle.loads(pickle.dumps(reader))
    assert copy._pixels is None
    np.testing.assert_array_equal(copy.read(5, 5, 32, 32), first)
