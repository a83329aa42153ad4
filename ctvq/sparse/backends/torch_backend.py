"""Pure-PyTorch submanifold sparse convolution: runs on CPU and CUDA, needs no extension.

The neighbour table [N, K³] (missing neighbour = N, a zero row) and its pair lists come from
`ctvq.sparse.backends.neighbors`.

Two paths compute the same convolution (measured on CPU, 1 thread, bench/sparse_conv.py):
- implicit GEMM (narrow channels, dense tables): per row chunk, gather the K³ neighbour rows into one
  [rows, K³ C_in] buffer and multiply it by the kernel viewed as [K³ C_in, C_out]. It also multiplies the zero
  rows of missing neighbours (a fraction 1 - fill of the work), needs no scatter-add and runs one large GEMM
  per chunk. Backward: grad_feats is the same product of grad_out with the mirrored, transposed kernel (offset
  -d reads the rows that +d wrote); grad_kernel is the gathered chunk transposed times grad_out.
- pair lists (wide channels, sparse tables, see `use_pair_lists`): per block of output rows and per offset,
  gather only the neighbours that exist and multiply into one stacked [block pairs, C_out] product buffer,
  then sum each output row's products with one sparse CSR matmul (a 0/1 matrix cached per block): 2.5x
  faster than `index_add_`, whose per-row dispatch dominated at 64-128 channels. Backward: grad_feats is the
  same path on grad_out with the mirrored kernel; grad_kernel multiplies per offset gathered pair rows.
Temporaries are bounded by a byte budget / block size and reused across chunks (index_select/mm out=), so
memory stays linear in N. A custom autograd function keeps only the input features and the kernel (recomputing
the gathers) instead of autograd's saved [N, K³ C] gathers.

Convention (torchsparse's, used by Direct3D-S2's weights): kernel [K³, in, out]; offsets d in {-r..r}³
with index k = (dx + r) + K (dy + r) + K² (dz + r), x fastest; out[p] = sum_k in[p + d_k] @ kernel[k] + bias,
i.e. the cross-correlation that `torch.nn.functional.conv3d` computes with
weight[o, i, dx + r, dy + r, dz + r].
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ctvq.sparse.backends.neighbors import (
    NeighborMap,
    PairBlock,
    build_neighbor_map,
    kernel_offsets,
    neighbor_map,
)
from ctvq.sparse.tensor import SparseTensor

__all__ = [
    "NeighborMap",
    "PairBlock",
    "build_neighbor_map",
    "kernel_offsets",
    "neighbor_map",
    "submanifold_conv3d",
    "use_pair_lists",
]

# Bytes of one gathered [rows, K³ C] chunk: small enough to stay in cache on CPU (1-4 MiB within noise at
# 32-128 channels, 2 MiB and less 10-45 % slower at 512), large enough on CUDA to keep kernel launches few.
CHUNK_BYTES = {"cpu": 4 << 20, "cuda": 256 << 20}
# Bytes of the pair-list path's stacked products [block pairs, C_out]: sets its rows per block (a power of
# two). Measured: 8-32 MiB within 10 %; above 32 MiB glibc maps every buffer afresh (page faults), 15-40 %
# slower.
PAIR_BLOCK_BYTES = 24 << 20
# Dtypes that torch's sparse CSR matmul supports on CPU (MKL); others take the implicit GEMM there.
_CSR_DTYPES = (torch.float32, torch.float64)
# Channel count where the pair-list path starts to win at half of the table filled; it scales with
# fill / (1 - fill) - 1/2 (measured on CPU with the CSR sum: below 32 at fill 0.39, 32-64 at 0.66, ~128-256
# at 0.83, above 256 at 0.94; the per-map block set-up, ~2 ms at 4k voxels, is not counted).
COMPACT_CHANNELS_SCALE = 32.0


def _chunk_rows(row_elems: int, src: torch.Tensor) -> int:
    budget = CHUNK_BYTES.get(src.device.type, CHUNK_BYTES["cuda"])
    return max(1, budget // (row_elems * src.element_size()))


def _padded(feats: torch.Tensor) -> torch.Tensor:
    """`feats` with one zero row appended: the row that missing neighbours (index N) read."""
    return torch.cat([feats, feats.new_zeros(1, feats.shape[1])])


def _chunks(padded: torch.Tensor, table: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yields (start, stop, [stop - start, K³ C]): each row chunk's neighbour rows, offsets side by side.

    One buffer serves every chunk (index_select out=), so large inputs do not churn the allocator.
    """
    n = table.shape[0]
    step = _chunk_rows(table.shape[1] * padded.shape[1], padded)
    buf = padded.new_empty(min(n, step) * table.shape[1], padded.shape[1])
    for start in range(0, n, step):
        stop = min(n, start + step)
        cols = buf[: (stop - start) * table.shape[1]]
        torch.index_select(padded, 0, table[start:stop].reshape(-1), out=cols)
        yield start, stop, cols.view(stop - start, -1)


