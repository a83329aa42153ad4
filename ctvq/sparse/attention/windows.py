"""Partition a batch of sparse voxels into attention groups (windows), one int64 group id per row.

Every attention mode reduces to "attend within the rows that share a group id". Group ids always include
the batch index, so no sample ever attends to another. Ids need not be contiguous; the attention core
compacts them.

Model-level modes and what each block gets (`block_attention_args`):
- ``full``: one group per sample.
- ``swin``: cubes of ``window_size``^3 latent voxels; odd blocks shift the grid by ``window_size // 2``.
- ``shift_window``: serialized windows (Z-order, chunks of ``window_size``^3 tokens) where odd blocks shift
  the coordinates by ``window_size // 2`` before serializing. This follows TRELLIS, where the reference's
  ``shift_window`` also meant a coordinate shift of a Z-order serialization, and unlike a swin that shifts on
  every block (which would never alternate window borders) it lets information cross chunk borders.
- ``shift_sequence``: serialized windows (Z-order); odd blocks move the chunk borders by half a chunk.
- ``shift_order``: serialized windows with the curve cycling per block through z_order, z_order_transposed,
  hilbert, hilbert_transposed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from ctvq.sparse.attention.serialize import SERIALIZE_MODES, SerializeMode, serialize

AttnMode = Literal["full", "swin", "shift_window", "shift_sequence", "shift_order"]
ATTN_MODES: tuple[AttnMode, ...] = get_args(AttnMode)
SERIALIZED_MODES: tuple[AttnMode, ...] = ("shift_window", "shift_sequence", "shift_order")


@dataclass(frozen=True)
class BlockAttention:
    """Per-block window arguments derived from the model-level mode and the block's index."""

    attn_mode: AttnMode
    window_size: int
    shift_window: int = 0
    shift_sequence: int = 0
    serialize_mode: SerializeMode = "z_order"


def check_attention_args(attn: BlockAttention) -> None:
    """Reject unknown modes and arguments that a mode would silently ignore."""
    if attn.attn_mode not in ATTN_MODES:
        raise ValueError(f"unknown attn_mode {attn.attn_mode!r}; choose one of {ATTN_MODES}")
    if attn.serialize_mode not in SERIALIZE_MODES:
        raise ValueError(f"unknown serialize_mode {attn.serialize_mode!r}; choose one of {SERIALIZE_MODES}")
    if attn.attn_mode != "full" and attn.window_size < 1:
        raise ValueError(f"window_size must be >= 1 for attn_mode {attn.attn_mode!r}, got {attn.window_size}")
    if attn.shift_window < 0 or attn.shift_sequence < 0:
        raise ValueError(f"shifts must be >= 0, got shift_window={attn.shift_window}, "
                         f"shift_sequence={attn.shift_sequence}")
    unused = []
    if attn.attn_mode == "full" and attn.shift_window:
        unused.append(f"shift_window={attn.shift_window}")
    if attn.attn_mode in ("full", "swin") and attn.shift_sequence:
        unused.append(f"shift_sequence={attn.shift_sequence}")
    if attn.attn_mode in ("full", "swin") and attn.serialize_mode != "z_order":
        unused.append(f"serialize_mode={attn.serialize_mode!r}")
    if unused:
        raise ValueError(f"attn_mode {attn.attn_mode!r} does not use {', '.join(unused)}; remove it")


def block_attention_args(attn_mode: AttnMode, window_size: int, block_index: int) -> BlockAttention:
    """The window arguments of block ``block_index`` for a model-level ``attn_mode`` (see module doc)."""
    odd = block_index % 2
    if attn_mode == "full":
        out = BlockAttention("full", window_size)
    elif attn_mode in ("swin", "shift_window"):
        out = BlockAttention(attn_mode, window_size, shift_window=window_size // 2 * odd)
    elif attn_mode == "shift_sequence":
        out = BlockAttention(attn_mode, window_size, shift_sequence=window_size**3 // 2 * odd)
    elif attn_mode == "shift_order":
        out = BlockAttention(attn_mode, window_size, serialize_mode=SERIALIZE_MODES[block_index % 4])
    else:
        raise ValueError(f"unknown attn_mode {attn_mode!r}; choose one of {ATTN_MODES}")
    check_attention_args(out)
    return out


def _check_coords(coords: torch.Tensor) -> torch.Tensor:
    if coords.ndim != 2 or coords.shape[1] != 4:
        raise ValueError(f"expected coords of shape [N, 4] (batch, x, y, z), got {tuple(coords.shape)}")
    if coords.dtype.is_floating_point:
        raise ValueError(f"coords must be an integer tensor, got {coords.dtype}")
    coords = coords.to(torch.int64)
    if coords.numel() and int(coords.min().item()) < 0:
        raise ValueError("coords must be non-negative (batch, x, y, z)")
    return coords


def full_groups(coords: torch.Tensor) -> torch.Tensor:
    """One group per sample: the batch index."""
    return _check_coords(coords)[:, 0].clone()


def swin_groups(coords: torch.Tensor, window_size: int, shift: int = 0) -> torch.Tensor:
    """Group = (batch, window box): boxes of ``window_size``^3 voxels on a grid offset by ``shift``."""
    coords = _check_coords(coords)
    if coords.shape[0] == 0:
        return coords[:, 0].clone()
    box = torch.div(coords[:, 1:] + shift, window_size, rounding_mode="floor")
    extent = box.max(dim=0).values + 1
    key = coords[:, 0]
    for axis in range(3):
        key = key * extent[axis] + box[:, axis]
    return key


def serialized_groups(
    coords: torch.Tensor,
    chunk_len: int,
    serialize_mode: SerializeMode = "z_order",
    shift_sequence: int = 0,
    shift_window: int = 0,
) -> torch.Tensor:
    """Group = (batch, chunk) over each sample's curve ordering, cut every ``chunk_len`` tokens.

    ``shift_window`` offsets the coordinates before serializing (moves the curve's cell borders);
    ``shift_sequence`` moves the chunk borders along the ordering (the first chunk of a sample gets
    ``chunk_len - shift_sequence`` tokens).
    """
    coords = _check_coords(coords)
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
    n = coords.shape[0]
    if n == 0:
        return coords[:, 0].clone()
    shifted = coords.clone()
    shifted[:, 1:] += shift_window
    order = torch.argsort(serialize(shifted, serialize_mode), stable=True)
    batch_sorted = coords[order, 0]
    counts = torch.bincount(batch_sorted)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=coords.device) - starts[batch_sorted]
    chunk = torch.div(rank + shift_sequence % chunk_len, chunk_len, rounding_mode="floor")
    max_chunks = n // chunk_len + 2
    groups = torch.empty_like(batch_sorted)
    groups[order] = batch_sorted * max_chunks + chunk
    return groups


def attention_groups(coords: torch.Tensor, attn: BlockAttention) -> torch.Tensor:
    """Group id per row for one block's attention arguments."""
    check_attention_args(attn)
    if attn.attn_mode == "full":
        return full_groups(coords)
    if attn.attn_mode == "swin":
        return swin_groups(coords, attn.window_size, attn.shift_window)
    return serialized_groups(coords, attn.window_size**3, attn.serialize_mode, attn.shift_sequence,
                             attn.shift_window)
