"""The package's layering, checked on the source: cross-package imports go through packages' public names,
and public functions stay short. (``lint-imports`` checks the layer order itself, from pyproject.toml.)"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "pixgene"
PUBLIC_MODULES = ("io", "datasets", "pp", "tl", "pl")
MAX_PUBLIC_FUNCTION_LINES = 150


def _package_of(path: Path, src: Path) -> str:
    parts = path.relative_to(src).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def _resolve(path: Path, node: ast.ImportFrom, src: Path) -> str:
    if node.level == 0:
        return node.module or ""
    base = ["pixgene", *path.relative_to(src).parts[:-1]]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def cross_package_private_imports(src: Path = SRC) -> list[str]:
    """``file:line module names`` for every import that reaches into another pixgene package through a private
    module (``pixgene.data._geometry``) or takes a private name (``_as_list``); ``pixgene._core``, the shared
    bottom layer of public modules, is the one package imported by module."""
    found = []
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            parts = _resolve(path, node, src).split(".")
            if parts[0] != "pixgene" or len(parts) < 2 or parts[1] == _package_of(path, src):
                continue
            private_module = parts[1] != "_core" and any(p.startswith("_") for p in parts[2:])
            private_name = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            if private_module or private_name or (parts[1] == "_core" and len(parts) > 2 and
                                                  parts[2].startswith("_")):
                found.append(f"{path.relative_to(src)}:{node.lineno} {'.'.join(parts)} {[a.name for a in node.names]}")
    return found


def test_no_private_module_or_name_is_imported_across_packages():
    assert cross_package_private_imports() == []


def test_the_check_finds_a_private_import_across_packages(tmp_path):
    (tmp_path / "tl").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "tl" / "_x.py").write_text("from ..data._geometry import circle_weights\nfrom ..data import _y\n"
                                           "from ..data import ok\nfrom ._z import _same_package\n")
    found = cross_package_private_imports(tmp_path)
    assert [f.split()[0] for f in found] == ["tl/_x.py:1", "tl/_x.py:2"]


def _body_lines(func: ast.FunctionDef) -> int:
    body = func.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    return body[-1].end_lineno - body[0].lineno + 1 if body else 0


def public_function_lengths() -> dict[str, int]:
    """Lines of every public function of ``pg.io``, ``pg.datasets``, ``pg.pp``, ``pg.tl``, ``pg.pl`` (and the
    public methods of its classes), docstrings excluded."""
    import inspect
    import textwrap

    lengths = {}
    for name in PUBLIC_MODULES:
        module = importlib.import_module(f"pixgene.{name}")
        for attr in module.__all__:
            obj = getattr(module, attr)
            funcs = [obj] if inspect.isfunction(obj) else [
                m for k, m in vars(obj).items() if inspect.isfunction(m) and not k.startswith("_")
            ] if inspect.isclass(obj) else []
            for f in funcs:
                tree = ast.parse(textwrap.dedent(inspect.getsource(f)))
                lengths[f"pixgene.{name}.{attr}" + ("" if f is obj else f".{f.__name__}")] = _body_lines(tree.body[0])
    return lengths


def test_public_functions_are_short():
    lengths = public_function_lengths()
    assert "pixgene.tl.fit" in lengths and "pixgene.tl.PixNet.save" in lengths and lengths["pixgene.tl.fit"] > 10
    assert {k: v for k, v in lengths.items() if v >= MAX_PUBLIC_FUNCTION_LINES} == {}
