"""Predict the peak memory of a training step and of `ctvq eval`, and the change that makes them fit.

The prediction is a small physical model with coefficients fitted to ``bench/memory.py`` (CPU, fp32; the
fit and its error table: ``python bench/memory.py --fit``):

    peak MB = base + 4 B x parameters + trainable_bytes x trainable parameters (gradients, AdamW's two
              moments and the step's temporaries: 12 B in theory, fitted)
              + (input points + decoded voxels) x (per_voxel + per_channel x full-resolution channels)

The step's data size is its largest micro-batch: ``batch_size_per_gpu / batch_split`` of the manifest's
largest training cases after the ``max_points`` crop, whose latent cells follow each case's points per cell.
The decoder decodes all 512 children of every latent cell it sees, so decoded voxels, not input points,
dominate on sparse surfaces. ``use_checkpoint`` has its own pair of coefficients: with it, a voxel costs
about the same at every width (the loss terms dominate; width 256 and 512 differ by their parameters only);
without it, the sdf blocks' activations are kept and grow with their channels.

When the prediction exceeds the budget, ``fitting_patch`` walks the configuration reference's order
(chunk_size, batch_size_per_gpu, max_points, model_channels / num_blocks, batch_split), after
use_checkpoint, each step a config patch with what it costs, until the prediction fits; a remedy the model
says would not lower this config's peak (checkpointing a narrow model, say) is passed over.

Evaluation (``predict_eval_peak``, fitted by ``python bench/memory.py --fit-eval``) decodes whole cases
without gradients:

    peak MB = base + weight_bytes x parameters
              + voxels of the largest decoding chunk with its halo x (per_voxel + per_channel x channels)
              + box_voxel_bytes x voxels of the dense box the metrics and meshes are made on

over the manifest's largest cases. Its remedy is ``ctvq eval --chunk-size`` (``fitting_eval_chunk_size``):
chunked decoding gives the same output, where a config ``chunk_size`` would also change stage-2 training.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctvq.config.schema import CTVQConfig
from ctvq.ct.sample import LATENT_STRIDE

LATENT_CHILDREN = LATENT_STRIDE**3  # decoded voxels per latent cell (512): the decoder never prunes

# Fitted by `python bench/memory.py --fit bench/results/memory.json bench/results/memory_check.json
# --validation "scenario lowmem"` (CPU, each run's own peak RSS, fp32): 31 runs of 8 configs, worst error
# 7.5 %; the scenario lowmem config (not fitted) within 10.2 %.
COEFFICIENTS: dict[str, float] = {
    "base_mb": 439.75,
    "trainable_bytes": 12.70,
    "voxel_kb_checkpoint": 0.7188,
    "channel_kb_checkpoint": -0.0036,
    "voxel_kb": 0.4452,
    "channel_kb": 0.0295,
}

# `ctvq eval` (CPU, each run's own peak RSS, fp32), fitted by `python bench/memory.py --fit-eval
# bench/results/memory_eval.json bench/results/memory_eval_512.json` (non-negative, relative error): 24 runs
# of 7 configs, phantoms at 64-256^3 and a real CT at 512^3, worst error 12.1 %.
EVAL_COEFFICIENTS: dict[str, float] = {
    "base_mb": 379.9,
    "weight_bytes": 4.274,
    "chunk_voxel_kb": 0.6265,
    "chunk_channel_kb": 0.0073,
    "box_voxel_bytes": 22.45,
}


@dataclass(frozen=True)
class CaseSize:
    """A case's size as the manifest records it: band voxels (points) and occupied latent cells."""

    case_id: str
    points: int
    latent: int

    def cropped(self, max_points: int) -> CaseSize:
        """After the training crop: whole latent cells holding about ``max_points`` points."""
        if self.points <= max_points:
            return self
        return CaseSize(self.case_id, max_points, max(1, math.ceil(self.latent * max_points / self.points)))


@dataclass(frozen=True)
class StepData:
    """The largest micro-batch of a training step."""

    samples: int
    points: int
    latent: int

    @property
    def decoded(self) -> int:
        return self.latent * LATENT_CHILDREN


@dataclass(frozen=True)
class EvalCaseSize:
    """What evaluating one case holds at once: its latent cells (all decoded), the cells of its largest
    decoding chunk with their halo, and the voxels of the dense box its metrics and meshes are made on."""

    case_id: str
    cells: int
    chunk_cells: int
    box_voxels: int


@dataclass(frozen=True)
class Prediction:
    peak_mb: float
    parts: dict[str, float]
    data: StepData | EvalCaseSize


