"""``ctvq eval`` orchestration: encode -> tokens -> decode every case, compare with its input, write results.

Per case the input field is the decoder's supervision over the case's latent cells (band SDF, truncated sign
elsewhere) and the reconstruction is the decoded field of the same cells, decoded from the code indices
(the token path, honouring ``chunk_size``). Outputs:
- ``metrics.json``: flat numbers for ``dvc metrics show``. Every ok case of a manifest is evaluated, whatever
  its split, and reported per split: ``val/occupancy_iou``, ``train/chamfer_l1_mm``, ``test/...`` (means
  over that split's cases; codebook usage/perplexity over its tokens). ``eval_split`` names the headline
  split: ``val``, else ``test``, else ``train`` (no held-out case: those are training-case numbers, and the
  summary says so). The unprefixed keys (``occupancy_iou``, ``num_cases``, ...) are the same metrics over
  all evaluated cases together, splits mixed: kept for older readers, not the number to quote.
  ``cases.csv`` beside it: one row per case, with its ``split``.
- ``figures/<case>.png`` (slices with both surfaces), ``meshes/<case>_{input,recon}.ply`` (patient mm),
  ``training_curves.{png,csv}`` when a training log is given or found in the checkpoint's run folder.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctvq.atomic import atomic_output, atomic_write_text
from ctvq.ct.case_id import case_id_problem
from ctvq.ct.sample import (
    FigurePlanes,
    SparseSample,
    band_centre,
    decoder_targets,
    load_figure_planes,
    load_sample,
)
from ctvq.ct.splits import SPLITS
from ctvq.ct.volume_file import load_windowed
from ctvq.data.datasets import DatasetError, peek_band_and_iso, peek_sample, read_case_records
from ctvq.eval.figures import save_case_figure, training_curves
from ctvq.eval.loading import DataSettings, EvalInputError, LoadedModel, run_config_path
from ctvq.eval.metrics import (
    DEFAULT_POINTS,
    code_histogram,
    codebook_stats,
    occupancy_iou,
    sdf_mae,
    surface_distances,
    voxel_edge_mm,
)
from ctvq.eval.surfaces import (
    DenseBox,
    Mesh,
    bounding_box,
    box_surface,
    collapse_reason,
    dense_box,
    write_ply,
)
from ctvq.eval.tokens import cell_voxels, decode_tokens, encode_sample

TRAIN_LOG_NAME = "metrics.csv"
HEADLINE_ORDER = ("val", "test", "train")  # the first split evaluated is the one metrics.json headlines


@dataclass
class CaseEvaluation:
    metrics: dict[str, Any]
    counts: np.ndarray  # code histogram of this case
    input_box: DenseBox
    recon_box: DenseBox
    input_mesh: Mesh
    recon_mesh: Mesh
    seconds: dict[str, float] = field(default_factory=dict)


def compare_fields(sample: SparseSample, rec_coords: np.ndarray, rec_values: np.ndarray
                   ) -> tuple[DenseBox, DenseBox, dict[str, float]]:
    """Input and reconstruction on one box; band SDF error and occupancy IoU (see ``metrics``)."""
    in_coords = cell_voxels(sample.latent_coords)
    in_values = decoder_targets(sample).reshape(-1)
    lo, shape = bounding_box(in_coords, rec_coords)
    input_box = dense_box(in_coords, in_values, lo, shape)
    recon_box = dense_box(rec_coords, rec_values, lo, shape)
    band_pred, band_known = recon_box.lookup(sample.coords)
    if not band_known.all():
        raise RuntimeError(f"{sample.case_id}: {np.count_nonzero(~band_known)} band voxels were not decoded; "
                           "the decoder must emit every voxel of the encoded latent cells")
    mae_vox = sdf_mae(band_pred, sample.sdf, sample.band)
    region = input_box.known & recon_box.known
    iou = occupancy_iou(recon_box.values[region] < 0, input_box.values[region] < 0)
    return input_box, recon_box, {
        "sdf_mae_vox": mae_vox,
        "sdf_mae_mm": mae_vox * voxel_edge_mm(sample.affine),
        "occupancy_iou": iou,
    }


def evaluate_case(loaded: LoadedModel, sample: SparseSample, *, points: int = DEFAULT_POINTS,
                  seed: int = 0) -> CaseEvaluation:
    """All metrics of one case; ``seconds`` holds the time of each part (encode, decode, fields, ...)."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = now - clock
        clock = now

    tokens = encode_sample(loaded, sample)
    lap("encode")
    rec_coords, rec_values = decode_tokens(loaded, tokens, what=sample.case_id)
    lap("decode")
    input_box, recon_box, field_metrics = compare_fields(sample, rec_coords, rec_values)
    lap("field_metrics")
    input_mesh = box_surface(input_box, sample.affine)
    recon_mesh = box_surface(recon_box, sample.affine)
    lap("marching_cubes")
    surface = surface_distances(recon_mesh.vertices, recon_mesh.faces, input_mesh.vertices, input_mesh.faces,
                                points=points, seed=seed, voxel_mm=voxel_edge_mm(sample.affine))
    lap("surface_distances")
    counts = code_histogram(tokens.indices, tokens.num_embeddings)
    metrics: dict[str, Any] = {
        "case_id": sample.case_id,
        "num_points": sample.num_points,
        "tokens": tokens.num_tokens,
        "decoded_voxels": int(rec_coords.shape[0]),
        **field_metrics,
        **surface,
        **codebook_stats(counts),
        "input_faces": input_mesh.num_faces,
        "recon_faces": recon_mesh.num_faces,
    }
    metrics["collapsed"] = collapse_reason(recon_box, recon_mesh.num_faces, metrics["occupancy_iou"],
                                           input_mesh.num_faces) is not None
    return CaseEvaluation(metrics, counts, input_box, recon_box, input_mesh, recon_mesh, seconds)


