"""Resolution changes of a sparse tensor: mean-pool downsampling and 8-child subdivision.

Both are pure functions of their input tensor. The pooling map of a downsample (which output voxel each input
voxel joins) depends only on the input coords and the factor, so it is kept in the input's coordinate cache
under ("downsample", factor); nothing is stashed for a later layer to find.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ctvq.sparse.tensor import SparseTensor


@dataclass(frozen=True)
class DownsampleMap:
    """Coarse voxels `coords` [M, 4] (batch-sorted), `inverse` [N] (coarse row of each fine voxel) and
    `counts` [M] (fine voxels per coarse voxel)."""

    coords: torch.Tensor
    inverse: torch.Tensor
    counts: torch.Tensor


def build_downsample_map(coords: torch.Tensor, factor: int) -> DownsampleMap:
    """Group voxels by (batch, floor(xyz / factor)); coarse voxels come out sorted by (batch, x, y, z)."""
    c = coords.long()
    if c.shape[0] == 0:
        empty = coords.new_zeros((0, 4))
        return DownsampleMap(empty, c.new_zeros(0), c.new_zeros(0))
    parent = torch.cat([c[:, :1], torch.div(c[:, 1:], factor, rounding_mode="floor")], dim=1)
    ext = parent.amax(dim=0) + 1
    ey, ez = int(ext[2]), int(ext[3])
    ex = int(ext[1])
    key = ((parent[:, 0] * ex + parent[:, 1]) * ey + parent[:, 2]) * ez + parent[:, 3]
    uniq, inverse, counts = torch.unique(key, sorted=True, return_inverse=True, return_counts=True)
    z = uniq % ez
    rest = torch.div(uniq, ez, rounding_mode="floor")
    y = rest % ey
    rest = torch.div(rest, ey, rounding_mode="floor")
    x = rest % ex
    b = torch.div(rest, ex, rounding_mode="floor")
    out = torch.stack([b, x, y, z], dim=1).to(coords.dtype)
    return DownsampleMap(out, inverse, counts)


def sparse_downsample(x: SparseTensor, factor: int = 2) -> SparseTensor:
    """Merge each factor³ block of voxels into one whose features are the mean of the merged voxels.

    Samples never mix (the batch index is part of the key). The result's scale is `factor` times the input's
    and its spatial shape is ceil(shape / factor). Means are accumulated in at least float32 and cast back.
    """
    if factor < 1:
        raise ValueError(f"sparse downsample factor must be >= 1; got {factor}")
    dmap = x.cache.get_or_build(("downsample", factor), lambda c: build_downsample_map(c, factor))
    dtype = torch.promote_types(x.dtype, torch.float32)
    acc = torch.zeros(dmap.coords.shape[0], x.num_channels, dtype=dtype, device=x.device)
    acc = acc.index_add(0, dmap.inverse, x.feats.to(dtype))
    feats = (acc / dmap.counts.unsqueeze(1).to(acc.dtype)).to(x.dtype)
    shape = tuple(-(-s // factor) for s in x.spatial_shape)
    scale = tuple(s * factor for s in x.scale)
    return SparseTensor(
        dmap.coords,
        feats,
        batch_size=x.batch_size,
        spatial_shape=shape,  # type: ignore[arg-type]
        scale=scale,  # type: ignore[arg-type]
    )


def child_offsets(device: torch.device | str = "cpu") -> torch.Tensor:
    """Int64 [8, 3] child offsets in {0, 1}³, ordered c = x + 2y + 4z (x fastest, as the kernel index)."""
    c = torch.arange(8, device=device)
    return torch.stack([c % 2, (c // 2) % 2, c // 4], dim=1)


def sparse_subdivide(x: SparseTensor) -> SparseTensor:
    """Split every voxel into its 8 children at 2·xyz + {0,1}³, each a copy of the parent's features.

    Children of one parent are consecutive rows (order `child_offsets`), so rows stay sorted by batch. The
    result's scale is half the input's and its spatial shape twice the input's.
    """
    n = x.num_voxels
    offsets = child_offsets(x.device).to(x.coords.dtype)
    parent = x.coords.repeat_interleave(8, dim=0)
    step = torch.cat([torch.zeros(8, 1, dtype=offsets.dtype, device=x.device), offsets], dim=1).repeat(n, 1)
    coords = parent * torch.tensor([1, 2, 2, 2], dtype=parent.dtype, device=x.device) + step
    feats = x.feats.repeat_interleave(8, dim=0)
    shape = tuple(2 * s for s in x.spatial_shape)
    scale = tuple(s / 2 for s in x.scale)
    return SparseTensor(
        coords,
        feats,
        batch_size=x.batch_size,
        spatial_shape=shape,  # type: ignore[arg-type]
        scale=scale,  # type: ignore[arg-type]
    )


class SparseDownsample(nn.Module):
    """Mean-pool `factor`³ blocks (Direct3D-S2's encoder uses factor 2)."""

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"SparseDownsample factor must be >= 1; got {factor}")
        self.factor = factor

    def forward(self, x: SparseTensor) -> SparseTensor:
        return sparse_downsample(x, self.factor)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class SparseSubdivide(nn.Module):
    """Each voxel -> 8 children with copied features (Direct3D-S2's decoder upsampling)."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return sparse_subdivide(x)


__all__ = [
    "DownsampleMap",
    "SparseDownsample",
    "SparseSubdivide",
    "build_downsample_map",
    "child_offsets",
    "sparse_downsample",
    "sparse_subdivide",
]
