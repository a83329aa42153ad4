"""Windowed attention memory is O(N * window): 50k voxels fit far below the 9 GiB of one [N, N] matrix."""

import json
import subprocess
import sys
import textwrap

import pytest

# Runs in a fresh interpreter and reads its VmHWM, its own address space's peak. Not ru_maxrss: Linux carries
# the parent's high-water mark (this test session's, GBs) into a child's ru_maxrss, so peak - base read 0.
PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    from ctvq.sparse.attention import SparseTransformerBlock, block_attention_args

    torch.manual_seed(0)
    side, per_sample = 40, 25_000  # ~39 % occupancy: dense windows of up to 512 voxels
    parts = []
    for b in range(2):
        flat = torch.randperm(side**3)[:per_sample]
        xyz = torch.stack([flat // (side * side), (flat // side) % side, flat % side], dim=1)
        parts.append(torch.cat([torch.full((per_sample, 1), b), xyz], dim=1))
    coords = torch.cat(parts)

    def peak_kib():
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))

    base = peak_kib()
    for mode in sys.argv[1:]:
        for index in (0, 1):
            args = block_attention_args(mode, 8, index)
            block = SparseTransformerBlock(64, 4, 2.0, mode, 8, args.shift_window, args.shift_sequence,
                                           args.serialize_mode)
            x = torch.randn(coords.shape[0], 64, requires_grad=True)
            block(x, coords).square().mean().backward()
            if not torch.isfinite(x.grad).all():
                raise SystemExit("non-finite gradient")
    peak = peak_kib()
    print(json.dumps({"n": coords.shape[0], "base_mib": base / 1024, "peak_mib": peak / 1024}))
    """
)


@pytest.mark.slow
def test_windowed_modes_on_50k_voxels_never_build_an_n_by_n_matrix():
    modes = ["swin", "shift_window", "shift_sequence", "shift_order"]
    done = subprocess.run([sys.executable, "-c", PROBE, *modes], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    assert stats["n"] == 50_000
    # one float32 [N, N] score matrix alone would be 50k^2 * 4 B = 9.3 GiB
    assert stats["peak_mib"] - stats["base_mib"] < 1500, stats
