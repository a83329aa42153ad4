"""Pure-PyTorch submanifold sparse convolution: runs on CPU and CUDA, needs no extension.

Neighbours are found by encoding (batch, x, y, z) into one int64 key, sorting the keys once and looking half
of the kernel offsets up with `torch.searchsorted` (the pair list of offset -d is the swapped list of +d). The
result is a dense neighbour table [N, K³] (missing neighbour = N, a zero row).

Two paths compute the same convolution (measured on CPU, 1 thread, bench/sparse_conv.py):
- implicit GEMM (narrow channels, dense tables): per row chunk, gather the K³ neighbour rows into one
  [rows, K³ C_in] buffer and multiply it by the kernel viewed as [K³ C_in, C_out]. It also multiplies the zero
  rows of missing neighbours (a fraction 1 - fill of the work), needs no scatter-add and runs one large GEMM
  per chunk. Backward: grad_feats is the same product of grad_out with the mirrored, transposed kernel (offset
  -d reads the rows that +d wrote); grad_kernel is the gathered chunk transposed times grad_out.
- pair lists (wide channels, sparse tables, see `use_pair_lists`): per block of output rows and per offset,
  gather only the neighbours that exist, multiply, scatter-add into the block, which stays in cache.
Temporaries are bounded by a byte budget / block size, so memory stays linear in N. A custom autograd function
keeps only the input features and the kernel (recomputing the gathers) instead of autograd's saved
[N, K³ C] gathers.

Convention (torchsparse's, used by Direct3D-S2's weights): kernel [K³, in, out]; offsets d in {-r..r}³
with index k = (dx + r) + K (dy + r) + K² (dz + r), x fastest; out[p] = sum_k in[p + d_k] @ kernel[k] + bias,
i.e. the cross-correlation that `torch.nn.functional.conv3d` computes with
weight[o, i, dx + r, dy + r, dz + r].
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from ctvq.sparse.tensor import SparseTensor

# Bytes of one gathered [rows, K³ C] chunk: small enough to stay in cache on CPU (measured best around
# 2-8 MiB), large enough on CUDA to keep kernel launches few.
CHUNK_BYTES = {"cpu": 4 << 20, "cuda": 256 << 20}
# The pair-list path runs row blocks of this many output voxels, so the block it scatters into stays in cache.
COMPACT_BLOCK_ROWS = 8192
# Channel count where the pair-list path starts to win at half of the table filled; it scales with
# fill / (1 - fill) - 1/2 (measured on CPU: ~110 at fill 0.66, above 256 at fill 0.83).
COMPACT_CHANNELS_SCALE = 80.0


@dataclass(frozen=True, eq=False)
class NeighborMap:
    """`table[p, k]` is the row of voxel p + d_k, or `num_voxels` where that voxel is absent."""

    kernel_size: int
    num_voxels: int
    table: torch.Tensor
    _blocks: dict[int, tuple[tuple[int, ...], ...]] = field(default_factory=dict, repr=False)

    @property
    def center(self) -> int:
        return (self.kernel_size**3) // 2

    def num_pairs(self) -> int:
        """Number of (output, input) pairs over all offsets, the centre included."""
        return self._num_pairs

    @functools.cached_property
    def _num_pairs(self) -> int:
        return int((self.table < self.num_voxels).sum())

    def fill(self) -> float:
        """Fraction of the table's entries that are real neighbours (pairs / (N K³))."""
        return self._num_pairs / max(1, self.table.numel())

    def block_bounds(self, rows: int) -> tuple[tuple[int, ...], ...]:
        """Per offset: where each block of `rows` output voxels starts in `out_index[k]` (centre: empty)."""
        if rows not in self._blocks:
            starts = torch.arange(0, self.num_voxels + rows, rows, device=self.table.device)
            starts = starts.clamp_(max=self.num_voxels).to(self.table.dtype)
            self._blocks[rows] = tuple(
                () if o is None else tuple(torch.searchsorted(o, starts).tolist()) for o in self.out_index
            )
        return self._blocks[rows]

    @functools.cached_property
    def _pairs(self) -> tuple[tuple[torch.Tensor | None, ...], tuple[torch.Tensor | None, ...]]:
        outs: list[torch.Tensor | None] = []
        ins: list[torch.Tensor | None] = []
        for k in range(self.table.shape[1]):
            if k == self.center:
                outs.append(None)
                ins.append(None)
                continue
            rows = torch.nonzero(self.table[:, k] < self.num_voxels).squeeze(1)
            outs.append(rows.to(self.table.dtype))
            ins.append(self.table[rows, k])
        return tuple(outs), tuple(ins)

    @property
    def out_index(self) -> tuple[torch.Tensor | None, ...]:
        """Per offset k: output rows that have a neighbour at d_k (None for the identity centre)."""
        return self._pairs[0]

    @property
    def in_index(self) -> tuple[torch.Tensor | None, ...]:
        """Per offset k: the input rows read by `out_index[k]`, in the same order."""
        return self._pairs[1]


