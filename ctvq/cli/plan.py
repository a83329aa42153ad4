"""``ctvq plan``: will this config's training step, and `ctvq eval` of its model, fit in memory on this
data, and if not, what patch does.

Exit 0: both fit as configured. Exit 1: one does not: the printed JSON patch (merge it into the config)
makes training fit, and ``ctvq eval --chunk-size N`` (the same output) evaluation. Exit 2: bad input, or
nothing in the reference's remedies makes it fit. ``--requests-out``
writes the memory to request for each job (the workflow's mem_mb) whatever the budget; without
``--memory`` it then checks no budget (the machine planning is rarely the one training).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any

from ctvq.config import ConfigError, load_config, resolution_overrides

_UNITS = {"": 2**20, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}
EXPECTED_ERRORS = (ConfigError, ValueError)


def memory_mb(text: str) -> float:
    """``24GiB``, ``16 GB``, ``8000MB``, ``8000`` (MiB) -> MiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r}: give a size such as 24GiB, 16GB or 8000MB")
    return float(match.group(1)) * _UNITS[match.group(2).lower()] / 2**20


def machine_memory_mb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


def configure_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="the training config (JSON)")
    p.add_argument("--data", type=Path, required=True,
                   help="the manifest CSV training will read (its train split's largest cases count)")
    p.add_argument("--resolution", type=int, default=None,
                   help="plan the config at this data resolution, as `ctvq train --resolution` trains it")
    p.add_argument("--memory", type=memory_mb, default=None,
                   help="the memory one training process may use, e.g. 24GiB (default: this machine's RAM)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where training runs (the model is calibrated on CPU; for cuda it prints a note)")
    p.add_argument("--patch-out", type=Path, default=None, help="also write the fitting patch (JSON) here")
    p.add_argument("--eval-chunk-size", type=int, default=None, metavar="N",
                   help="plan evaluation as `ctvq eval --chunk-size N` runs it (default: the config's)")
    p.add_argument("--requests-out", type=Path, default=None,
                   help="write the memory requests (JSON: train_mem_mb, eval_mem_mb: the predictions "
                        "+ 25 %%, at least 1000 MB) for a scheduler; without --memory, no budget is checked")


def _gib(mb: float) -> str:
    return f"{mb / 1024:.2f} GiB"


