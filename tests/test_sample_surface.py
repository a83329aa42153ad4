"""The sample records how `ctvq window` cleaned the surface; version-2 samples (before that) still load."""

from pathlib import Path

import numpy as np
import pytest
from data_helpers import sphere_sample

from ctvq.cli import main
from ctvq.ct.manifest import manifest_table, read_manifest
from ctvq.ct.sample import FORMAT_VERSION, load_sample, save_sample
from ctvq.ct.volume_file import load_windowed
from ctvq.data.datasets import peek_sample


def test_cli_chain_carries_the_window_settings_into_sample_and_manifest(
        small_scan: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    w, b, s, m = (tmp_path / n for n in ("w.npz", "b.npz", "s.npz", "manifest.csv"))
    assert main(["window", str(small_scan), "-o", str(w), "--window", "bone", "--resolution", "64",
                 "--smooth-mm", "0.5", "--min-island-mm3", "7", "--no-body-mask", "--pad", "edge"]) == 0
    assert main(["sdf", str(w), "-o", str(b)]) == 0
    assert main(["index", str(b), "-o", str(s)]) == 0
    assert main(["manifest", str(s), "-o", str(m), "--min-points", "1"]) == 0
    capsys.readouterr()
    sample = load_sample(s)
    given = (0.5, 7.0, False, "edge")
    assert (sample.smooth_mm, sample.min_island_mm3, sample.body_mask, sample.pad) == given
    extent = load_windowed(w).scan_extent
    assert sample.scan_extent.dtype == np.float64 and sample.scan_extent.shape == (2, 3)
    np.testing.assert_array_equal(sample.scan_extent, extent)
    row = read_manifest(m).iloc[0]
    assert (row["smooth_mm"], row["min_island_mm3"], bool(row["body_mask"]), row["pad"]) == given
    np.testing.assert_allclose([float(v) for v in row["scan_extent"].split(",")], extent.ravel(), rtol=1e-5)


def _as_version_2(path: Path) -> None:
    """Rewrite a sample as version 2 wrote it: full coordinates and float32 sdf, no surface settings, no
    scan extent."""
    sample = load_sample(path)
    with np.load(path) as data:
        payload = {k: data[k] for k in data if k not in
                   ("smooth_mm", "min_island_mm3", "body_mask", "pad", "scan_extent", "local_index",
                    "sdf_steps")}
    payload.update(format_version=np.asarray(2), coords=sample.coords, sdf=sample.sdf)
    np.savez_compressed(path, **payload)


def test_version_2_sample_loads_with_raw_settings_and_unknown_extent(tmp_path: Path) -> None:
    path = tmp_path / "old.npz"
    original = sphere_sample("old", resolution=32)
    save_sample(original, path)
    _as_version_2(path)
    back = load_sample(path)
    np.testing.assert_array_equal(back.coords, original.coords)
    assert (back.smooth_mm, back.min_island_mm3, back.body_mask, back.pad) == (0.0, 0.0, False, "air")
    assert back.scan_extent.shape == (2, 3) and np.isnan(back.scan_extent).all()
    assert peek_sample(path).num_points == original.num_points
    row = manifest_table([path], tmp_path).iloc[0]
    assert (row["pad"], row["scan_extent"]) == ("air", "")


def test_saved_sample_is_the_current_version(tmp_path: Path) -> None:
    save_sample(sphere_sample("new", resolution=32), tmp_path / "new.npz")
    with np.load(tmp_path / "new.npz") as data:
        assert int(data["format_version"]) == FORMAT_VERSION == 4
        assert data["scan_extent"].shape == (2, 3) and str(data["pad"]) == "air"
        assert data["local_index"].dtype == np.uint16 and data["sdf_steps"].dtype == np.int16
        assert "coords" not in data and "sdf" not in data
