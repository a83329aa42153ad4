"""The run folder: resolved config, command line, and which checkpoint a (re)started run continues from.

Starting a run on a folder that already holds one resumes it (``--resume auto``). The resolved config must
then match the one the folder was started with, except for keys that only say how long or how verbosely to
train (``RESUMABLE_CHANGES``): resuming different settings under one folder would mix two experiments.
The same holds for the data: ``data.json`` records a fingerprint of the training cases, checked on resume.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctvq.atomic import atomic_write_text
from ctvq.train.checkpoint import CheckpointError, complete_steps, step_of

CONFIG_NAME = "config.json"
COMMAND_NAME = "command.txt"
RESUMABLE_CHANGES = frozenset(
    f"trainer.args.{k}"
    for k in ("max_steps", "max_epoch", "i_print", "i_log", "i_sample", "i_save", "i_ddpcheck",
              "disable_snapshot", "num_workers")
)


@dataclass(frozen=True)
class ResumePoint:
    ckpt_dir: Path
    step: int


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> leaf value (lists stay leaves)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two resolved configs, other than ``RESUMABLE_CHANGES``."""
    a, b = flatten(old), flatten(new)
    keys = sorted((set(a) | set(b)) - RESUMABLE_CHANGES - {"description"})
    return [f"{k}: {json.dumps(a.get(k))} -> {json.dumps(b.get(k))}" for k in keys if a.get(k) != b.get(k)]


def find_resume_point(output_dir: Path, resume: str, ema_rates: tuple[float, ...]) -> ResumePoint | None:
    """``auto``: the latest complete set in ``output_dir/ckpts`` (None: start fresh). ``never``: start fresh,
    refusing a folder that already holds checkpoints. Otherwise a checkpoint file of the set to resume."""
    ckpt_dir = output_dir / "ckpts"
    if resume == "auto":
        steps = complete_steps(ckpt_dir, ema_rates)
        return ResumePoint(ckpt_dir, steps[-1]) if steps else None
    if resume == "never":
        steps = complete_steps(ckpt_dir, ema_rates)
        if steps:
            raise CheckpointError(
                f"--resume never: {ckpt_dir} already holds checkpoints (latest step {steps[-1]}); choose a "
                "new --output-dir or use --resume auto"
            )
        return None
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"--resume {resume}: no such checkpoint file (or use auto / never)")
    step = step_of(path)
    if step not in complete_steps(path.parent, ema_rates):
        raise CheckpointError(
            f"--resume {resume}: the set of step {step} in {path.parent} is incomplete (misc, model and "
            "one EMA file per ema_rate are needed)"
        )
    return ResumePoint(path.parent, step)


def check_same_run(output_dir: Path, resolved: dict[str, Any]) -> None:
    """A folder that holds a run's config may only be resumed with the same settings."""
    path = output_dir / CONFIG_NAME
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); it records this folder's run") from exc
    changes = config_changes(old, resolved)
    if changes:
        raise CheckpointError(
            f"{output_dir} holds a run with other settings; resuming it with this config would mix two "
            "experiments. Use a new --output-dir. Differences: " + "; ".join(changes[:8])
            + (" ..." if len(changes) > 8 else "")
        )


DATA_NAME = "data.json"


def data_fingerprint(source: Path, records: Sequence[Any]) -> dict[str, Any]:
    """What a run trains on: the case ids, sample sizes and point counts, hashed (cheap on a 1000-case cohort:
    no sample is read). The same cases regenerated identically keep it; any added, removed or changed case
    changes it."""
    rows = sorted((r.case_id, _size(Path(r.path)), r.num_points) for r in records)
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    return {"source": str(source), "num_cases": len(rows), "sha256": digest,
            "cases": {case: [size, points] for case, size, points in rows}}


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def check_same_data(output_dir: Path, fingerprint: dict[str, Any], allow_change: bool) -> str | None:
    """A run folder resumes on the data it trained on; with ``allow_change`` a change is allowed and
    described (the returned text, for the log). Folders written before fingerprints existed pass."""
    path = output_dir / DATA_NAME
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        old_cases: dict[str, Any] = old["cases"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc}); it records the data this run trained on") from exc
    if old.get("sha256") == fingerprint["sha256"]:
        return None
    new_cases: dict[str, Any] = fingerprint["cases"]
    added = sorted(set(new_cases) - set(old_cases))
    removed = sorted(set(old_cases) - set(new_cases))
    changed = sorted(c for c in set(new_cases) & set(old_cases) if list(new_cases[c]) != list(old_cases[c]))
    parts = [f"{len(names)} {what} (e.g. {', '.join(names[:3])})"
             for names, what in ((added, "added"), (removed, "removed"), (changed, "changed")) if names]
    change = (f"the training data differ from the run's: {old.get('num_cases')} case(s) from "
              f"{old.get('source')} before, {fingerprint['num_cases']} from {fingerprint['source']} now; "
              + "; ".join(parts))
    if allow_change:
        return change
    raise CheckpointError(f"{output_dir}: {change}. Resuming would continue on other data than the "
                          "checkpoints learned from: use a new --output-dir, or --allow-data-change to "
                          "continue on the new data on purpose")


def write_data_fingerprint(output_dir: Path, fingerprint: dict[str, Any]) -> None:
    atomic_write_text(output_dir / DATA_NAME, json.dumps(fingerprint, indent=1) + "\n")


def git_revision() -> str:
    repo = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    return done.stdout.strip() if done.returncode == 0 else f"unavailable ({done.stderr.strip()[:100]})"


def write_run_files(output_dir: Path, resolved: dict[str, Any], argv: list[str] | None = None) -> None:
    """config.json (the resolved config) and command.txt (one line appended per start), atomically."""
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / CONFIG_NAME, json.dumps(resolved, indent=2) + "\n")
    argv = sys.argv if argv is None else argv
    command_file = output_dir / COMMAND_NAME
    previous = command_file.read_text(encoding="utf-8") if command_file.is_file() else ""
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')}  git {git_revision()}  {shlex.join(argv)}\n"
    atomic_write_text(command_file, previous + line)


__all__ = [
    "COMMAND_NAME",
    "CONFIG_NAME",
    "DATA_NAME",
    "RESUMABLE_CHANGES",
    "ResumePoint",
    "check_same_data",
    "check_same_run",
    "config_changes",
    "data_fingerprint",
    "find_resume_point",
    "flatten",
    "write_data_fingerprint",
    "write_run_files",
]