def run_plan(a: argparse.Namespace) -> int:
    from ctvq.atomic import atomic_write_text
    from ctvq.train import plan

    base = resolution_overrides(a.resolution) if a.resolution is not None else {}
    cfg = load_config(a.config, overrides=base or None)
    eval_chunk = cfg.model.chunk_size if a.eval_chunk_size is None else a.eval_chunk_size
    if eval_chunk < 1 or cfg.model.resolution % eval_chunk:
        raise ValueError(f"--eval-chunk-size {eval_chunk}: must be >= 1 and divide the latent resolution "
                         f"{cfg.model.resolution} of {a.config}")
    cases = plan.case_sizes(a.data, resolution=cfg.dataset.resolution)
    latents = plan.largest_eval_cases(a.data, cfg.dataset.resolution)
    first = plan.predict_training_peak(cfg, cases)
    first_eval = plan.predict_eval_peak(cfg, plan.eval_sizes(cfg, latents, eval_chunk))
    biggest = max(cases, key=lambda c: c.points)
    print(f"ctvq plan: {a.config} (stage {cfg.stage}) on {a.data}: {len(cases)} training cases, the largest "
          f"{biggest.case_id} with {biggest.points:,} points in {biggest.latent:,} latent cells")
    _report("training, as configured", first)
    _report(f"evaluation, chunk_size {eval_chunk}", first_eval)
    if cfg.stage == 1 and cfg.trainer.stage1_mode == "codebook":
        print("  note: stage 1 trains the codebook only: nothing runs backward through the frozen encoder "
              "and decoder, whose activations are counted as in stage 2 (measured: 9-18 % over, an upper "
              "bound)")
    if a.device == "cuda":
        print("  note: not calibrated on a GPU yet: this is the CPU (fp32 RSS) model, whose process base is "
              "host memory on CUDA and which leaves out the CUDA context")
    if a.requests_out is not None:
        requests = {"config": str(a.config), "manifest": str(a.data), "eval_chunk_size": eval_chunk,
                    "train_peak_mb": round(first.peak_mb), "train_mem_mb": plan.request_mb(first.peak_mb),
                    "eval_peak_mb": round(first_eval.peak_mb),
                    "eval_mem_mb": plan.request_mb(first_eval.peak_mb)}
        atomic_write_text(a.requests_out, json.dumps(requests, indent=2) + "\n")
        print(f"requests: training {requests['train_mem_mb']} MB, evaluation {requests['eval_mem_mb']} MB; "
              f"wrote {a.requests_out}")
        if a.memory is None:
            return 0
    budget = a.memory if a.memory is not None else machine_memory_mb()
    if first.peak_mb <= budget and first_eval.peak_mb <= budget:
        print(f"fits in {_gib(budget)}")
        return 0
    print(f"does not fit in {_gib(budget)}")
    if first.peak_mb > budget:
        patch, applied, fitted = plan.fitting_patch(plan.predictor(a.config, cases, base), budget)
        if fitted is None:
            tried = ", ".join(f"{r.key}={json.dumps(r.value)}" for r in applied) or "nothing"
            raise ValueError(f"{a.config}: training's predicted {_gib(first.peak_mb)} does not fit in "
                             f"{_gib(budget)}, and the reference's remedies do not make it fit (tried "
                             f"{tried}); use a machine with more memory or a smaller resolution")
        print("training: the reference's remedies, in order:")
        for remedy in applied:
            print(f"  {remedy.key} = {json.dumps(remedy.value)}: {remedy.cost}")
        _report("training, with the patch", fitted)
        text = json.dumps(plan.nested(patch), indent=2)
        print("patch (merge into the config):")
        print(text)
        if a.patch_out is not None:
            atomic_write_text(a.patch_out, text + "\n")
            print(f"wrote {a.patch_out}")
        if a.eval_chunk_size is None:  # evaluation follows the patched config's chunking
            cfg = load_config(a.config, overrides={**base, **patch} or None)
            eval_chunk = cfg.model.chunk_size
            first_eval = plan.predict_eval_peak(cfg, plan.eval_sizes(cfg, latents, eval_chunk))
    if first_eval.peak_mb > budget:
        found = plan.fitting_eval_chunk_size(cfg, latents, budget, eval_chunk)
        if found is None:
            raise ValueError(f"{a.config}: evaluation's predicted {_gib(first_eval.peak_mb)} does not fit in "
                             f"{_gib(budget)} at any chunk_size; use a machine with more memory or a smaller "
                             "resolution")
        chunk, fitted_eval = found
        print(f"evaluation: run `ctvq eval --chunk-size {chunk}` (the same output, decoded in {chunk}^3 "
              f"chunks; slower), in the workflow evaluate.chunk_size: {chunk}")
        _report(f"evaluation, chunk_size {chunk}", fitted_eval)
    return 1


def _report(label: str, prediction: Any) -> None:
    from ctvq.train.plan import EvalCaseSize

    d = prediction.data
    parts = ", ".join(f"{name} {mb:,.0f} MB" for name, mb in prediction.parts.items())
    if isinstance(d, EvalCaseSize):
        what = (f"largest case {d.case_id}, {d.cells:,} latent cells, {d.chunk_cells:,} in its largest chunk "
                f"with halo, a {d.box_voxels:,}-voxel box")
    else:
        what = (f"micro-batch of {d.samples} case(s), {d.points:,} points, {d.latent:,} latent cells "
                f"({d.decoded:,} decoded voxels)")
    print(f"  {label}: {what}: {parts}; peak {_gib(prediction.peak_mb)}")
