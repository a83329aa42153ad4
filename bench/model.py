"""Benchmark: SparseSDFVQVAE train-step time and peak memory vs input points; decoder memory vs chunk_size.

Train-step inputs are narrow bands (|d| <= 3 voxels) around spheres on the 512³ grid, sized to hold about the
requested number of points, with exact decoder targets. The decode benchmark feeds the decoder latent cells
with random codes laid out like an object that fills the grid (4³ small shells of ``--decode-radius`` cells on
a lattice, one per chunk of chunk_size 4): chunking pays off only when the object spans the chunks, as a CT
volume does. Each measurement runs in a fresh subprocess so that peak memory is that run's own: on CPU the
peak resident set (VmHWM, `bench/rss.py`) above the RSS measured just before the step (for the decode: after a
warm-up decode of 8 cells), on CUDA ``torch.cuda.max_memory_allocated`` above the allocation before the step.
Writes JSON.

    .venv/bin/python bench/model.py [--points 5000 20000 80000 160000] [--decode-radius 2]
        [--model-channels 512] [--num-blocks 4] [--device cpu] [--threads 2] [--out bench/results/model.json]
        [--compare-backends torch spconv]

Side by side with spconv on CPU: an interpreter with the CPU ``spconv`` wheel and ctvq on PYTHONPATH,
``--threads 1 --compare-backends torch spconv`` (forward only there: the wheel's backward needs CUDA).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rss import peak_rss_mb  # bench/ is the script's folder, so its siblings import by name

BAND = 3.0
GRID = 512


def shell_batch(points: int, device: torch.device) -> dict[str, Any]:
    """A one-sample batch: band voxels of a sphere holding about ``points`` voxels, plus exact targets."""
    radius = math.sqrt(points / (4 * math.pi * (2 * BAND + 1)))
    centre = np.array([GRID / 2 + 0.37, GRID / 2 + 0.21, GRID / 2 + 0.13])
    lo = np.floor(centre - radius - BAND - 1).astype(int)
    hi = np.ceil(centre + radius + BAND + 2).astype(int)
    axes = [np.arange(lo[i], hi[i]) for i in range(3)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    dist = np.linalg.norm(grid - centre, axis=1) - radius
    band = grid[np.abs(dist) <= BAND]
    sdf = np.clip((np.linalg.norm(band - centre, axis=1) - radius) / BAND, -1, 1).astype(np.float32)
    latent = np.unique(band // 8, axis=0)
    children = (latent[:, None, :] * 8 + np.stack(np.meshgrid(*[np.arange(8)] * 3, indexing="ij"), -1)
                .reshape(1, 512, 3))
    targets = np.clip((np.linalg.norm(children - centre, axis=2) - radius) / BAND, -1, 1).astype(np.float32)

    def with_batch(xyz: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([np.zeros((len(xyz), 1), int), xyz], 1).astype(np.int32))

    return {
        "coords": with_batch(band).to(device),
        "feats": torch.from_numpy(sdf).reshape(-1, 1).to(device),
        "latent_coords": with_batch(latent).to(device),
        "targets": torch.from_numpy(targets.reshape(-1, 8, 8, 8)).to(device),
        "batch_size": 1,
    }


def latent_lattice(radius: float, per_axis: int = 4, res: int = GRID // 8) -> torch.Tensor:
    """Int32 [M, 4] latent cells of ``per_axis``³ small shells (radius ``radius`` cells, half a cell thick)
    on a regular lattice: an object whose surfaces fill the grid, as a CT's skin and bones do."""
    step = res // per_axis
    axis = torch.arange(res, dtype=torch.float32) + 0.5
    gx, gy, gz = torch.meshgrid(axis, axis, axis, indexing="ij")
    # distance to the nearest lattice centre (centres at step/2 + k*step)
    d = [((g - step / 2) - step * torch.round((g - step / 2) / step)) for g in (gx, gy, gz)]
    near = ((d[0] ** 2 + d[1] ** 2 + d[2] ** 2).sqrt() - radius).abs() <= 0.5
    xyz = torch.nonzero(near)
    return torch.cat([torch.zeros(xyz.shape[0], 1, dtype=xyz.dtype), xyz], 1).to(torch.int32)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return int(peak_rss_mb() * 2**20)


