"""3-D rotary position embedding (RoPE) from voxel coordinates.

Each head's channels are taken as adjacent pairs (0,1), (2,3), ...; the pairs are split evenly across the x,
y and z axes and each pair is rotated by coordinate * frequency. Rotating q and k this way makes q_i . k_j
depend only on the offset p_i - p_j. Pairs left over when ``head_dim // 2`` is not a multiple of 3 get phase 0
(identity), so the default head size 64 (32 pairs: 10 per axis + 2 identity) works.
"""

from __future__ import annotations

import torch


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Per-axis frequencies [head_dim // 2 // 3] (float64); raises if the head cannot be rotated in 3-D."""
    if head_dim % 2 != 0:
        raise ValueError(f"RoPE rotates channel pairs: head dim {head_dim} must be even "
                         f"(choose num_heads so that channels / num_heads is even)")
    freq_dim = head_dim // 2 // 3
    if freq_dim < 1:
        raise ValueError(f"3-D RoPE needs one channel pair per axis: head dim {head_dim} must be >= 6")
    return 1.0 / theta ** (torch.arange(freq_dim, dtype=torch.float64) / freq_dim)


def rope_phases(xyz: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angle per row and channel pair: [N, head_dim // 2], axes laid out x | y | z | zero padding."""
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"expected coordinates [N, 3], got {tuple(xyz.shape)}")
    freqs = rope_frequencies(head_dim, theta).to(xyz.device)
    phases = (xyz.to(torch.float64)[:, :, None] * freqs[None, None, :]).reshape(xyz.shape[0], -1)
    pad = head_dim // 2 - phases.shape[1]
    return torch.nn.functional.pad(phases, (0, pad))


def apply_rope(x: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, H, D] by phases [N, D // 2]; computed in at least float32, returned in x's dtype."""
    if x.ndim != 3 or phases.shape != (x.shape[0], x.shape[2] // 2):
        raise ValueError(f"phases {tuple(phases.shape)} do not match x {tuple(x.shape)} (want [N, D // 2])")
    work = torch.promote_types(x.dtype, torch.float32)
    pairs = x.to(work).reshape(*x.shape[:2], -1, 2)
    cos = torch.cos(phases).to(work)[:, None, :]
    sin = torch.sin(phases).to(work)[:, None, :]
    a, b = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return rotated.reshape(x.shape).to(x.dtype)
