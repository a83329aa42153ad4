"""Atomic outputs: a failed or killed step must never leave a partial file where a finished one is expected.

Writers get a temporary folder next to the target (same file system, so ``os.replace`` is atomic), write the
final file names inside it, and the files are moved into place only after the writer returned normally.
Multi-file formats (MHD header + raw data) keep their internal references because names do not change.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path named like ``path``; move it (and its siblings) into place on success.

    Every file the writer creates in the temporary folder is moved next to ``path``; the data files first and
    ``path`` itself last, so a reader that sees ``path`` sees complete data.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp_dir / target.name
        produced = sorted(tmp_dir.iterdir(), key=lambda p: p.name == target.name)
        if not any(p.name == target.name for p in produced):
            raise FileNotFoundError(f"{target}: the writer produced no file")
        for item in produced:
            _fsync_file(item)
            os.replace(item, target.parent / item.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``path`` (which must not exist or be empty) on success."""
    target = Path(path)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target}: output folder exists and is not empty; remove it or choose another")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp_dir
        for item in tmp_dir.iterdir():
            _fsync_file(item)
        if target.exists():
            target.rmdir()
        os.replace(tmp_dir, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    if path.is_file():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
