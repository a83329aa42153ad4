"""The on-disk sample contract: atomic writes, version check, decoder targets."""

from pathlib import Path

import numpy as np
import pytest

from ctvq.ct.sample import (
    FORMAT_VERSION,
    SampleFormatError,
    SparseSample,
    decoder_targets,
    load_sample,
    save_sample,
)


def _two_cell_sample() -> SparseSample:
    # Two latent cells at resolution 16: cell (0,0,0) holds two band voxels, cell (1,0,0) one.
    coords = np.array([[1, 2, 3], [7, 7, 7], [9, 0, 0]], dtype=np.int16)
    sdf = np.array([-0.5, 0.25, 1.0], dtype=np.float32)
    inside = np.zeros((2, 8, 8, 8), dtype=bool)
    inside[0, :4] = True  # local x < 4 of the first cell lies inside
    return SparseSample(
        case_id="c0", window="lung", window_width=1500.0, window_level=-600.0, iso_value=0.5,
        resolution=16, band=3.0, affine=np.eye(4), coords=coords, sdf=sdf,
        latent_coords=np.array([[0, 0, 0], [1, 0, 0]], dtype=np.int16),
        cell_start=np.array([0, 2, 3], dtype=np.int64),
        inside_bits=np.packbits(inside.reshape(2, -1), axis=1),
    )


def test_save_then_load_returns_identical_arrays(tmp_path: Path) -> None:
    sample = _two_cell_sample()
    save_sample(sample, tmp_path / "c0.npz")
    back = load_sample(tmp_path / "c0.npz")
    for name in ("coords", "sdf", "latent_coords", "cell_start", "inside_bits", "affine"):
        np.testing.assert_array_equal(getattr(back, name), getattr(sample, name))
    assert (back.case_id, back.window, back.resolution, back.band) == ("c0", "lung", 16, 3.0)


def test_decoder_targets_use_sdf_in_band_and_sign_elsewhere() -> None:
    target = decoder_targets(_two_cell_sample())
    assert target.shape == (2, 8, 8, 8)
    assert target[0, 1, 2, 3] == -0.5 and target[0, 7, 7, 7] == 0.25 and target[1, 1, 0, 0] == 1.0
    assert target[0, 0, 0, 0] == -1.0 and target[0, 5, 0, 0] == 1.0 and target[1, 0, 5, 5] == 1.0


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    bad = _two_cell_sample()
    object.__setattr__(bad, "sdf", np.array([0.0, 2.0, 0.0], dtype=np.float32))  # outside [-1, 1]
    with pytest.raises(SampleFormatError, match="outside"):
        save_sample(bad, tmp_path / "bad.npz")
    assert list(tmp_path.iterdir()) == []


def test_other_format_version_is_refused_with_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "old.npz"
    save_sample(_two_cell_sample(), path)
    with np.load(path) as data:
        payload = dict(data)
    payload["format_version"] = np.asarray(FORMAT_VERSION + 1)
    np.savez_compressed(path, **payload)
    with pytest.raises(SampleFormatError, match=r"old\.npz.*version"):
        load_sample(path)


def test_corrupt_file_is_refused_with_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "broken.npz"
    path.write_bytes(b"not a zip at all")
    with pytest.raises(SampleFormatError, match=r"broken\.npz"):
        load_sample(path)
