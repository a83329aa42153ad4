"""Per-voxel layers: they act on the feature rows only and keep coords, layout and coordinate cache."""

from __future__ import annotations

from torch import nn

from ctvq.sparse.tensor import SparseTensor


class SparseLinear(nn.Linear):
    """nn.Linear on every voxel's features (parameter names `weight` [out, in] / `bias` as torch.nn)."""

    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.replace(super().forward(x.feats))


class SparseSiLU(nn.SiLU):
    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.replace(super().forward(x.feats))


class SparseGELU(nn.GELU):
    """GELU on features; `approximate="tanh"` is the variant Direct3D-S2's MLPs use."""

    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.replace(super().forward(x.feats))


class SparseTanh(nn.Tanh):
    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.replace(super().forward(x.feats))
