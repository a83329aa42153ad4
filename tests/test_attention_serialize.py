"""Space-filling-curve keys: bijective, Hilbert steps are face-adjacent, batch stays in the high bits."""

import itertools

import pytest
import torch

from ctvq.sparse.attention.serialize import SERIALIZE_MODES, hilbert_key, morton_key, serialize


def _grid(side: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(side), repeat=3)), dtype=torch.int64)


@pytest.mark.parametrize("key_fn", [morton_key, hilbert_key])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_curve_keys_are_a_bijection_onto_the_cube(key_fn, bits):
    side = 1 << bits
    keys = key_fn(_grid(side), bits)
    assert torch.equal(torch.sort(keys).values, torch.arange(side**3))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hilbert_consecutive_keys_are_face_adjacent_voxels(bits):
    grid = _grid(1 << bits)
    walk = grid[torch.argsort(hilbert_key(grid, bits))]
    steps = (walk[1:] - walk[:-1]).abs().sum(dim=1)
    assert torch.all(steps == 1)


def test_morton_key_matches_bitwise_interleave_reference():
    gen = torch.Generator().manual_seed(0)
    xyz = torch.randint(0, 1 << 10, (50, 3), generator=gen)
    keys = morton_key(xyz, 10)
    for (x, y, z), key in zip(xyz.tolist(), keys.tolist(), strict=True):
        expected = 0
        for b in range(10):
            expected |= ((x >> b) & 1) << (3 * b + 2)
            expected |= ((y >> b) & 1) << (3 * b + 1)
            expected |= ((z >> b) & 1) << (3 * b)
        assert key == expected


def test_morton_is_not_a_hilbert_walk():
    grid = _grid(4)
    walk = grid[torch.argsort(morton_key(grid, 2))]
    assert (walk[1:] - walk[:-1]).abs().sum(dim=1).max() > 1


def test_serialize_orders_samples_by_batch_then_curve():
    grid = _grid(4)
    coords = torch.cat([torch.cat([torch.full((64, 1), b), grid], dim=1) for b in (1, 0)])
    for mode in SERIALIZE_MODES:
        order = torch.argsort(serialize(coords, mode))
        assert torch.all(coords[order[:64], 0] == 0) and torch.all(coords[order[64:], 0] == 1)


def test_the_four_serialize_modes_give_four_different_orders():
    grid = _grid(8)
    coords = torch.cat([torch.zeros(grid.shape[0], 1, dtype=torch.int64), grid], dim=1)
    orders = {tuple(torch.argsort(serialize(coords, m)).tolist()) for m in SERIALIZE_MODES}
    assert len(orders) == 4


def test_serialize_rejects_negative_coords_and_unknown_mode():
    coords = torch.tensor([[0, -1, 0, 0]])
    with pytest.raises(ValueError, match="non-negative"):
        serialize(coords, "z_order")
    with pytest.raises(ValueError, match="unknown serialize mode"):
        serialize(torch.zeros(1, 4, dtype=torch.int64), "peano")