def _implicit_gemm(
    feats: torch.Tensor, table: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """out[p] = concat_k feats[table[p, k]] @ weight (+ bias), with weight [K³ C_in, C_out]."""
    out = feats.new_empty(table.shape[0], weight.shape[1])
    for start, stop, cols in _chunks(_padded(feats), table):
        if bias is None:
            torch.mm(cols, weight, out=out[start:stop])
        else:
            torch.addmm(bias, cols, weight, out=out[start:stop])
    return out


def use_pair_lists(nmap: NeighborMap, c_in: int, c_out: int, dtype: torch.dtype = torch.float32) -> bool:
    """True where the pair-list path beats the implicit GEMM: on CPU, wide channels and a sparse table.

    The implicit GEMM also multiplies the (1 - fill) zero rows; the pair-list path pays a gather and a CSR sum
    per pair instead, which only pays off once the matmul dominates (wide channels).
    """
    if nmap.table.device.type != "cpu":
        # measured on an H100 (bench/sparse_conv.py): the per-block, per-offset launches make pair lists 5x
        # slower than the implicit GEMM at 64-128 channels and never faster at 512
        return False
    fill = nmap.fill()
    if fill >= 1.0 or dtype not in _CSR_DTYPES:
        return False
    return (c_in * c_out) ** 0.5 > COMPACT_CHANNELS_SCALE * (fill / (1.0 - fill) - 0.5)


def _pair_block_rows(nmap: NeighborMap, c_out: int, feats: torch.Tensor) -> int:
    """Rows per pair-list block: a power of two whose stacked products fit PAIR_BLOCK_BYTES."""
    pairs_per_row = max(1.0, nmap.num_pairs() / max(1, nmap.num_voxels) - 1.0)
    rows = int(PAIR_BLOCK_BYTES / (pairs_per_row * c_out * feats.element_size()))
    return 1 << max(0, rows.bit_length() - 1)


def _pairs_forward(
    feats: torch.Tensor, nmap: NeighborMap, kernel: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Centre as one matmul; per row block, the other offsets' existing pairs multiplied and CSR-summed."""
    c = nmap.center
    out = feats @ kernel[c] if bias is None else torch.addmm(bias, feats, kernel[c])
    blocks = nmap.pair_blocks(_pair_block_rows(nmap, kernel.shape[2], feats))
    if not blocks:
        return out
    products = feats.new_empty(max(b.col.numel() for b in blocks), kernel.shape[2])
    rows = feats.new_empty(max(i.numel() for b in blocks for _, _, i in b.segments), feats.shape[1])
    for block in blocks:
        pos = 0
        for k, _, i in block.segments:
            gathered = rows[: i.numel()]
            torch.index_select(feats, 0, i, out=gathered)
            torch.mm(gathered, kernel[k], out=products[pos : pos + i.numel()])
            pos += i.numel()
        out[block.start : block.stop].addmm_(block.sum_matrix(feats.dtype), products[:pos])
    return out


def _pairs_grad_kernel(
    feats: torch.Tensor, grad_out: torch.Tensor, nmap: NeighborMap, kernel: torch.Tensor
) -> torch.Tensor:
    """grad_kernel[k] = feats[in_k]^T grad_out[out_k], in chunks of pairs within the CPU chunk budget."""
    grad_kernel = torch.zeros_like(kernel)
    grad_kernel[nmap.center] = feats.transpose(0, 1) @ grad_out
    step = _chunk_rows(feats.shape[1] + grad_out.shape[1], feats)
    rows_in = feats.new_empty(min(step, nmap.num_voxels), feats.shape[1])
    rows_out = grad_out.new_empty(min(step, nmap.num_voxels), grad_out.shape[1])
    for k, (o, i) in enumerate(zip(nmap.out_index, nmap.in_index, strict=True)):
        if o is None or i is None:
            continue
        for start in range(0, o.numel(), step):
            stop = min(o.numel(), start + step)
            torch.index_select(feats, 0, i[start:stop], out=rows_in[: stop - start])
            torch.index_select(grad_out, 0, o[start:stop], out=rows_out[: stop - start])
            grad_kernel[k].addmm_(rows_in[: stop - start].transpose(0, 1), rows_out[: stop - start])
    return grad_kernel


class _SubmanifoldConv(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        feats: torch.Tensor,
        kernel: torch.Tensor,
        bias: torch.Tensor | None,
        nmap: NeighborMap,
        pairs: bool | None = None,
    ) -> torch.Tensor:
        """`pairs`: True/False forces the pair-list / implicit-GEMM path, None picks by `use_pair_lists`."""
        volume, c_in, c_out = kernel.shape
        if pairs is None:
            pairs = use_pair_lists(nmap, c_in, c_out, feats.dtype)
        elif pairs and feats.device.type == "cpu" and feats.dtype not in _CSR_DTYPES:
            raise ValueError(f"the pair-list path needs float32/float64 features on CPU; got {feats.dtype}")
        if pairs:
            out = _pairs_forward(feats, nmap, kernel, bias)
        else:
            out = _implicit_gemm(feats, nmap.table, kernel.reshape(volume * c_in, c_out), bias)
        ctx.save_for_backward(feats, kernel)
        ctx.pairs = pairs  # type: ignore[attr-defined]
        ctx.nmap = nmap  # type: ignore[attr-defined]
        ctx.has_bias = bias is not None  # type: ignore[attr-defined]
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None]:
        feats, kernel = ctx.saved_tensors  # type: ignore[attr-defined]
        nmap: NeighborMap = ctx.nmap  # type: ignore[attr-defined]
        need_feats, need_kernel, need_bias = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        grad_out = grad_out.contiguous()
        volume, c_in, c_out = kernel.shape
        grad_bias = grad_out.sum(0) if (need_bias and ctx.has_bias) else None  # type: ignore[attr-defined]
        # voxel q received grad from p = q - d_k = table[q, K³-1-k] through kernel[k]: grad_feats is the same
        # conv of grad_out with the mirrored, transposed kernel
        mirrored = kernel.flip(0).transpose(1, 2) if need_feats else kernel
        grad_feats = grad_kernel = None
        if ctx.pairs:  # type: ignore[attr-defined]
            if need_feats:
                grad_feats = _pairs_forward(grad_out, nmap, mirrored, None)
            if need_kernel:
                grad_kernel = _pairs_grad_kernel(feats, grad_out, nmap, kernel)
            return grad_feats, grad_kernel, grad_bias, None, None
        if need_feats:
            grad_feats = _implicit_gemm(grad_out, nmap.table, mirrored.reshape(volume * c_out, c_in), None)
        if need_kernel:
            grad_kernel = kernel.new_zeros(volume * c_in, c_out)
            for start, stop, cols in _chunks(_padded(feats), nmap.table):
                grad_kernel.addmm_(cols.transpose(0, 1), grad_out[start:stop])
            grad_kernel = grad_kernel.view(volume, c_in, c_out)
        return grad_feats, grad_kernel, grad_bias, None, None


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
