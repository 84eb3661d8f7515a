"""Where the bundled public datasets live on disk, and whether their files are the ones we expect."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from .._core.validate import fail

logger = logging.getLogger(__name__)

#: environment variable naming the folder that holds the dataset folders (her2st/, st_mob/, ...)
DATA_DIR_ENV = "PIXGENE_DATA_DIR"
#: folder searched for in every parent of the search starts (the project's ``../shared/data``)
SHARED_DATA = Path("shared") / "data"

# Verified hashes keyed by (path, mtime, size): hashing is the slow part of a repeated load, and a file that
# changes on disk changes its mtime or size, which sends it through verification again.
_VERIFIED: dict[tuple[str, int, int], str] = {}


def search_starts() -> list[Path]:
    """Folders whose parents are searched for ``shared/data``: the working directory, then this package."""
    return [Path.cwd(), Path(__file__).resolve().parent]


def candidate_dirs() -> tuple[list[Path], list[str]]:
    """Data folders to try, in order, and a human-readable description of every place searched."""
    candidates: list[Path] = []
    searched: list[str] = []
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        candidates.append(Path(env).expanduser())
        searched.append(f"${DATA_DIR_ENV}={env}")
    else:
        searched.append(f"${DATA_DIR_ENV} (not set)")
    for start in search_starts():
        start = start.resolve()
        for folder in (start, *start.parents):
            candidate = folder / SHARED_DATA
            if candidate.is_dir() and candidate not in candidates:
                candidates.append(candidate)
        searched.append(f"a '{SHARED_DATA.as_posix()}' folder in {start} or any of its parents")
    return candidates, searched


def dataset_dir(name: str) -> Path:
    """The folder of dataset ``name`` (e.g. ``"her2st"``): the first data folder that contains it."""
    candidates, searched = candidate_dirs()
    for root in candidates:
        if (root / name).is_dir():
            return root / name
    found = ", ".join(str(c) for c in candidates) or "none"
    fail(
        f"dataset {name!r}",
        f"its folder was not found; searched {' and '.join(searched)} (data folders found: {found})",
        f"Set ${DATA_DIR_ENV} to the folder that contains '{name}/', or run from a project whose parent "
        f"has '{SHARED_DATA.as_posix()}/{name}/'",
    )
    raise AssertionError("unreachable")  # fail() always raises; this keeps type checkers content


def sha256_of(path: Path, *, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: Path, expected_sha256: str) -> Path:
    """Check ``path`` exists and has the expected SHA-256; an unchanged file verified before is not hashed."""
    path = Path(path)
    if not path.is_file():
        fail(
            f"file {str(path)!r}",
            "is missing from the dataset folder",
            "Restore the dataset folder from its original release (see the data folder's README.md)",
        )
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if _VERIFIED.get(key) == expected_sha256:
        return path
    actual = sha256_of(path)
    if actual != expected_sha256:
        fail(
            f"file {str(path)!r}",
            f"its SHA-256 checksum is {actual}, expected {expected_sha256}: the file is corrupt, truncated "
            "or a different version",
            "Restore the original file from the dataset's release (see the data folder's README.md)",
        )
    _VERIFIED[key] = actual
    logger.debug("verified %s", path)
    return path


def verify_files(root: Path, checksums: dict[str, str], names: Iterable[str]) -> list[Path]:
    """Verify ``root / name`` for each name against ``checksums[name]``; returns the paths in order."""
    return [verify_file(root / name, checksums[name]) for name in names]