@dataclass(frozen=True)
class EvalCase:
    """One case to evaluate: its sample file, the split the manifest gives it, and its case id where the
    manifest names it (a bare sample file or folder is known only once loaded: None)."""

    path: Path
    split: str
    case_id: str | None = None


def eval_cases(data: str | os.PathLike, splits: Sequence[str] | None = None) -> list[EvalCase]:
    """A manifest CSV (its 'ok' rows of every split, or of ``splits``), a folder of sample ``.npz`` files,
    or one sample file. A folder or a file has no split: its cases count as train."""
    data = Path(data)
    if data.is_dir():
        paths = sorted(data.glob("*.npz"))
        if not paths:
            raise EvalInputError(f"{data}: folder holds no sample .npz files")
        cases = [EvalCase(p, "train") for p in paths]
    elif data.suffix.lower() == ".csv":
        try:
            records = read_case_records(data)
        except DatasetError as exc:
            raise EvalInputError(str(exc)) from exc
        cases = [EvalCase(r.path, r.split, r.case_id) for r in records if r.status == "ok"]
        if not cases:
            raise EvalInputError(f"{data}: no case with status 'ok' in the manifest")
    elif data.is_file():
        cases = [EvalCase(data, "train")]
    else:
        raise EvalInputError(f"{data}: no such manifest, folder or sample file")
    if splits is None:
        return cases
    chosen = [c for c in cases if c.split in splits]
    if not chosen:
        have = ", ".join(f"{s} {sum(c.split == s for c in cases)}" for s in SPLITS)
        raise EvalInputError(f"{data}: no ok case in split {', '.join(splits)} (ok cases by split: {have}); "
                             "choose another --split")
    return chosen


def sample_paths(data: str | os.PathLike) -> list[Path]:
    """The sample files `eval_cases` finds in ``data`` (every split)."""
    return [case.path for case in eval_cases(data)]


def aggregate(cases: Sequence[dict[str, Any]], counts: np.ndarray) -> dict[str, float | int | None]:
    """Means over cases of every per-case number; codebook usage/perplexity over all tokens together.

    A metric a case lacks (no reconstructed surface: no distances) is averaged over the cases that have it;
    ``cases_without_recon_surface`` says how many lacked one; a metric no case has is None (JSON null).
    """
    skip = {"case_id", "split", "codebook_usage", "perplexity", "collapsed"}
    out: dict[str, float | int | None] = {"num_cases": len(cases)}
    for key in cases[0]:
        if key in skip:
            continue
        values = [c[key] for c in cases if c[key] is not None]
        out[key if key != "tokens" else "tokens_per_case"] = float(np.mean(values)) if values else None
    out["cases_without_recon_surface"] = sum(1 for c in cases if c["recon_faces"] == 0)
    out["collapsed_cases"] = sum(1 for c in cases if c["collapsed"])
    out.update(codebook_stats(counts))
    out["case_codebook_usage"] = float(np.mean([c["codebook_usage"] for c in cases]))
    out["case_perplexity"] = float(np.mean([c["perplexity"] for c in cases]))
    return out


