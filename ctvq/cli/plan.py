"""``ctvq plan``: will this config's training step, and `ctvq eval` of its model, fit in memory on this
data, and if not, what patch does.

Exit 0: both fit as configured. Exit 1: one does not, and the printed JSON patch (merge it into the config)
makes both fit. Exit 2: bad input, or nothing in the reference's remedies makes it fit. ``--requests-out``
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

from ctvq.config import ConfigError, load_config

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
    p.add_argument("--memory", type=memory_mb, default=None,
                   help="the memory one training process may use, e.g. 24GiB (default: this machine's RAM)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where training runs (the model is calibrated on CPU; for cuda it prints a note)")
    p.add_argument("--patch-out", type=Path, default=None, help="also write the fitting patch (JSON) here")
    p.add_argument("--requests-out", type=Path, default=None,
                   help="write the memory requests (JSON: train_mem_mb, eval_mem_mb: the predictions "
                        "+ 25 %%, at least 1000 MB) for a scheduler; without --memory, no budget is checked")


def _gib(mb: float) -> str:
    return f"{mb / 1024:.2f} GiB"


def run_plan(a: argparse.Namespace) -> int:
    from ctvq.atomic import atomic_write_text
    from ctvq.train import plan

    cfg = load_config(a.config)
    cases = plan.case_sizes(a.data, resolution=cfg.dataset.resolution)
    latents = plan.largest_eval_cases(a.data, cfg.dataset.resolution)
    first = plan.predict_training_peak(cfg, cases)
    first_eval = plan.predict_eval_peak(cfg, plan.eval_sizes(cfg, latents))
    biggest = max(cases, key=lambda c: c.points)
    print(f"ctvq plan: {a.config} (stage {cfg.stage}) on {a.data}: {len(cases)} training cases, the largest "
          f"{biggest.case_id} with {biggest.points:,} points in {biggest.latent:,} latent cells")
    _report("training, as configured", first)
    _report("evaluation, as configured", first_eval)
    if cfg.stage == 1:
        print("  note: stage 1 is not in the fitted benchmark; its frozen parts keep no gradients or "
              "optimizer state, and their activations are counted as in stage 2 (an upper bound)")
    if a.device == "cuda":
        print("  note: not calibrated on a GPU yet: this is the CPU (fp32 RSS) model, whose process base is "
              "host memory on CUDA and which leaves out the CUDA context")
    if a.requests_out is not None:
        requests = {"config": str(a.config), "manifest": str(a.data),
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
    patch, applied, fitted = plan.fitting_patch(plan.predictor(a.config, cases), budget)
    fitted_eval = None
    if fitted is not None:
        patch, fitted_eval = plan.eval_chunk_patch(a.config, latents, budget, patch)
    if fitted is None or fitted_eval is None:
        tried = ", ".join(f"{k}={json.dumps(v)}" for k, v in patch.items()) or "nothing"
        what = "training" if fitted is None else "evaluation"
        peak = first.peak_mb if fitted is None else first_eval.peak_mb
        raise ValueError(f"{a.config}: {what}'s predicted {_gib(peak)} does not fit in {_gib(budget)}, and "
                         f"the reference's remedies do not make it fit (tried {tried}); use a machine with "
                         "more memory or a smaller resolution")
    print(f"does not fit in {_gib(budget)}; the reference's remedies, in order:")
    for remedy in applied:
        print(f"  {remedy.key} = {json.dumps(remedy.value)}: {remedy.cost}")
    chunk = patch.get("models.vqvae.args.chunk_size")
    if chunk is not None and all(r.key != "models.vqvae.args.chunk_size" for r in applied):
        print(f"  models.vqvae.args.chunk_size = {chunk}: evaluation decodes one chunk at a time (slower)")
    _report("training, with the patch", fitted)
    _report("evaluation, with the patch", fitted_eval)
    text = json.dumps(plan.nested(patch), indent=2)
    print("patch (merge into the config):")
    print(text)
    if a.patch_out is not None:
        atomic_write_text(a.patch_out, text + "\n")
        print(f"wrote {a.patch_out}")
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
