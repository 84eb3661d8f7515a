"""What a benchmark script records about its run, and how it writes its results."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def setup_logging() -> None:
    """The script's own progress at INFO; pixgene's at WARNING."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("pixgene").setLevel(logging.WARNING)


def started() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def machine() -> str:
    """Cores, torch and its threads, and the load average when the run started (a busy machine shows here)."""
    import torch

    return (f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"load average at start {os.getloadavg()[0]:.2f}")


def command(script: str) -> str:
    """The command line that ran ``script``, without ``--out`` (where the results went is not part of them)."""
    args, shown = sys.argv[1:], []
    skip = False
    for a in args:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            shown.append(a)
    return " ".join([f"python benchmarks/{script}", *shown])


def write(out: str | Path, name: str, result: dict, render: Callable[[dict], str]) -> None:
    """``<out>/<name>.json`` and the markdown table ``<out>/<name>.md``; prints the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(render(result))
    print(render(result))


def main(name: str, parser, run: Callable, render: Callable[[dict], str], script: str | None = None) -> None:
    """Parse ``parser``'s arguments (with ``--out``, default ``benchmarks/results``), run ``run(args)`` with the
    start time, machine and command recorded in its result, and write ``<out>/<name>.json`` and ``.md``
    (``script``: the script's file name when it is not ``<name>.py``)."""
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    setup_logging()
    when, where = started(), machine()
    result = run(args)
    result.update(command=command(script or f"{name}.py"), started=when, machine=where)
    write(args.out, name, result, render)
