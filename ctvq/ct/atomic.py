"""Atomic outputs: a failed or killed step must never leave a partial file where a finished one is expected.

Writers get a temporary folder next to the target (same file system, so ``os.replace`` is atomic), write the
final file names inside it, and the files are moved into place only after the writer returned normally.
Multi-file formats (MHD header + raw data) keep their internal references because names do not change.

Failures of the file system itself (no space, read-only or unwritable folder, a folder where the file should
go) become one-line CTInputErrors naming the target and the fix; the temporary folder is always removed.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ctvq.ct.errors import CTInputError

_FIXES = {
    errno.ENOSPC: "no space left on the device; free some space or write to another disk",
    errno.EDQUOT: "disk quota exceeded; free some space or write to another disk",
    errno.EACCES: "the folder is not writable; choose a folder you may write to",
    errno.EPERM: "the folder is not writable; choose a folder you may write to",
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.EISDIR: "a folder is in the way; give a file name, not a folder",
    errno.ENOTDIR: "part of the folder path is a file; choose another output path",
    errno.ENAMETOOLONG: "the path is too long; choose a shorter one",
}


def write_error(target: str | os.PathLike, exc: OSError) -> CTInputError:
    """The one-line error for an OSError raised while writing ``target``: what failed and how to fix it."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    fix = _FIXES.get(exc.errno or -1, "check the output path and the disk")
    return CTInputError(f"{target}: cannot write the output ({reason}): {fix}")


@contextmanager
def _translated(target: Path) -> Iterator[None]:
    """Turn OSErrors that carry an errno (real file-system failures) into ``write_error``; others pass."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None:
            raise
        raise write_error(target, exc) from exc


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path named like ``path``; move it (and its siblings) into place on success.

    Every file the writer creates in the temporary folder is moved next to ``path``; the data files first and
    ``path`` itself last, so a reader that sees ``path`` sees complete data.
    """
    target = Path(path)
    if target.is_dir():
        raise CTInputError(f"{target}: is a folder, not a file; give a file name for the output")
    with _translated(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with _translated(target):
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
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target}: exists and is a file, not a folder; remove it or choose another")
    if target.is_dir() and any(target.iterdir()):
        raise FileExistsError(f"{target}: output folder exists and is not empty; remove it or choose another")
    with _translated(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with _translated(target):
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
