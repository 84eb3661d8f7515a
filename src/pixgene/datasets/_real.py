"""Loaders for the public spot-based datasets kept next to the project (``../shared/data``).

Each loader finds its dataset folder (see :func:`pixgene.datasets._paths.dataset_dir`), checks the files it
reads against the SHA-256 checksums below, and reads them with the matching :mod:`pixgene.io` reader.
"""

from __future__ import annotations

import math
from typing import Any

from .._core.keys import IMAGE_KEY, SPOTS_KEY, TABLE_KEY
from .._core.validate import fail
from ._paths import dataset_dir, verify_files

__all__ = [
    "HER2ST_SECTIONS",
    "ST_MOB_SECTIONS",
    "VISIUM_SCMUSCLE_SAMPLES",
    "her2st",
    "st_mob",
    "visium_scmuscle",
]

#: ST 1k arrays: 100 um spots on a square grid with 200 um between neighbouring centres
ST_SPOT_DIAMETER_UM = 100.0
ST_1K_PITCH_UM = 200.0
#: ST 2k arrays interleave a second 1k grid ("diamond" pattern): nearest centres are 200 / sqrt(2) um apart
ST_2K_PITCH_UM = 200.0 / math.sqrt(2.0)

# file (relative to the dataset folder) -> SHA-256, computed from the released files
_CHECKSUMS: dict[str, dict[str, str]] = {
    "her2st": {
        "counts/C2.tsv.gz": "c1c59ea6cffae36b9ecb561b8e2a97e3aa5f4085f748e991a0e330ed9d09773d",
        "counts/C3.tsv.gz": "e00c55a3eb9caac5d9c71b8906aae8be8b38f93e23938f4a0ebee17683ef6a2a",
        "counts/C4.tsv.gz": "33201f76d41d7131dc600a0f87d9a70383af3503e81698b4d11e6f2e8d73e9da",
        "counts/C5.tsv.gz": "c0f310315ca6110d74dbdf7011e5b42432ba0b8eb5f001824764911988f39338",
        "images/C2_5714_HE_BT_C2.jpg": "26e2f73ae840cdd46c5bba405aae181f13a56a376b9848dff23f7a9c5de7f19e",
        "images/C3_5714_HE_BT_D1.jpg": "0005a92674014d473040a28f0afca89ce5fa5c44019b479b638ceb3272ceb568",
        "images/C4_5714_HE_BT_D2.jpg": "f40607eb1d5f0d125decd71c48b0c5d29cf6776ad92297fd185631208c82d6f2",
        "images/C5_5714_HE_BT_E1.jpg": "34028ea41e376396b50c42b0a11a7e689c85be4a8022e668d0a09cc128c04c65",
        "spots/C2_selection.tsv": "235b5f4306b3b57c628ffc82c98c7109602474fbcc79a917b9c50517f99b6b1c",
        "spots/C3_selection.tsv": "7fd76c13370b7804ac3bb377b846d22485cf9223f9dd8dfc25be06e5aaf65755",
        "spots/C4_selection.tsv": "47e79f3b9dbfa3a8c18af9e948ba7ba4bf0a75ea1b4c292bc714ced7d0917d4c",
        "spots/C5_selection.tsv": "2114cc3b4da759772112897f1e247d5443c9f8c808e6a9a952eb4fda379a194c",
    },
    "st_mob": {
        "MOB1.jpg": "c1c292187221bab077ac1b15e95cf665db35684c98d6193af56d2e8b7772fe20",
        "MOB1.tsv": "82c0691f800355369fd8a72ff44ba1e3112d4e44a790f490a9fa267876a9352e",
        "MOB2.jpg": "1079fe52f600ec212a6a59cef76b8697fcd776d0cdb10461ad3bb738eaa5c0b6",
        "MOB2.tsv": "449dcc351ede5c63f9afe313479dbb830ba32c6e86b56b258276304102d1f7e9",
        "MOB3.jpg": "0ac2c820ca6614e3ebc7fef3004a85c4623093b10741858e5c5328d7310606ca",
        "MOB3.tsv": "f0b9601a10d627d372c412cad4a4dde2a1dee9f2433e51f07ca26d534be015ea",
        "alignment_table_MOB1.tsv": "91ade06cf93bc0b3cd728846c34e310a8365200d1ad33498e6a0eb6951a92164",
        "alignment_table_MOB2.tsv": "6d86b226386b0a08f825b3bff4b5c359f00fd52d3f53d77db0376b0f7e0ec30d",
        "alignment_table_MOB3.tsv": "da0ce26ad12b94b6d0784ddc1c0c76e998d3bbd2579bad6aa8c4ac2c4f7f2e33",
    },
    "visium_scmuscle": {
        "Vis5A_2dpi/Vis5A_filtered_feature_bc_matrix.h5":
            "ef21fc3499feb0bbc3663b27bc6d6a98818ab1105ed2ddc2cdb0eab5a5e845e4",
        "Vis5A_2dpi/spatial/scalefactors_json.json":
            "c6b3d6caefb7d3a69ae12db255a44f4911eaa44e1ebb0946b0d23afa0a3ffb77",
        "Vis5A_2dpi/spatial/tissue_lowres_image.png":
            "caa68b6c38795a569aa52581b4292b8430994a3458112608a939ccdddd97b9ee",
        "Vis5A_2dpi/spatial/tissue_positions_list.csv":
            "3a70640481ce74f2afc4de881c7928f103477d2452a3fe3530fd2696f28922b9",
        "Vis7B_5dpi/Vis7B_filtered_feature_bc_matrix.h5":
            "e611c57c5daf8d3349ff6a37b51d2d5913f99013bfced88733c55518ab03db69",
        "Vis7B_5dpi/spatial/scalefactors_json.json":
            "3084e2d475817bb99fdd7beaf97d8be348d7f18cd8ee5e5a3cad474592b125c1",
        "Vis7B_5dpi/spatial/tissue_lowres_image.png":
            "9479d562da2b4d359657cd2fe73d4ed18a2a2751a49fb5ab25e987c5d1de1854",
        "Vis7B_5dpi/spatial/tissue_positions_list.csv":
            "7149dfc0bd4f7e056c2f4cfec8f9d6ac746e8d92e9b989d35d71ea9d15fd4ff9",
    },
}

