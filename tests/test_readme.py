"""The README's session, run as written: every line of its ```python block must run without raising.

The code's text is not edited. Only what it reaches is made small, from outside, so that the test takes a few
minutes on a CPU: ``pg.tl.fit`` gets one decoder, one epoch and one view of each tile unless the README asks
for something else, ``pg.datasets.her2st`` returns a square millimetre of the section (its spots, counts and
H&E, read by ``pg.io.read_st`` as the full section is), and the files the session reads
(``new_slide.ome.tif``) are written first into the temporary folder it runs in.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import data_dir

README = Path(__file__).resolve().parents[1] / "README.md"
CROP_UM = 1100.0  # side of the square of each her2st section the session gets (about 25 spots)
NEW_SLIDE_PX = 768  # side of the H&E-only slide the session predicts


def readme_session() -> tuple[str, int]:
    """The README's ```python block under "## A session", and the README line its code starts on."""
    text = README.read_text(encoding="utf-8")
    section = text.index("## A session")
    match = re.compile(r"^```python\n(.*?)^```", re.S | re.M).search(text, section)
    assert match is not None, "README.md has no ```python block under '## A session'"
    return match.group(1), text.count("\n", 0, match.start(1)) + 1


def her2st_root() -> Path:
    root = data_dir()
    if root is None or not (root / "her2st").is_dir():
        pytest.skip("real data not available: no her2st folder in ../shared/data or $PIXGENE_DATA_DIR")
    return root / "her2st"


def crop_section(root: Path, section: str, out: Path) -> tuple[Path, Path, Path, float]:
    """Counts, spots and H&E of a CROP_UM square around the section's median spot, as her2st's files."""
    from PIL import Image

    spots = pd.read_csv(root / "spots" / f"{section}_selection.tsv", sep="\t")
    if "selected" in spots:
        spots = spots[spots["selected"] == 1]
    xy = spots[["pixel_x", "pixel_y"]].to_numpy(float)
    d = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    um_per_px = 200.0 / float(np.median(d.min(1)))  # the 1k array's pitch, as read_st derives it
    side = int(round(CROP_UM / um_per_px))
    x0, y0 = (np.median(xy, 0) - side / 2).round().astype(int)
    inside = (xy[:, 0] >= x0) & (xy[:, 0] < x0 + side) & (xy[:, 1] >= y0) & (xy[:, 1] < y0 + side)
    kept = spots[inside].copy()
    kept["pixel_x"] -= x0
    kept["pixel_y"] -= y0
    out.mkdir(parents=True, exist_ok=True)
    spots_path = out / f"{section}_selection.tsv"
    kept.to_csv(spots_path, sep="\t", index=False)
    counts = pd.read_csv(root / "counts" / f"{section}.tsv.gz", sep="\t", index_col=0)
    counts_path = out / f"{section}.tsv"
    counts.loc[counts.index.intersection([f"{x}x{y}" for x, y in zip(kept["x"], kept["y"], strict=True)])].to_csv(
        counts_path, sep="\t")
    Image.MAX_IMAGE_PIXELS = None
    (jpeg,) = (root / "images").glob(f"{section}_*.jpg")
    with Image.open(jpeg) as im:
        image_path = out / f"{section}.png"
        im.convert("RGB").crop((x0, y0, x0 + side, y0 + side)).save(image_path)
    return counts_path, spots_path, image_path, um_per_px


def write_new_slide(image: Path, um_per_px: float, path: Path) -> None:
    """An OME-TIFF with its physical pixel size: the middle of a cropped section's H&E."""
    import tifffile
    from PIL import Image

    rgb = np.asarray(Image.open(image).convert("RGB"))
    y0, x0 = (np.array(rgb.shape[:2]) - NEW_SLIDE_PX) // 2
    tifffile.imwrite(path, rgb[y0 : y0 + NEW_SLIDE_PX, x0 : x0 + NEW_SLIDE_PX], photometric="rgb", ome=True,
                     tile=(256, 256), metadata={"axes": "YXS", "PhysicalSizeX": um_per_px, "PhysicalSizeXUnit": "µm",
                                                "PhysicalSizeY": um_per_px, "PhysicalSizeYUnit": "µm"})


@pytest.mark.data
def test_readme_session_runs_as_written(tmp_path, monkeypatch):
    import pixgene as pg
    import pixgene.datasets
    import pixgene.tl

    root = her2st_root()
    code, first_line = readme_session()
    real_fit = pixgene.tl.fit

    def her2st(section: str = "C2", **keys):
        counts, spots, image, um = crop_section(root, section, tmp_path / "her2st_crop")
        return pg.io.read_st(counts, spots, image, spot_diameter_um=100.0, pitch_um=200.0, um_per_px=um,
                             library_id=f"her2st_{section}", **keys)

    def fit(*args, **kwargs):
        kwargs.setdefault("n_members", 1)
        kwargs.setdefault("max_epochs", 1)
        kwargs.setdefault("training", pg.tl.TrainConfig(n_views=1, tile_context_px=0))
        kwargs.setdefault("progress", False)
        return real_fit(*args, **kwargs)

    _, _, image, um = crop_section(root, "C3", tmp_path / "new_slide_source")
    write_new_slide(image, um, tmp_path / "new_slide.ome.tif")
    monkeypatch.setattr(pixgene.datasets, "her2st", her2st)
    monkeypatch.setattr(pixgene.tl, "fit", fit)
    monkeypatch.chdir(tmp_path)

    namespace: dict = {"__name__": "readme_session"}
    with warnings.catch_warnings():
        # the session's warnings are the user's to see, not failures; any exception fails the test
        warnings.simplefilter("default")
        exec(compile("\n" * (first_line - 1) + code, str(README), "exec"), namespace)  # noqa: S102

    sdata, new, cells = namespace["sdata"], namespace["new"], namespace["cells"]
    assert "he_pixgene" in sdata.images and "he_pixgene" in new.images
    assert cells.n_obs > 0 and "pixgene_lognorm" in cells.layers and "leiden" in cells.obs
    assert (tmp_path / "models" / "c2" / "model.safetensors").is_file()