def headline_split(present: Sequence[str]) -> str:
    """The split whose numbers are quoted: val, else test, else train (no held-out case at all)."""
    return next(s for s in HEADLINE_ORDER if s in present)


def split_metrics(cases: Sequence[dict[str, Any]], counts: Sequence[np.ndarray]
                  ) -> dict[str, str | float | int | None]:
    """``eval_split``, then ``<split>/<metric>`` per split present (headline split first), then the flat
    keys: the same metrics over every evaluated case together, splits mixed (what older readers expect)."""
    present = [s for s in SPLITS if any(c["split"] == s for c in cases)]
    eval_split = headline_split(present)
    out: dict[str, str | float | int | None] = {"eval_split": eval_split}
    for split in sorted(present, key=lambda s: (s != eval_split, SPLITS.index(s))):
        chosen = [i for i, c in enumerate(cases) if c["split"] == split]
        summary = aggregate([cases[i] for i in chosen], np.sum([counts[i] for i in chosen], axis=0))
        out.update({f"{split}/{key}": value for key, value in summary.items()})
    out.update(aggregate(cases, np.sum(counts, axis=0)))
    return out


def windowed_path_for(sample_path: Path, windowed_dir: Path | None) -> Path:
    """A sample's windowed volume: ``windowed_dir/<name>``, or the demo layout's ``../windowed/<name>``."""
    folder = windowed_dir if windowed_dir is not None else sample_path.parent.parent / "windowed"
    return folder / sample_path.name


def _json_number(value: float | int | None) -> float | int | None:
    """JSON has no NaN/inf: an undefined number is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _checked_cases(data: str | os.PathLike, settings: DataSettings, splits: Sequence[str] | None
                   ) -> list[EvalCase]:
    """Every case, its sample's header checked against the checkpoint's settings before any evaluation
    starts; the samples themselves are loaded one at a time (at 1024³ one can take gigabytes)."""
    cases = eval_cases(data, splits)
    for case in cases:
        head = peek_sample(case.path)
        band, _ = peek_band_and_iso(case.path)
        settings.check_sample(head.window, head.window_width, head.window_level, head.resolution, band,
                              str(case.path))
    return cases


def _write_case_outputs(result: CaseEvaluation, case: EvalCase, sample: SparseSample, output_dir: Path, *,
                        meshes: bool, figures: bool, windowed_dir: Path | None) -> None:
    """The case's PLY meshes and slice figure (over its windowed volume when one is found)."""
    problem = case_id_problem(sample.case_id)
    if problem is not None:  # a crafted id such as ../../x would write outside output_dir
        raise EvalInputError(f"{case.path}: case id {sample.case_id!r} cannot name output files: {problem}; "
                             "rebuild the sample with a plain --case-id")
    name = sample.case_id
    if meshes:
        write_ply(result.input_mesh, output_dir / "meshes" / f"{name}_input.ply")
        write_ply(result.recon_mesh, output_dir / "meshes" / f"{name}_recon.ply")
    if figures:
        planes = figure_planes_for(case.path, sample, windowed_dir)
        centre = planes.centre if planes is not None else band_centre(sample.coords)
        keys = ("sdf_mae_mm", "chamfer_l1_mm", "fscore_1mm", "occupancy_iou")
        summary = {k: result.metrics[k] for k in keys}
        save_case_figure(output_dir / "figures" / f"{name}.png", name, result.input_box, result.recon_box,
                         centre, sample.resolution, planes, summary)


def figure_planes_for(path: Path, sample: SparseSample, windowed_dir: Path | None) -> FigurePlanes | None:
    """The CT behind a case's figure: the sample's own planes, else (samples made before they were stored)
    the planes of its windowed volume when one is found; None without either."""
    planes = load_figure_planes(path)
    if planes is None:
        windowed = windowed_path_for(path, windowed_dir)
        if windowed.is_file():
            planes = FigurePlanes.of(load_windowed(windowed).values, band_centre(sample.coords))
    return planes


def warn_if_collapsed(result: CaseEvaluation) -> None:
    """One loud stderr line for a collapsed case (also when ``quiet``): its surface metrics are undefined or
    meaningless and its others describe a model that learned nothing, which a mean would hide."""
    if not result.metrics["collapsed"]:
        return
    m = result.metrics
    reason = collapse_reason(result.recon_box, m["recon_faces"], m["occupancy_iou"], m["input_faces"])
    print(f"ctvq eval: WARNING: collapse: case {m['case_id']}: {reason}; the checkpoint has likely collapsed "
          "(look for 'WARNING: collapse:' in its training log)", file=sys.stderr, flush=True)


