"""Benchmark: peak memory of one training step for each out-of-memory knob, alone, at several data sizes.

The base is the reference's scenario 2 (``configs/vqvae/stage2.json``: width 512, 8 + 8 blocks, batch 2 in 2
micro-batches, ``use_checkpoint`` on) on chest phantoms at 256³, lung window, in fp32 (``fp16_mode`` null:
the fp16 modes are for CUDA). Each knob is changed alone; ``max_points`` sets the data size of a step (the
band voxels of one case after the crop). Every measurement runs one training step in a fresh process, so
``ru_maxrss`` is its own peak. Two steps run: the optimizer's state (Adam: twice the parameters) is made at
the end of the first, after its activations are freed, so only the second holds gradients, optimizer state
and activations together, as every later step does. ``step_mb`` is the peak above the process's memory
before the first step (model and data loaded). On CUDA (``--device cuda``) the CUDA allocator's peak is
reported too.

    .venv/bin/python bench/memory.py [--points 10000 40000 80000 160000] [--threads 2]
        [--device cpu] [--out bench/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from quality import set_key  # bench/ is the script's folder, so its sibling imports by name

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
}


def current_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


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
    first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # activations are freed:
    trainer.train_step(next(batches, micro))  # the second step holds both, as every later one does
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out = {"peak_rss_mb": peak, "first_step_peak_rss_mb": first, "rss_before_mb": before,
           "points": int(sum(int(m["coords"].shape[0]) for m in micro))}
    out["step_mb"] = out["peak_rss_mb"] - before
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(out))


def make_data(folder: Path, cases: int) -> Path:
    from ctvq.ct.demo import run_demo

    run_demo(folder, cases, RESOLUTION, ["lung"])
    return folder / "lung" / "manifest.csv"


def config_for(changes: dict[str, Any], points: int, stage1: Path, path: Path) -> Path:
    cfg = json.loads(BASE.read_text())
    cfg["dataset"]["args"].update(resolution=RESOLUTION, max_points=points)
    cfg["models"]["vqvae"]["args"].update(resolution=RESOLUTION // 8, sparse_backend="torch")
    cfg["trainer"]["args"].update(pretrained_vae_path=str(stage1), fp16_mode=None, num_workers=0,
                                  ema_rate=[], disable_snapshot=True)
    for dotted, value in changes.items():
        set_key(cfg, dotted, value)
    path.write_text(json.dumps(cfg))
    return path


def stage1_weights(changes: dict[str, Any], path: Path) -> Path:
    """A stage-1 checkpoint of the (changed) model's initial weights, which stage 2 starts from."""
    import torch

    from ctvq.config import load_config
    from ctvq.models.vqvae import SparseSDFVQVAE
    from ctvq.train.checkpoint import atomic_torch_save, model_payload

    probe = config_for(changes, 1000, path, path.with_suffix(".json"))
    torch.manual_seed(0)
    model = SparseSDFVQVAE(**load_config(probe).model.to_dict()["args"])
    atomic_torch_save(model_payload(model.state_dict(), model.config, 1, 0), path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, nargs="+", default=[10000, 40000, 80000, 160000])
    parser.add_argument("--knobs", nargs="+", choices=list(KNOBS), default=list(KNOBS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--cases", type=int, default=4, help="phantoms made (the hash split holds some out)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/memory.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    from ctvq.atomic import atomic_write_text

    results: dict[str, Any] = {
        "benchmark": "memory", "base": str(BASE.relative_to(BASE.parents[2])), "resolution": RESOLUTION,
        "device": args.device, "threads": args.threads, "python": platform.python_version(),
        "cpus": os.cpu_count(), "command": " ".join([sys.executable, *sys.argv]), "runs": []}
    with tempfile.TemporaryDirectory(prefix="ctvq-bench-memory-") as tmp:
        work = Path(tmp)
        data = make_data(work / "data", args.cases)
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
