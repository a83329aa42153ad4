"""max_points: a latent-aligned spatial crop within budget, complete cells, seeded, never random dropping."""

import numpy as np
import pytest
from data_helpers import sphere_sample

from ctvq.ct.sample import LATENT_STRIDE, SparseSample, decoder_targets
from ctvq.data.crop import choose_crop_cells, crop_to_budget, select_cells

MAX_POINTS = 3000


@pytest.fixture(scope="module")
def big() -> SparseSample:
    # Two touching spheres at 64³: ~25k band points in ~150 latent cells.
    return sphere_sample("big", spheres=[(24.0, 30.0, 32.0, 14.0), (42.0, 34.0, 30.0, 12.0)])


def _cells_as_dict(sample: SparseSample) -> dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    out = {}
    for m, key in enumerate(map(tuple, sample.latent_coords.tolist())):
        lo, hi = sample.cell_start[m], sample.cell_start[m + 1]
        out[key] = (sample.coords[lo:hi], sample.sdf[lo:hi], sample.inside_bits[m])
    return out


def test_crop_is_within_budget_and_keeps_whole_latent_cells(big: SparseSample) -> None:
    assert big.num_points > 4 * MAX_POINTS
    crop = crop_to_budget(big, MAX_POINTS, np.random.default_rng(0))
    crop.validate("crop")
    assert crop.num_points <= MAX_POINTS
    # As large as possible: the cell that stopped the growth holds at most 512 points.
    assert crop.num_points > MAX_POINTS - LATENT_STRIDE**3
    np.testing.assert_array_equal(crop.coords // LATENT_STRIDE,
                                  np.repeat(crop.latent_coords, np.diff(crop.cell_start), axis=0))
    full, kept = _cells_as_dict(big), _cells_as_dict(crop)
    assert set(kept) < set(full)
    for key, (coords, sdf, bits) in kept.items():
        np.testing.assert_array_equal(coords, full[key][0])  # no point of a kept cell is dropped
        np.testing.assert_array_equal(sdf, full[key][1])
        np.testing.assert_array_equal(bits, full[key][2])


def test_crop_keeps_the_contract_order_and_the_decoder_targets_of_kept_cells(big: SparseSample) -> None:
    crop = crop_to_budget(big, MAX_POINTS, np.random.default_rng(3))
    n = big.resolution // LATENT_STRIDE
    lat = crop.latent_coords.astype(int)
    keys = (lat[:, 0] * n + lat[:, 1]) * n + lat[:, 2]
    assert np.all(np.diff(keys) > 0)
    index_of = {tuple(c): m for m, c in enumerate(big.latent_coords.tolist())}
    rows = [index_of[tuple(c)] for c in crop.latent_coords.tolist()]
    np.testing.assert_array_equal(decoder_targets(crop), decoder_targets(big)[rows])


def test_crop_grows_as_a_box_of_latent_cells_around_its_centre(big: SparseSample) -> None:
    counts = np.diff(big.cell_start)
    for seed in range(5):
        cells, centre = choose_crop_cells(counts, big.latent_coords, MAX_POINTS, np.random.default_rng(seed))
        assert centre in cells
        chebyshev = np.abs(big.latent_coords.astype(int) - big.latent_coords[centre]).max(axis=1)
        reach = chebyshev[cells].max()
        inner = np.flatnonzero(chebyshev < reach)
        assert np.isin(inner, cells).all(), f"seed {seed}: a cell nearer than the crop's reach was left out"
        assert counts[cells].sum() <= MAX_POINTS


def test_crop_is_deterministic_per_seed_and_differs_across_seeds(big: SparseSample) -> None:
    a = crop_to_budget(big, MAX_POINTS, np.random.default_rng(7))
    b = crop_to_budget(big, MAX_POINTS, np.random.default_rng(7))
    np.testing.assert_array_equal(a.coords, b.coords)
    others = [crop_to_budget(big, MAX_POINTS, np.random.default_rng(s)).latent_coords for s in (8, 9, 10)]
    assert any(not np.array_equal(a.latent_coords, o) for o in others)


def test_case_within_budget_is_returned_unchanged(big: SparseSample) -> None:
    assert crop_to_budget(big, big.num_points, np.random.default_rng(0)) is big


def test_budget_below_every_cell_is_an_error_naming_the_fix(big: SparseSample) -> None:
    dense = select_cells(big, np.flatnonzero(np.diff(big.cell_start) >= 100))
    smallest = int(np.diff(dense.cell_start).min())
    with pytest.raises(ValueError, match=f"max_points={smallest - 1}.*{smallest} points"):
        crop_to_budget(dense, smallest - 1, np.random.default_rng(0))


def test_select_cells_refuses_unsorted_cells(big: SparseSample) -> None:
    with pytest.raises(ValueError, match="ascending"):
        select_cells(big, np.array([3, 1]))