def case_sizes(manifest: str | os.PathLike, splits: Sequence[str] = ("train",),
               resolution: int | None = None) -> list[CaseSize]:
    """The ok cases of ``splits`` in a manifest (training reads the train split only). With ``resolution``,
    a manifest made at another resolution is refused (training would refuse its samples)."""
    from ctvq.ct.manifest import read_manifest

    table = read_manifest(manifest)
    missing = {"case_id", "num_points", "num_latent", "status"} - set(table.columns)
    if missing:
        raise ValueError(f"{manifest}: not a ctvq manifest (no {', '.join(sorted(missing))} column); "
                         "pass the CSV that `ctvq manifest` wrote")
    rows = table[table["status"] == "ok"]
    if "split" in table.columns:
        rows = rows[rows["split"].isin(list(splits))]
    if resolution is not None and "resolution" in rows.columns:
        other = sorted({int(r) for r in rows["resolution"]} - {resolution})
        if other:
            raise ValueError(f"{manifest}: samples at resolution {other[0]}, but the config trains at "
                             f"dataset.args.resolution {resolution}; plan at theirs with --resolution "
                             f"{other[0]} (as `ctvq train --resolution` trains), or with a manifest of that "
                             "resolution")
    sizes = [CaseSize(str(r.case_id), int(r.num_points), int(r.num_latent)) for r in rows.itertuples()]
    if not sizes:
        raise ValueError(f"{manifest}: no ok cases in the {'/'.join(splits)} split to plan for")
    return sizes


def largest_micro_batch(cfg: CTVQConfig, cases: Sequence[CaseSize]) -> StepData:
    """The ``batch_size_per_gpu / batch_split`` largest cases after the crop: the worst micro-batch."""
    if not cases:
        raise ValueError("no cases to plan for: the manifest has no ok training rows")
    t, d = cfg.trainer, cfg.dataset
    per_micro = max(1, math.ceil(t.batch_size_per_gpu / t.batch_split))
    cropped = sorted((c.cropped(d.max_points) for c in cases), key=lambda c: c.points, reverse=True)
    chosen = [cropped[i % len(cropped)] for i in range(per_micro)]
    return StepData(per_micro, sum(c.points for c in chosen), sum(c.latent for c in chosen))


def parameter_counts(cfg: CTVQConfig) -> tuple[int, int]:
    """(all, trainable) parameters of the config's model in its training stage, counted on the meta device
    (no memory is allocated)."""
    import torch

    from ctvq.models.vqvae import SparseSDFVQVAE

    with torch.device("meta"):
        model = SparseSDFVQVAE(**cfg.model.to_dict()["args"])
    model.freeze_for_stage(cfg.stage, cfg.trainer.stage1_mode)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


REQUEST_MARGIN = 1.25  # requested = prediction x margin: the fits' worst errors on their own runs are 10-15 %
MIN_REQUEST_MB = 1000


def request_mb(peak_mb: float) -> int:
    """The memory to ask a scheduler for: the prediction with a 25 % margin, rounded up to 100 MB, at least
    1000 MB."""
    return max(MIN_REQUEST_MB, math.ceil(peak_mb * REQUEST_MARGIN / 100) * 100)


def eval_case_size(case_id: str, latent_coords: np.ndarray, resolution: int, chunk_size: int) -> EvalCaseSize:
    """The sizes `ctvq eval` works with on one case, from its latent cells (``resolution``: the latent
    grid's). The chunks are the decoder's own plan (`ctvq.models.chunking.plan_chunks`)."""
    import torch

    from ctvq.models.chunking import plan_chunks

    cells = np.asarray(latent_coords, dtype=np.int64).reshape(-1, 3)
    if cells.shape[0] == 0:
        raise ValueError(f"{case_id}: no latent cells to evaluate")
    chunk_cells = cells.shape[0]
    if chunk_size > 1:
        coords = torch.zeros((cells.shape[0], 4), dtype=torch.int64)
        coords[:, 1:] = torch.from_numpy(cells)
        chunk_cells = max(int(c.halo_rows.numel()) for c in plan_chunks(coords, resolution, chunk_size))
    # the box of every decoded voxel, one voxel of padding per side (ctvq.eval.surfaces.bounding_box)
    edges = (cells.max(axis=0) - cells.min(axis=0) + 1) * LATENT_STRIDE + 2
    return EvalCaseSize(case_id, int(cells.shape[0]), chunk_cells, int(np.prod(edges)))


