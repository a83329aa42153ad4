"""One trainer per run folder: ``<run>/run.lock`` names the holder (host, pid, start time).

Two trainers on one folder would interleave checkpoints and duplicate rows of metrics.csv. That happens
when a workflow is killed and rerun while its first trainer lives on, orphaned. The lock is a file created
exclusively; a second trainer refuses with one line naming the holder. A lock whose holder is dead (same
host, pid gone: a SIGKILL) is taken over. A lock of another host cannot be checked from here and is only
ever removed by hand, as the message says.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import TracebackType

from ctvq.processes import host_name, pid_alive

LOCK_NAME = "run.lock"
_ATTEMPTS = 50
_WRITE_GRACE_S = 2.0  # an unreadable lock younger than this is being written, not stale


class RunLockError(ValueError):
    """Another live trainer holds the run folder."""


class RunLock:
    """``with RunLock(folder) as lock:`` holds ``folder/run.lock``; ``lock.took_over`` names a dead
    holder whose lock was replaced (for the log)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.took_over: str | None = None
        self._created = False
        self._mine = {"host": host_name(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def __enter__(self) -> RunLock:
        self._created = not self.path.parent.exists()  # a start that fails leaves no empty folder behind
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(_ATTEMPTS):  # a dead holder's lock is removed, then created again exclusively
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released between our two looks
                if not holder and time.time() - self._age_base() < _WRITE_GRACE_S:
                    time.sleep(0.1)  # created an instant ago: its holder is still writing it
                    continue
                self._take_over_or_refuse(holder)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self._mine, fh)
            return self
        raise RunLockError(f"{self.path}: could not take the run lock (it keeps changing hands); is another "
                           "trainer starting on this folder?")

    def _age_base(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
            return holder if isinstance(holder, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return {}  # empty or half-written: a holder writing it now, or killed while writing it

    def _take_over_or_refuse(self, holder: dict) -> None:
        host, pid = holder.get("host"), holder.get("pid")
        here = host == self._mine["host"]
        if holder and not (here and isinstance(pid, int) and not pid_alive(pid)):
            where = "this host" if here else f"host {host}"
            raise RunLockError(
                f"{self.path.parent}: another trainer is using this run folder (pid {pid} on {where}, since "
                f"{holder.get('started')}); wait for it or stop it"
                + ("" if here else f"; if that job is gone, delete {self.path}")
            )
        self.took_over = (f"pid {pid} on {host}, since {holder.get('started')}" if holder
                          else "an unreadable lock")
        self.path.unlink(missing_ok=True)

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        holder = self._holder()
        mine = holder is not None and all(holder.get(k) == self._mine[k] for k in ("host", "pid"))
        if mine:
            self.path.unlink(missing_ok=True)
            if self._created and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()


__all__ = ["LOCK_NAME", "RunLock", "RunLockError"]
