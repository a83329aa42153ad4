"""Space-filling-curve keys for 3-D integer voxel coordinates, vectorised in torch.

Serialized attention cuts a curve ordering of each sample's voxels into fixed-length chunks; a curve that
keeps neighbours close in the ordering makes each chunk a compact blob of space. Z-order (Morton) is cheap;
Hilbert never jumps (consecutive keys are face-adjacent voxels). The transposed variants swap the x and y
axes, so a stack of blocks cycling through the four curves sees differently shaped chunks.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

SerializeMode = Literal["z_order", "z_order_transposed", "hilbert", "hilbert_transposed"]
SERIALIZE_MODES: tuple[SerializeMode, ...] = get_args(SerializeMode)

# 3 axes x 21 bits = 63 bits: the largest code that fits a signed int64 key.
MAX_BITS = 21


def bits_for(coords_xyz: torch.Tensor) -> int:
    """Bits per axis needed to hold the largest coordinate (at least 1)."""
    if coords_xyz.numel() == 0:
        return 1
    bits = max(1, int(coords_xyz.max().item()).bit_length())
    if bits > MAX_BITS:
        raise ValueError(f"coordinate {int(coords_xyz.max().item())} needs {bits} bits per axis; at most "
                         f"{MAX_BITS} fit a 64-bit key (coordinates must be < 2**{MAX_BITS})")
    return bits


def _check_xyz(xyz: torch.Tensor) -> torch.Tensor:
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"expected coordinates of shape [N, 3], got {tuple(xyz.shape)}")
    if xyz.dtype.is_floating_point or xyz.dtype == torch.bool:
        raise ValueError(f"coordinates must be an integer tensor, got {xyz.dtype}")
    if xyz.numel() and int(xyz.min().item()) < 0:
        raise ValueError(f"coordinates must be non-negative to serialize, got min {int(xyz.min().item())}")
    return xyz.to(torch.int64)


def _interleave(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    """Interleave bits as ... x_b y_b z_b ... x_0 y_0 z_0 (x most significant within each triple)."""
    code = torch.zeros_like(x)
    for b in range(bits):
        code |= ((x >> b) & 1) << (3 * b + 2)
        code |= ((y >> b) & 1) << (3 * b + 1)
        code |= ((z >> b) & 1) << (3 * b)
    return code


def morton_key(xyz: torch.Tensor, bits: int | None = None) -> torch.Tensor:
    """Z-order code of each row of an int tensor [N, 3]; bits per axis default to what the data needs."""
    xyz = _check_xyz(xyz)
    bits = bits_for(xyz) if bits is None else bits
    return _interleave(xyz[:, 0], xyz[:, 1], xyz[:, 2], bits)


def hilbert_key(xyz: torch.Tensor, bits: int | None = None) -> torch.Tensor:
    """Hilbert-curve index of each row of an int tensor [N, 3] on a 2**bits cube.

    Skilling's construction (Programming the Hilbert curve, AIP Conf. Proc. 707, 2004): undo the curve's
    per-level rotations/reflections on the axes, Gray-encode, then read the bits interleaved. Each step is a
    masked xor over the whole tensor, so the cost is O(N * bits) with no Python loop over points.
    """
    xyz = _check_xyz(xyz)
    bits = bits_for(xyz) if bits is None else bits
    x = [xyz[:, 0].clone(), xyz[:, 1].clone(), xyz[:, 2].clone()]
    q = 1 << (bits - 1)
    while q > 1:
        p = q - 1
        # axis 0: reflect the low bits when its own level bit is set
        x[0] = torch.where((x[0] & q) != 0, x[0] ^ p, x[0])
        for i in (1, 2):
            set_i = (x[i] & q) != 0
            swap = (x[0] ^ x[i]) & p
            new0 = torch.where(set_i, x[0] ^ p, x[0] ^ swap)
            x[i] = torch.where(set_i, x[i], x[i] ^ swap)
            x[0] = new0
        q >>= 1
    x[1] = x[1] ^ x[0]
    x[2] = x[2] ^ x[1]
    t = torch.zeros_like(x[0])
    q = 1 << (bits - 1)
    while q > 1:
        t = torch.where((x[2] & q) != 0, t ^ (q - 1), t)
        q >>= 1
    return _interleave(x[0] ^ t, x[1] ^ t, x[2] ^ t, bits)


def serialize(coords: torch.Tensor, mode: SerializeMode, bits: int | None = None) -> torch.Tensor:
    """Sort key [N] int64 for coords [N, 4] (batch, x, y, z): batch in the high bits, curve code below.

    Sorting by this key groups each sample's rows together and orders them along the curve.
    """
    if coords.ndim != 2 or coords.shape[1] != 4:
        raise ValueError(f"expected coords of shape [N, 4] (batch, x, y, z), got {tuple(coords.shape)}")
    if mode not in SERIALIZE_MODES:
        raise ValueError(f"unknown serialize mode {mode!r}; choose one of {SERIALIZE_MODES}")
    xyz = _check_xyz(coords[:, 1:])
    batch = coords[:, 0].to(torch.int64)
    if batch.numel() and int(batch.min().item()) < 0:
        raise ValueError(f"batch indices must be non-negative, got min {int(batch.min().item())}")
    bits = bits_for(xyz) if bits is None else bits
    if mode.endswith("_transposed"):
        xyz = xyz[:, [1, 0, 2]]
    code = morton_key(xyz, bits) if mode.startswith("z_order") else hilbert_key(xyz, bits)
    if batch.numel() and int(batch.max().item()).bit_length() + 3 * bits > 63:
        raise ValueError(f"batch index {int(batch.max().item())} with {bits} bits per axis overflows int64")
    return (batch << (3 * bits)) | code
