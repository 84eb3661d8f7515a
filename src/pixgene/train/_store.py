"""One resumable store for every long job that can stop and go on: a fit's members, the encoded training tiles
a feature cache shares between fits, and denoise's folds.

A store is a directory of finished pieces. Each piece is a payload file and a JSON record beside it that holds
the fingerprint of everything the piece depends on; the payload is written first and the record last, each
atomically, so a record marks a complete piece. A piece with the same fingerprint is loaded instead of being
computed again; one with another fingerprint is never overwritten: the job stops before any work, naming the
directory.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._core.validate import fail

logger = logging.getLogger(__name__)


def require_directory(what: str, path: str | os.PathLike) -> None:
    """Fail unless ``path`` is a directory or does not exist yet (``what``: the argument, e.g. checkpoint_dir)."""
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"{what} {str(path)!r}", "is a file, not a directory", "Pass a directory (it is created if missing)")


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``: readers see the old file or the whole new one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


class ResumableStore:
    """The finished pieces in ``path`` (a directory, or not there yet: created at the first piece written).

    Parameters
    ----------
    path
        The directory.
    argument
        The argument that named it (``"checkpoint_dir"``, ``"feature_cache"``), for error messages.
    """

    def __init__(self, path: str | os.PathLike, *, argument: str) -> None:
        require_directory(argument, path)
        self.path = Path(path)
        self.argument = argument

    def _fail(self, problem: str, fix: str) -> None:
        fail(f"{self.argument} {str(self.path)!r}", problem, fix)

    def payload(self, name: str, suffix: str) -> Path:
        """The payload file of piece ``name``."""
        return self.path / f"{name}{suffix}"

    def record(self, name: str, suffix: str) -> dict | None:
        """Piece ``name``'s record, or None when it is not finished (no record yet)."""
        meta = self.path / f"{name}.json"
        if not meta.is_file():
            return None
        try:
            record = json.loads(meta.read_text())
        except (OSError, ValueError):
            self._fail(f"{meta.name} is not readable JSON", f"Delete {name}'s files to compute it again, or pass "
                       "another directory")
        if not self.payload(name, suffix).is_file():
            self._fail(f"{meta.name} has no {self.payload(name, suffix).name}",
                       f"Delete {name}'s files to compute it again, or pass another directory")
        return record

    def finished(self, name: str, suffix: str, fingerprint: str, what: str) -> dict | None:
        """Piece ``name``'s record when it was finished with ``fingerprint``; None when there is none yet. A
        piece of another job (another fingerprint) stops the job: ``what`` says what it holds (e.g. "member 0
        of another fit")."""
        record = self.record(name, suffix)
        if record is not None and record.get("fingerprint") != fingerprint:
            self._fail(f"holds {what} (other data, genes, settings, seed or pixgene version)",
                       "Pass a new or empty directory, or the data and settings of that run to resume it")
        return record

    def save(self, name: str, suffix: str, fingerprint: str, write: Callable[[Path], None],
             record: dict[str, Any] | None = None, *, default: Callable | None = None) -> None:
        """Write piece ``name``: the payload with ``write(path)``, then its record (``record`` and the
        fingerprint), each atomically."""
        (self.path / name).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.payload(name, suffix), write)
        text = json.dumps({**(record or {}), "fingerprint": fingerprint}, indent=1, default=default)
        write_atomically(self.path / f"{name}.json", lambda tmp: tmp.write_text(text))
