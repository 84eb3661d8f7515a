"""``pixgene predict`` on an H&E-only whole-slide file: the same reader, model and read-outs as in Python."""

from __future__ import annotations

import numpy as np
from conftest import FIT_GENES

import pixgene as pg


def test_cli_predicts_an_ome_tiff_and_reads_the_map_out_over_segmented_cells(synthetic_small, tmp_path, capsys):
    import spatialdata as sd
    import tifffile

    from pixgene.cli import main

    model = pg.tl.fit(synthetic_small, genes=FIT_GENES[:2], max_epochs=1, n_members=1, progress=False,
                      decoder=pg.tl.DecoderConfig(width=8), training=pg.tl.TrainConfig(n_views=1, tile_context_px=0))
    model.save(tmp_path / "model")
    rgb = np.moveaxis(np.asarray(synthetic_small.images["he"].values)[:, :320, :384], 0, -1)
    slide = tmp_path / "slide.ome.tif"
    tifffile.imwrite(slide, rgb, photometric="rgb", ome=True, tile=(128, 128),
                     metadata={"axes": "YXS", "PhysicalSizeX": 1.0, "PhysicalSizeXUnit": "µm",
                               "PhysicalSizeY": 1.0, "PhysicalSizeYUnit": "µm"})
    out = tmp_path / "out.zarr"
    assert main(["predict", "--model", str(tmp_path / "model"), "--image", str(slide), "--out", str(out),
                 "--um-per-px", "4", "--segment"]) == 0
    written = sd.read_zarr(out)
    assert written.attrs["pixgene"]["um_per_px"]["he"] == 1.0  # from the file's OME metadata
    table = written.tables["cells_pixgene"]
    assert table.n_obs == len(written.shapes["cells"]) > 20
    # the same steps in Python give the same cells and read-out
    again = pg.io.read_image(slide)
    pg.tl.predict_dense(again, pg.tl.PixNet.load(tmp_path / "model"), progress=False)
    pg.tl.segment_cells(again, progress=False)
    want = pg.tl.aggregate(again, shapes="cells", progress=False)
    np.testing.assert_allclose(np.asarray(table.X), np.asarray(want.X), rtol=1e-5, atol=1e-6)

    # a plain PNG has no pixel size: a clear message and exit code 2, no traceback
    from PIL import Image

    png = tmp_path / "slide.png"
    Image.fromarray(rgb).save(png)
    assert main(["predict", "--model", str(tmp_path / "model"), "--image", str(png), "--out",
                 str(tmp_path / "png.zarr")]) == 2
    assert "um_per_px" in capsys.readouterr().err
