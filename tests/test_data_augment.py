"""augment: a symmetry of the cube maps a sparse sample onto the exact sample of the transformed volume."""

import itertools

import numpy as np
import pytest
from data_helpers import NO_CROP, sphere_sample

from ctvq.ct.sample import LATENT_STRIDE, SparseSample, decoder_targets, save_sample
from ctvq.data.augment import apply_symmetry, random_symmetry, voxel_transform
from ctvq.data.datasets import DatasetError, SparseSDF

SYMMETRIES = [(order, flips) for order in itertools.permutations(range(3))
              for flips in itertools.product((False, True), repeat=3)]


@pytest.fixture(scope="module")
def case() -> SparseSample:
    # Off-centre, unequal spheres so that every symmetry moves something.
    return sphere_sample("aug", spheres=[(20.0, 30.0, 40.0, 9.0), (44.0, 26.0, 22.0, 5.0)])


def _dense_targets(sample: SparseSample) -> np.ndarray:
    """Every decoded voxel's target on the full grid, NaN where no latent cell is."""
    r = sample.resolution
    grid = np.full((r, r, r), np.nan, np.float32)
    for (a, b, c), cell in zip(sample.latent_coords.astype(int) * LATENT_STRIDE, decoder_targets(sample),
                               strict=True):
        grid[a:a + LATENT_STRIDE, b:b + LATENT_STRIDE, c:c + LATENT_STRIDE] = cell
    return grid


@pytest.mark.parametrize(("order", "flips"), SYMMETRIES[::5] + [SYMMETRIES[-1]])
def test_symmetry_equals_transforming_the_dense_targets(case: SparseSample, order, flips) -> None:
    out = apply_symmetry(case, order, flips)
    out.validate("augmented")
    expected = _dense_targets(case).transpose(order)
    axes = tuple(i for i, f in enumerate(flips) if f)
    if axes:
        expected = np.flip(expected, axes)
    np.testing.assert_array_equal(_dense_targets(out), expected)
    # contract order: cells lexicographic, points by cell then local index
    lat = out.latent_coords.astype(np.int64)
    assert np.all(np.diff((lat[:, 0] * 64 + lat[:, 1]) * 64 + lat[:, 2]) > 0)
    np.testing.assert_array_equal(out.coords // LATENT_STRIDE,
                                  np.repeat(out.latent_coords, np.diff(out.cell_start), axis=0))


def test_affine_keeps_patient_millimetres(case: SparseSample) -> None:
    order, flips = (2, 0, 1), (True, False, True)
    out = apply_symmetry(case, order, flips)
    voxels = np.c_[case.coords[:50].astype(float), np.ones(50)].T
    moved = voxel_transform(case.resolution, order, flips) @ voxels
    np.testing.assert_allclose(case.affine @ voxels, out.affine @ moved)


def test_identity_and_draws(case: SparseSample) -> None:
    assert apply_symmetry(case, (0, 1, 2), (False, False, False)) is case
    rng = np.random.default_rng(0)
    flips_only = {random_symmetry(rng, "flips") for _ in range(200)}
    assert {order for order, _ in flips_only} == {(0, 1, 2)} and len(flips_only) == 8
    assert len({random_symmetry(rng, "cube") for _ in range(2000)}) == 48
    assert random_symmetry(rng, "none") == ((0, 1, 2), (False, False, False))
    with pytest.raises(ValueError, match="augment='rotate'"):
        random_symmetry(rng, "rotate")


def test_dataset_augments_training_items_deterministically(tmp_path, case: SparseSample) -> None:
    save_sample(case, tmp_path / "aug.npz")
    plain = SparseSDF(tmp_path, resolution=64, max_points=NO_CROP)[0]["coords"].numpy()
    data = SparseSDF(tmp_path, resolution=64, max_points=NO_CROP, augment="cube", seed=3)
    per_epoch = []
    for epoch in range(4):
        data.set_epoch(epoch)
        first, again = data[0]["coords"].numpy(), data[0]["coords"].numpy()
        np.testing.assert_array_equal(first, again)  # seeded by (seed, epoch, case)
        assert first.shape == plain.shape  # the same points, moved
        per_epoch.append(first.tobytes())
    assert len(set(per_epoch)) > 1  # a new symmetry per epoch (4 draws of 48, seed fixed)
    with pytest.raises(DatasetError, match="augment='spin'"):
        SparseSDF(tmp_path, resolution=64, max_points=NO_CROP, augment="spin")
