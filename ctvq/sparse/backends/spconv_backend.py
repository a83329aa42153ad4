"""spconv 2.x adapter: runs our torchsparse-layout parameters through spconv's `SubMConv3d`.

The parameters stay in torchsparse layout ([K³, in, out], Direct3D-S2's checkpoint format); each call converts
the kernel to spconv's KRSC layout ([out, kx, ky, kz, in]) with a differentiable permute and runs a stateless
spconv module through `torch.func.functional_call`, so gradients land on our parameter. spconv is imported
lazily: this module imports without it, and the pure layout conversions work everywhere.

spconv indices are (batch, d0, d1, d2) with the spatial dims in `spatial_shape` order; we pass
(batch, x, y, z), so kernel axis 1 is x. Index pairs are kept in the tensor's coordinate cache under
("spconv_indices", indice key).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ctvq.sparse.tensor import SparseTensor


def torchsparse_to_spconv_kernel(kernel: torch.Tensor) -> torch.Tensor:
    """[K³, in, out] (k = x + K y + K² z) -> spconv KRSC [out, x, y, z, in]."""
    if kernel.dim() != 3:
        raise ValueError(f"torchsparse kernel must be [K^3, in, out]; got shape {tuple(kernel.shape)}")
    k = round(kernel.shape[0] ** (1 / 3))
    if k**3 != kernel.shape[0]:
        raise ValueError(
            f"torchsparse kernel's first dim must be a cube (27 for 3x3x3); got {kernel.shape[0]}"
        )
    c_in, c_out = kernel.shape[1], kernel.shape[2]
    # kernel index k = x + K y + K² z, so viewing dim 0 as (z, y, x) recovers the axes
    grid = kernel.reshape(k, k, k, c_in, c_out)  # [z, y, x, in, out]
    return grid.permute(4, 2, 1, 0, 3)  # [out, x, y, z, in]


def spconv_to_torchsparse_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Inverse of `torchsparse_to_spconv_kernel`: spconv KRSC [out, x, y, z, in] -> [K³, in, out]."""
    if weight.dim() != 5 or not (weight.shape[1] == weight.shape[2] == weight.shape[3]):
        raise ValueError(f"spconv kernel must be [out, K, K, K, in]; got shape {tuple(weight.shape)}")
    k = weight.shape[1]
    return weight.permute(3, 2, 1, 4, 0).reshape(k**3, weight.shape[4], weight.shape[0])


def _import_spconv() -> Any:
    try:
        import spconv.pytorch as spconv_torch
    except ImportError as err:
        raise RuntimeError(
            "sparse backend 'spconv' needs the spconv package (GPU extra: pip install 'ctvq[gpu]', i.e. "
            f"spconv-cu120); import failed with: {err}. Use backend 'torch' instead."
        ) from err
    return spconv_torch


def _indice_key(kernel_size: int, native: bool) -> str:
    # layers sharing an indice key must share the algorithm (spconv checks it), so the key names both
    return f"ctvq_subm{kernel_size}_{'native' if native else 'default'}"


@functools.lru_cache(maxsize=64)
def _template_module(
    c_in: int, c_out: int, kernel_size: int, has_bias: bool, native: bool
) -> torch.nn.Module:
    """A spconv SubMConv3d used only as a function: its parameters are always replaced at call time."""
    spconv_torch = _import_spconv()
    from spconv.core import ConvAlgo

    return spconv_torch.SubMConv3d(
        c_in,
        c_out,
        kernel_size,
        bias=has_bias,
        indice_key=_indice_key(kernel_size, native),
        algo=ConvAlgo.Native if native else None,
    )


def submanifold_conv3d(x: SparseTensor, kernel: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Output features [N, out] of spconv's SubMConv3d applied with a torchsparse-layout kernel.

    On CPU spconv runs forward only (its backward calls CUDA APIs) and its scatter is racy with more than one
    torch thread; use it there for comparisons only.
    """
    spconv_torch = _import_spconv()
    weight = torchsparse_to_spconv_kernel(kernel)
    c_out, k, _, _, c_in = weight.shape
    if c_in != x.num_channels:
        raise ValueError(f"sparse conv kernel expects {c_in} input channels, tensor has {x.num_channels}")
    native = x.device.type == "cpu"
    indice_key = _indice_key(k, native)
    module = _template_module(c_in, c_out, k, bias is not None, native)
    if tuple(module.weight.shape) != tuple(weight.shape):
        raise RuntimeError(
            f"this spconv stores SubMConv3d weights as {tuple(module.weight.shape)}, not KRSC "
            f"{tuple(weight.shape)}; unset SPCONV_SAVED_WEIGHT_LAYOUT or use backend 'torch'"
        )
    indice_dict: dict[str, Any] = x.cache.get_or_build(("spconv_indices", indice_key), lambda _: {})
    # spconv reads raw row-major memory: torch.nonzero (a common source of coords) returns column-major
    # [N, 4] tensors in recent torch, which spconv silently misreads, so both inputs are made contiguous
    sp_in = spconv_torch.SparseConvTensor(
        x.feats.contiguous(),
        x.coords.to(torch.int32).contiguous(),
        list(x.spatial_shape),
        x.batch_size,
        indice_dict=dict(indice_dict),
    )
    params: dict[str, torch.Tensor] = {"weight": weight.to(x.feats.dtype).contiguous()}
    if bias is not None:
        params["bias"] = bias.to(x.feats.dtype)
    sp_out = torch.func.functional_call(module, params, (sp_in,))
    if indice_key in sp_out.indice_dict:
        indice_dict[indice_key] = sp_out.indice_dict[indice_key]
    return sp_out.features
