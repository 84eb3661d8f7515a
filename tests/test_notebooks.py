"""The tutorials in ``notebooks/`` run from top to bottom in FAST mode.

Each notebook reads the environment variable ``PIXGENE_FAST=1`` in its first cell (the papermill
``parameters`` cell) and then shrinks epochs, members and area so that all of them together take minutes. They
run in order, in one temporary folder (tutorial 3 loads the model tutorial 2 saves there), with nbclient and a
``python3`` Jupyter kernel; the committed notebooks are never written to. A notebook that reads the real data
(``pg.datasets.her2st``, ...) is marked ``data`` and skipped when the data are not there; one that imports a
package this environment lacks (the ``tutorials`` extra: squidpy, spatialdata-plot, ...) is skipped, naming it.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path

import pytest
from conftest import data_dir

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
REAL_DATA = ("pg.datasets.her2st", "pg.datasets.st_mob", "pg.datasets.visium_scmuscle")
TIMEOUT_S = 1800  # per cell


def code_of(path: Path) -> str:
    import nbformat

    nb = nbformat.read(path, as_version=4)
    return "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")


def imported_modules(source: str) -> set[str]:
    """Top-level modules a notebook imports (IPython magics and shell lines left out)."""
    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
    names: set[str] = set()
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def params():
    for path in NOTEBOOKS:
        text = path.read_text(encoding="utf-8")
        marks = [pytest.mark.data] if any(name in text for name in REAL_DATA) else []
        yield pytest.param(path, marks=marks, id=path.stem)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("notebooks")


@pytest.mark.parametrize("path", list(params()))
def test_notebook_runs_in_fast_mode(path, workdir, monkeypatch):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    import nbformat
    from nbclient import NotebookClient

    missing = sorted(m for m in imported_modules(code_of(path)) if importlib.util.find_spec(m) is None)
    if missing:
        pytest.skip(f"{path.name} imports {', '.join(missing)}: pip install 'pixgene[tutorials]'")
    if any(name in path.read_text(encoding="utf-8") for name in REAL_DATA):
        root = data_dir()
        if root is None:
            pytest.skip("real data not available: no ../shared/data and no $PIXGENE_DATA_DIR")
        monkeypatch.setenv("PIXGENE_DATA_DIR", str(root))  # the kernel runs in the temporary folder
    # the kernel inherits this process's environment
    monkeypatch.setenv("PIXGENE_FAST", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's own inline backend, as in Jupyter
    monkeypatch.setenv("TQDM_MININTERVAL", "30")  # fewer progress-bar updates in the outputs
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(workdir)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    assert os.environ["PIXGENE_FAST"] == "1"
