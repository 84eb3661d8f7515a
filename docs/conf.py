"""Sphinx configuration of pixgene's documentation.

Build: ``sphinx-build -W -b html docs docs/_build`` (from the repository root; ``pip install -e ".[docs]"``).
Notebooks are rendered from their committed outputs and never executed. The API pages, the CLI help and
``benchmarks.md`` are derived from the code and from ``benchmarks/results`` at every build (``_ext/pixgene_docs.py``).

Intersphinx links to anndata, spatialdata, scanpy, squidpy, numpy and torch need their inventories online:
``PIXGENE_DOCS_INTERSPHINX=1`` always asks for them (a failed fetch is then a warning), ``=0`` never does, and
unset (the default) asks only when the first inventory answers within a few seconds, so an offline build
has no links to those projects and no warning.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "_ext"))

import pixgene  # noqa: E402

project = "pixgene"
author = "the pixgene authors"
copyright = f"{date.today():%Y}, {author}"
version = release = pixgene.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx_autodoc_typehints",  # after napoleon
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
    "pixgene_docs",
]

root_doc = "index"
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
# jupyter_execute: myst-nb writes it next to the output folder, here docs/
exclude_patterns = ["_build", "jupyter_execute", "**.ipynb_checkpoints"]
templates_path: list[str] = []

# notebooks: committed outputs only
nb_execution_mode = "off"
nb_output_stderr = "remove"  # progress bars and warnings saved in a notebook are not shown
nb_merge_streams = True
# outputs only a browser kernel can show (e.g. progress-bar widgets): skipped without failing the build
# the generated benchmarks page nests each script's own headings under its section: levels may skip
suppress_warnings = ["mystnb.unknown_mime_type", "myst.header"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# API: stub pages are written by pixgene_docs from each module's __all__; autosummary only draws the tables
autosummary_generate = False
autodoc_member_order = "bysource"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True
# pixgene's Returns sections are free text (often a list of the elements written), not "type / description"
# pairs: render them as written, under the heading "Returns"
napoleon_custom_sections = [("Returns", "generic")]
typehints_defaults = "comma"
typehints_document_rtype = False
always_use_bars_union = True
nitpicky = False

# intersphinx
INTERSPHINX = {
    "python": ("https://docs.python.org/3", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "spatialdata": ("https://spatialdata.scverse.org/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "squidpy": ("https://squidpy.readthedocs.io/en/stable/", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "torch": ("https://docs.pytorch.org/docs/stable/", None),
}


def _reachable(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url + "objects.inv", timeout=timeout):
            return True
    except Exception:  # noqa: BLE001 -- any failure means: build without that project's links
        return False


def _intersphinx_mapping() -> dict:
    wanted = os.environ.get("PIXGENE_DOCS_INTERSPHINX", "auto").lower()
    if wanted in {"0", "false", "no", "off"}:
        return {}
    if wanted in {"1", "true", "yes", "on"}:
        return dict(INTERSPHINX)
    with ThreadPoolExecutor(len(INTERSPHINX)) as pool:
        ok = dict(zip(INTERSPHINX, pool.map(lambda v: _reachable(v[0]), INTERSPHINX.values()), strict=True))
    return {name: target for name, target in INTERSPHINX.items() if ok[name]}


intersphinx_mapping = _intersphinx_mapping()
intersphinx_timeout = 10

# HTML
html_theme = "sphinx_book_theme"
html_title = "pixgene"
html_theme_options = {"show_toc_level": 2, "navigation_with_keys": False}
html_static_path = ["_static"] if (HERE / "_static").is_dir() else []
html_show_sourcelink = False


def _free_text_returns(app, what, name, obj, options, lines) -> None:
    """Undo sphinx-autodoc-typehints' ``:`` under a numpydoc "Returns" header (its hint to napoleon that the
    section has no type line): pixgene's Returns sections are rendered as free text, where it would show."""
    for i in range(len(lines) - 2):
        if lines[i].strip().lower() == "returns" and set(lines[i + 1].strip()) == {"-"} and lines[i + 2] == ":":
            del lines[i + 2]
            return


def setup(app):
    # after sphinx-autodoc-typehints' own handler (priority 499, registered earlier), before napoleon's (500)
    app.connect("autodoc-process-docstring", _free_text_returns, priority=499)
