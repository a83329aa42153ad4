"""precompute_sparse=false: samples built from `ctvq window` outputs equal the precomputed ones."""

from pathlib import Path

import pytest
import torch
from data_helpers import NO_CROP

from ctvq.ct.io import CTImage
from ctvq.ct.pipeline import build_sample, load_windowed, window_image
from ctvq.ct.sample import save_sample
from ctvq.ct.volume_file import save_windowed
from ctvq.ct.windows import WINDOWS
from ctvq.data.datasets import CTWindowSparseSDF, DatasetError

KEYS = ("coords", "feats", "latent_coords", "targets", "affine")


@pytest.fixture(scope="module")
def folders(small_ct: CTImage, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same two cases as windowed volumes (one folder) and as precomputed samples (another)."""
    windowed_dir, sample_dir = tmp_path_factory.mktemp("windowed"), tmp_path_factory.mktemp("samples")
    for case in ("a", "b"):
        volume = window_image(small_ct, WINDOWS["lung"], 64, case_id=case)
        save_windowed(volume, windowed_dir / f"{case}.npz")
        # As `ctvq sdf` + `ctvq index` do: from the stored (quantised) windowed volume.
        save_sample(build_sample(load_windowed(windowed_dir / f"{case}.npz")), sample_dir / f"{case}.npz")
    return windowed_dir, sample_dir


def test_on_the_fly_items_equal_precomputed_items(folders: tuple[Path, Path]) -> None:
    windowed_dir, sample_dir = folders
    kwargs = {"window_type": "lung", "resolution": 64, "max_points": 1500, "seed": 2}
    fly = CTWindowSparseSDF(windowed_dir, precompute_sparse=False, **kwargs)
    pre = CTWindowSparseSDF(sample_dir, **kwargs)
    assert len(fly) == len(pre) == 2
    for i in range(2):
        a, b = fly[i], pre[i]
        assert a["case_id"] == b["case_id"] and a["num_points_full"] == b["num_points_full"] > 1500
        assert all(torch.equal(a[k], b[k]) for k in KEYS)


def test_on_the_fly_checks_the_window_and_names_foreign_files(folders: tuple[Path, Path]) -> None:
    windowed_dir, sample_dir = folders
    with pytest.raises(DatasetError, match=r"a\.npz: case 'a' has window 'lung'.*window_type='bone'"):
        CTWindowSparseSDF(windowed_dir, window_type="bone", resolution=64,
                          max_points=NO_CROP, precompute_sparse=False)
    with pytest.raises(DatasetError, match=r"a\.npz: cannot build a sample.*not a ctvq-windowed-volume"):
        CTWindowSparseSDF(sample_dir, window_type="lung", resolution=64,
                          max_points=NO_CROP, precompute_sparse=False)


def test_on_the_fly_cache_builds_once_and_survives_deleted_files(
    small_ct: CTImage, tmp_path: Path
) -> None:
    save_windowed(window_image(small_ct, WINDOWS["lung"], 64, case_id="c"), tmp_path / "c.npz")
    ds = CTWindowSparseSDF(tmp_path, window_type="lung", resolution=64,
                           max_points=NO_CROP, precompute_sparse=False,
                           cache_data=True, min_points=1)
    first = ds[0]
    (tmp_path / "c.npz").unlink()
    assert all(torch.equal(first[k], ds[0][k]) for k in KEYS)
