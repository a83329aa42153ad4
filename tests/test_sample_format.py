"""The on-disk sample contract: atomic writes, version check, decoder targets."""

from pathlib import Path

import numpy as np
import pytest

from ctvq.ct.sample import (
    FORMAT_VERSION,
    SDF_STEPS,
    SampleFormatError,
    SparseSample,
    decoder_targets,
    load_sample,
    on_sdf_steps,
    save_sample,
)
from ctvq.data.datasets import peek_sample


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
    for name in ("coords", "latent_coords", "cell_start", "inside_bits", "affine"):
        np.testing.assert_array_equal(getattr(back, name), getattr(sample, name))
    assert back.coords.dtype == np.int16
    # the sdf is stored in SDF_STEPS steps per band: 1.5e-5 of the band at most, and a second round trip
    # changes nothing
    np.testing.assert_allclose(back.sdf, sample.sdf, rtol=0, atol=0.5 / SDF_STEPS + 1e-9)
    save_sample(back, tmp_path / "again.npz")
    np.testing.assert_array_equal(load_sample(tmp_path / "again.npz").sdf, back.sdf)
    tiny = np.array([-1e-7, 1e-7, 0.0, -1.0, 1.0], dtype=np.float32)  # the sign survives any rounding
    np.testing.assert_array_equal(np.sign(on_sdf_steps(tiny)), np.sign(tiny))


def test_version_3_sample_with_full_coordinates_still_loads(tmp_path: Path) -> None:
    sample = _two_cell_sample()
    save_sample(sample, tmp_path / "c0.npz")
    with np.load(tmp_path / "c0.npz") as data:
        payload = {k: data[k] for k in data if k not in ("local_index", "sdf_steps")}
    payload.update(format_version=np.asarray(3), coords=sample.coords, sdf=sample.sdf)
    np.savez_compressed(tmp_path / "v3.npz", **payload)
    back = load_sample(tmp_path / "v3.npz")
    np.testing.assert_array_equal(back.coords, sample.coords)
    np.testing.assert_array_equal(back.sdf, sample.sdf)
    assert peek_sample(tmp_path / "v3.npz").num_points == peek_sample(tmp_path / "c0.npz").num_points == 3
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