def _model(args: argparse.Namespace, chunk_size: int, device: torch.device):  # type: ignore[no-untyped-def]
    from ctvq.models import SparseSDFVQVAE

    torch.manual_seed(0)
    model = SparseSDFVQVAE(model_channels=args.model_channels, latent_channels=16, num_blocks=args.num_blocks,
                           num_embeddings=8192, attn_mode="swin", window_size=8, chunk_size=chunk_size,
                           sparse_backend=args.backend)
    for layer in (model.encoder.out_layer, model.decoder.out_layer):  # zero-init in Direct3D-S2
        torch.nn.init.normal_(layer.weight, std=0.02)
    return model.to(device)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement (runs in its own process)."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    model = _model(args, args.child_chunk, device)
    if args.precision == "fp16":
        model.convert_to_fp16()
    autocast = torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
                              enabled=args.precision == "amp")
    if args.child_task in ("train_step", "forward"):
        batch = shell_batch(args.child_points, device)
        points, latent_voxels = int(batch["coords"].shape[0]), int(batch["latent_coords"].shape[0])
    else:
        coords = latent_lattice(args.child_radius).to(device)
        gen = torch.Generator().manual_seed(0)
        indices = torch.randint(8192, (coords.shape[0],), generator=gen).to(device)
        points, latent_voxels = 0, int(coords.shape[0])
        # warm up on a few cells first, so that one-time library set-up (thread pools, kernel caches) is not
        # counted as decoder memory: its peak is far below the measured decode's
        model.eval()
        with torch.no_grad():
            model.decode(model.latent_from_indices(coords[:8], indices[:8], batch_size=1))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    if args.child_task in ("train_step", "forward"):
        backward = args.child_task == "train_step"  # forward only: all that the CPU spconv wheel can run
        model.train()
        for _ in range(args.repeats + 1):  # the first step warms up (allocator, thread pools) untimed
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            with torch.set_grad_enabled(backward), autocast:
                out = model(batch, loss_type="l1")
            if backward:
                (out["recon_loss"] + out["codebook_loss"] + 0.25 * out["commitment_loss"]).backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        times = times[1:]
        decoded = out["num_decoded"]
    else:  # eval decode, chunked per chunk_size
        model.eval()
        start = time.perf_counter()
        with torch.no_grad():
            decoded = model.decode(model.latent_from_indices(coords, indices, batch_size=1)).num_voxels
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_rss_bytes() - base
    return {
        "task": args.child_task,
        "backend": args.backend,
        "points": points,
        "latent_voxels": latent_voxels,
        "decoded_voxels": int(decoded),
        "chunk_size": args.child_chunk,
        "seconds_median": sorted(times)[len(times) // 2],
        "seconds_min": min(times),
        "timed_runs": len(times),
        "peak_mem_mb": peak / 2**20,
    }


def run_child(args: argparse.Namespace, task: str, points: int, chunk: int, backend: str | None = None
              ) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child-task", task, "--child-points", str(points), "--child-chunk",
           str(chunk), "--child-radius", str(args.decode_radius), "--device", args.device, "--threads",
           str(args.threads), "--model-channels", str(args.model_channels), "--num-blocks",
           str(args.num_blocks), "--backend", backend or args.backend, "--repeats", str(args.repeats),
           "--precision", args.precision]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child {task} points={points} chunk={chunk} failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, nargs="+", default=[5000, 20000, 80000, 160000])
    parser.add_argument("--decode-radius", type=float, default=2.0)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--model-channels", type=int, default=512)
    parser.add_argument("--num-blocks", type=int, default=4)
    parser.add_argument("--backend", default="torch", help="backend of the train-step and decode runs")
    parser.add_argument("--compare-backends", nargs="*", default=[], metavar="BACKEND",
                        help="also time these backends (e.g. torch spconv): forward+backward on CUDA, "
                             "forward only on CPU, where the spconv wheel's backward needs CUDA; run with "
                             "--threads 1 on CPU, the wheel's scatter being racy with more threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "amp", "fp16"), default="fp32",
                        help="amp: autocast (float16 on CUDA, bfloat16 on CPU); fp16: the model's use_fp16 "
                             "weights (norms stay float32)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed train steps after one warm-up step")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "model.json")
    parser.add_argument("--child-task", help=argparse.SUPPRESS)
    parser.add_argument("--child-points", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-chunk", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--child-radius", type=float, default=2.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_task:
        print(json.dumps(child(args)))
        return
    train = [run_child(args, "train_step", n, 1) for n in args.points]
    compare_task = "train_step" if args.device.startswith("cuda") else "forward"
    compare = [run_child(args, compare_task, n, 1, backend) for backend in args.compare_backends
               for n in args.points]
    decode = [run_child(args, "eval_decode", 0, c) for c in args.chunk_sizes]
    report = {
        "benchmark": "SparseSDFVQVAE forward+backward and chunked decode",
        "model": {"model_channels": args.model_channels, "num_blocks": args.num_blocks,
                  "latent_channels": 16, "num_embeddings": 8192, "attn_mode": "swin", "window_size": 8,
                  "sparse_backend": args.backend},
        "device": args.device,
        "precision": args.precision,
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "memory_note": "CPU: peak RSS above the RSS before the step; CUDA: max allocated above the base",
        "decode_layout": f"4x4x4 lattice of latent shells, radius {args.decode_radius} cells, random codes",
        "train_step": train,
        "backend_comparison": compare,
        "eval_decode_by_chunk_size": decode,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
