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


def test_context_mask_leaves_out_exactly_the_kept_cells_next_to_a_dropped_one() -> None:
    from ctvq.data.crop import context_complete_cells

    full = np.array([[x, y, 0] for x in range(6) for y in range(3)])
    kept = full[full[:, 0] < 3]  # the crop ends between x = 2 and x = 3
    by_margin = {m: context_complete_cells(full, kept, m) for m in (0, 1, 2)}
    assert by_margin[0].all()
    np.testing.assert_array_equal(by_margin[1], kept[:, 0] < 2)
    np.testing.assert_array_equal(by_margin[2], kept[:, 0] < 1)
    # the edge of the case itself is no cut: an uncropped case keeps every cell
    assert context_complete_cells(full, full, 3).all()


@pytest.mark.parametrize("augment", ["none", "cube"])
def test_dataset_marks_the_cells_whose_crop_context_is_cut(tmp_path, big: SparseSample, augment) -> None:
    from ctvq.ct.sample import save_sample
    from ctvq.data.datasets import SparseSDF

    save_sample(big, tmp_path / "big.npz")
    plain = SparseSDF(tmp_path, resolution=64, max_points=MAX_POINTS, seed=5, augment=augment)[0]
    assert plain["supervised"].all()  # crop_margin 0: the whole crop is supervised
    item = SparseSDF(tmp_path, resolution=64, max_points=MAX_POINTS, seed=5, augment=augment,
                     crop_margin=1)[0]
    supervised = item["supervised"].numpy()
    assert 0 < supervised.sum() < supervised.size
    kept = item["latent_coords"].numpy().astype(np.int64)
    kept_set = set(map(tuple, kept.tolist()))
    # In the item's own frame (after any symmetry), a cell is left out iff a neighbour of the full case is
    # missing from the crop: the full case's cells, moved the same way, are the neighbours that exist.
    old_to_new = np.linalg.inv(item["affine"].numpy()) @ big.affine  # voxel index before -> after
    centres = np.c_[big.latent_coords * LATENT_STRIDE + (LATENT_STRIDE - 1) / 2, np.ones(big.num_latent)]
    moved = np.rint(((old_to_new @ centres.T).T[:, :3] - (LATENT_STRIDE - 1) / 2) / LATENT_STRIDE)
    full_set = set(map(tuple, moved.astype(np.int64).tolist()))
    assert kept_set <= full_set
    for cell, flag in zip(kept.tolist(), supervised, strict=True):
        around = {(cell[0] + a, cell[1] + b, cell[2] + c) for a in (-1, 0, 1) for b in (-1, 0, 1)
                  for c in (-1, 0, 1)}
        assert flag == (around & full_set <= kept_set)
