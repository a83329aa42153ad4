"""Submanifold sparse convolution module with torchsparse-layout parameters.

Parameters live in a child module `conv` as `kernel` ([K³, in, out], or [in, out] for K = 1) and `bias`
([out]), so a state dict reads `conv.kernel` / `conv.bias` exactly like Direct3D-S2's checkpoint (which used
torchsparse): its weights load with no conversion. The backend only changes how the kernel is applied.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ctvq.sparse.backends import SparseBackend, spconv_backend, torch_backend
from ctvq.sparse.tensor import SparseTensor


class TorchsparseConvParams(nn.Module):
    """Holds `kernel` and `bias` in torchsparse layout (kernel index k = x + K y + K² z)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> None:
        super().__init__()
        volume = kernel_size**3
        shape = (in_channels, out_channels) if volume == 1 else (volume, in_channels, out_channels)
        self.kernel = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.kernel_volume = volume
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # torchsparse's default: U(-s, s) with s = 1 / sqrt(in_channels * kernel_volume), bias alike
        bound = 1.0 / math.sqrt(self.kernel.shape[-2] * self.kernel_volume)
        nn.init.uniform_(self.kernel, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)


class SparseConv3d(nn.Module):
    """Stride-1 submanifold conv (output voxels = input voxels); kernel_size 1 is a per-voxel linear map."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        bias: bool = True,
        backend: SparseBackend | str = SparseBackend.TORCH,
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"SparseConv3d kernel_size must be a positive odd number; got {kernel_size}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.backend = SparseBackend.parse(backend)
        self.conv = TorchsparseConvParams(in_channels, out_channels, kernel_size, bias)

    def forward(self, x: SparseTensor) -> SparseTensor:
        if x.num_channels != self.in_channels:
            raise ValueError(
                f"SparseConv3d expects {self.in_channels} input channels, the tensor has {x.num_channels}"
            )
        kernel, bias = self.conv.kernel, self.conv.bias
        if self.kernel_size == 1:
            feats = x.feats @ kernel
            if bias is not None:
                feats = feats + bias
            return x.replace(feats)
        if self.backend is SparseBackend.SPCONV:
            return x.replace(spconv_backend.submanifold_conv3d(x, kernel, bias))
        return x.replace(torch_backend.submanifold_conv3d(x, kernel, bias))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"bias={self.conv.bias is not None}, backend={self.backend.value}"
        )


def set_sparse_backend(module: nn.Module, backend: SparseBackend | str) -> int:
    """Set the backend of every SparseConv3d inside `module`; returns how many were set."""
    chosen = SparseBackend.parse(backend)
    count = 0
    for sub in module.modules():
        if isinstance(sub, SparseConv3d):
            sub.backend = chosen
            count += 1
    return count
