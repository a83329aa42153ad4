"""Stop requests: SIGTERM (SLURM preemption, ``scancel``, ``kill``) and SIGUSR1 (SLURM's ``--signal`` warning
before the time limit) make the trainer finish its step, save a checkpoint and exit, so a requeued job
resumes from that step instead of the last periodic save."""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingInterrupted(Exception):  # noqa: N818 (not an error: a requested stop)
    """Raised by the trainer after it saved the checkpoint of ``step`` on a stop request."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum = signum
        self.step = step

    @property
    def exit_code(self) -> int:
        """128 + the signal: what a process killed by it reports, so a workflow never counts it done."""
        return 128 + self.signum


class StopRequests:
    """``with StopRequests() as stop:`` records the first stop signal in ``stop.signum``; the previous
    handlers come back on exit. Outside the main thread (handlers cannot be installed there) nothing is
    caught and the signals keep their default effect."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()


__all__ = ["STOP_SIGNALS", "StopRequests", "TrainingInterrupted"]