def kernel_offsets(kernel_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Int64 [K³, 3] offsets (dx, dy, dz) in kernel-index order k = x + K y + K² z."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"sparse conv kernel_size must be a positive odd number; got {kernel_size}")
    r = kernel_size // 2
    rng = torch.arange(-r, r + 1, device=device)
    dz, dy, dx = torch.meshgrid(rng, rng, rng, indexing="ij")
    return torch.stack([dx.reshape(-1), dy.reshape(-1), dz.reshape(-1)], dim=1)


def build_neighbor_map(coords: torch.Tensor, kernel_size: int) -> NeighborMap:
    """Neighbour table of unique voxels `coords` [N, 4] for a stride-1 submanifold kernel."""
    offsets = kernel_offsets(kernel_size, coords.device)
    n = coords.shape[0]
    volume = offsets.shape[0]
    center = volume // 2
    index_dtype = torch.int32 if n < 2**31 - 1 else torch.int64
    if n == 0:
        return NeighborMap(kernel_size, 0, coords.new_zeros((0, volume), dtype=index_dtype))
    r = kernel_size // 2
    c = coords.long()
    xyz = c[:, 1:] - c[:, 1:].amin(dim=0)
    ext = xyz.amax(dim=0) + 1 + 2 * r
    ex, ey, ez = (int(v) for v in ext.tolist())
    nb = int(c[:, 0].max()) + 1
    if nb * ex * ey * ez >= 2**62:
        raise ValueError(f"sparse coords too large to hash: batch {nb} x extent {(ex, ey, ez)}")
    key = ((c[:, 0] * ex + xyz[:, 0] + r) * ey + xyz[:, 1] + r) * ez + xyz[:, 2] + r
    sorted_keys, perm = torch.sort(key)
    if n > 1 and bool((sorted_keys[1:] == sorted_keys[:-1]).any()):
        dup = int(perm[1:][sorted_keys[1:] == sorted_keys[:-1]][0])
        raise ValueError(
            f"sparse coords hold duplicate voxels (e.g. {coords[dup].tolist()}); merge them first"
        )
    deltas = ((offsets[:, 0] * ey) + offsets[:, 1]) * ez + offsets[:, 2]
    # work in sorted order (queries sorted too, so the searches walk memory in order), map back at the end
    sorted_table = torch.full((n, volume), n, dtype=torch.int64, device=coords.device)
    rows = torch.arange(n, device=coords.device)
    sorted_table[:, center] = rows
    for k in range(center):  # offset K³-1-k is -d_k: its pairs are the swapped pairs of k
        query = sorted_keys + deltas[k]
        pos = torch.searchsorted(sorted_keys, query).clamp_(max=n - 1)
        hit = sorted_keys[pos] == query
        src, dst = rows[hit], pos[hit]
        sorted_table[src, k] = dst
        sorted_table[dst, volume - 1 - k] = src
    to_row = torch.cat([perm, perm.new_full((1,), n)])
    table = torch.empty((n, volume), dtype=index_dtype, device=coords.device)
    table[perm] = to_row[sorted_table].to(index_dtype)
    return NeighborMap(kernel_size, n, table)


def neighbor_map(x: SparseTensor, kernel_size: int) -> NeighborMap:
    """The tensor's neighbour map for `kernel_size`, built once and kept in its coordinate cache."""
    return x.cache.get_or_build(("neighbors", kernel_size), lambda c: build_neighbor_map(c, kernel_size))


def _chunk_rows(row_elems: int, src: torch.Tensor) -> int:
    budget = CHUNK_BYTES.get(src.device.type, CHUNK_BYTES["cuda"])
    return max(1, budget // (row_elems * src.element_size()))


def _padded(feats: torch.Tensor) -> torch.Tensor:
    """`feats` with one zero row appended: the row that missing neighbours (index N) read."""
    return torch.cat([feats, feats.new_zeros(1, feats.shape[1])])


def _gather(padded: torch.Tensor, table: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """[stop - start, K³ C]: the neighbour rows of rows start..stop, offsets side by side."""
    return padded.index_select(0, table[start:stop].reshape(-1)).view(stop - start, -1)


def _implicit_gemm(
    feats: torch.Tensor, table: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """out[p] = concat_k feats[table[p, k]] @ weight (+ bias), with weight [K³ C_in, C_out]."""
    n = table.shape[0]
    out = feats.new_empty(n, weight.shape[1])
    padded = _padded(feats)
    step = _chunk_rows(weight.shape[0], feats)
    for start in range(0, n, step):
        stop = min(n, start + step)
        cols = _gather(padded, table, start, stop)
        if bias is None:
            torch.mm(cols, weight, out=out[start:stop])
        else:
            torch.addmm(bias, cols, weight, out=out[start:stop])
    return out


def use_pair_lists(nmap: NeighborMap, c_in: int, c_out: int) -> bool:
    """True where the pair-list path beats the implicit GEMM: on CPU, wide channels and a sparse table.

    The implicit GEMM also multiplies the (1 - fill) zero rows; the pair-list path pays a scatter-add per pair
    instead, which only pays off once the matmul dominates (wide channels).
    """
    if nmap.table.device.type != "cpu":
        # measured on an H100 (bench/sparse_conv.py): the per-block, per-offset launches make pair lists 5x
        # slower than the implicit GEMM at 64-128 channels and never faster at 512
        return False
    fill = nmap.fill()
    if fill >= 1.0:
        return False
    return (c_in * c_out) ** 0.5 > COMPACT_CHANNELS_SCALE * (fill / (1.0 - fill) - 0.5)


def _pairs_forward(
    feats: torch.Tensor, nmap: NeighborMap, kernel: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Per row block and offset: gather the neighbours that exist, multiply, scatter-add into the block."""
    c = nmap.center
    out = feats @ kernel[c] if bias is None else torch.addmm(bias, feats, kernel[c])
    bounds = nmap.block_bounds(COMPACT_BLOCK_ROWS)
    for j, start in enumerate(range(0, nmap.num_voxels, COMPACT_BLOCK_ROWS)):
        block = out[start : start + COMPACT_BLOCK_ROWS]
        for k, (o, i) in enumerate(zip(nmap.out_index, nmap.in_index, strict=True)):
            if o is None or i is None or bounds[k][j] == bounds[k][j + 1]:
                continue
            lo, hi = bounds[k][j], bounds[k][j + 1]
            block.index_add_(0, o[lo:hi] - start, feats.index_select(0, i[lo:hi]) @ kernel[k])
    return out


def _pairs_backward(
    feats: torch.Tensor,
    grad_out: torch.Tensor,
    nmap: NeighborMap,
    kernel: torch.Tensor,
    need_feats: bool,
    need_kernel: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients along the pair lists: grad_out rows gathered once per pair feed both gradients."""
    c = nmap.center
    grad_feats = grad_out @ kernel[c].transpose(0, 1) if need_feats else None
    grad_kernel = torch.zeros_like(kernel) if need_kernel else None
    if grad_kernel is not None:
        grad_kernel[c] = feats.transpose(0, 1) @ grad_out
    bounds = nmap.block_bounds(COMPACT_BLOCK_ROWS)
    for j in range(len(range(0, nmap.num_voxels, COMPACT_BLOCK_ROWS))):
        for k, (o, i) in enumerate(zip(nmap.out_index, nmap.in_index, strict=True)):
            if o is None or i is None or bounds[k][j] == bounds[k][j + 1]:
                continue
            lo, hi = bounds[k][j], bounds[k][j + 1]
            g = grad_out.index_select(0, o[lo:hi])
            if grad_feats is not None:
                grad_feats.index_add_(0, i[lo:hi], g @ kernel[k].transpose(0, 1))
            if grad_kernel is not None:
                grad_kernel[k].addmm_(feats.index_select(0, i[lo:hi]).transpose(0, 1), g)
    return grad_feats, grad_kernel


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
            pairs = use_pair_lists(nmap, c_in, c_out)
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
        if ctx.pairs:  # type: ignore[attr-defined]
            grad_feats, grad_kernel = _pairs_backward(feats, grad_out, nmap, kernel, need_feats, need_kernel)
            return grad_feats, grad_kernel, grad_bias, None, None
        grad_feats = None
        if need_feats:
            # voxel q received grad from p = q - d_k = table[q, K³-1-k] through kernel[k]
            mirrored = kernel.flip(0).transpose(1, 2).reshape(volume * c_out, c_in)
            grad_feats = _implicit_gemm(grad_out, nmap.table, mirrored, None)
        grad_kernel = None
        if need_kernel:
            grad_kernel = kernel.new_zeros(volume * c_in, c_out)
            padded = _padded(feats)
            n = nmap.num_voxels
            step = _chunk_rows(volume * c_in, feats)
            for start in range(0, n, step):
                stop = min(n, start + step)
                cols = _gather(padded, nmap.table, start, stop)
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
