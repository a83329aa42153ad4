"""Pure-PyTorch submanifold sparse convolution: runs on CPU and CUDA, needs no extension.

Neighbours are found by encoding (batch, x, y, z) into one int64 key, sorting the keys once and looking every
kernel offset up with `torch.searchsorted`. The convolution then runs offset by offset (gather, matmul,
scatter-add), so temporaries are at most [N, C]. A custom autograd function keeps only the input features, the
kernel and the neighbour map for backward (recomputing the gathers) instead of autograd's saved gathers, which
would amount to the [N, 27, C] tensor we avoid.

Convention (torchsparse's, used by Direct3D-S2's weights): kernel [K³, in, out]; offsets d in {-r..r}³
with index k = (dx + r) + K (dy + r) + K² (dz + r), x fastest; out[p] = sum_k in[p + d_k] @ kernel[k] + bias,
i.e. the cross-correlation that `torch.nn.functional.conv3d` computes with
weight[o, i, dx + r, dy + r, dz + r].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctvq.sparse.tensor import SparseTensor


@dataclass(frozen=True)
class NeighborMap:
    """For each kernel offset k: rows `out_index[k]` of the output read rows `in_index[k]` of the input.

    The centre offset is the identity and is stored as None (it is handled as one dense matmul).
    """

    kernel_size: int
    num_voxels: int
    out_index: tuple[torch.Tensor | None, ...]
    in_index: tuple[torch.Tensor | None, ...]

    @property
    def center(self) -> int:
        return (self.kernel_size**3) // 2

    def num_pairs(self) -> int:
        """Number of (output, input) pairs over all offsets, the centre included."""
        return self.num_voxels + sum(int(o.numel()) for o in self.out_index if o is not None)


def kernel_offsets(kernel_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Int64 [K³, 3] offsets (dx, dy, dz) in kernel-index order k = x + K y + K² z."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"sparse conv kernel_size must be a positive odd number; got {kernel_size}")
    r = kernel_size // 2
    rng = torch.arange(-r, r + 1, device=device)
    dz, dy, dx = torch.meshgrid(rng, rng, rng, indexing="ij")
    return torch.stack([dx.reshape(-1), dy.reshape(-1), dz.reshape(-1)], dim=1)


def build_neighbor_map(coords: torch.Tensor, kernel_size: int) -> NeighborMap:
    """Neighbour pairs of unique voxels `coords` [N, 4] for a stride-1 submanifold kernel."""
    offsets = kernel_offsets(kernel_size, coords.device)
    n = coords.shape[0]
    center = offsets.shape[0] // 2
    if n == 0:
        empty = tuple(
            None if k == center else coords.new_zeros(0, dtype=torch.int32) for k in range(len(offsets))
        )
        return NeighborMap(kernel_size, 0, empty, empty)
    r = kernel_size // 2
    c = coords.long()
    ext = c[:, 1:].amax(dim=0) + 1 + 2 * r
    ex, ey, ez = (int(v) for v in ext.tolist())
    nb = int(c[:, 0].max()) + 1
    if nb * ex * ey * ez >= 2**62:
        raise ValueError(f"sparse coords too large to hash: batch {nb} x extent {(ex, ey, ez)}")
    key = ((c[:, 0] * ex + c[:, 1] + r) * ey + c[:, 2] + r) * ez + c[:, 3] + r
    sorted_keys, perm = torch.sort(key)
    if n > 1 and bool((sorted_keys[1:] == sorted_keys[:-1]).any()):
        dup = int(perm[1:][sorted_keys[1:] == sorted_keys[:-1]][0])
        raise ValueError(
            f"sparse coords hold duplicate voxels (e.g. {coords[dup].tolist()}); merge them first"
        )
    deltas = ((offsets[:, 0] * ey) + offsets[:, 1]) * ez + offsets[:, 2]
    index_dtype = torch.int32 if n < 2**31 else torch.int64
    outs: list[torch.Tensor | None] = []
    ins: list[torch.Tensor | None] = []
    for k in range(offsets.shape[0]):
        if k == center:
            outs.append(None)
            ins.append(None)
            continue
        query = key + deltas[k]
        pos = torch.searchsorted(sorted_keys, query).clamp_(max=n - 1)
        hit = sorted_keys[pos] == query
        outs.append(torch.nonzero(hit).squeeze(1).to(index_dtype))
        ins.append(perm[pos[hit]].to(index_dtype))
    return NeighborMap(kernel_size, n, tuple(outs), tuple(ins))


def neighbor_map(x: SparseTensor, kernel_size: int) -> NeighborMap:
    """The tensor's neighbour map for `kernel_size`, built once and kept in its coordinate cache."""
    return x.cache.get_or_build(("neighbors", kernel_size), lambda c: build_neighbor_map(c, kernel_size))


