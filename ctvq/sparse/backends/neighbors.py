"""Neighbour maps of submanifold sparse convs: which voxel sits at each kernel offset of each voxel.

Built by encoding (batch, x, y, z) into one int64 key, sorting the keys once and looking half of the kernel
offsets up with `torch.searchsorted` (the pairs of offset -d are the swapped pairs of +d). The dense table
[N, K³] (missing neighbour = N, a zero row) feeds the implicit GEMM; its per-offset pair lists and row blocks
(`pair_blocks`, with the CSR matrices that sum each output row's products) feed the pair-list path. Both are
cached on the map, which `neighbor_map` caches on the tensor's coordinates.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

import torch

from ctvq.sparse.tensor import SparseTensor


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