def largest_eval_cases(manifest: str | os.PathLike, resolution: int, largest: int = 4
                       ) -> list[tuple[str, np.ndarray]]:
    """(case id, latent cells) of the ``largest`` ok cases of a manifest by band voxels, every split (`ctvq
    eval` evaluates them all); a manifest at another ``resolution`` than the config's is refused."""
    from pathlib import Path

    from ctvq.data.datasets import read_case_records

    records = [r for r in read_case_records(Path(manifest)) if r.status == "ok"]
    if not records:
        raise ValueError(f"{manifest}: no ok cases to evaluate")
    other = sorted({r.resolution for r in records} - {resolution})
    if other:
        raise ValueError(f"{manifest}: samples at resolution {other[0]}, but the config decodes "
                         f"dataset.args.resolution {resolution}; plan at theirs with --resolution "
                         f"{other[0]}, or with a manifest of that resolution")
    cases = []
    for record in sorted(records, key=lambda r: r.num_points or 0, reverse=True)[:largest]:
        with np.load(record.path) as data:
            cases.append((record.case_id, data["latent_coords"]))
    return cases


def eval_sizes(cfg: CTVQConfig, cases: Sequence[tuple[str, np.ndarray]], chunk_size: int | None = None
               ) -> list[EvalCaseSize]:
    """The evaluation sizes of ``cases`` (see `largest_eval_cases`) under ``cfg``'s chunking, or under
    ``chunk_size`` (`ctvq eval --chunk-size`)."""
    chunk = cfg.model.chunk_size if chunk_size is None else chunk_size
    return [eval_case_size(case_id, latent, cfg.model.resolution, chunk) for case_id, latent in cases]


def predict_eval_peak(cfg: CTVQConfig, cases: Sequence[EvalCaseSize],
                      coefficients: Mapping[str, float] = EVAL_COEFFICIENTS,
                      total_parameters: int | None = None) -> Prediction:
    """Peak memory (MB) of `ctvq eval` with ``cfg``'s model: the worst of ``cases``. No gradients; the
    decoder holds one chunk's voxels (with halo) at a time; the case's decoded field, its dense box and
    meshes stay until its metrics and figure are written, and cost in proportion to the box (a per-decoded-
    voxel term fitted to zero beside it)."""
    if not cases:
        raise ValueError("no cases to plan evaluation for")
    total = total_parameters if total_parameters is not None else parameter_counts(cfg)[0]
    per_voxel_kb = (coefficients["chunk_voxel_kb"]
                    + coefficients["chunk_channel_kb"] * full_resolution_channels(cfg))
    worst: Prediction | None = None
    for case in cases:
        parts = {
            "process": coefficients["base_mb"],
            "weights": coefficients["weight_bytes"] * total / 2**20,
            "decoding (largest chunk)": per_voxel_kb * case.chunk_cells * LATENT_CHILDREN / 1024.0,
            "dense box (metrics, meshes)": coefficients["box_voxel_bytes"] * case.box_voxels / 2**20,
        }
        prediction = Prediction(sum(parts.values()), parts, case)
        if worst is None or prediction.peak_mb > worst.peak_mb:
            worst = prediction
    assert worst is not None
    return worst


def full_resolution_channels(cfg: CTVQConfig) -> int:
    from ctvq.models.encoder import sdf_block_channels

    return sdf_block_channels(cfg.model.model_channels, cfg.model.sdf_channels)[0]


def predict_training_peak(cfg: CTVQConfig, cases: Sequence[CaseSize],
                          coefficients: Mapping[str, float] = COEFFICIENTS,
                          counts: tuple[int, int] | None = None) -> Prediction:
    """Peak memory (MB) of one training step of ``cfg`` on the largest micro-batch of ``cases``."""
    total, trainable = counts if counts is not None else parameter_counts(cfg)
    data = largest_micro_batch(cfg, cases)
    suffix = "_checkpoint" if cfg.model.use_checkpoint else ""
    per_voxel_kb = (coefficients["voxel_kb" + suffix]
                    + coefficients["channel_kb" + suffix] * full_resolution_channels(cfg))
    parts = {
        "process": coefficients["base_mb"],
        "weights": 4.0 * total / 2**20,
        "gradients and optimizer": coefficients["trainable_bytes"] * trainable / 2**20,
        "activations": per_voxel_kb * (data.points + data.decoded) / 1024.0,
    }
    return Prediction(sum(parts.values()), parts, data)


@dataclass(frozen=True)
class Remedy:
    key: str
    value: Any
    cost: str


def next_remedy(cfg: CTVQConfig, skip: frozenset[str] = frozenset()) -> Remedy | None:
    """The first remedy, in the configuration reference's order, that still has room in ``cfg`` (keys in
    ``skip`` are passed over)."""
    for remedy in _remedies(cfg):
        if remedy.key not in skip:
            return remedy
    return None