class _SubmanifoldConv(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        feats: torch.Tensor,
        kernel: torch.Tensor,
        bias: torch.Tensor | None,
        nmap: NeighborMap,
    ) -> torch.Tensor:
        out = feats @ kernel[nmap.center]
        for k, (o, i) in enumerate(zip(nmap.out_index, nmap.in_index, strict=True)):
            if o is None or i is None or o.numel() == 0:
                continue
            out.index_add_(0, o, feats.index_select(0, i) @ kernel[k])
        if bias is not None:
            out += bias
        ctx.save_for_backward(feats, kernel)
        ctx.nmap = nmap  # type: ignore[attr-defined]
        ctx.has_bias = bias is not None  # type: ignore[attr-defined]
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        feats, kernel = ctx.saved_tensors  # type: ignore[attr-defined]
        nmap: NeighborMap = ctx.nmap  # type: ignore[attr-defined]
        need_feats, need_kernel, need_bias, _ = ctx.needs_input_grad  # type: ignore[attr-defined]
        grad_out = grad_out.contiguous()
        c = nmap.center
        grad_feats = grad_out @ kernel[c].transpose(0, 1) if need_feats else None
        grad_kernel = torch.zeros_like(kernel) if need_kernel else None
        if grad_kernel is not None:
            grad_kernel[c] = feats.transpose(0, 1) @ grad_out
        for k, (o, i) in enumerate(zip(nmap.out_index, nmap.in_index, strict=True)):
            if o is None or i is None or o.numel() == 0:
                continue
            g = grad_out.index_select(0, o)
            if grad_feats is not None:
                grad_feats.index_add_(0, i, g @ kernel[k].transpose(0, 1))
            if grad_kernel is not None:
                grad_kernel[k] = feats.index_select(0, i).transpose(0, 1) @ g
        grad_bias = grad_out.sum(0) if (need_bias and ctx.has_bias) else None  # type: ignore[attr-defined]
        return grad_feats, grad_kernel, grad_bias, None


def submanifold_conv3d(x: SparseTensor, kernel: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Output features [N, out] of a stride-1 submanifold conv with a torchsparse-layout kernel [K³, in, out].

    Under autocast the inputs are cast to the autocast dtype (as autocast does for conv/matmul); otherwise
    features, kernel and bias must share one dtype.
    """
    if kernel.dim() != 3 or kernel.shape[1] != x.num_channels:
        raise ValueError(
            f"sparse conv kernel must be [K^3, in={x.num_channels}, out]; got shape {tuple(kernel.shape)}"
        )
    kernel_size = round(kernel.shape[0] ** (1 / 3))
    if kernel_size**3 != kernel.shape[0]:
        raise ValueError(
            f"sparse conv kernel's first dim must be a cube (27 for 3x3x3); got {kernel.shape[0]}"
        )
    nmap = neighbor_map(x, kernel_size)
    feats = x.feats
    device_type = feats.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        feats, kernel = feats.to(dtype), kernel.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return _SubmanifoldConv.apply(feats, kernel, bias, nmap)
    if kernel.dtype != feats.dtype or (bias is not None and bias.dtype != feats.dtype):
        bias_dtype = None if bias is None else bias.dtype
        raise ValueError(
            f"sparse conv dtypes disagree: feats {feats.dtype}, kernel {kernel.dtype}, bias {bias_dtype}; "
            "convert the module (e.g. .half()/.float()) or the features"
        )
    return _SubmanifoldConv.apply(feats.contiguous(), kernel, bias, nmap)
