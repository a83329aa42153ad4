"""The torch backend's two conv paths (implicit GEMM, pair lists) and its neighbour table, against oracles.

Chunk and block sizes are shrunk so every test crosses several chunks/blocks, the only way small inputs reach
the chunk-boundary code.
"""

import pytest
import torch
import torch.nn.functional as F

from ctvq.sparse import SparseTensor
from ctvq.sparse.backends import torch_backend
from ctvq.sparse.backends.torch_backend import (
    _SubmanifoldConv,
    build_neighbor_map,
    kernel_offsets,
    use_pair_lists,
)


def random_voxels(shape: tuple[int, int, int], batch: int, density: float, seed: int) -> torch.Tensor:
    """Int32 [N, 4] voxels with rows shuffled (no path may rely on row order)."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.nonzero(torch.rand((batch, *shape), generator=g) < density).to(torch.int32)
    return coords[torch.randperm(coords.shape[0], generator=g)]


def dense_oracle(
    coords: torch.Tensor, feats: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """conv3d on the densified grid, read back at the active voxels (any odd kernel size)."""
    k = round(kernel.shape[0] ** (1 / 3))
    c = coords.long()
    shape = (int(c[:, 0].max()) + 1, *(int(v) + 1 for v in c[:, 1:].amax(0)), feats.shape[1])
    grid = feats.new_zeros(shape).index_put((c[:, 0], c[:, 1], c[:, 2], c[:, 3]), feats)
    weight = kernel.reshape(k, k, k, kernel.shape[1], kernel.shape[2]).permute(4, 3, 2, 1, 0)
    out = F.conv3d(grid.permute(0, 4, 1, 2, 3), weight, bias, padding=k // 2)
    return out.permute(0, 2, 3, 4, 1)[c[:, 0], c[:, 1], c[:, 2], c[:, 3]]


@pytest.fixture
def tiny_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(torch_backend.CHUNK_BYTES, "cpu", 125 * 3 * 8 * 5)  # 5 to 23 rows per chunk
    monkeypatch.setattr(torch_backend, "PAIR_BLOCK_BYTES", 8 * 8 * 4 * 16)  # 4 to 16 rows per pair block


@pytest.mark.usefixtures("tiny_chunks")
@pytest.mark.parametrize("pairs", [False, True], ids=["implicit_gemm", "pair_lists"])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_each_path_matches_dense_conv3d_forward_and_backward_across_chunks(
    pairs: bool, kernel_size: int
) -> None:
    coords = random_voxels((6, 7, 5), batch=2, density=0.4, seed=kernel_size)
    g = torch.Generator().manual_seed(1)
    volume = kernel_size**3
    feats = torch.randn(coords.shape[0], 3, generator=g, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(volume, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    nmap = build_neighbor_map(coords, kernel_size)
    assert nmap.num_voxels > 4 * torch_backend._pair_block_rows(nmap, 4, feats)

    out = _SubmanifoldConv.apply(feats, kernel, bias, nmap, pairs)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * upstream).sum(), (feats, kernel, bias))
    ref = dense_oracle(coords, feats, kernel, bias)
    grads_ref = torch.autograd.grad((ref * upstream).sum(), (feats, kernel, bias))

    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.usefixtures("tiny_chunks")
@pytest.mark.parametrize("pairs", [False, True], ids=["implicit_gemm", "pair_lists"])
def test_each_path_gives_only_the_gradients_asked_for(pairs: bool) -> None:
    coords = random_voxels((5, 5, 5), batch=1, density=0.5, seed=7)
    feats = torch.randn(coords.shape[0], 2, dtype=torch.float64)
    kernel = torch.randn(27, 2, 2, dtype=torch.float64, requires_grad=True)
    nmap = build_neighbor_map(coords, 3)
    out = _SubmanifoldConv.apply(feats, kernel, None, nmap, pairs)
    (grad_kernel,) = torch.autograd.grad(out.square().sum(), (kernel,))
    ref = dense_oracle(coords, feats, kernel, torch.zeros(2, dtype=torch.float64))
    (want,) = torch.autograd.grad(ref.square().sum(), (kernel,))
    torch.testing.assert_close(grad_kernel, want, rtol=1e-10, atol=1e-10)


def test_neighbour_table_matches_brute_force_lookup_with_negative_coords() -> None:
    coords = random_voxels((5, 4, 6), batch=3, density=0.5, seed=3)
    coords[:, 1:] -= torch.tensor([2, 7, 1], dtype=torch.int32)  # negative coordinates must work too
    nmap = build_neighbor_map(coords, 3)
    row_of = {tuple(c): r for r, c in enumerate(coords.tolist())}
    offsets = kernel_offsets(3).tolist()
    want = [
        [row_of.get((b, x + dx, y + dy, z + dz), len(coords)) for dx, dy, dz in offsets]
        for b, x, y, z in coords.tolist()
    ]
    assert nmap.table.tolist() == want
    assert nmap.num_pairs() == sum(v < len(coords) for row in want for v in row)


def test_neighbour_table_of_an_empty_tensor_is_empty_and_convolves_to_nothing() -> None:
    coords = torch.zeros(0, 4, dtype=torch.int32)
    nmap = build_neighbor_map(coords, 3)
    assert nmap.table.shape == (0, 27)
    x = SparseTensor(coords, torch.zeros(0, 2), batch_size=1, spatial_shape=(4, 4, 4))
    out = torch_backend.submanifold_conv3d(x, torch.randn(27, 2, 3), torch.randn(3))
    assert out.shape == (0, 3)


def test_pair_lists_are_chosen_only_for_wide_channels_on_a_sparse_table() -> None:
    line = torch.tensor([[0, i, 0, 0] for i in range(50)], dtype=torch.int32)  # 3 of 27 neighbours
    cube = torch.nonzero(torch.ones(1, 8, 8, 8)).to(torch.int32)  # dense: ~21 of 27 neighbours
    sparse_map, dense_map = build_neighbor_map(line, 3), build_neighbor_map(cube, 3)
    assert sparse_map.fill() < 0.2 < 0.7 < dense_map.fill()
    assert use_pair_lists(sparse_map, 64, 64)
    assert not use_pair_lists(dense_map, 64, 64)
    assert use_pair_lists(dense_map, 1024, 1024)


@pytest.mark.parametrize("pairs", [False, True], ids=["implicit_gemm", "pair_lists"])
def test_each_path_matches_dense_conv3d_with_the_default_chunk_and_block_sizes(pairs: bool) -> None:
    coords = random_voxels((9, 8, 7), batch=2, density=0.5, seed=11)
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(coords.shape[0], 5, generator=g, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(27, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    nmap = build_neighbor_map(coords, 3)
    out = _SubmanifoldConv.apply(feats, kernel, bias, nmap, pairs)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * upstream).sum(), (feats, kernel, bias))
    ref = dense_oracle(coords, feats, kernel, bias)
    grads_ref = torch.autograd.grad((ref * upstream).sum(), (feats, kernel, bias))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rows", [1, 5, 64, 4096])
def test_pair_blocks_cover_every_off_centre_pair_once_and_sum_it_into_its_output_row(rows: int) -> None:
    coords = random_voxels((6, 6, 6), batch=1, density=0.45, seed=rows)
    nmap = build_neighbor_map(coords, 3)
    products = torch.randn(nmap.num_pairs(), 2, dtype=torch.float64)  # one row per pair, any order
    got = torch.zeros(nmap.num_voxels, 2, dtype=torch.float64)
    want = torch.zeros_like(got)
    used = 0
    for block in nmap.pair_blocks(rows):
        assert block.stop - block.start <= rows
        outs = torch.cat([o for _, o, _ in block.segments]).long()
        assert bool(((outs >= block.start) & (outs < block.stop)).all())
        rows_products = products[used : used + outs.numel()]
        got[block.start : block.stop] += block.sum_matrix(torch.float64) @ rows_products
        want.index_add_(0, outs, rows_products)
        used += outs.numel()
    assert used == nmap.num_pairs() - nmap.num_voxels  # every pair but the centre ones
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_voxels_without_neighbours_convolve_through_the_centre_tap_only_on_both_paths() -> None:
    coords = torch.tensor([[0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 4, 4], [1, 0, 0, 0]], dtype=torch.int32)
    nmap = build_neighbor_map(coords, 3)
    assert nmap.pair_blocks(2) == ()
    feats = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(27, 3, 2, dtype=torch.float64, requires_grad=True)
    for pairs in (False, True):
        out = _SubmanifoldConv.apply(feats, kernel, None, nmap, pairs)
        torch.testing.assert_close(out, feats @ kernel[13])
        grad_feats, grad_kernel = torch.autograd.grad(out.sum(), (feats, kernel))
        torch.testing.assert_close(grad_feats, kernel[13].sum(1).expand(4, 3))
        assert grad_kernel[13].abs().sum() > 0 and grad_kernel[:13].abs().sum() == 0


def test_half_precision_on_cpu_takes_the_implicit_gemm_and_refuses_forced_pair_lists() -> None:
    line = torch.tensor([[0, i, 0, 0] for i in range(50)], dtype=torch.int32)
    nmap = build_neighbor_map(line, 3)
    assert use_pair_lists(nmap, 256, 256)
    assert not use_pair_lists(nmap, 256, 256, torch.bfloat16)
    feats = torch.randn(50, 4, dtype=torch.bfloat16)
    kernel = torch.randn(27, 4, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="pair-list path needs float32/float64"):
        _SubmanifoldConv.apply(feats, kernel, None, nmap, True)
    out = _SubmanifoldConv.apply(feats, kernel, None, nmap, None)
    want = _SubmanifoldConv.apply(feats.float(), kernel.float(), None, nmap, True)
    torch.testing.assert_close(out.float(), want, rtol=0.05, atol=0.05)
