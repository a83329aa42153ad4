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

import functools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ctvq.sparse.tensor import SparseTensor

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


@dataclass(frozen=True, eq=False)
class PairBlock:
    """Output rows start..stop of the pair-list path.

    `segments`: (k, output rows, input rows) per offset with pairs here; their products are stacked in this
    order. `crow`/`col`: CSR of the [stop - start, pairs] 0/1 matrix that sums each output row's products.
    """

    start: int
    stop: int
    segments: tuple[tuple[int, torch.Tensor, torch.Tensor], ...]
    crow: torch.Tensor
    col: torch.Tensor

    def sum_matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """The CSR summing matrix in `dtype` (torch's once-per-process "sparse CSR is beta" warning muted)."""
        ones = torch.ones(self.col.numel(), dtype=dtype, device=self.col.device)
        size = (self.stop - self.start, self.col.numel())
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(self.crow, self.col, ones, size=size, check_invariants=False)


@dataclass(frozen=True, eq=False)
class NeighborMap:
    """`table[p, k]` is the row of voxel p + d_k, or `num_voxels` where that voxel is absent."""

    kernel_size: int
    num_voxels: int
    table: torch.Tensor
    _blocks: dict[int, tuple[PairBlock, ...]] = field(default_factory=dict, repr=False)

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

    def pair_blocks(self, rows: int) -> tuple[PairBlock, ...]:
        """The off-centre pairs split into blocks of `rows` output voxels (blocks without pairs left out)."""
        if rows not in self._blocks:
            self._blocks[rows] = self._build_pair_blocks(rows)
        return self._blocks[rows]

    def _build_pair_blocks(self, rows: int) -> tuple[PairBlock, ...]:
        """Vectorised, no sorting: a pair's slot in its block's products follows from running counts."""
        n, volume = self.num_voxels, self.table.shape[1]
        present = self.table < n
        present[:, self.center] = False
        before = present.new_zeros((n + 1, volume), dtype=torch.int32)
        torch.cumsum(present, 0, dtype=torch.int32, out=before[1:])  # [p, k]: offset k's pairs in rows < p
        edges = [*range(0, n, rows), n]
        bounds = before[edges]  # [blocks + 1, k]: where each block starts in out_index[k]
        counts = bounds.diff(dim=0)
        shift = counts.cumsum(1, dtype=torch.int32) - counts - bounds[:-1]  # rank -> slot in the block
        bounds_list = bounds.tolist()
        blocks = []
        for j, (start, stop) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
            segments = tuple(
                (k, o[b:e], i[b:e])
                for k, (o, i, b, e) in enumerate(
                    zip(self.out_index, self.in_index, bounds_list[j], bounds_list[j + 1], strict=True)
                )
                if o is not None and i is not None and b < e
            )
            if not segments:
                continue
            # the block's pairs row by row: their slots are the CSR columns (ascending within a row, as k
            # is); int32 indices (a block holds far fewer than 2^31 pairs) are MKL's native width
            mask = present[start:stop]
            where = mask.view(-1).nonzero().squeeze(1)
            col = (before[start:stop] + shift[j]).view(-1).index_select(0, where)
            crow = torch.zeros(stop - start + 1, dtype=torch.int32, device=mask.device)
            torch.cumsum(mask.sum(1, dtype=torch.int32), 0, dtype=torch.int32, out=crow[1:])
            blocks.append(PairBlock(start, stop, segments, crow, col))
        return tuple(blocks)

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
