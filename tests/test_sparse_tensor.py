"""SparseTensor: validation, per-sample layout, and coords/cache sharing."""

from fractions import Fraction

import pytest
import torch

from ctvq.sparse import CoordinateCache, SparseTensor


def _coords(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int32)


def test_layout_gives_one_contiguous_slice_per_sample_including_empty_ones() -> None:
    coords = _coords([[0, 1, 1, 1], [0, 2, 1, 1], [2, 0, 0, 0], [2, 3, 4, 5], [2, 1, 1, 1]])
    x = SparseTensor(coords, torch.randn(5, 3), batch_size=4)
    assert x.layout == [slice(0, 2), slice(2, 2), slice(2, 5), slice(5, 5)]
    assert x.batch_offsets.tolist() == [0, 2, 2, 5, 5]
    assert x.batch_counts.tolist() == [2, 0, 3, 0]
    assert x.batch_size == 4
    assert x.spatial_shape == (4, 5, 6)
    assert x.scale == (Fraction(1), Fraction(1), Fraction(1))


def test_batch_size_defaults_to_largest_index_plus_one() -> None:
    x = SparseTensor(_coords([[0, 0, 0, 0], [1, 0, 0, 0]]), torch.zeros(2, 1))
    assert x.batch_size == 2


def test_from_unsorted_sorts_by_batch_and_keeps_order_inside_a_sample() -> None:
    coords = _coords([[1, 5, 0, 0], [0, 3, 0, 0], [1, 2, 0, 0], [0, 1, 0, 0]])
    feats = torch.arange(4, dtype=torch.float32).unsqueeze(1)
    x = SparseTensor.from_unsorted(coords, feats)
    assert x.coords[:, 0].tolist() == [0, 0, 1, 1]
    assert x.coords[:, 1].tolist() == [3, 1, 5, 2]
    assert x.feats[:, 0].tolist() == [1.0, 3.0, 0.0, 2.0]


@pytest.mark.parametrize(
    ("coords", "feats", "kwargs", "message"),
    [
        (torch.zeros(3, 3, dtype=torch.int32), torch.zeros(3, 2), {}, r"\[N, 4\]"),
        (torch.zeros(3, 4), torch.zeros(3, 2), {}, "int32 or int64"),
        (torch.zeros(3, 4, dtype=torch.int32), torch.zeros(3, 2, dtype=torch.int32), {}, "floating"),
        (torch.zeros(3, 4, dtype=torch.int32), torch.zeros(2, 2), {}, "disagree on N"),
        (torch.zeros(3, 4, dtype=torch.int32), torch.zeros(3), {}, r"\[N, C\]"),
        (torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]), torch.zeros(2, 1), {}, "from_unsorted"),
        (torch.tensor([[0, -1, 0, 0]]), torch.zeros(1, 1), {}, "non-negative"),
        (torch.tensor([[3, 0, 0, 0]]), torch.zeros(1, 1), {"batch_size": 2}, "batch_size=2"),
        (torch.tensor([[0, 4, 0, 0]]), torch.zeros(1, 1), {"spatial_shape": (4, 4, 4)}, "outside"),
        (torch.tensor([[0, 0, 0, 0]]), torch.zeros(1, 1), {"scale": 0}, "positive"),
    ],
)
def test_constructor_rejects_inconsistent_inputs_with_a_clear_message(
    coords: torch.Tensor, feats: torch.Tensor, kwargs: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        SparseTensor(coords, feats, **kwargs)


def test_cache_bound_to_other_coords_is_refused() -> None:
    a = _coords([[0, 0, 0, 0]])
    b = _coords([[0, 0, 0, 0]])
    with pytest.raises(ValueError, match="another coords tensor"):
        SparseTensor(a, torch.zeros(1, 1), cache=CoordinateCache(b))


def test_replace_shares_coords_cache_and_metadata() -> None:
    coords = _coords([[0, 1, 2, 3], [1, 0, 0, 0]])
    x = SparseTensor(coords, torch.randn(2, 4), spatial_shape=(8, 8, 8), scale=2)
    x.cache.get_or_build(("probe",), lambda c: c.shape[0])
    y = x.replace(torch.randn(2, 7))
    assert y.coords is x.coords
    assert y.cache is x.cache
    assert ("probe",) in y.cache
    assert (y.batch_size, y.spatial_shape, y.scale) == (x.batch_size, x.spatial_shape, x.scale)
    assert y.num_channels == 7
    with pytest.raises(ValueError, match="disagree on N"):
        x.replace(torch.randn(3, 4))


def test_cache_builds_each_key_once() -> None:
    x = SparseTensor(_coords([[0, 0, 0, 0]]), torch.zeros(1, 1))
    calls: list[int] = []

    def build(c: torch.Tensor) -> int:
        calls.append(1)
        return int(c.shape[0])

    assert x.cache.get_or_build(("k", 3), build) == 1
    assert x.cache.get_or_build(("k", 3), build) == 1
    assert x.cache.get_or_build(("k", 5), build) == 1
    assert len(calls) == 2


def test_dense_scatters_features_at_their_voxels() -> None:
    x = SparseTensor(_coords([[0, 1, 2, 0], [1, 0, 1, 1]]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    grid = x.dense()
    assert grid.shape == (2, 2, 2, 3, 2)
    assert grid[0, :, 1, 2, 0].tolist() == [1.0, 2.0]
    assert grid[1, :, 0, 1, 1].tolist() == [3.0, 4.0]
    assert float(grid.abs().sum()) == 10.0