def _print_case(number: int, total: int, split: str, result: CaseEvaluation) -> None:
    m = result.metrics
    chamfer = "n/a" if m["chamfer_l1_mm"] is None else f"{m['chamfer_l1_mm']:.3f} mm"
    print(f"ctvq eval: [{number}/{total}] {m['case_id']} ({split}): sdf MAE {m['sdf_mae_mm']:.3f} mm, "
          f"IoU {m['occupancy_iou']:.3f}, Chamfer-L1 {chamfer}, {m['tokens']} tokens "
          f"({sum(result.seconds.values()):.1f} s)", file=sys.stderr, flush=True)


def _fmt(value: float | None, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.3f}{unit}"


def print_summary(summary: dict[str, Any], data: str | os.PathLike) -> None:
    """One line per split, headline first; a loud line when there is no held-out case to quote."""
    for split in sorted(SPLITS, key=lambda s: s != summary["eval_split"]):
        if f"{split}/num_cases" not in summary:
            continue
        m = {k.split("/", 1)[1]: v for k, v in summary.items() if k.startswith(f"{split}/")}
        print(f"ctvq eval: {split} ({m['num_cases']} cases): IoU {_fmt(m['occupancy_iou'])}, Chamfer-L1 "
              f"{_fmt(m['chamfer_l1_mm'], ' mm')} ({_fmt(m['chamfer_l1_vox'], ' voxel')}), F@1 voxel "
              f"{_fmt(m['fscore_1vox'])}, sdf MAE {_fmt(m['sdf_mae_mm'], ' mm')}", file=sys.stderr)
    if summary["eval_split"] == "train":
        where = "" if Path(data).suffix.lower() == ".csv" else " (a folder or sample file has no split)"
        print(f"ctvq eval: no held-out cases: these are TRAINING-case metrics{where}", file=sys.stderr)


def _write_json(values: dict[str, Any], path: Path) -> None:
    atomic_write_text(path, json.dumps(values, indent=2) + "\n")


def run_evaluation(loaded: LoadedModel, settings: DataSettings, data: str | os.PathLike,
                   metrics_json: str | os.PathLike, output_dir: str | os.PathLike, *,
                   points: int = DEFAULT_POINTS, seed: int = 0, meshes: bool = True, figures: bool = True,
                   windowed_dir: str | os.PathLike | None = None,
                   train_logs: Sequence[str | os.PathLike] = (), curves_csv: str | os.PathLike | None = None,
                   quiet: bool = False, splits: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate every ok case of ``data`` (of ``splits`` only, if given); write metrics.json (per split,
    see `split_metrics`), cases.csv (with each case's split), figures, meshes and curves."""
    output_dir = Path(output_dir)
    windowed = Path(windowed_dir) if windowed_dir is not None else None
    checked = _checked_cases(data, settings, splits)
    cases: list[dict[str, Any]] = []
    counts: list[np.ndarray] = []
    for number, case in enumerate(checked, start=1):
        sample = load_sample(case.path)
        result = evaluate_case(loaded, sample, points=points, seed=seed)
        warn_if_collapsed(result)
        cases.append({"case_id": sample.case_id, "split": case.split, **result.metrics})
        counts.append(result.counts)
        _write_case_outputs(result, case, sample, output_dir, meshes=meshes, figures=figures,
                            windowed_dir=windowed)
        if not quiet:
            _print_case(number, len(checked), case.split, result)
    summary_metrics = {k: _json_number(v) for k, v in split_metrics(cases, counts).items()}
    _write_json(summary_metrics, Path(metrics_json))
    output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(output_dir / "cases.csv") as tmp:
        pd.DataFrame(cases).to_csv(tmp, index=False)
    own = run_config_path(loaded.path).parent / TRAIN_LOG_NAME
    logs = [Path(p) for p in train_logs] if train_logs else ([own] if own.is_file() else [])
    if logs:
        training_curves(logs, output_dir / "training_curves.png",
                        output_dir / "training_curves.csv" if curves_csv is None else curves_csv)
    if not quiet:
        print_summary(summary_metrics, data)
    return summary_metrics


__all__ = ["CaseEvaluation", "EvalCase", "aggregate", "compare_fields", "eval_cases", "evaluate_case",
           "headline_split", "print_summary", "run_evaluation", "sample_paths", "split_metrics",
           "windowed_path_for"]