#: her2st section -> H&E image file name (the scan names carry the slide position)
_HER2ST_IMAGES = {
    "C2": "C2_5714_HE_BT_C2.jpg",
    "C3": "C3_5714_HE_BT_D1.jpg",
    "C4": "C4_5714_HE_BT_D2.jpg",
    "C5": "C5_5714_HE_BT_E1.jpg",
}
HER2ST_SECTIONS = tuple(_HER2ST_IMAGES)
ST_MOB_SECTIONS = ("MOB1", "MOB2", "MOB3")
VISIUM_SCMUSCLE_SAMPLES = ("Vis5A_2dpi", "Vis7B_5dpi")


def her2st(
    section: str = "C2",
    *,
    image_key: str = IMAGE_KEY,
    shapes_key: str = SPOTS_KEY,
    table_key: str = TABLE_KEY,
) -> Any:
    """HER2-positive breast tumour, patient C, legacy ST 1k array (Andersson et al., Nat. Commun. 2021).

    Parameters
    ----------
    section
        One of ``"C2"``, ``"C3"``, ``"C4"``, ``"C5"`` (serial sections).
    image_key, shapes_key, table_key
        Names of the image, spots and table elements.

    Returns
    -------
    :class:`spatialdata.SpatialData` as returned by :func:`pixgene.io.read_st`: the full-resolution H&E
    (about 9300 x 9900 px, multiscale), about 180 spots of 100 um and about 15,700 genes of raw counts, with
    about 0.73 um per pixel derived from the 200 um spot pitch; ``library_id`` = ``"her2st_{section}"``.
    """
    from ..io import read_st

    _check_choice(section, HER2ST_SECTIONS, "her2st section")
    root = dataset_dir("her2st")
    counts, spots, image = verify_files(
        root,
        _CHECKSUMS["her2st"],
        [f"counts/{section}.tsv.gz", f"spots/{section}_selection.tsv", f"images/{_HER2ST_IMAGES[section]}"],
    )
    return read_st(
        counts,
        spots,
        image,
        spot_diameter_um=ST_SPOT_DIAMETER_UM,
        pitch_um=ST_1K_PITCH_UM,
        library_id=f"her2st_{section}",
        image_key=image_key,
        shapes_key=shapes_key,
        table_key=table_key,
    )


