"""Benchmark: 3x3x3 submanifold sparse conv, forward + backward seconds vs voxel count (CPU by default).

Voxels form spherical shells (surface-like, as a narrow-band SDF is), one per sample, batch size 1. The torch
backend is always timed (torch threads: --threads, default 1); on CPU the spconv backend is timed forward-only
and single-threaded when spconv imports (its CPU backward needs CUDA and its CPU scatter is racy with more
threads), on CUDA forward and forward+backward, together with its largest difference from the torch
backend. On CUDA both torch-backend paths (implicit GEMM, pair lists) are also timed forced. Writes JSON.

    .venv/bin/python bench/sparse_conv.py [--voxels 5000 20000 80000] [--channels 32 64 128] [--threads 1]

To time spconv too, run it with an interpreter that has the CPU `spconv` wheel and ctvq on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from ctvq.sparse import SparseBackend, SparseConv3d, SparseTensor, spconv_available
from ctvq.sparse.backends.torch_backend import _SubmanifoldConv, neighbor_map, use_pair_lists


def shell_voxels(target: int, device: torch.device) -> torch.Tensor:
    """Int32 [N, 4] coords of a 2-voxel-thick spherical shell holding about `target` voxels."""
    radius = math.sqrt(target / (4 * math.pi * 2))
    size = int(2 * radius + 6)
    axis = torch.arange(size, dtype=torch.float32) - size / 2
    gx, gy, gz = torch.meshgrid(axis, axis, axis, indexing="ij")
    dist = torch.sqrt(gx**2 + gy**2 + gz**2)
    mask = (dist - radius).abs() < 1.0
    xyz = torch.nonzero(mask)
    coords = torch.cat([torch.zeros(xyz.shape[0], 1, dtype=xyz.dtype), xyz], dim=1)
    return coords.to(torch.int32).contiguous().to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, repeats: int, device: torch.device) -> float:  # type: ignore[no-untyped-def]
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench_one(n_target: int, channels: int, repeats: int, device: torch.device) -> dict:
    coords = shell_voxels(n_target, device)
    feats = torch.randn(coords.shape[0], channels, device=device)
    conv = SparseConv3d(channels, channels).to(device)
    x = SparseTensor(coords, feats)
    start = time.perf_counter()
    with torch.no_grad():
        conv(x)  # the first call also builds the neighbour map (cached on x afterwards)
    _sync(device)
    first_call = time.perf_counter() - start
    nmap = neighbor_map(x, 3)
    with torch.no_grad():
        ref = conv(x).feats

    def fwd_bwd() -> None:
        f = feats.clone().requires_grad_(True)
        conv(x.replace(f)).feats.square().mean().backward()

    def fwd() -> None:
        with torch.no_grad():
            conv(x)

    row: dict = {
        "voxels": int(coords.shape[0]),
        "channels": channels,
        "pairs_per_voxel": nmap.num_pairs() / coords.shape[0],
        "torch_first_call_s": first_call,
        "torch_forward_s": time_call(fwd, repeats, device),
        "torch_forward_backward_s": time_call(fwd_bwd, repeats, device),
    }
    if device.type == "cuda":  # both torch-backend paths, forced, to check `use_pair_lists` on the GPU
        row["torch_picks_pair_lists"] = use_pair_lists(nmap, channels, channels)
        kernel, bias = conv.conv.kernel, conv.conv.bias
        for name, pairs in (("implicit_gemm", False), ("pair_lists", True)):

            def forced(pairs: bool = pairs) -> None:
                f = feats.clone().requires_grad_(True)
                _SubmanifoldConv.apply(f, kernel, bias, nmap, pairs).square().mean().backward()

            row[f"torch_{name}_forward_backward_s"] = time_call(forced, repeats, device)
    if spconv_available() and device.type == "cuda":
        conv.backend = SparseBackend.SPCONV
        try:
            row["spconv_forward_s"] = time_call(fwd, repeats, device)
            row["spconv_forward_backward_s"] = time_call(fwd_bwd, repeats, device)
            with torch.no_grad():
                row["spconv_max_abs_diff"] = float((conv(x).feats - ref).abs().max())
        finally:
            conv.backend = SparseBackend.TORCH
    elif spconv_available():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the CPU wheel's scatter is racy with more threads
        try:
            conv.backend = SparseBackend.SPCONV
            row["spconv_forward_s"] = time_call(fwd, repeats, device)
            with torch.no_grad():
                row["spconv_max_abs_diff"] = float((conv(x).feats - ref).abs().max())
        finally:
            torch.set_num_threads(threads)
            conv.backend = SparseBackend.TORCH
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxels", type=int, nargs="+", default=[5000, 20000, 80000])
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 = comparable with single-threaded CPU spconv)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/sparse_conv.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    rows = [bench_one(n, c, args.repeats, device) for c in args.channels for n in args.voxels]
    result = {
        "benchmark": "sparse_conv_3x3x3_submanifold",
        "device": str(device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "spconv": spconv_available(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