def _remedies(cfg: CTVQConfig) -> Iterator[Remedy]:
    m, d, t = cfg.model, cfg.dataset, cfg.trainer
    if not m.use_checkpoint:
        yield Remedy("models.vqvae.args.use_checkpoint", True,
                     "recomputes activations in the backward pass: slower steps")
    for c in (2, 4, 8):
        if m.chunk_size < c and m.resolution % c == 0:
            yield Remedy("models.vqvae.args.chunk_size", c,
                         "stage 2 supervises one random chunk per step: fewer voxels per step")
    if t.batch_size_per_gpu > 1:
        yield Remedy("trainer.args.batch_size_per_gpu", t.batch_size_per_gpu // 2,
                     "fewer cases per step: noisier gradients")
    if d.max_points > 20_000:
        yield Remedy("dataset.args.max_points", d.max_points // 2,
                     "smaller crops: a step sees less of a case")
    if m.model_channels > 64:
        yield Remedy("models.vqvae.args.model_channels", m.model_channels // 2,
                     "a narrower model: lower quality, and Direct3D-S2 weights no longer load")
    if m.num_blocks > 2:
        yield Remedy("models.vqvae.args.num_blocks", m.num_blocks // 2,
                     "a shallower model: lower quality, and Direct3D-S2 weights no longer load")
    if t.batch_split < t.batch_size_per_gpu:
        yield Remedy("trainer.args.batch_split", t.batch_size_per_gpu,
                     "the same batch in more micro-batches: slower steps, same gradients")


def predictor(config_file: str | os.PathLike, cases: Sequence[CaseSize], base: Mapping[str, Any] | None = None
              ) -> Callable[[dict[str, Any]], tuple[CTVQConfig, Prediction]]:
    """patch -> (the validated patched config, its prediction on ``cases``): what ``fitting_patch`` tries.

    ``base``: overrides under every patch that are not part of it (``ctvq plan --resolution``'s)."""
    from ctvq.config import load_config

    def predict(patch: dict[str, Any]) -> tuple[CTVQConfig, Prediction]:
        cfg = load_config(config_file, overrides={**(base or {}), **patch} or None)
        return cfg, predict_training_peak(cfg, cases)

    return predict


def fitting_patch(predict: Callable[[dict[str, Any]], tuple[CTVQConfig, Prediction]], budget_mb: float,
                  max_steps: int = 16) -> tuple[dict[str, Any], list[Remedy], Prediction | None]:
    """Add remedies to a dotted-key patch until ``predict(patch)`` fits ``budget_mb``.

    Returns (patch, remedies in the order applied, the fitting prediction or None when none fits).
    ``predict`` validates the patched config, so every patch returned is a valid config.
    """
    patch: dict[str, Any] = {}
    applied: list[Remedy] = []
    useless: set[str] = set()  # remedies that would not lower this config's prediction
    cfg, prediction = predict(patch)
    for _ in range(max_steps):
        if prediction.peak_mb <= budget_mb:
            return patch, applied, prediction
        remedy = next_remedy(cfg, frozenset(useless))
        if remedy is None:
            break
        trial = {**patch, remedy.key: remedy.value}
        if remedy.key == "trainer.args.batch_size_per_gpu" and cfg.trainer.batch_split > remedy.value:
            trial["trainer.args.batch_split"] = remedy.value  # batch_split must divide the batch
        trial_cfg, trial_prediction = predict(trial)
        if trial_prediction.peak_mb >= prediction.peak_mb:
            useless.add(remedy.key)
            continue
        patch, cfg, prediction = trial, trial_cfg, trial_prediction
        applied.append(remedy)
    return patch, applied, None


def fitting_eval_chunk_size(cfg: CTVQConfig, cases: Sequence[tuple[str, np.ndarray]], budget_mb: float,
                            start: int) -> tuple[int, Prediction] | None:
    """The smallest chunk count per axis from ``start`` (2, 4, 8, ... dividing the latent grid) at which
    `ctvq eval --chunk-size` fits ``budget_mb``: chunked decoding gives the same output, so evaluation's
    remedy is this flag, not a config change that would also change training. None when none fits."""
    chunk = start
    while chunk <= cfg.model.resolution:
        if cfg.model.resolution % chunk == 0:
            prediction = predict_eval_peak(cfg, eval_sizes(cfg, cases, chunk))
            if prediction.peak_mb <= budget_mb:
                return chunk, prediction
        chunk *= 2
    return None


def nested(patch: Mapping[str, Any]) -> dict[str, Any]:
    """A dotted-key patch as the nested JSON to merge into a config file."""
    out: dict[str, Any] = {}
    for dotted, value in patch.items():
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


__all__ = [
    "COEFFICIENTS",
    "CaseSize",
    "Prediction",
    "Remedy",
    "StepData",
    "EVAL_COEFFICIENTS",
    "EvalCaseSize",
    "eval_case_size",
    "fitting_eval_chunk_size",
    "eval_sizes",
    "largest_eval_cases",
    "largest_micro_batch",
    "parameter_counts",
    "predict_eval_peak",
    "predict_training_peak",
    "request_mb",
    "predictor",
    "fitting_patch",
    "nested",
    "next_remedy",
]