def st_mob(
    section: str = "MOB1",
    *,
    image_key: str = IMAGE_KEY,
    shapes_key: str = SPOTS_KEY,
    table_key: str = TABLE_KEY,
) -> Any:
    """Mouse olfactory bulb, legacy ST 2k array (STUtility example data, MIT licence).

    Parameters
    ----------
    section
        One of ``"MOB1"``, ``"MOB2"``, ``"MOB3"``.
    image_key, shapes_key, table_key
        Names of the image, spots and table elements.

    Returns
    -------
    :class:`spatialdata.SpatialData` as returned by :func:`pixgene.io.read_st`: the 1905 x 1905 px H&E, the
    spots under tissue (about 400) with 1,000 Ensembl genes of raw counts; the pixel size (about 4.5 um per
    pixel) is derived from the 2k array's 141 um nearest-centre pitch; ``library_id`` =
    ``"st_mob_{section}"``.
    The JPEG's pixels are not square (an array unit spans about 21.6 px in x and 24.1 px in y), so spots drawn
    as circles are about 5 % off in each direction.
    """
    from ..io import read_st

    _check_choice(section, ST_MOB_SECTIONS, "st_mob section")
    root = dataset_dir("st_mob")
    counts, spots, image = verify_files(
        root, _CHECKSUMS["st_mob"], [f"{section}.tsv", f"alignment_table_{section}.tsv", f"{section}.jpg"]
    )
    return read_st(
        counts,
        spots,
        image,
        spot_diameter_um=ST_SPOT_DIAMETER_UM,
        pitch_um=ST_2K_PITCH_UM,
        library_id=f"st_mob_{section}",
        image_key=image_key,
        shapes_key=shapes_key,
        table_key=table_key,
    )


def visium_scmuscle(
    sample: str = "Vis5A_2dpi",
    *,
    image_key: str = IMAGE_KEY,
    shapes_key: str = SPOTS_KEY,
    table_key: str = TABLE_KEY,
) -> Any:
    """Mouse tibialis anterior after injury, 10x Visium (McKellar et al. 2021, GEO GSE161318).

    Parameters
    ----------
    sample
        ``"Vis5A_2dpi"`` (2 days post injury) or ``"Vis7B_5dpi"`` (5 days).
    image_key, shapes_key, table_key
        Names of the image, spots and table elements.

    Returns
    -------
    :class:`spatialdata.SpatialData` as returned by :func:`pixgene.io.read_visium`: only the low-resolution
    image is released (about 11 um per pixel, a 55 um spot is about 5 px), about 1,000 in-tissue spots and
    33,217 genes of raw counts; ``library_id`` = ``"Vis5A"`` / ``"Vis7B"``.
    """
    from ..io import read_visium

    _check_choice(sample, VISIUM_SCMUSCLE_SAMPLES, "visium_scmuscle sample")
    root = dataset_dir("visium_scmuscle")
    library = sample.split("_")[0]
    files = [
        f"{library}_filtered_feature_bc_matrix.h5",
        "spatial/tissue_positions_list.csv",
        "spatial/scalefactors_json.json",
        "spatial/tissue_lowres_image.png",
    ]
    verify_files(root, _CHECKSUMS["visium_scmuscle"], [f"{sample}/{name}" for name in files])
    return read_visium(
        root / sample,
        dataset_id=library,
        image="lowres",
        counts_file=files[0],
        tissue_positions_file=files[1],
        scalefactors_file=files[2],
        image_key=image_key,
        shapes_key=shapes_key,
        table_key=table_key,
    )


def _check_choice(value: str, known: tuple[str, ...], what: str) -> None:
    if value not in known:
        fail(f"{what} {value!r}", "is not part of this dataset", f"Choose one of {list(known)}")
