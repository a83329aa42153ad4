"""Mean-pool downsample and 8-child subdivide."""

from fractions import Fraction

import torch
import torch.nn.functional as F

from ctvq.sparse import SparseDownsample, SparseSubdivide, SparseTensor, sparse_downsample, sparse_subdivide


def _random_sparse(channels: int, seed: int = 0) -> SparseTensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand((2, 8, 6, 10), generator=g) < 0.3
    coords = torch.nonzero(mask).to(torch.int32)
    feats = torch.randn(coords.shape[0], channels, generator=g, dtype=torch.float64)
    return SparseTensor(coords, feats, batch_size=2, spatial_shape=(8, 6, 10))


def test_downsample_takes_the_mean_of_merged_voxels_per_sample() -> None:
    coords = torch.tensor(
        [[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 1], [0, 2, 0, 0], [1, 0, 0, 1]],
        dtype=torch.int32,
    )
    feats = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])
    y = SparseDownsample(2)(SparseTensor(coords, feats, spatial_shape=(3, 2, 2)))
    assert y.coords.tolist() == [[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]]
    assert y.coords.dtype == torch.int32
    assert y.feats[:, 0].tolist() == [2.0, 4.0, 5.0]
    assert y.scale == (Fraction(2), Fraction(2), Fraction(2))
    assert y.spatial_shape == (2, 1, 1)
    assert y.layout == [slice(0, 2), slice(2, 3)]


def test_downsample_equals_dense_average_over_active_voxels() -> None:
    x = _random_sparse(channels=3)
    y = sparse_downsample(x, 2)
    dense = x.dense()
    occupancy = SparseTensor(x.coords, torch.ones(x.num_voxels, 1, dtype=torch.float64)).dense()
    sums = F.avg_pool3d(dense, 2, ceil_mode=True) * 8
    counts = F.avg_pool3d(occupancy, 2, ceil_mode=True) * 8
    b, i, j, k = y.coords.long().unbind(1)
    want = (sums / counts.clamp(min=1)).permute(0, 2, 3, 4, 1)[b, i, j, k]
    torch.testing.assert_close(y.feats, want)
    assert int((counts > 0).sum()) == y.num_voxels
    assert y.batch_counts.tolist() == [int((counts[s] > 0).sum()) for s in range(2)]


def test_subdivide_makes_eight_children_with_copied_features() -> None:
    coords = torch.tensor([[0, 1, 2, 3], [1, 0, 0, 0]], dtype=torch.int64)
    feats = torch.tensor([[7.0, 8.0], [9.0, 1.0]])
    x = SparseTensor(coords, feats, spatial_shape=(4, 4, 4), scale=4)
    y = SparseSubdivide()(x)
    assert y.num_voxels == 16
    children = {tuple(c) for c in y.coords[:8].tolist()}
    assert children == {(0, 2 + dx, 4 + dy, 6 + dz) for dx in (0, 1) for dy in (0, 1) for dz in (0, 1)}
    assert y.coords[:8, 1:].tolist()[1] == [3, 4, 6]  # x varies fastest
    assert torch.equal(y.feats[:8], feats[0].expand(8, 2))
    assert torch.equal(y.feats[8:], feats[1].expand(8, 2))
    assert y.layout == [slice(0, 8), slice(8, 16)]
    assert y.scale == (Fraction(2), Fraction(2), Fraction(2))
    assert y.spatial_shape == (8, 8, 8)


def test_subdivide_then_downsample_restores_coords_and_features() -> None:
    x = _random_sparse(channels=4, seed=1)
    back = sparse_downsample(sparse_subdivide(x), 2)
    assert torch.equal(back.coords, x.coords)
    torch.testing.assert_close(back.feats, x.feats)
    assert back.scale == x.scale
    assert back.spatial_shape == x.spatial_shape


def test_downsample_then_subdivide_covers_every_voxel_with_its_parent_mean() -> None:
    x = _random_sparse(channels=2, seed=2)
    coarse = sparse_downsample(x, 2)
    fine = sparse_subdivide(coarse)
    assert fine.scale == x.scale
    index = {tuple(c): r for r, c in enumerate(fine.coords.tolist())}
    rows = torch.tensor([index[tuple(c)] for c in x.coords.tolist()])
    parent = x.cache.get_or_build(("downsample", 2), lambda c: None).inverse
    torch.testing.assert_close(fine.feats[rows], coarse.feats[parent])


def test_downsample_map_is_cached_on_the_input() -> None:
    x = _random_sparse(channels=1, seed=3)
    sparse_downsample(x, 2)
    first = x.cache.get_or_build(("downsample", 2), lambda c: None)
    sparse_downsample(x.replace(x.feats * 2), 2)
    assert x.cache.get_or_build(("downsample", 2), lambda c: None) is first


def test_downsample_keeps_half_precision_features() -> None:
    x = _random_sparse(channels=2, seed=4)
    y = sparse_downsample(x.replace(x.feats.half()), 2)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.feats.double(), sparse_downsample(x, 2).feats, rtol=2e-3, atol=2e-3)
