"""The benchmarks use pixgene's public API and ``pixgene._bench`` alone, so that private modules can move.

``benchmarks/*.py`` may import ``pixgene``, ``pixgene.io``, ``pixgene.datasets``, ``pixgene.pp``, ``pixgene.tl``,
``pixgene.pl`` (and public names from them) and ``pixgene._bench``; every name they take from ``pixgene._bench``
is listed in its docstring and exists. Checked on the source with ``ast`` (function-level imports included)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PUBLIC = ("io", "datasets", "pp", "tl", "pl")
BENCH = "pixgene._bench"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _module_allowed(module: str) -> bool:
    """``pixgene``, ``pixgene.<public>`` or ``pixgene._bench``; no private part below them."""
    parts = module.split(".")
    if module == BENCH or parts == ["pixgene"]:
        return True
    return parts[1] in PUBLIC and not any(_private(p) for p in parts[2:])


def pixgene_imports(source: str, where: str = "<source>") -> tuple[list[str], list[str]]:
    """``(violations, bench_names)`` of a script's source: every import of pixgene other than its public API and
    ``pixgene._bench`` (``where:line what``), and every name the script takes from ``pixgene._bench``."""
    violations, bench_names, bench_aliases = [], [], set()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "pixgene":
                    continue
                if not _module_allowed(alias.name):
                    violations.append(f"{where}:{node.lineno} import {alias.name}")
                elif alias.name == BENCH and alias.asname:
                    bench_aliases.add(alias.asname)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "pixgene":
            names = [a.name for a in node.names]
            if not _module_allowed(node.module):
                violations.append(f"{where}:{node.lineno} from {node.module} import {', '.join(names)}")
            elif node.module == BENCH:
                bench_names += names
            elif node.module == "pixgene":
                for a in node.names:
                    if a.name == "_bench":
                        bench_aliases.add(a.asname or a.name)
                    elif a.name not in PUBLIC and a.name != "__version__":
                        violations.append(f"{where}:{node.lineno} from pixgene import {a.name}")
            else:
                violations += [f"{where}:{node.lineno} from {node.module} import {n}" for n in names if _private(n)]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name) \
                and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str) \
                and node.args[0].value.split(".")[0] == "pixgene" and not _module_allowed(node.args[0].value):
            violations.append(f"{where}:{node.lineno} import_module({node.args[0].value!r})")
    # pixgene._bench.<name> reached through the module itself (``from pixgene import _bench``)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bench_aliases:
            bench_names.append(node.attr)
    return sorted(violations, key=lambda v: int(v.split()[0].rsplit(":", 1)[1])), bench_names


def bench_listed() -> list[str]:
    """The names ``pixgene._bench``'s docstring lists (``- ``name``: ...`` lines)."""
    import pixgene._bench as bench

    return re.findall(r"^- ``(\w+)``", bench.__doc__, flags=re.MULTILINE)


SCRIPTS = sorted(BENCHMARKS.glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_benchmark_imports_only_the_public_api_and_bench(script):
    violations, _ = pixgene_imports(script.read_text(), script.name)
    assert violations == [], "import these through pixgene._bench (add the names there):\n" + "\n".join(violations)


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_benchmark_takes_only_listed_names_from_bench(script):
    import pixgene._bench as bench

    _, names = pixgene_imports(script.read_text(), script.name)
    listed = set(bench_listed())
    assert [n for n in names if n not in listed] == [], "list the name in pixgene._bench's docstring"
    assert [n for n in names if not hasattr(bench, n)] == []


def test_the_check_flags_private_imports():
    source = (
        "import pixgene as pg\n"
        "from pixgene.tl import fit\n"
        "from pixgene._bench import score_matrices\n"
        "def f():\n"
        "    from pixgene.data._reader import SlideReader\n"
        "    from pixgene.train import _plan\n"
        "    from pixgene.tl import _train\n"
        "    import pixgene.tl._fit as tf\n"
        "    from pixgene._core.normalize import log_normalize_np\n"
        "    from pixgene import nn, _bench\n"
        "    from pixgene.nn import build_encoder\n"
        "    importlib.import_module('pixgene.model._pixnet')\n"
        "    return _bench.training_plan\n"
    )
    violations, names = pixgene_imports(source, "x.py")
    assert [v.split()[0] for v in violations] == [f"x.py:{n}" for n in (5, 6, 7, 8, 9, 10, 11, 12)]
    assert names == ["score_matrices", "training_plan"]


def test_the_check_flags_names_bench_does_not_list():
    _, names = pixgene_imports("from pixgene._bench import score_matrices, not_listed_anywhere\n")
    assert [n for n in names if n not in set(bench_listed())] == ["not_listed_anywhere"]


def test_bench_lists_exactly_what_it_provides():
    import pixgene._bench as bench

    listed = bench_listed()
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(bench.__all__)
    pytest.importorskip("torch")
    assert [n for n in bench.__all__ if not hasattr(bench, n)] == []


def test_bench_imports_from_layer_packages_public_names():
    """``_bench`` itself imports public names of pixgene's layer packages and ``pixgene._core`` modules (its two
    documented exceptions are the string tables of names it imports on first use)."""
    import pixgene._bench as bench

    tree = ast.parse(Path(bench.__file__).read_text())
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pixgene"):
            parts = node.module.split(".")
            ok = (parts[1] == "_core" and len(parts) == 3) or (len(parts) == 2 and not _private(parts[1]))
            if not ok or any(_private(a.name) for a in node.names):
                bad.append(f"{node.lineno} {node.module}")
        elif isinstance(node, ast.Import) and any(a.name.startswith("pixgene") for a in node.names):
            bad.append(f"{node.lineno} import {node.names[0].name}")
    assert bad == []


def test_importing_bench_leaves_torch_unimported():
    code = ("import sys, pixgene._bench as b; b.log_normalize_np; b.score_matrices; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_score_matrices_scores_as_evaluate_does():
    from pixgene._bench import score_matrices
    from pixgene.tl._evaluate import score_matrices as evaluates

    rng = np.random.default_rng(0)
    pred, true = rng.gamma(2.0, size=(40, 5)), rng.gamma(2.0, size=(40, 5))
    true[:, 3] = 1.0  # a constant gene: no Pearson r
    genes = list("abcde")
    ours, theirs = score_matrices(pred, true, genes), evaluates(pred, true, genes)
    assert ours.summary == theirs.summary
    assert ours.per_gene.equals(theirs.per_gene)
    assert type(ours) is type(theirs)
