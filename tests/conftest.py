"""Shared fixtures: small synthetic slides built once per session and copied per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

SMALL_UM = 640.0
FIT_GENES = ["GENE00", "GENE01", "GENE02", "GENE03", "GENE05", "GENE08"]


def data_dir() -> Path | None:
    candidates = [os.environ.get("PIXGENE_DATA_DIR"), Path(__file__).resolve().parents[2] / "shared" / "data"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def synthetic_small_session():
    import pixgene as pg

    return pg.datasets.synthetic(seed=3, size_um=SMALL_UM)


@pytest.fixture
def synthetic_small(synthetic_small_session):
    from spatialdata import deepcopy

    sdata = deepcopy(synthetic_small_session)
    return sdata


@pytest.fixture(scope="session")
def fitted_session(synthetic_small_session):
    """A quickly fitted model (few epochs: for plumbing and determinism, not accuracy)."""
    from spatialdata import deepcopy

    import pixgene as pg

    sdata = deepcopy(synthetic_small_session)
    model = pg.tl.fit(sdata, genes=FIT_GENES, max_epochs=2, progress=False, random_state=0, decoder=pg.tl.DecoderConfig(width=16), training=pg.tl.TrainConfig(n_views=2))
    return sdata, model
