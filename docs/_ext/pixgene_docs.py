"""Sphinx glue for pixgene's docs: pages that are derived from the code or the results, never copied by hand.

- ``{pixgene-api} tl``: an autosummary table of everything in ``pixgene.tl.__all__``; the stub page of every
  listed object is written at ``config-inited`` (``generated/pixgene.tl.fit.rst`` and so on), so a function
  added to a module's ``__all__`` appears in the docs at the next build and one removed disappears.
- ``{pixgene-cli-help} predict``: the output of ``pixgene predict --help``, taken from the parser itself.
- ``notebooks/``: the tutorial notebooks of ``../notebooks`` copied in (the docs render their committed
  outputs; nothing is executed).
- ``benchmarks.md``: written by ``make_benchmarks.py`` from ``benchmarks/results/*.json``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import os
import shutil
import sys
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective

#: The public modules, in the order the API page shows them.
PUBLIC_MODULES = ("io", "datasets", "pp", "tl", "pl")
GENERATED = "generated"


def public_names(module: str) -> list[str]:
    """``pixgene.<module>.__all__``, in the module's own order."""
    mod = importlib.import_module(f"pixgene.{module}")
    return list(mod.__all__)


def _stub(module: str, name: str) -> str:
    obj = getattr(importlib.import_module(f"pixgene.{module}"), name)
    full = f"pixgene.{module}.{name}"
    lines = [full, "=" * len(full), "", f".. currentmodule:: pixgene.{module}", ""]
    if inspect.isclass(obj):
        lines += [f".. autoclass:: {name}", "   :members:"]
    elif callable(obj):
        lines += [f".. autofunction:: {name}"]
    else:
        lines += [f".. autodata:: {name}", "   :no-value:"]
    return "\n".join(lines) + "\n"


def write_api_stubs(srcdir: Path) -> None:
    """One page per public object; pages of objects no longer public are removed. Unchanged pages are not
    touched, so Sphinx's incremental build re-reads only what changed."""
    out = srcdir / GENERATED
    out.mkdir(exist_ok=True)
    wanted: dict[str, str] = {}
    for module in PUBLIC_MODULES:
        for name in public_names(module):
            wanted[f"pixgene.{module}.{name}.rst"] = _stub(module, name)
    for path in out.glob("pixgene.*.rst"):
        if path.name not in wanted:
            path.unlink()
    for fname, text in wanted.items():
        path = out / fname
        if not path.exists() or path.read_text() != text:
            path.write_text(text)


def sync_notebooks(srcdir: Path) -> None:
    """Copy ``../notebooks/*.ipynb`` into ``notebooks/`` (Sphinx reads documents inside its source folder
    only); copies of notebooks that are gone are removed, unchanged ones left alone."""
    src, dst = srcdir.parent / "notebooks", srcdir / "notebooks"
    dst.mkdir(exist_ok=True)
    wanted = {p.name: p for p in sorted(src.glob("*.ipynb"))}
    for path in dst.glob("*.ipynb"):
        if path.name not in wanted:
            path.unlink()
    for name, path in wanted.items():
        target = dst / name
        if not target.exists() or target.read_bytes() != path.read_bytes():
            shutil.copy2(path, target)


def write_benchmarks(srcdir: Path) -> None:
    sys.path.insert(0, str(srcdir))
    try:
        import make_benchmarks
    finally:
        sys.path.remove(str(srcdir))
    make_benchmarks.main([])


def on_config_inited(app, config) -> None:
    srcdir = Path(app.srcdir)
    write_api_stubs(srcdir)
    sync_notebooks(srcdir)
    write_benchmarks(srcdir)


class PixgeneApi(SphinxDirective):
    """An autosummary table of ``pixgene.<module>.__all__``, linking to the generated stub pages."""

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        module = self.arguments[0]
        # MyST syntax: the directive is used in MyST pages, whose nested_parse reads Markdown
        lines = [
            f"```{{currentmodule}} pixgene.{module}",
            "```",
            "",
            "```{autosummary}",
            f":toctree: {GENERATED}",
            ":nosignatures:",
            "",
            *public_names(module),
            "```",
            "",
            "```{currentmodule} pixgene",
            "```",
        ]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source=f"<pixgene-api {module}>"), self.content_offset,
                                container)
        return container.children


class PixgeneCliHelp(SphinxDirective):
    """The ``--help`` of ``pixgene`` or one of its sub-commands, as the installed parser prints it."""

    optional_arguments = 1
    option_spec = {"width": directives.positive_int}

    def run(self) -> list[nodes.Node]:
        from pixgene import cli

        argv = [*self.arguments, "--help"]
        buffer = io.StringIO()
        old = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = str(self.options.get("width", 100))
        try:
            with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
                cli.main(argv)
        finally:
            if old is None:
                del os.environ["COLUMNS"]
            else:
                os.environ["COLUMNS"] = old
        text = buffer.getvalue().rstrip()
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


def always_outdated(app, env, added, changed, removed) -> list[str]:
    """Pages that use this module's directives are read again at every build: what they show comes from the
    code (a module's ``__all__``, the parser), which Sphinx does not watch."""
    docs = []
    for docname in env.found_docs:
        path = Path(env.doc2path(docname))
        if path.suffix == ".md" and "{pixgene-" in path.read_text(encoding="utf-8"):
            docs.append(docname)
    return docs


def setup(app):
    app.connect("config-inited", on_config_inited)
    app.connect("env-get-outdated", always_outdated)
    app.add_directive("pixgene-api", PixgeneApi)
    app.add_directive("pixgene-cli-help", PixgeneCliHelp)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
