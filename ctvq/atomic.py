"""Atomic outputs and one-line file-system errors: the one way every ctvq writer puts a file on disk.

A failed or killed step must never leave a partial file where a finished one is expected. Writers get a
temporary folder next to the target (same file system, so ``os.replace`` is atomic), write the final file
names inside it, and the files are moved into place only after the writer returned normally. Multi-file
formats (MHD header + raw data) keep their internal references because names do not change. The temporary
folder is named after the target, this host and this process, so a later write of the same target removes
the folders a killed process left behind (never one of a live process).

Failures of the file system itself (no space, read-only or unwritable folder, a folder where a file should
go) become one-line ``FileSystemError``s naming the path and the fix. ``describe_os_error`` is the same text
for an OSError raised anywhere else; the command line prints it instead of a traceback.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ctvq.processes import host_name, pid_alive

_FIXES = {
    errno.ENOSPC: "no space left on the device; free some space or write to another disk",
    errno.EDQUOT: "disk quota exceeded; free some space or write to another disk",
    errno.EACCES: "permission denied; choose a path you may use",
    errno.EPERM: "permission denied; choose a path you may use",
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.EISDIR: "a folder is in the way; give a file name, not a folder",
    errno.ENOTDIR: "part of the path is a file, not a folder; choose another path",
    errno.ENAMETOOLONG: "the path is too long; choose a shorter one",
    errno.ENOENT: "no such file or folder; check the path",
    errno.EEXIST: "it exists already; remove it or choose another path",
    errno.ENOMEM: "the process is out of memory, not the disk; see `ctvq plan` for a config that fits",
    errno.EIO: "input/output error: the disk or network file system failed; check it and run again",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n) or use fewer workers",
}


class FileSystemError(ValueError):
    """The file system refused a read or write; the message names the path, the reason and the fix."""


def describe_os_error(exc: OSError, path: str | os.PathLike | None = None, action: str = "write") -> str:
    """``<path>: cannot <action> (<reason>): <fix>``: one line for any OSError."""
    where = path if path is not None else (exc.filename if exc.filename is not None else "?")
    reason = exc.strerror or str(exc) or type(exc).__name__
    fix = _FIXES.get(exc.errno if exc.errno is not None else -1, "check the path and the disk")
    return f"{where}: cannot {action} ({reason}): {fix}"


def file_system_error(path: str | os.PathLike, exc: OSError, action: str = "write the output"
                      ) -> FileSystemError:
    """The ``FileSystemError`` for an OSError raised while writing (or reading) ``path``."""
    return FileSystemError(describe_os_error(exc, path, action))


def incomplete_write_error(path: str | os.PathLike) -> FileSystemError:
    """For writers that swallow their I/O errors (ITK's NIfTI writer) and leave a short file instead."""
    return FileSystemError(f"{path}: cannot write the output (the written file is incomplete: disk full?): "
                           "free some space or write to another disk")


@contextmanager
def translated_os_errors(path: str | os.PathLike, action: str = "write the output") -> Iterator[None]:
    """Turn OSErrors that carry an errno (real file-system failures) into ``FileSystemError``; others pass."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None:
            raise
        raise file_system_error(path, exc, action) from exc


def _owner_tag() -> str:
    return f"{host_name()}-{os.getpid()}"


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Delete the temporary files and folders of writes to ``target`` whose process (on this host) is dead.

    Names are ``.<target name>.<host>-<pid>.<random>.tmp``; those of other hosts or of live processes stay.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return []
    host = host_name()
    removed = []
    for item in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        owner = item.name[len(target.name) + 2:].split(".")[0]
        owner_host, _, pid = owner.rpartition("-")
        if owner_host != host or not pid.isdigit() or pid_alive(int(pid)):
            continue
        remove_temporary(item)
        removed.append(item)
    return removed


def remove_temporary(item: Path) -> None:
    """Delete one temporary file or folder (a folder's contents too; a link, not what it points to)."""
    if item.is_dir() and not item.is_symlink():
        shutil.rmtree(item, ignore_errors=True)
    else:
        item.unlink(missing_ok=True)


def _check_parents(target: Path) -> None:
    """A file where a folder of the path should be: say which (mkdir's "File exists" does not)."""
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FileSystemError(f"{target}: cannot write: {parent} is a file, not a folder; "
                                      "choose another path")
            return


def _temporary_folder(target: Path) -> Path:
    _check_parents(target)
    with translated_os_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.{_owner_tag()}.", suffix=".tmp",
                                     dir=target.parent))


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path named like ``path``; move it (and its siblings) into place on success.

    Every file the writer creates in the temporary folder is moved next to ``path``; the data files first and
    ``path`` itself last, so a reader that sees ``path`` sees complete data.
    """
    target = Path(path)
    if target.is_dir():
        raise FileSystemError(f"{target}: is a folder, not a file; give a file name for the output")
    tmp_dir = _temporary_folder(target)
    try:
        with translated_os_errors(target):
            yield tmp_dir / target.name
            produced = sorted(tmp_dir.iterdir(), key=lambda p: p.name == target.name)
            if not any(p.name == target.name for p in produced):
                raise FileNotFoundError(f"{target}: the writer produced no file")
            for item in produced:
                _fsync_file(item)
                os.replace(item, target.parent / item.name)
            _fsync_dir(target.parent)
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
    tmp_dir = _temporary_folder(target)
    try:
        with translated_os_errors(target):
            yield tmp_dir
            for item in tmp_dir.iterdir():
                _fsync_file(item)
            if target.exists():
                target.rmdir()
            os.chmod(tmp_dir, 0o777 & ~_umask())  # mkdtemp made it 0700
            os.replace(tmp_dir, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    if path.is_file():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make the renames durable (a crash right after must not lose them); a no-op where unsupported."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = [
    "FileSystemError",
    "atomic_directory",
    "atomic_output",
    "atomic_write_bytes",
    "atomic_write_text",
    "describe_os_error",
    "file_system_error",
    "incomplete_write_error",
    "remove_stale_temporaries",
    "remove_temporary",
    "translated_os_errors",
]
