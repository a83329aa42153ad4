"""Checkpoint files: atomic writes, complete-set discovery for resuming, the final checkpoint, stage inputs.

Layout under ``<output>/ckpts/`` (TRELLIS's names): ``vqvae_step{step:07d}.pt`` (model),
``vqvae_ema{rate}_step{step:07d}.pt`` (one per EMA rate), ``misc_step{step:07d}.pt`` (optimizer, scheduler,
precision, clipper, data position, RNG). A set is written model first and misc last, each file through
``ctvq.atomic`` (temporary file, fsync, ``os.replace``), so a set whose misc file exists is complete: a kill
at any moment leaves the previous complete set loadable. ``final.pt`` is written when a run finishes.

Model and EMA files use Direct3D-S2's wrapper ``{'vae': state_dict, 'config': {'name', 'params'}}`` plus
``'ctvq': {'stage', 'step', 'kind', 'ema_rate'}``, so every one of them can be the next stage's
``pretrained_vae_path``. Trainable tensors are stored at full precision (fp32 masters under inflat_all).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctvq.atomic import atomic_output, file_system_error, remove_temporary
from ctvq.models.pretrained import LoadReport, PretrainedWeightsError, load_pretrained, load_torch_file

NAME = "vqvae"
FINAL_NAME = "final.pt"
_MISC = re.compile(r"^misc_step(\d{7})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint cannot be used for what was asked (wrong stage, incomplete set, other run)."""


# -- names -------------------------------------------------------------------------------------------------
def model_path(ckpt_dir: Path, step: int, name: str = NAME) -> Path:
    return ckpt_dir / f"{name}_step{step:07d}.pt"


def ema_path(ckpt_dir: Path, step: int, rate: float, name: str = NAME) -> Path:
    return ckpt_dir / f"{name}_ema{rate}_step{step:07d}.pt"


def misc_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"misc_step{step:07d}.pt"


def final_path(output_dir: Path) -> Path:
    """The stable path of a finished run's model (the workflow's stage-2 input)."""
    return output_dir / "ckpts" / FINAL_NAME


# -- atomic writes -----------------------------------------------------------------------------------------
def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through ``atomic_output``. torch reports a failed write (a full disk) as the
    RuntimeError "enforce fail at inline_container.cc", which never names the cause: the OSError it hides
    becomes the usual one-line FileSystemError."""
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        try:
            torch.save(obj, fh)
        except RuntimeError as exc:
            hidden = exc.__context__
            if isinstance(hidden, OSError) and hidden.errno is not None:
                raise file_system_error(path, hidden) from exc
            raise


def remove_stale_temp(ckpt_dir: Path) -> list[Path]:
    """Delete temporary files left by a write that was killed (they are never read)."""
    stale = sorted(ckpt_dir.glob(".*.tmp")) if ckpt_dir.is_dir() else []
    for path in stale:
        remove_temporary(path)
    return stale


# -- payloads ----------------------------------------------------------------------------------------------
def model_payload(state: Mapping[str, torch.Tensor], model_config: Mapping[str, Any], stage: int, step: int,
                  kind: str = "model", ema_rate: float | None = None) -> dict[str, Any]:
    return {
        "vae": {k: v.detach().cpu() for k, v in state.items()},
        "config": {"name": "SparseSDFVQVAE", "params": dict(model_config)},
        "ctvq": {"stage": int(stage), "step": int(step), "kind": kind, "ema_rate": ema_rate},
    }


def save_set(ckpt_dir: Path, step: int, model_file: dict[str, Any], ema_files: Mapping[float, dict[str, Any]],
             misc: dict[str, Any]) -> None:
    """One complete checkpoint set, misc last (its presence marks the set complete)."""
    atomic_torch_save(model_file, model_path(ckpt_dir, step))
    for rate, payload in ema_files.items():
        atomic_torch_save(payload, ema_path(ckpt_dir, step, rate))
    atomic_torch_save(misc, misc_path(ckpt_dir, step))


def complete_steps(ckpt_dir: Path, ema_rates: tuple[float, ...]) -> list[int]:
    """Steps whose misc, model and every EMA file exist, ascending."""
    if not ckpt_dir.is_dir():
        return []
    steps = []
    for path in ckpt_dir.iterdir():
        match = _MISC.match(path.name)
        if not match:
            continue
        step = int(match.group(1))
        needed = [model_path(ckpt_dir, step), *(ema_path(ckpt_dir, step, r) for r in ema_rates)]
        if all(p.is_file() for p in needed):
            steps.append(step)
    return sorted(steps)


def step_of(path: Path) -> int:
    """The step a checkpoint file name carries (``..._step0000123.pt``)."""
    match = re.search(r"_step(\d{7})\.pt$", Path(path).name)
    if not match:
        raise CheckpointError(f"{path}: not a checkpoint file name (expected *_stepNNNNNNN.pt)")
    return int(match.group(1))


def load_file(path: Path) -> dict[str, Any]:
    payload = load_torch_file(path, CheckpointError)
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(payload).__name__}")
    return payload


def ctvq_meta(path: Path) -> dict[str, Any] | None:
    """The ``ctvq`` block of a model file, or None for a file ctvq did not write (Direct3D-S2, raw)."""
    meta = load_file(path).get("ctvq")
    return dict(meta) if isinstance(meta, Mapping) else None


# -- stage inputs ------------------------------------------------------------------------------------------
def load_stage_input(model: nn.Module, path: Path, stage: int) -> LoadReport:
    """Initialise ``model`` for ``stage`` from ``pretrained_vae_path`` (strict; errors name the file).

    Stage 1 takes a Direct3D-S2 VAE file (encoder + decoder; the codebook keeps its initialisation).
    Stage 2 takes a checkpoint written by a ctvq stage-1 run and loads ALL of it, codebook included.
    """
    key = "trainer.args.pretrained_vae_path"
    if not path.is_file():
        raise CheckpointError(f"{key}: {path} does not exist")
    meta = ctvq_meta(path)
    if stage == 1 and meta is not None:
        raise CheckpointError(
            f"{key}: {path} is a ctvq stage-{meta.get('stage')} checkpoint; stage 1 starts from a "
            "Direct3D-S2 VAE file (or null). To continue from this checkpoint set training_stage 2"
        )
    if stage == 2:
        if meta is None:
            raise CheckpointError(
                f"{key}: {path} was not written by a ctvq stage-1 run (no 'ctvq' block, e.g. a Direct3D-S2 "
                "VAE file, which has no codebook); stage 2 starts from a stage-1 checkpoint such as "
                "<stage-1 output>/ckpts/final.pt"
            )
        if meta.get("stage") != 1:
            raise CheckpointError(
                f"{key}: {path} is a stage-{meta.get('stage')} checkpoint; stage 2 starts from a stage-1 one"
            )
    try:
        report = load_pretrained(model, path)
    except PretrainedWeightsError as exc:
        raise CheckpointError(f"{key}: {exc}") from exc
    if stage == 2 and not report.codebook_loaded:
        raise CheckpointError(f"{key}: {path} holds no codebook; stage 2 must start from the whole model")
    return report


__all__ = [
    "FINAL_NAME",
    "NAME",
    "CheckpointError",
    "atomic_torch_save",
    "complete_steps",
    "ctvq_meta",
    "ema_path",
    "final_path",
    "load_file",
    "load_stage_input",
    "misc_path",
    "model_path",
    "model_payload",
    "remove_stale_temp",
    "save_set",
    "step_of",
]
