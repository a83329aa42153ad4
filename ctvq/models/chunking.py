"""Chunk planning for the decoder's upsampling stage: pure functions on latent coordinates.

The latent grid (``resolution``³ per sample) is cut into ``chunk_size``³ equal chunks (``chunk_size`` counts
chunks per axis, as in Direct3D-S2). A chunk's upsampling runs on its core voxels plus a halo of ``padding``
latent voxels; the three subdivide blocks see at most ~2.2 latent voxels around a voxel and contain no
normalisation, so with a halo of 4 every core output equals the un-chunked one. Chunks span all samples of a
batch (the same spatial box in each), like Direct3D-S2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctvq.ct.sample import LATENT_STRIDE

DEFAULT_PADDING = 4
UPSAMPLE_FACTOR = LATENT_STRIDE  # the decoder's three 2x subdivisions undo the data's latent stride


@dataclass(frozen=True)
class ChunkPlan:
    """One chunk: its id, the latent rows it owns (core) and the rows its upsampling needs (core + halo)."""

    chunk_id: int
    core_rows: torch.Tensor  # int64 [K] rows of the latent tensor whose outputs this chunk owns
    halo_rows: torch.Tensor  # int64 [H >= K] rows fed to the upsampling (sorted, so batch order is kept)


def chunk_extent(resolution: int, chunk_size: int) -> int:
    """Edge length, in latent voxels, of one chunk; the grid must split evenly."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    if resolution % chunk_size:
        raise ValueError(
            f"chunk_size={chunk_size} does not divide the latent resolution {resolution}; "
            "choose a divisor (1, 2, 4, 8, ...)"
        )
    return resolution // chunk_size


def chunk_ids(latent_coords: torch.Tensor, resolution: int, chunk_size: int) -> torch.Tensor:
    """Chunk index (x-major over ``chunk_size``³) of every latent voxel; coords are [M, 4] (b, x, y, z)."""
    extent = chunk_extent(resolution, chunk_size)
    xyz = latent_coords[:, 1:].long()
    if xyz.numel() and (int(xyz.min()) < 0 or int(xyz.max()) >= resolution):
        raise ValueError(
            f"latent coords span [{int(xyz.min())}, {int(xyz.max())}], outside the {resolution}^3 "
            "latent grid; check the model resolution against the data resolution / 8"
        )
    cell = xyz // extent
    return (cell[:, 0] * chunk_size + cell[:, 1]) * chunk_size + cell[:, 2]


def halo_mask(
    latent_coords: torch.Tensor, chunk_id: int, resolution: int, chunk_size: int, padding: int
) -> torch.Tensor:
    """Rows inside chunk ``chunk_id``'s box grown by ``padding`` latent voxels per side."""
    extent = chunk_extent(resolution, chunk_size)
    cx, rest = divmod(chunk_id, chunk_size * chunk_size)
    cy, cz = divmod(rest, chunk_size)
    lo = torch.tensor([cx, cy, cz], device=latent_coords.device) * extent - padding
    hi = lo + extent + 2 * padding
    xyz = latent_coords[:, 1:].long()
    return ((xyz >= lo) & (xyz < hi)).all(dim=1)


def plan_chunks(
    latent_coords: torch.Tensor, resolution: int, chunk_size: int, padding: int = DEFAULT_PADDING
) -> list[ChunkPlan]:
    """Every non-empty chunk, in chunk-id order: together their cores cover each latent row exactly once."""
    ids = chunk_ids(latent_coords, resolution, chunk_size)
    plans = []
    for cid in torch.unique(ids).tolist():
        core = torch.nonzero(ids == cid).squeeze(1)
        halo = torch.nonzero(halo_mask(latent_coords, cid, resolution, chunk_size, padding)).squeeze(1)
        plans.append(ChunkPlan(int(cid), core, halo))
    return plans


def pick_training_chunk(
    latent_coords: torch.Tensor,
    resolution: int,
    chunk_size: int,
    padding: int = DEFAULT_PADDING,
    generator: torch.Generator | None = None,
) -> ChunkPlan:
    """One chunk drawn uniformly among the NON-EMPTY ones (a single draw, never a retry loop)."""
    ids = chunk_ids(latent_coords, resolution, chunk_size)
    occupied = torch.unique(ids).cpu()
    if occupied.numel() == 0:
        raise ValueError("pick_training_chunk: the latent tensor is empty; nothing to decode")
    pick = int(occupied[int(torch.randint(occupied.numel(), (1,), generator=generator))])
    core = torch.nonzero(ids == pick).squeeze(1)
    halo = torch.nonzero(halo_mask(latent_coords, pick, resolution, chunk_size, padding)).squeeze(1)
    return ChunkPlan(pick, core, halo)


def owned_output_mask(
    output_coords: torch.Tensor, chunk_id: int, resolution: int, chunk_size: int
) -> torch.Tensor:
    """Decoded voxels (full-resolution coords) whose parent latent voxel lies in chunk ``chunk_id``'s core."""
    parents = output_coords.clone()
    parents[:, 1:] = torch.div(output_coords[:, 1:], UPSAMPLE_FACTOR, rounding_mode="floor")
    return chunk_ids(parents, resolution, chunk_size) == chunk_id


__all__ = [
    "DEFAULT_PADDING",
    "UPSAMPLE_FACTOR",
    "ChunkPlan",
    "chunk_extent",
    "chunk_ids",
    "halo_mask",
    "owned_output_mask",
    "pick_training_chunk",
    "plan_chunks",
]
