"""What a run reports: console lines, ``log.txt``, ``metrics.csv`` and TensorBoard events (rank 0 only).

A resumed run continues the same files: rows and events logged after the checkpoint it resumes from (work
that the restart repeats) are dropped, so every step appears once.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from collections import deque
from pathlib import Path
from typing import TextIO

from ctvq.atomic import atomic_output

METRICS_NAME = "metrics.csv"
LOG_NAME = "log.txt"
TENSORBOARD_DIR = "tensorboard"


def format_duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # nan / inf: unknown yet
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _open_csv(path: Path, mode: str = "r") -> TextIO:
    """metrics.csv as the csv module wants it (no newline translation), UTF-8 whatever the process locale."""
    return open(path, mode, newline="", encoding="utf-8")


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the header and the rows with step <= ``last_step``."""
    if not path.is_file():
        return
    with _open_csv(path) as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return
    kept = [rows[0], *(r for r in rows[1:] if r and int(r[0]) <= last_step)]
    with atomic_output(path) as tmp, _open_csv(tmp, "w") as fh:
        csv.writer(fh).writerows(kept)


class RateMeter:
    """Steps per second since this process started training, and the ETA to ``total`` steps."""

    def __init__(self, start_step: int, total: int) -> None:
        self.start_step = start_step
        self.total = total
        self.t0 = time.perf_counter()

    def rate(self, step: int) -> float:
        elapsed = time.perf_counter() - self.t0
        done = step - self.start_step
        return done / elapsed if elapsed > 0 and done > 0 else float("nan")

    def eta(self, step: int) -> float:
        rate = self.rate(step)
        return (self.total - step) / rate if rate == rate and rate > 0 else float("nan")


class RunLog:
    """Console + log.txt + metrics.csv + TensorBoard. Every method is a no-op where ``enabled`` is False."""

    def __init__(self, output_dir: Path, *, enabled: bool, start_step: int, tensorboard: bool = True,
                 stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.output_dir = output_dir
        self.stream = stream if stream is not None else sys.stdout
        self.metrics_path = output_dir / METRICS_NAME
        self._writer = None
        self._columns: list[str] | None = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.metrics_path, start_step)
        if self.metrics_path.is_file():
            with _open_csv(self.metrics_path) as fh:
                header = next(csv.reader(fh), None)
            self._columns = header or None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError(
                    "TensorBoard logging needs the 'tensorboard' package: pip install tensorboard"
                ) from exc
            self._writer = SummaryWriter(str(output_dir / TENSORBOARD_DIR), purge_step=start_step + 1)

    def text(self, message: str, console: bool = True) -> None:
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.output_dir / LOG_NAME, "a", encoding="utf-8") as fh:
            fh.write(f"[{stamp}] {message}\n")
        if console:
            print(message, file=self.stream, flush=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One metrics.csv row and one TensorBoard point per value."""
        if not self.enabled:
            return
        if self._columns is None:
            self._columns = ["step", *sorted(values)]
            with _open_csv(self.metrics_path, "w") as fh:
                csv.writer(fh).writerow(self._columns)
        extra = sorted(set(values) - set(self._columns))
        if extra:
            self._add_columns(extra)
        with _open_csv(self.metrics_path, "a") as fh:
            csv.writer(fh).writerow([step, *(values.get(c, "") for c in self._columns[1:])])
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, step)

    def _add_columns(self, names: list[str]) -> None:
        """Widen metrics.csv for metrics that first appear mid-run (the collapse guard's, at ``i_sample``
        steps) or on resuming a run logged before they existed: earlier rows get empty cells."""
        with _open_csv(self.metrics_path) as fh:
            rows = list(csv.reader(fh))[1:]
        self._columns = [*(self._columns or ["step"]), *names]
        with atomic_output(self.metrics_path) as tmp, _open_csv(tmp, "w") as fh:
            csv.writer(fh).writerows([self._columns, *(r + [""] * len(names) for r in rows)])

    def warning(self, step: int, message: str) -> None:
        """A warning line in the log (console and log.txt) and, with TensorBoard on, as text at ``step``."""
        if not self.enabled:
            return
        self.text(message)
        if self._writer is not None:
            self._writer.add_text("warnings", message, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class LossEnds:
    """Mean loss of a run's first and last ``span`` steps, so a summary shows the trend of the curve rather
    than two single noisy steps (a flat, collapsed curve read "0.80 -> 0.16" from one step each).

    ``span`` = min(20, steps // 5), at least 1; non-finite losses (skipped overflow steps) are left out.
    """

    def __init__(self, steps: int) -> None:
        self.span = max(1, min(20, steps // 5))
        self.first: list[float] = []
        self.last: deque[float] = deque(maxlen=self.span)

    def add(self, loss: float) -> None:
        if not math.isfinite(loss):
            return
        if len(self.first) < self.span:
            self.first.append(loss)
        self.last.append(loss)

    @property
    def start(self) -> float:
        return sum(self.first) / len(self.first) if self.first else math.nan

    @property
    def end(self) -> float:
        return sum(self.last) / len(self.last) if self.last else math.nan

    def describe(self) -> str:
        return (f"loss (mean of first {len(self.first)} steps) {self.start:.5f} -> (last {len(self.last)}) "
                f"{self.end:.5f}")


__all__ = ["LOG_NAME", "METRICS_NAME", "TENSORBOARD_DIR", "LossEnds", "RateMeter", "RunLog",
           "format_duration", "truncate_metrics"]
