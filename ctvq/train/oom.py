"""Out of memory during training: one line with what to change and where training resumes.

A CUDA OOM is ``torch.OutOfMemoryError``; a CPU one is a ``RuntimeError`` from the default allocator ("can't
allocate memory"). Either becomes ``TrainingOutOfMemory``: the step's data size, ``ctvq plan``'s patch for a
budget 20 % under the predicted peak (the prediction evidently did not fit here), and the latest complete
checkpoint, from which the same command resumes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ctvq.config.schema import CTVQConfig

SHRINK = 0.8  # the patch aims this far under the prediction that just failed to fit


class TrainingOutOfMemory(Exception):
    """Training ran out of device or host memory; the message says what to change."""


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def device_memory_mb(device: torch.device) -> float | None:
    """Total memory of the CUDA device, or of this machine for CPU training."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**20
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError):
        return None


def _resume_point(ckpt_dir: Path, ema_rates: tuple[float, ...]) -> str:
    from ctvq.train.checkpoint import complete_steps, model_path

    steps = complete_steps(ckpt_dir, ema_rates) if ckpt_dir.is_dir() else []
    if not steps:
        return "no checkpoint yet: the same command starts again from the beginning"
    return f"the same command resumes from {model_path(ckpt_dir, steps[-1])} (step {steps[-1]})"


def _advice(cfg: CTVQConfig, config_file: Path, data: Path, device: torch.device) -> str:
    from ctvq.train import plan

    if not data.is_file():
        return f"run `ctvq plan --config {config_file} --data <manifest.csv>` for the patch that fits"
    cases = plan.case_sizes(data, resolution=cfg.dataset.resolution)
    predicted = plan.predict_training_peak(cfg, cases).peak_mb
    total = device_memory_mb(device)
    budget = min(predicted * SHRINK, total) if total is not None else predicted * SHRINK
    patch, _, fitted = plan.fitting_patch(plan.predictor(config_file, cases), budget)
    where = f"ctvq plan predicts {predicted / 1024:.2f} GiB"
    if fitted is None:
        return f"{where}; no remedy of the reference gets it {1 - SHRINK:.0%} lower: use a larger device"
    return (f"{where}; for {budget / 1024:.2f} GiB merge {json.dumps(plan.nested(patch))} into {config_file} "
            f"(predicted {fitted.peak_mb / 1024:.2f} GiB)")


def out_of_memory_error(exc: BaseException, cfg: CTVQConfig, config_file: Path, data: Path, run_dir: Path,
                        device: torch.device) -> TrainingOutOfMemory:
    """The one-line error that replaces an out-of-memory traceback."""
    what = "CUDA" if isinstance(exc, torch.OutOfMemoryError) and device.type == "cuda" else "host"
    asked = re.search(r"tried to allocate ([^.;(]+?(?:bytes|[KMGT]i?B))", str(exc), re.IGNORECASE)
    first = f"could not allocate {asked.group(1)}" if asked else type(exc).__name__
    try:
        advice = _advice(cfg, config_file, data, device)
    except (ValueError, OSError) as err:  # the advice must never hide the out-of-memory error itself
        advice = f"(no plan: {err})"
    resume = _resume_point(run_dir / "ckpts", cfg.trainer.ema_rate)
    return TrainingOutOfMemory(f"out of {what} memory ({first}); {advice}; {resume}")


__all__ = ["TrainingOutOfMemory", "device_memory_mb", "is_out_of_memory", "out_of_memory_error"]
