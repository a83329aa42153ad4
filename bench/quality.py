"""Benchmark: tokenizer quality at a fixed training budget, per window x resolution x variant, held out.

Why: a config change (loss weighting, learning rate, codebook options) is only an improvement if held-out
reconstructions get better for the same number of steps. Each variant is trained with the real CLI
(`ctvq train` stage 1, then stage 2 from its ckpts/final.pt) on the train cases and scored with `ctvq eval`
on held-out cases only, phantom and real CT reported apart (phantoms alone flatter the model).

Data (preprocessed once per window and resolution into --work, reruns reuse it; delete the folder after a
preprocessing change): phantoms (`ctvq phantom` defaults, train seeds 0-5, held-out seeds 100-101) and,
when .cache/real-ct/ exists (scripts/fetch-real-ct.sh), real CT split BY PATIENT, since the package's files
are crops of one another: train = patient B (ts_aorta_ct and its two crops), held out = patient A
(ts_example_ct) and patient C (ts_dicom_ct). ts_example_ct_sm is left out: a sub-slab of ts_example_ct at the
same scale. Leave-one-patient-out would triple the cost for three patients.

Metrics, all ctvq eval's: occupancy IoU, Chamfer-L1 (mm and voxels), F-score at 1 mm and at 1 voxel, band
SDF MAE (voxels), codebook usage and perplexity (all held-out
tokens of the subset), collapsed cases (ctvq eval's: no reconstructed triangle, or IoU 0), steps, wall and
CPU minutes of training (getrusage of the child processes). A failing variant is recorded with its log tail.

Run-to-run spread: at the demo budget two trainings of one config that differ only in their seeds differ
by about as much as most config changes do (the shipped tiny configs over three seeds, lung 64³: held-out
phantom IoU 0.843-0.864, real CT 0.750-0.802; bench/results/quality_lung_repeats.json). ``--repeats N``
trains every variant N times with ``trainer.args.seed`` and ``dataset.args.seed`` set to 0..N-1 and prints
the mean and the range over the repeats next to the per-run rows; a difference inside the ranges is not a
result.

    .venv/bin/python bench/quality.py [--windows lung,bone,soft_tissue] [--resolutions 64,128]
        [--variants baseline,current] [--variant NAME=STAGE1.json,STAGE2.json[,PATCH.json]]
        [--variants-file FILE.json] [--steps N] [--stage1-steps N] [--curve-every K] [--repeats N]
        [--threads 2]
        [--work .cache/quality] [--output bench/results/quality.json]

Smoke scale: --windows bone --resolutions 64 --steps 20 --stage1-steps 5 --variants baseline (4 min on a
shared 2-core machine; training ~2 CPU-min). --data-only preprocesses and prints the targets' shares only.
Each manifest (train.csv, val_phantom.csv, val_real.csv) has an explicit ``split`` column, so ctvq's hash
split never moves a case between training and evaluation.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctvq.ct.band import default_band

ROOT = Path(__file__).resolve().parents[1]
TINY1, TINY2 = ROOT / "configs/vqvae/tiny_stage1.json", ROOT / "configs/vqvae/tiny_stage2.json"
DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    # the tiny configs as they were before the quality work (plain-mean loss, stage-1 codebook mode)
    "baseline": {"stage1": str(ROOT / "bench/variants/baseline_stage1.json"),
                 "stage2": str(ROOT / "bench/variants/baseline_stage2.json"), "patch": {}},
    "current": {"stage1": str(TINY1), "stage2": str(TINY2), "patch": {}},
}
REAL_TRAIN = ("ts_aorta_ct", "ts_aorta_ct_cropped", "ts_pulmonary_ct_cropped")  # patient B
REAL_VAL = ("ts_example_ct", "ts_dicom_ct")  # patients A and C
SUBSETS = ("phantom", "real")
TABLE_KEYS = ("occupancy_iou", "chamfer_l1_mm", "chamfer_l1_vox", "fscore_1vox", "fscore_1mm", "sdf_mae_vox",
              "codebook_usage", "perplexity")


@dataclass(frozen=True)
class Case:
    case_id: str
    scan: Path
    split: str  # train | val
    kind: str  # phantom | real


@dataclass(frozen=True)
class Variant:
    name: str
    stage1: Path
    stage2: Path
    patch: dict[str, Any] = field(default_factory=dict)


class Progress:
    """Elapsed time and an ETA from the mean duration of the finished jobs (a job: one variant's run)."""

    def __init__(self, jobs: int) -> None:
        self.jobs, self.done, self.start = jobs, 0, time.perf_counter()

    def log(self, text: str) -> None:
        elapsed = time.perf_counter() - self.start
        eta = "?" if not self.done else _minutes(elapsed / self.done * (self.jobs - self.done))
        print(f"[{_minutes(elapsed)} elapsed, ETA {eta}, {self.done}/{self.jobs} runs] {text}", flush=True)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


# -- data ----------------------------------------------------------------------------------------------------
def phantom_cases(work: Path, train: list[int], val: list[int]) -> list[Case]:
    """Phantom scans with `ctvq phantom`'s defaults, written once; seeds give the split."""
    from ctvq.ct.steps import run_phantom

    cases = []
    for seed, split in [(s, "train") for s in train] + [(s, "val") for s in val]:
        scan = work / "scans" / f"phantom_s{seed:03d}.nii.gz"
        if not scan.is_file():
            run_phantom(scan, seed=seed, shape=(192, 192, 96), spacing=(0.7, 0.7, 2.0), noise=12.0,
                        quiet=True)
        cases.append(Case(scan.name.removesuffix(".nii.gz"), scan, split, "phantom"))
    return cases


def real_cases(folder: Path, train: list[str], val: list[str]) -> list[Case]:
    """The fetched real scans named in the split (``cases.tsv`` of scripts/fetch-real-ct.sh)."""
    index = folder / "cases.tsv"
    if not index.is_file():
        return []
    table = pd.read_csv(index, sep="\t", dtype=str)
    paths = dict(zip(table["case_id"], table["path"], strict=True))
    missing = [c for c in (*train, *val) if c not in paths]
    if missing:
        raise SystemExit(f"bench/quality.py: {index} lacks {', '.join(missing)}; "
                         "rerun scripts/fetch-real-ct.sh")
    return [Case(c, folder / paths[c], split, "real") for split, ids in (("train", train), ("val", val))
            for c in ids]


def preprocess(cases: list[Case], window: str, resolution: int, folder: Path) -> dict[str, Any]:
    """Samples of every case (cached) and the manifests train.csv, val_phantom.csv, val_real.csv.

    Each manifest carries an explicit ``split`` column (train or val for all its rows) instead of the
    manifest hash split, so that training sees exactly the train cases and eval only held-out ones.
    """
    from ctvq.ct.errors import CTInputError
    from ctvq.ct.pipeline import build_sample, window_scan
    from ctvq.ct.sample import save_sample
    from ctvq.ct.windows import WINDOWS

    groups: dict[str, list[Path]] = {"train": [], "val_phantom": [], "val_real": []}
    skipped = {}
    for case in cases:
        path = folder / "samples" / f"{case.case_id}.npz"
        if not path.is_file():
            try:
                volume = window_scan(case.scan, WINDOWS[window], resolution, case.case_id)
            except CTInputError as exc:
                skipped[case.case_id] = str(exc)
                continue
            save_sample(build_sample(volume, band=default_band(window), iso_value=0.5), path)
        groups["train" if case.split == "train" else f"val_{case.kind}"].append(path)
    manifests = {}
    for name, paths in groups.items():
        if paths:
            split = "train" if name == "train" else "val"
            manifests[name] = write_manifest(paths, folder / f"{name}.csv", split)
    return {"manifests": manifests, "skipped": skipped, "cases": case_stats(cases, groups)}


def write_manifest(paths: list[Path], path: Path, split: str) -> Path:
    from ctvq.ct.manifest import manifest_table
    from ctvq.ct.manifest import write_manifest as write

    table = manifest_table(paths, path.parent, 100)
    table["split"] = split
    write(table, path)
    return path


def case_stats(cases: list[Case], groups: dict[str, list[Path]]) -> list[dict[str, Any]]:
    """Per case: band/cell counts, voxel edge, and the decoder targets < 0 (inside) or in the band."""
    from ctvq.ct.sample import decoder_targets, load_sample
    from ctvq.eval.metrics import offset_iou, voxel_edge_mm

    kinds = {c.case_id: (c.split, c.kind) for c in cases}
    rows = []
    for path in (p for paths in groups.values() for p in paths):
        sample = load_sample(path)
        target = decoder_targets(sample)
        split, kind = kinds[sample.case_id]
        rows.append({"case_id": sample.case_id, "split": split, "kind": kind, "sample": str(path),
                     "num_points": sample.num_points, "num_latent": sample.num_latent,
                     "decoded_voxels": int(target.size), "inside_voxels": int(np.count_nonzero(target < 0)),
                     "band_voxels": int(np.count_nonzero(np.abs(target) < 1)),
                     "voxel_edge_mm": voxel_edge_mm(sample.affine),
                     # the IoU a surface off by a quarter voxel everywhere gets (mean of out- and inward)
                     "iou_at_quarter_voxel": float(np.mean([offset_iou(target * sample.band, d)
                                                            for d in (0.25, -0.25)]))})
    return rows


def inside_fractions(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Voxel-weighted inside and band shares per split x kind (what the decoder's loss averages over)."""
    out = {}
    for split in ("train", "val"):
        for kind in SUBSETS:
            sel = [r for r in rows if r["split"] == split and r["kind"] == kind]
            total = sum(r["decoded_voxels"] for r in sel)
            if total:
                out[f"{split}_{kind}"] = {"cases": len(sel),
                                          "inside": sum(r["inside_voxels"] for r in sel) / total,
                                          "band": sum(r["band_voxels"] for r in sel) / total,
                                          "iou_at_quarter_voxel": float(np.mean([r["iou_at_quarter_voxel"]
                                                                                 for r in sel]))}
    return out


# -- configs and runs ----------------------------------------------------------------------------------------
def set_key(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested config; the parent must exist (a typo should fail, not add a new branch)."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for key in parents:
        if not isinstance(node.get(key), dict):
            raise KeyError(f"patch key {dotted!r}: {key!r} is not a section of the config")
        node = node[key]
    node[leaf] = value


def patched_config(source: dict[str, Any], patch: dict[str, Any], window: str, resolution: int,
                   steps: int | None, extra: dict[str, Any]) -> dict[str, Any]:
    """The variant's config for this data: its patch, the data's window/resolution, the step budget.

    A cosine schedule whose T_max equals the config's max_steps follows the new budget, so that a short
    benchmark still anneals the learning rate as the config intends.
    """
    cfg = copy.deepcopy(source)
    for key, value in patch.items():
        set_key(cfg, key, value)
    set_key(cfg, "dataset.args.window_type", window)
    set_key(cfg, "dataset.args.resolution", resolution)
    set_key(cfg, "models.vqvae.args.resolution", resolution // 8)
    trainer = cfg["trainer"]["args"]
    if steps is not None:
        sched = trainer.get("lr_scheduler") or {}
        if sched.get("name") == "CosineAnnealingLR" and sched["args"].get("T_max") == trainer["max_steps"]:
            sched["args"]["T_max"] = steps
        trainer["max_steps"] = steps
    for key, value in extra.items():
        set_key(cfg, key, value)
    return cfg


def run_logged(cmd: list[str], log: Path, threads: int) -> dict[str, Any]:
    """Run a child with its output in ``log``; wall and CPU seconds (getrusage of children), exit code."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONUNBUFFERED": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env, check=False)
    rc = done.returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out = {"returncode": rc, "wall_s": time.perf_counter() - start, "cpu_s": cpu, "log": str(log)}
    if rc != 0:
        out["error_tail"] = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
    return out


def ctvq(*args: str) -> list[str]:
    return [sys.executable, "-m", "ctvq", *args]


def train_variant(variant: Variant, window: str, resolution: int, data: Path, run: Path,
                  args: argparse.Namespace) -> dict[str, Any]:
    """Stage 1 then stage 2 from scratch in ``run`` (an old run folder is removed first)."""
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    quiet = {"trainer.args.disable_snapshot": True}
    stages: dict[str, Any] = {}
    for stage, source, steps in ((1, variant.stage1, args.stage1_steps), (2, variant.stage2, args.steps)):
        extra = dict(quiet)
        if stage == 2 and args.curve_every:
            extra["trainer.args.i_save"] = args.curve_every
        try:
            cfg = patched_config(json.loads(source.read_text()), variant.patch, window, resolution, steps,
                                 extra)
        except (OSError, ValueError, KeyError) as exc:
            stages[f"stage{stage}"] = {"returncode": -1, "error_tail": f"config {source}: {exc}"}
            return stages
        cfg_path = run / f"stage{stage}.json"
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        cmd = ctvq("train", "--config", str(cfg_path), "--data", str(data), "--output-dir",
                   str(run / f"s{stage}"), "--threads", str(args.threads), "--device", args.device,
                   "--no-tensorboard", "--resume", "never", "--band", str(default_band(window)))
        if stage == 2:
            cmd += ["--pretrained-vae-path", str(run / "s1" / "ckpts" / "final.pt")]
        result = run_logged(cmd, run / f"stage{stage}.log", args.threads)
        result["steps"] = cfg["trainer"]["args"]["max_steps"]
        stages[f"stage{stage}"] = result
        if result["returncode"] != 0:
            break
    return stages


# -- evaluation ----------------------------------------------------------------------------------------------
def eval_flags() -> list[str]:
    """Options this ctvq eval has: --allow-collapse (else all-collapsed runs may exit non-zero) and
    --split val (the manifests hold val rows only; the flag makes the held-out rule explicit)."""
    done = subprocess.run(ctvq("eval", "--help"), capture_output=True, text=True, cwd=ROOT, check=False)
    flags = ["--allow-collapse"] if "--allow-collapse" in done.stdout else []
    return flags + (["--split", "val"] if "--split" in done.stdout else [])


def evaluate(ckpt: Path, manifest: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """`ctvq eval` on one held-out subset and its per-case rows; metrics.json is read even on failure."""
    cmd = ctvq("eval", "--ckpt", str(ckpt), "--data", str(manifest), "-o", str(out / "metrics.json"),
               "--device", args.device, "--points", str(args.points), "--no-figures", "--no-meshes",
               *args.eval_flags)
    if args.eval_chunk_size:
        cmd += ["--chunk-size", str(args.eval_chunk_size)]
    result = run_logged(cmd, out / "eval.log", args.threads)
    metrics_file, cases_file = out / "metrics.json", out / "cases.csv"
    if metrics_file.is_file():
        result["metrics"] = json.loads(metrics_file.read_text())
    if cases_file.is_file():
        cases = case_rows(pd.read_csv(cases_file))
        result["cases"] = cases
        result["summary"] = summarise(cases, result.get("metrics", {}))
    return result


def case_rows(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Eval's rows, NaN as None and collapsed as bool (each case's voxel edge is in the data section)."""
    out = []
    for row in table.to_dict("records"):
        row = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        row["collapsed"] = bool(row["collapsed"])  # ctvq eval's verdict (ctvq.eval.surfaces.collapse_reason)
        out.append(row)
    return out


def summarise(cases: list[dict[str, Any]], metrics: dict[str, Any]) -> dict[str, Any]:
    """Means over cases (None skipped); codebook usage/perplexity over the subset's tokens (metrics.json)."""
    out: dict[str, Any] = {"cases": len(cases), "collapsed": sum(c["collapsed"] for c in cases)}
    for key in TABLE_KEYS:
        if key in ("codebook_usage", "perplexity"):  # flat key, or per split (val/...) in newer evals
            out[key] = metrics.get(key, metrics.get(f"val/{key}"))
            continue
        values = [c[key] for c in cases if c.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


CURVE_CASE_KEYS = ("case_id", "occupancy_iou", "chamfer_l1_vox", "fscore_1vox", "sdf_mae_vox", "collapsed")


def curve_point(step: int, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One curve point: each subset's summary under its name, and under ``cases`` each subset's per-case
    numbers, so that two runs' curves can be compared case by case, not only as subset means."""
    point: dict[str, Any] = {"step": step, "cases": {}}
    for subset, result in results.items():
        point[subset] = result.get("summary", {"error_tail": result.get("error_tail")})
        point["cases"][subset] = [{k: c.get(k) for k in CURVE_CASE_KEYS} for c in result.get("cases", [])]
    return point


def curve(run: Path, manifests: dict[str, Path], final: dict[str, Any], steps: int,
          args: argparse.Namespace) -> list[dict[str, Any]]:
    """Held-out metrics of every intermediate stage-2 checkpoint (``vqvae_step*.pt``); the last point is the
    final model's evaluation, reused (final.pt holds the same weights as the last step's file)."""
    points = []
    for ckpt in sorted((run / "s2" / "ckpts").glob("vqvae_step*.pt")):
        step = int(ckpt.stem.rsplit("step", 1)[1])
        if step >= steps:
            continue
        points.append(curve_point(step, {
            subset: evaluate(ckpt, manifest, run / "curve" / f"step{step:07d}" / subset, args)
            for subset, manifest in manifests.items()}))
    points.append(curve_point(steps, final))
    return points


def repeated(variant: Variant, repeat: int, repeats: int) -> Variant:
    """The variant with its training and crop seeds set to ``repeat`` (unchanged when not repeating)."""
    if repeats == 1:
        return variant
    seeds_patch = {"trainer.args.seed": repeat, "dataset.args.seed": repeat}
    return Variant(variant.name, variant.stage1, variant.stage2, {**variant.patch, **seeds_patch})


def run_job(variant: Variant, window: str, resolution: int, data: dict[str, Any], args: argparse.Namespace,
            progress: Progress, repeat: int = 0) -> dict[str, Any]:
    """One variant at one window x resolution: train, evaluate each held-out subset, optional curve."""
    tag = f"{window} r{resolution} {variant.name}" + (f" seed {repeat}" if args.repeats > 1 else "")
    run = args.work / "runs" / window / f"r{resolution}" / variant.name
    if args.repeats > 1:
        run = run / f"seed{repeat}"
    variant = repeated(variant, repeat, args.repeats)
    record: dict[str, Any] = {"window": window, "resolution": resolution, "variant": variant.name,
                              "repeat": repeat,
                              "stage1_config": str(variant.stage1), "stage2_config": str(variant.stage2),
                              "patch": variant.patch, "run_dir": str(run), "eval": {}}
    progress.log(f"{tag}: training")
    record["train"] = train_variant(variant, window, resolution, data["manifests"]["train"], run, args)
    failed = [s for s, r in record["train"].items() if r["returncode"] != 0]
    if failed or "stage2" not in record["train"]:
        record["status"] = f"failed: {failed[0] if failed else 'stage2'}"
        progress.log(f"{tag}: {record['status']}\n{record['train'][failed[0]].get('error_tail', '')}")
        return record
    final = run / "s2" / "ckpts" / "final.pt"
    val = {k.removeprefix("val_"): v for k, v in data["manifests"].items() if k.startswith("val_")}
    for subset, manifest in val.items():
        progress.log(f"{tag}: eval {subset}")
        record["eval"][subset] = evaluate(final, manifest, run / "eval" / subset, args)
    bad = [s for s, r in record["eval"].items() if r["returncode"] != 0]
    record["status"] = "ok" if not bad else f"eval rc != 0: {', '.join(bad)}"
    if args.curve_every:
        progress.log(f"{tag}: curve")
        record["curve"] = curve(run, val, record["eval"], record["train"]["stage2"]["steps"], args)
    return record


# -- variants, output ----------------------------------------------------------------------------------------
def load_variants(args: argparse.Namespace) -> list[Variant]:
    """Built-ins, then --variants-file ({name: {stage1, stage2, patch}}), then --variant; pick --variants."""
    pool = dict(DEFAULT_VARIANTS)
    if args.variants_file is not None:
        pool.update(json.loads(args.variants_file.read_text()))
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        parts = rest.split(",")
        if not name or len(parts) not in (2, 3):
            raise SystemExit(f"--variant {spec!r}: use NAME=STAGE1.json,STAGE2.json[,PATCH.json]")
        patch = json.loads(Path(parts[2]).read_text()) if len(parts) == 3 else {}
        pool[name] = {"stage1": parts[0], "stage2": parts[1], "patch": patch}
    names = args.variants.split(",") if args.variants else list(pool)
    unknown = [n for n in names if n not in pool]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(pool)}")
    return [Variant(n, Path(pool[n]["stage1"]), Path(pool[n]["stage2"]), dict(pool[n].get("patch", {})))
            for n in names]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def print_tables(data: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """The decoder targets' inside shares, then one row per window x resolution x variant x subset."""
    print("\n| window | res | subset | cases | inside share (target < 0) | band share (abs < 1) | "
          "IoU of the target at a 0.25-voxel offset |")
    print("|---|---|---|---|---|---|---|")
    for key, entry in data.items():
        for subset, share in entry["inside_fraction"].items():
            print(f"| {key[0]} | {key[1]} | {subset} | {share['cases']} | {share['inside']:.3f} | "
                  f"{share['band']:.3f} | {share.get('iou_at_quarter_voxel', float('nan')):.3f} |")
    if not results:
        return
    head = ["window", "res", "variant", "subset", "status", "IoU", "CD-L1 mm", "CD-L1 vox", "F@1vox", "F@1mm",
            "SDF MAE vox", "usage", "ppl", "collapsed", "steps s1+s2", "train wall min", "train CPU min"]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    repeats = any(r.get("repeat", 0) for r in results)
    for r in results:
        train = r.get("train", {})
        wall = sum(s.get("wall_s", 0.0) for s in train.values()) / 60
        cpu = sum(s.get("cpu_s", 0.0) for s in train.values()) / 60
        steps = "+".join(str(s.get("steps", "?")) for s in train.values())
        for subset, ev in (r["eval"] or {"-": {}}).items():
            s = ev.get("summary", {})
            name = f"{r['variant']} seed {r['repeat']}" if repeats else r["variant"]
            cells = [r["window"], r["resolution"], name, subset, r["status"],
                     *(_fmt(s.get(k), 1 if k == "perplexity" else 3) for k in TABLE_KEYS),
                     f"{s['collapsed']}/{s['cases']}" if s else "n/a", steps, f"{wall:.2f}",
                     f"{cpu:.2f}"]
            print("| " + " | ".join(map(str, cells)) + " |")
    if repeats:
        print_spread(results)


SPREAD_KEYS = ("occupancy_iou", "chamfer_l1_vox", "fscore_1vox", "sdf_mae_vox", "codebook_usage")


def spread(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, min and max over the repeats of each window x resolution x variant x subset."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in results:
        for subset, ev in r["eval"].items():
            groups.setdefault((r["window"], r["resolution"], r["variant"], subset), []).append(
                ev.get("summary", {}))
    rows = []
    for (window, res, variant, subset), summaries in groups.items():
        row: dict[str, Any] = {"window": window, "resolution": res, "variant": variant, "subset": subset,
                               "runs": len(summaries)}
        for key in SPREAD_KEYS:
            values = [s[key] for s in summaries if s.get(key) is not None]
            row[key] = ({"mean": float(np.mean(values)), "min": float(min(values)), "max": float(max(values))}
                        if values else None)
        rows.append(row)
    return rows


def print_spread(results: list[dict[str, Any]]) -> None:
    head = ["window", "res", "variant", "subset", "runs", *(f"{k} mean (min-max)" for k in SPREAD_KEYS)]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in spread(results):
        cells = [row["window"], row["resolution"], row["variant"], row["subset"], row["runs"]]
        for key in SPREAD_KEYS:
            v = row[key]
            cells.append("n/a" if v is None else f"{v['mean']:.3f} ({v['min']:.3f}-{v['max']:.3f})")
        print("| " + " | ".join(map(str, cells)) + " |")


def plot_curves(results: list[dict[str, Any]], path: Path) -> None:
    """Held-out metric vs stage-2 step, one line per window/resolution/variant/subset (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("occupancy_iou", "chamfer_l1_vox", "fscore_1vox", "sdf_mae_vox", "codebook_usage")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5))
    for r in results:
        for subset in SUBSETS:
            for ax, key in zip(axes, keys, strict=True):
                xy = [(p["step"], p[subset][key]) for p in r.get("curve", [])
                      if p.get(subset, {}).get(key) is not None]
                if xy:
                    ax.plot(*zip(*xy, strict=True), marker="o",
                            label=f"{r['window']} {r['resolution']} {r['variant']} {subset}")
    for ax, key in zip(axes, keys, strict=True):
        ax.set_title(key)
        ax.set_xlabel("stage-2 step")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", default="lung,bone,soft_tissue")
    p.add_argument("--resolutions", default="64,128")
    p.add_argument("--variants", default="baseline,current", help="comma list of variant names to run")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=S1.json,S2.json[,PATCH.json]")
    p.add_argument("--variants-file", type=Path, help="JSON {name: {stage1, stage2, patch: {dotted: value}}}")
    p.add_argument("--steps", type=int, help="stage-2 max_steps for every variant (default: the config's)")
    p.add_argument("--stage1-steps", type=int, help="stage-1 max_steps (default: the config's)")
    p.add_argument("--curve-every", type=int, metavar="K",
                   help="also evaluate stage-2 checkpoints every K steps")
    p.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="train each variant N times, seeds 0..N-1, and print the spread")
    p.add_argument("--train-seeds", default="0-5")
    p.add_argument("--val-seeds", default="100-101")
    p.add_argument("--real-dir", type=Path, default=ROOT / ".cache/real-ct")
    p.add_argument("--real-train", default=",".join(REAL_TRAIN))
    p.add_argument("--real-val", default=",".join(REAL_VAL))
    p.add_argument("--no-real", action="store_true", help="phantoms only, even when real CT is cached")
    p.add_argument("--data-only", action="store_true",
                   help="preprocess and print the decoder targets' inside/band shares; no training")
    p.add_argument("--points", type=int, default=100_000, help="surface points per mesh (eval's default)")
    p.add_argument("--eval-chunk-size", type=int, metavar="N",
                   help="ctvq eval --chunk-size N: decode in N^3 chunks (same output, less memory)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--work", type=Path, default=ROOT / ".cache/quality")
    p.add_argument("--output", type=Path, default=ROOT / "bench/results/quality.json")
    return p.parse_args(argv)


def seeds(text: str) -> list[int]:
    """``0-5`` or ``0,3,7``."""
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",") if s]


def prepare_data(args: argparse.Namespace, windows: list[str], resolutions: list[int]) -> dict[Any, Any]:
    cases = phantom_cases(args.work / "data", seeds(args.train_seeds), seeds(args.val_seeds))
    if not args.no_real:
        cases += real_cases(args.real_dir, args.real_train.split(","), args.real_val.split(","))
    data = {}
    for window in windows:
        for res in resolutions:
            tic = time.perf_counter()
            entry = preprocess(cases, window, res,
                               args.work / "data" / window / f"r{res}_band{default_band(window):g}")
            entry["inside_fraction"] = inside_fractions(entry["cases"])
            data[(window, res)] = entry
            print(f"data {window} r{res}: {len(entry['cases'])} cases, skipped {list(entry['skipped'])} "
                  f"({time.perf_counter() - tic:.1f} s)", flush=True)
    return data


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    windows, resolutions = args.windows.split(","), [int(r) for r in args.resolutions.split(",")]
    variants = load_variants(args)
    args.work = args.work.resolve()
    args.eval_flags = eval_flags()
    data = prepare_data(args, windows, resolutions)
    if args.data_only:
        variants = []
    if args.repeats < 1:
        raise SystemExit(f"--repeats {args.repeats}: use 1 or more")
    progress = Progress(len(data) * len(variants) * args.repeats)
    results = []
    for (window, res), entry in data.items():
        for variant in variants:
            for repeat in range(args.repeats):
                results.append(run_job(variant, window, res, entry, args, progress, repeat))
                progress.done += 1
                progress.log(f"{window} r{res} {variant.name}: {results[-1]['status']}")
    out = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count()},
        "data": {f"{w}/r{r}": {k: v for k, v in e.items() if k != "manifests"} for (w, r), e in data.items()},
        "results": results,
        "spread": spread(results) if args.repeats > 1 else [],
        "seconds_total": time.perf_counter() - start,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2, default=str) + "\n")
    if args.curve_every and any(r.get("curve") for r in results):
        plot_curves(results, args.output.with_suffix(".png"))
    print_tables(data, results)
    print(f"\nwrote {args.output} ({_minutes(out['seconds_total'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
