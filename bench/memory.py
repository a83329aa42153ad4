"""Benchmark: peak memory of one training step for each out-of-memory knob, alone, at several data sizes.

The base is the reference's scenario 2 (``configs/vqvae/stage2.json``: width 512, 8 + 8 blocks, batch 2 in 2
micro-batches, ``use_checkpoint`` on) on chest phantoms at 256³, lung window, in fp32 (``fp16_mode`` null: the
fp16 modes are for CUDA). Each knob is changed alone; ``max_points`` sets the data size of a step (the band
voxels of one case after the crop). Every measurement runs one training step in a fresh process and reports
that process's own peak (VmHWM, see ``bench/rss.py``). Two steps run: the optimizer's state (Adam: twice the
parameters) is made at the end of the first, after its activations are freed, so only the second holds
gradients, optimizer state and activations together, as every later step does. ``step_mb`` is the peak above
the process's memory before the first step (model and data loaded). On CUDA (``--device cuda``) the CUDA
allocator's peak is reported too.

    .venv/bin/python bench/memory.py [--points 10000 40000 80000 160000] [--threads 2]
        [--device cpu] [--out bench/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from quality import set_key  # bench/ is the script's folder, so its siblings import by name
from rss import current_rss_mb, peak_rss_mb

BASE = Path(__file__).resolve().parents[1] / "configs" / "vqvae" / "stage2.json"
RESOLUTION = 256
# knob -> the dotted config changes that turn it; the reference's OOM chapter order, then its other two
KNOBS: dict[str, dict[str, Any]] = {
    "base": {},
    "chunk_size 2": {"models.vqvae.args.chunk_size": 2},
    "batch_size_per_gpu 1": {"trainer.args.batch_size_per_gpu": 1, "trainer.args.batch_split": 1},
    "model_channels 256": {"models.vqvae.args.model_channels": 256},
    "num_blocks 4": {"models.vqvae.args.num_blocks": 4},
    "batch_split 1": {"trainer.args.batch_split": 1},
    "use_checkpoint false": {"models.vqvae.args.use_checkpoint": False},
    # whole configs, not single knobs: the planner's validation set (bench/results/memory_check.json)
    "scenario lowmem": {"models.vqvae.args.model_channels": 256, "models.vqvae.args.num_blocks": 4,
                        "models.vqvae.args.chunk_size": 4, "trainer.args.batch_size_per_gpu": 4,
                        "trainer.args.batch_split": 4},
    "tiny": {"models.vqvae.args.model_channels": 64, "models.vqvae.args.num_blocks": 2,
             "models.vqvae.args.latent_channels": 8, "models.vqvae.args.num_embeddings": 128,
             "models.vqvae.args.num_head_channels": 32, "models.vqvae.args.window_size": 4,
             "models.vqvae.args.use_checkpoint": False},
    "tiny checkpoint": {"models.vqvae.args.model_channels": 64, "models.vqvae.args.num_blocks": 2,
                        "models.vqvae.args.latent_channels": 8, "models.vqvae.args.num_embeddings": 128,
                        "models.vqvae.args.num_head_channels": 32, "models.vqvae.args.window_size": 4},
    "model_channels 256 no checkpoint": {"models.vqvae.args.model_channels": 256,
                                         "models.vqvae.args.use_checkpoint": False},
    # stage 1 from scratch (no Direct3D-S2 weights): the reference's codebook stage (EMA codebook, nothing
    # trainable) and ctvq's autoencoder warm-up (encoder and decoder train, the quantizer is bypassed)
    "stage 1 codebook": {"trainer.args.training_stage": 1, "trainer.args.pretrained_vae_path": None},
    "stage 1 autoencoder": {"trainer.args.training_stage": 1, "trainer.args.pretrained_vae_path": None,
                            "trainer.args.stage1_mode": "autoencoder"},
}
DEFAULT_KNOBS = list(KNOBS)[:7]
# Evaluation decodes whole cases without gradients: what matters is the width of the full-resolution blocks,
# chunk_size (one chunk's voxels at a time) and the case's size. The knobs change the same base config.
TINY = {k: v for k, v in KNOBS["tiny"].items() if k != "models.vqvae.args.use_checkpoint"}
EVAL_KNOBS: dict[str, dict[str, Any]] = {
    "tiny": TINY,
    "tiny chunk 4": {**TINY, "models.vqvae.args.chunk_size": 4},
    "model_channels 256": {"models.vqvae.args.model_channels": 256, "models.vqvae.args.num_blocks": 4},
    "model_channels 256 chunk 4": {"models.vqvae.args.model_channels": 256, "models.vqvae.args.num_blocks": 4,
                                   "models.vqvae.args.chunk_size": 4},
    "base": {},
    "base chunk 2": {"models.vqvae.args.chunk_size": 2},
    "base chunk 4": {"models.vqvae.args.chunk_size": 4},
}
EVAL_RESOLUTIONS = (64, 128, 256)  # phantoms made at each; --eval-data adds manifests (e.g. real CT at 512)


def child(args: argparse.Namespace) -> None:
    """One training step of the config in ``args.config``; prints one JSON line."""
    import torch

    from ctvq.config import load_config
    from ctvq.train.distributed import DistInfo
    from ctvq.train.trainer import RunOptions, Trainer

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(args.config)
    trainer = Trainer(cfg, RunOptions(Path(args.work) / "run", Path(args.data), resume="never",
                                      tensorboard=False), DistInfo(0, 1, 0, device))
    batches = iter(trainer.loader)
    micro = next(batches)
    before = current_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.train_step(micro)  # the optimizer's state appears at the end of the first step, after the
    first = peak_rss_mb()  # activations are freed:
    trainer.train_step(next(batches, micro))  # the second step holds both, as every later one does
    peak = peak_rss_mb()
    out = {"peak_rss_mb": peak, "first_step_peak_rss_mb": first, "rss_before_mb": before,
           "points": int(sum(int(m["coords"].shape[0]) for m in micro))}
    out["step_mb"] = out["peak_rss_mb"] - before
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(out))


def eval_child(args: argparse.Namespace) -> None:
    """`ctvq eval` of one checkpoint on one manifest, in this fresh process; prints its peak RSS."""
    from ctvq.cli import main as ctvq_main

    metrics = Path(args.work) / "m.json"
    code = ctvq_main(["eval", "--ckpt", args.ckpt, "--data", args.data, "-o", str(metrics),
                      "--allow-collapse"])
    faces = {k: json.loads(metrics.read_text()).get(k) for k in ("input_faces", "recon_faces")}
    print(json.dumps({"peak_rss_mb": peak_rss_mb(),
                      "returncode": code, **faces}))


def largest_case_manifest(manifest: Path, out: Path) -> dict[str, Any]:
    """A one-row copy of ``manifest`` holding its largest ok case (absolute sample path); that row."""
    import pandas as pd

    from ctvq.ct.manifest import read_manifest

    table = read_manifest(manifest)
    table = table[table["status"] == "ok"].sort_values("num_points", ascending=False).head(1).copy()
    table["sample_path"] = [str((manifest.parent / p).resolve()) for p in table["sample_path"]]
    table["split"] = "val"
    pd.DataFrame(table).to_csv(out, index=False)
    row = table.iloc[0]
    return {"case_id": str(row["case_id"]), "sample": row["sample_path"], "points": int(row["num_points"]),
            "resolution": int(row["resolution"])}


def eval_runs(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Peak RSS of `ctvq eval` per eval knob on the largest case of each data set. Each model trains one
    step first (`ctvq train --max-steps 1`), so the checkpoint and its run folder are the real ones."""
    import numpy as np

    from ctvq.config import load_config
    from ctvq.train import plan

    sets = [(r, make_data(work / f"data{r}", args.cases, r)) for r in args.eval_resolutions]
    sets += [(None, Path(m).resolve()) for m in args.eval_data]
    runs = []
    for number, (_, manifest) in enumerate(sets):
        case = largest_case_manifest(manifest, work / f"case{number}.csv")
        resolution = case["resolution"]
        with np.load(case["sample"]) as data:
            latent = data["latent_coords"]
        for knob in args.eval_knobs:
            changes = EVAL_KNOBS[knob]
            tag = f"e{len(runs)}"
            weights = stage1_weights(changes, work / f"{tag}_stage1.pt", resolution)
            config = config_for(changes, 2000, weights, work / f"{tag}.json", resolution)
            train = [sys.executable, "-m", "ctvq", "train", "--config", str(config), "--data", str(manifest),
                     "--output-dir", str(work / tag), "--max-steps", "1", "--threads", str(args.threads),
                     "--no-tensorboard"]
            trained = subprocess.run(train, capture_output=True, text=True)
            if trained.returncode:
                raise SystemExit(f"{knob}: training one step failed:\n{trained.stderr[-3000:]}")
            cmd = [sys.executable, __file__, "--eval-child", "--ckpt", str(work / tag / "ckpts" / "final.pt"),
                   "--data", str(work / f"case{number}.csv"), "--work", str(work / tag)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                raise SystemExit(f"{knob}: ctvq eval failed:\n{done.stderr[-3000:]}")
            cfg = load_config(config)
            size = plan.eval_case_size(case["case_id"], latent, cfg.model.resolution, cfg.model.chunk_size)
            run = {"knob": knob, "resolution": resolution, "manifest": str(manifest), **case,
                   "cells": size.cells, "chunk_cells": size.chunk_cells, "box_voxels": size.box_voxels,
                   **json.loads(done.stdout.strip().splitlines()[-1])}
            runs.append(run)
            print(f"eval {knob:28s} {resolution:4d}^3 {case['case_id']:14s} {size.cells:6d} cells "
                  f"(chunk {size.chunk_cells:6d}): peak RSS {run['peak_rss_mb']:7.0f} MB", flush=True)
    return runs


def make_data(folder: Path, cases: int, resolution: int = RESOLUTION) -> Path:
    from ctvq.ct.demo import run_demo

    run_demo(folder, cases, resolution, ["lung"])
    return folder / "lung" / "manifest.csv"


def config_dict(changes: dict[str, Any], points: int, stage1: Path, resolution: int = RESOLUTION
                ) -> dict[str, Any]:
    """The base config at this benchmark's resolution and data size, with one knob's changes."""
    cfg = json.loads(BASE.read_text())
    cfg["dataset"]["args"].update(resolution=resolution, max_points=points)
    cfg["models"]["vqvae"]["args"].update(resolution=resolution // 8, sparse_backend="torch")
    cfg["trainer"]["args"].update(pretrained_vae_path=str(stage1), fp16_mode=None, num_workers=0,
                                  ema_rate=[], disable_snapshot=True)
    for dotted, value in changes.items():
        set_key(cfg, dotted, value)
    return cfg


def config_for(changes: dict[str, Any], points: int, stage1: Path, path: Path, resolution: int = RESOLUTION
               ) -> Path:
    path.write_text(json.dumps(config_dict(changes, points, stage1, resolution)))
    return path


def stage1_weights(changes: dict[str, Any], path: Path, resolution: int = RESOLUTION) -> Path:
    """A stage-1 checkpoint of the (changed) model's initial weights, which stage 2 starts from."""
    import torch

    from ctvq.config import load_config
    from ctvq.models.vqvae import SparseSDFVQVAE
    from ctvq.train.checkpoint import atomic_torch_save, model_payload

    probe = config_for(changes, 1000, path, path.with_suffix(".json"), resolution)
    torch.manual_seed(0)
    model = SparseSDFVQVAE(**load_config(probe).model.to_dict()["args"])
    atomic_torch_save(model_payload(model.state_dict(), model.config, 1, 0), path)
    return path


def _run_config(knob: str, points: int) -> Any:
    """The validated config a recorded run trained with."""
    from ctvq.config import config_from_dict

    cfg = config_dict(KNOBS[knob], points, Path("stage1.pt"))
    return config_from_dict(cfg, origin=f"{knob} at max_points {points}")


def fit(paths: list[Path], refit: bool, validation: list[str]) -> int:
    """``refit``: fit ctvq.train.plan's coefficients to recorded runs and print them with the error of each
    run, and the error when each knob's runs are predicted from a fit without them (how the model
    extrapolates). Otherwise: the error of the shipped coefficients on the recorded runs. Runs of the
    ``validation`` knobs are never fitted, only predicted."""
    import numpy as np

    from ctvq.train import plan

    rows = []
    for path in paths:
        recorded = json.loads(path.read_text())
        cases = [plan.CaseSize(c["case_id"], c["points"], c["latent"]) for c in recorded["cases"]
                 if c["split"] == "train"]
        for run in recorded["runs"]:
            cfg = _run_config(run["knob"], run["max_points"])
            counts = plan.parameter_counts(cfg)
            zero = dict.fromkeys(plan.COEFFICIENTS, 0.0)
            fixed = plan.predict_training_peak(cfg, cases, zero, counts)
            voxels = (fixed.data.points + fixed.data.decoded) / 1024.0
            ck = float(cfg.model.use_checkpoint)
            c = plan.full_resolution_channels(cfg)
            features = [1.0, counts[1] / 2**20, voxels * ck, voxels * ck * c, voxels * (1 - ck),
                        voxels * (1 - ck) * c]
            rows.append({"run": run, "cfg": cfg, "cases": cases, "counts": counts, "fixed": fixed.peak_mb,
                         "x": features})
    names = list(plan.COEFFICIENTS)  # base, trainable bytes, voxel/channel with and without checkpointing

    def solve(subset: list[dict]) -> dict[str, float]:
        """Least squares (minimum norm where the subset cannot tell two columns apart; an all-zero column,
        e.g. no run without checkpointing, keeps 0)."""
        a = np.array([r["x"] for r in subset])
        y = np.array([r["run"]["peak_rss_mb"] - r["fixed"] for r in subset])
        keep = [i for i in range(a.shape[1]) if a[:, i].any()]
        solution = np.zeros(a.shape[1])
        solution[keep] = np.linalg.lstsq(a[:, keep], y, rcond=None)[0]
        return {name: float(v) for name, v in zip(names, solution, strict=True)}

    def error(row: dict, coefficients: dict[str, float]) -> float:
        predicted = plan.predict_training_peak(row["cfg"], row["cases"], coefficients, row["counts"]).peak_mb
        return 100.0 * (predicted - row["run"]["peak_rss_mb"]) / row["run"]["peak_rss_mb"]

    fitted = [r for r in rows if r["run"]["knob"] not in validation]
    coefficients = solve(fitted) if refit else dict(plan.COEFFICIENTS)
    print("COEFFICIENTS =", json.dumps({k: round(v, 4) for k, v in coefficients.items()}))
    print(f"{'knob':32s} {'max_points':>10s} {'measured MB':>11s} {'error %':>8s} {'knob held out %':>15s}")
    worst = 0.0
    for knob in dict.fromkeys(r["run"]["knob"] for r in rows):
        held = solve([r for r in fitted if r["run"]["knob"] != knob]) if refit and knob not in validation \
            else None
        for row in (r for r in rows if r["run"]["knob"] == knob):
            e = error(row, coefficients)
            h = error(row, held) if held is not None else float("nan")
            worst = max(worst, abs(e))
            print(f"{knob:32s} {row['run']['max_points']:10d} {row['run']['peak_rss_mb']:11.0f} {e:8.1f} "
                  f"{h:15.1f}{'  (validation: not fitted)' if knob in validation else ''}")
    print(f"worst error {worst:.1f} %")
    return 0


def eval_run_config(run: dict[str, Any]) -> Any:
    """The validated config a recorded `--eval` run evaluated."""
    from ctvq.config import config_from_dict

    cfg = config_dict(EVAL_KNOBS[run["knob"]], 2000, Path("stage1.pt"), run["resolution"])
    return config_from_dict(cfg, origin=f"{run['knob']} at {run['resolution']}^3")


def fit_eval(paths: list[Path]) -> int:
    """Fit ctvq.train.plan's evaluation coefficients to recorded `--eval` runs; print them, the error of
    each run, and its error when its knob's runs are left out of the fit."""
    import numpy as np

    from ctvq.train import plan

    rows = []
    for path in paths:
        for run in json.loads(path.read_text())["runs"]:
            cfg = eval_run_config(run)
            size = plan.EvalCaseSize(run["case_id"], run["cells"], run["chunk_cells"], run["box_voxels"])
            total = plan.parameter_counts(cfg)[0]
            chunk = size.chunk_cells * plan.LATENT_CHILDREN / 1024.0
            channels = plan.full_resolution_channels(cfg)
            x = [1.0, total / 2**20, chunk, chunk * channels, size.box_voxels / 2**20]
            rows.append({"run": run, "cfg": cfg, "size": size, "total": total, "x": x})
    names = list(plan.EVAL_COEFFICIENTS)

    def solve(subset: list[dict]) -> dict[str, float]:
        """Non-negative least squares of the relative error: every term is memory held (plain least squares
        traded the chunk and box sizes, which move together, off with negative costs), and runs from 0.5 to
        10 GB weigh alike (in absolute error the small runs were off by 20 %)."""
        from scipy.optimize import nnls

        a = np.array([r["x"] for r in subset])
        y = np.array([r["run"]["peak_rss_mb"] for r in subset])
        return dict(zip(names, map(float, nnls(a / y[:, None], np.ones_like(y))[0]), strict=True))

    def error(row: dict, coefficients: dict[str, float]) -> float:
        predicted = plan.predict_eval_peak(row["cfg"], [row["size"]], coefficients, row["total"]).peak_mb
        return 100.0 * (predicted - row["run"]["peak_rss_mb"]) / row["run"]["peak_rss_mb"]

    coefficients = solve(rows)
    print("EVAL_COEFFICIENTS =", json.dumps({k: round(v, 4) for k, v in coefficients.items()}))
    print(f"{'knob':28s} {'res':>4s} {'cells':>6s} {'chunk':>6s} {'measured MB':>11s} {'error %':>8s} "
          f"{'knob held out %':>15s}")
    worst = 0.0
    for knob in dict.fromkeys(r["run"]["knob"] for r in rows):
        held = solve([r for r in rows if r["run"]["knob"] != knob])
        for row in (r for r in rows if r["run"]["knob"] == knob):
            e, h = error(row, coefficients), error(row, held)
            worst = max(worst, abs(e))
            size = row["size"]
            print(f"{knob:28s} {row['run']['resolution']:4d} {size.cells:6d} {size.chunk_cells:6d} "
                  f"{row['run']['peak_rss_mb']:11.0f} {e:8.1f} {h:15.1f}")
    print(f"worst error {worst:.1f} %")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, nargs="+", default=[10000, 40000, 80000, 160000])
    parser.add_argument("--knobs", nargs="+", choices=list(KNOBS), default=DEFAULT_KNOBS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--cases", type=int, default=4, help="phantoms made (the hash split holds some out)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/memory.json"))
    parser.add_argument("--fit", type=Path, nargs="+", default=None, metavar="RUNS_JSON",
                        help="fit ctvq.train.plan's coefficients to finished runs, print the errors")
    parser.add_argument("--check", type=Path, nargs="+", default=None, metavar="RUNS_JSON",
                        help="the error of ctvq.train.plan's coefficients on finished runs")
    parser.add_argument("--validation", nargs="*", default=[], metavar="KNOB",
                        help="with --fit: knobs whose runs are predicted but not fitted")
    parser.add_argument("--eval", action="store_true",
                        help="measure `ctvq eval` instead of training steps (out: memory_eval.json)")
    parser.add_argument("--eval-knobs", nargs="+", choices=list(EVAL_KNOBS), default=list(EVAL_KNOBS))
    parser.add_argument("--eval-resolutions", type=int, nargs="*", default=list(EVAL_RESOLUTIONS))
    parser.add_argument("--eval-data", nargs="*", default=[], metavar="MANIFEST",
                        help="with --eval: more data sets, e.g. a 512 manifest of real CT (its largest case)")
    parser.add_argument("--fit-eval", type=Path, nargs="+", default=None, metavar="RUNS_JSON",
                        help="fit ctvq.train.plan's evaluation coefficients to finished --eval runs")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--eval-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.eval_child:
        eval_child(args)
        return 0
    if args.fit_eval:
        return fit_eval(args.fit_eval)
    if args.fit or args.check:
        return fit(args.fit or args.check, refit=args.fit is not None, validation=args.validation)
    from ctvq.atomic import atomic_write_text

    results: dict[str, Any] = {
        "benchmark": "memory", "base": str(BASE.relative_to(BASE.parents[2])), "resolution": RESOLUTION,
        "device": args.device, "threads": args.threads, "python": platform.python_version(),
        "cpus": os.cpu_count(), "command": " ".join([sys.executable, *sys.argv]), "runs": []}
    with tempfile.TemporaryDirectory(prefix="ctvq-bench-memory-") as tmp:
        work = Path(tmp)
        if args.eval:
            results["benchmark"] = "memory_eval"
            results["runs"] = eval_runs(args, work)
            default = args.out == Path("bench/results/memory.json")
            out = Path("bench/results/memory_eval.json") if default else args.out
            atomic_write_text(out, json.dumps(results, indent=2) + "\n")
            print(f"wrote {out}")
            return 0
        data = make_data(work / "data", args.cases)
        from ctvq.ct.manifest import read_manifest

        results["cases"] = [{"case_id": r.case_id, "points": int(r.num_points), "latent": int(r.num_latent),
                             "split": r.split} for r in read_manifest(data).itertuples() if r.status == "ok"]
        for knob in args.knobs:
            changes = KNOBS[knob]
            weights = stage1_weights(changes, work / f"stage1_{len(results['runs'])}.pt")
            for points in args.points:
                config = config_for(changes, points, weights, work / "config.json")
                cmd = [sys.executable, __file__, "--child", "--config", str(config), "--data", str(data),
                       "--work", str(work / f"w{len(results['runs'])}"), "--threads", str(args.threads),
                       "--device", args.device]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{knob} at {points} points failed:\n{done.stderr[-3000:]}")
                run = {"knob": knob, "max_points": points, **json.loads(done.stdout.strip().splitlines()[-1])}
                results["runs"].append(run)
                print(f"{knob:22s} max_points {points:6d}: step {run['step_mb']:7.0f} MB above "
                      f"{run['rss_before_mb']:6.0f} MB, peak RSS {run['peak_rss_mb']:6.0f} MB "
                      f"({run['points']} points in the batch)", flush=True)
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
