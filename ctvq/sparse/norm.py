"""Normalisation over sparse voxels, computed in (at least) float32 and cast back: use_fp16 keeps norms fp32.

`SparseGroupNorm` normalises each sample over its own voxels (statistics never mix samples, whatever the batch
composition); `SparseLayerNorm` normalises each voxel's channels. Parameters are named like torch.nn
(`weight`, `bias`), matching Direct3D-S2's checkpoint keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ctvq.sparse.tensor import SparseTensor


def group_norm_per_sample(
    feats: torch.Tensor,
    batch_index: torch.Tensor,
    batch_size: int,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """GroupNorm of [N, C] rows where rows with equal `batch_index` form one sample.

    Equals `nn.GroupNorm` applied to each sample as a [1, C, N_b] tensor (biased variance, two-pass for
    accuracy). Computes and returns at least float32 (float64 input stays float64).
    """
    n, c = feats.shape
    x = feats.to(_compute_dtype(feats.dtype)).reshape(n, num_groups, c // num_groups)
    b = batch_index.long()
    count = torch.bincount(b, minlength=batch_size).clamp_(min=1).to(x.dtype) * (c // num_groups)
    sums = x.new_zeros(batch_size, num_groups).index_add(0, b, x.sum(dim=2))
    mean = sums / count.unsqueeze(1)
    # index_select, not mean[b]: the backward of advanced indexing accumulates with atomics on CPU (its sum
    # order, hence the gradient, changed from run to run at 2 threads); index_select's is an ordered index_add
    centred = x - mean.index_select(0, b).unsqueeze(2)
    sq = x.new_zeros(batch_size, num_groups).index_add(0, b, centred.square().sum(dim=2))
    inv_std = torch.rsqrt(sq / count.unsqueeze(1) + eps)
    out = (centred * inv_std.index_select(0, b).unsqueeze(2)).reshape(n, c)
    if weight is not None:
        out = out * weight.to(out.dtype)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 are normalised in float32; float32/float64 as they are."""
    return torch.promote_types(dtype, torch.float32)


class SparseGroupNorm(nn.GroupNorm):
    """GroupNorm over each sample's voxels (like nn.GroupNorm on [1, C, N_b] per sample)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True) -> None:
        if num_groups < 1 or num_channels % num_groups != 0:
            raise ValueError(
                f"SparseGroupNorm: num_channels={num_channels} must be divisible by num_groups={num_groups}"
            )
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)

    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        if x.num_channels != self.num_channels:
            raise ValueError(f"SparseGroupNorm expects {self.num_channels} channels, got {x.num_channels}")
        out = group_norm_per_sample(
            x.feats, x.coords[:, 0], x.batch_size, self.num_groups, self.weight, self.bias, self.eps
        )
        return x.replace(out.to(x.dtype))


class SparseLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each voxel, in float32."""

    def __init__(self, num_channels: int, eps: float = 1e-5, elementwise_affine: bool = True) -> None:
        super().__init__(num_channels, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        dtype = _compute_dtype(x.dtype)
        weight = self.weight.to(dtype) if self.weight is not None else None
        bias = self.bias.to(dtype) if self.bias is not None else None
        out = F.layer_norm(x.feats.to(dtype), self.normalized_shape, weight, bias, self.eps)
        return x.replace(out.to(x.dtype))
