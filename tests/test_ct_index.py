from dataclasses import replace
from pathlib import Path

import numpy as np

from ctvq.ct.band import compute_band, load_band, save_band, surface_volume
from ctvq.ct.index import build_index
from ctvq.ct.io import CTImage
from ctvq.ct.pipeline import build_sample, load_windowed, window_image
from ctvq.ct.sample import decoder_targets, load_sample, save_sample
from ctvq.ct.surface import island_voxels
from ctvq.ct.volume_file import save_windowed
from ctvq.ct.windows import get_window


def test_sample_is_sorted_by_latent_cell_and_targets_match_the_volume(small_ct: CTImage) -> None:
    volume = window_image(small_ct, get_window("bone"), 64, "chest")
    sample = build_sample(volume, band=2.0)
    c = sample.coords.astype(np.int64)
    cell = c // 8
    local = c % 8
    key = (((cell[:, 0] * 8 + cell[:, 1]) * 8 + cell[:, 2]) * 512 + (local[:, 0] * 64 + local[:, 1] * 8
                                                                     + local[:, 2]))
    assert (np.diff(key) > 0).all()
    np.testing.assert_array_equal(np.unique(cell, axis=0), sample.latent_coords)
    counts = np.diff(sample.cell_start)
    assert (counts > 0).all() and counts.sum() == sample.num_points
    for m in (0, sample.num_latent // 2, sample.num_latent - 1):
        members = c[sample.cell_start[m]:sample.cell_start[m + 1]] // 8
        assert (members == sample.latent_coords[m]).all()
    targets = decoder_targets(sample)
    x, y, z = (sample.latent_coords.astype(np.int64) * 8).T
    step = float(np.linalg.norm(volume.affine[:3, 0]))
    surface, _, _ = surface_volume(volume.values, 0.5, island_voxels(volume.surface.min_island_mm3, step))
    # the targets are those of the cleaned surface
    children = np.stack([surface[a:a + 8, b:b + 8, d:d + 8] for a, b, d in zip(x, y, z, strict=True)])
    outside_band = np.abs(targets) == 1.0
    np.testing.assert_array_equal(targets[outside_band] < 0, children[outside_band] > 0.5)
    assert sample.affine.shape == (4, 4) and sample.band == 2.0 and sample.window == "bone"
    np.testing.assert_allclose(sample.spacing, small_ct.spacing)


def test_file_chain_equals_the_in_memory_build(small_ct: CTImage, tmp_path: Path) -> None:
    volume = window_image(small_ct, get_window("lung"), 64, "chest")
    save_windowed(volume, tmp_path / "w.npz")
    loaded = load_windowed(tmp_path / "w.npz")
    assert np.abs(loaded.values - volume.values).max() <= 0.5 / 65535 + 1e-7
    save_band(compute_band(loaded), tmp_path / "b.npz")
    save_sample(build_index(load_band(tmp_path / "b.npz")), tmp_path / "s.npz")
    from_files = load_sample(tmp_path / "s.npz")
    direct = build_sample(loaded)
    for name in ("coords", "sdf", "latent_coords", "cell_start", "inside_bits", "affine"):
        np.testing.assert_array_equal(getattr(from_files, name), getattr(direct, name), err_msg=name)
    assert from_files.source == small_ct.source and from_files.case_id == "chest"


def test_memory_layout_of_the_volume_does_not_change_the_sample(small_ct: CTImage) -> None:
    volume = window_image(small_ct, get_window("soft_tissue"), 64, "chest")
    c_order = replace(volume, values=np.ascontiguousarray(volume.values))
    f_order = replace(volume, values=np.asfortranarray(volume.values))
    a, b = build_sample(c_order), build_sample(f_order)
    for name in ("coords", "sdf", "latent_coords", "cell_start", "inside_bits"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
