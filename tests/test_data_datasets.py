"""CTWindowSparseSDF / SparseSDF: sources, window and resolution checks, filtering, cache, crops."""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from data_helpers import NO_CROP, sphere_sample, write_cases, write_manifest

from ctvq.ct.sample import SampleFormatError, save_sample
from ctvq.ct.splits import SplitRule
from ctvq.data.datasets import CTWindowSparseSDF, DatasetError, SparseSDF

RADII = (0.0, 8.0, 14.0, 18.0)  # case0 is a dot: ~120 band points, below a min_points of 500


@pytest.fixture()
def lung_dir(tmp_path: Path) -> Path:
    write_cases(tmp_path, RADII)
    return tmp_path


def _items_equal(a: dict, b: dict) -> bool:
    keys = ("coords", "feats", "latent_coords", "targets", "affine")
    return a["case_id"] == b["case_id"] and all(torch.equal(a[k], b[k]) for k in keys)


def test_folder_dataset_returns_the_item_contract(lung_dir: Path) -> None:
    ds = CTWindowSparseSDF(lung_dir, window_type="lung", resolution=64, min_points=1, max_points=10**6)
    assert len(ds) == len(RADII) and ds.filtered == []
    item = ds[2]
    n, m = item["num_points"], item["latent_coords"].shape[0]
    assert item["case_id"] == "case2" and item["num_points_full"] == n
    assert item["coords"].dtype == torch.int32 and item["coords"].shape == (n, 3)
    assert item["feats"].dtype == torch.float32 and item["feats"].shape == (n, 1)
    assert item["latent_coords"].dtype == torch.int32 and m > 0
    assert item["targets"].dtype == torch.float32 and item["targets"].shape == (m, 8, 8, 8)
    assert item["affine"].dtype == torch.float64 and item["affine"].shape == (4, 4)
    assert float(item["feats"].abs().max()) <= 1.0


def test_cases_below_min_points_are_filtered_recorded_and_logged(
    lung_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="ctvq.data.datasets"):
        ds = CTWindowSparseSDF(lung_dir, window_type="lung", resolution=64,
                               max_points=NO_CROP, min_points=500)
    assert [case for case, _ in ds.filtered] == ["case0"]
    assert ds.filtered[0][1].startswith("min_points (") and "< 500)" in ds.filtered[0][1]
    assert [ds[i]["case_id"] for i in range(len(ds))] == ["case1", "case2", "case3"]
    assert sum("filtered case case0" in r.getMessage() for r in caplog.records) == 1


def test_nothing_left_after_filtering_is_an_error(lung_dir: Path) -> None:
    with pytest.raises(DatasetError, match=r"no usable case left \(4 filtered"):
        CTWindowSparseSDF(lung_dir, window_type="lung", resolution=64, max_points=NO_CROP, min_points=10**7)


def test_a_sample_of_another_window_in_the_folder_errors_naming_the_file(lung_dir: Path) -> None:
    save_sample(sphere_sample("odd", window="bone"), lung_dir / "odd.npz")
    with pytest.raises(DatasetError, match=r"odd\.npz.*window 'bone'.*window_type='lung'"):
        CTWindowSparseSDF(lung_dir, window_type="lung", resolution=64, max_points=NO_CROP)
    # The generic dataset reads any window.
    assert len(SparseSDF(lung_dir, resolution=64, max_points=NO_CROP, min_points=1)) == len(RADII) + 1


def test_a_sample_of_another_resolution_errors_naming_the_file(lung_dir: Path) -> None:
    save_sample(sphere_sample("small", resolution=32), lung_dir / "small.npz")
    with pytest.raises(DatasetError, match=r"small\.npz.*resolution 32.*resolution=64"):
        SparseSDF(lung_dir, resolution=64, max_points=NO_CROP)


def test_a_corrupt_sample_errors_naming_the_file(lung_dir: Path) -> None:
    (lung_dir / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(SampleFormatError, match=r"broken\.npz"):
        CTWindowSparseSDF(lung_dir, window_type="lung", resolution=64, max_points=NO_CROP)


def test_manifest_with_several_windows_selects_the_requested_one(tmp_path: Path) -> None:
    lung = write_cases(tmp_path / "lung", RADII)
    bone = write_cases(tmp_path / "bone", (9.0, 11.0), window="bone")
    manifest = write_manifest(tmp_path / "manifest.csv", [*lung, *bone])
    ds = CTWindowSparseSDF(manifest, window_type="bone", resolution=64, max_points=NO_CROP, min_points=1)
    assert len(ds) == 2 and {ds[i]["window"] for i in range(2)} == {"bone"}
    with pytest.raises(DatasetError, match=r"manifest\.csv.*no rows of window_type='brain'.*bone, lung"):
        CTWindowSparseSDF(manifest, window_type="brain", resolution=64, max_points=NO_CROP)


def test_manifest_of_another_window_or_resolution_errors_naming_the_file(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.csv", write_cases(tmp_path, RADII, window="bone"))
    with pytest.raises(DatasetError, match=r"m\.csv.*no rows of window_type='lung'"):
        CTWindowSparseSDF(manifest, window_type="lung", resolution=64, max_points=NO_CROP)
    with pytest.raises(DatasetError, match=r"m\.csv \(row of .*case0\.npz\).*resolution 64"):
        CTWindowSparseSDF(manifest, window_type="bone", resolution=128, max_points=NO_CROP)


def test_manifest_filters_use_the_dataset_threshold_and_keep_other_verdicts(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.csv", write_cases(tmp_path, RADII), min_points=10**6)
    table = pd.read_csv(manifest)
    table.loc[3, ["status", "num_points", "resolution"]] = ["failed: no surface", None, None]
    table.to_csv(manifest, index=False)
    ds = CTWindowSparseSDF(manifest, window_type="lung", resolution=64, max_points=NO_CROP, min_points=500)
    assert [ds[i]["case_id"] for i in range(len(ds))] == ["case1", "case2"]
    assert dict(ds.filtered)["case3"] == "manifest status: failed: no surface"
    assert dict(ds.filtered)["case0"].startswith("min_points")
    table.loc[3, "status"] = "ok"
    table.to_csv(manifest, index=False)
    with pytest.raises(DatasetError, match=r"m\.csv: line 5 \(case3\.npz\) has status 'ok' but no"):
        CTWindowSparseSDF(manifest, window_type="lung", resolution=64, max_points=NO_CROP)


def test_a_stale_manifest_errors_naming_the_sample(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.csv", write_cases(tmp_path, RADII))
    save_sample(sphere_sample("case2", spheres=[(30.0, 30.0, 30.0, 5.0)]), tmp_path / "case2.npz")
    ds = CTWindowSparseSDF(manifest, window_type="lung", resolution=64, max_points=NO_CROP, min_points=1)
    with pytest.raises(DatasetError, match=r"case2\.npz.*stale"):
        ds[2]


def test_window_type_is_checked_against_the_window_registry(lung_dir: Path) -> None:
    with pytest.raises(DatasetError, match=r"unknown window_type 'lungs'; accepted: lung, bone.*custom"):
        CTWindowSparseSDF(lung_dir, window_type="lungs", resolution=64, max_points=NO_CROP)
    with pytest.raises(DatasetError, match=r"'lung' has window_width=1500.0; use window_type='custom'"):
        CTWindowSparseSDF(lung_dir, window_type="lung", resolution=64, max_points=NO_CROP, window_width=1400)
    with pytest.raises(DatasetError, match="'custom' needs both window_width and window_level"):
        CTWindowSparseSDF(lung_dir, window_type="custom", resolution=64, max_points=NO_CROP, window_width=400)


def test_custom_window_samples_must_carry_the_requested_width_and_level(tmp_path: Path) -> None:
    sample = sphere_sample("c", window="custom", window_width=400.0, window_level=40.0)
    save_sample(sample, tmp_path / "c.npz")
    ok = CTWindowSparseSDF(tmp_path, window_type="custom", resolution=64,
                           max_points=NO_CROP, window_width=400, window_level=40)
    assert ok[0]["case_id"] == "c"
    with pytest.raises(DatasetError, match=r"c\.npz: window_level is 40\.0.*window_level=50"):
        CTWindowSparseSDF(tmp_path, window_type="custom", resolution=64,
                          max_points=NO_CROP, window_width=400, window_level=50)
    # A manifest has no width/level columns: the check happens when the sample is loaded.
    manifest = write_manifest(tmp_path / "m.csv", [tmp_path / "c.npz"])
    wrong = CTWindowSparseSDF(manifest, window_type="custom", resolution=64,
                              max_points=NO_CROP, window_width=400.0,
                              window_level=50.0)
    with pytest.raises(DatasetError, match=r"c\.npz: window_level is 40\.0.*window_level=50"):
        wrong[0]


def test_cache_data_serves_identical_items_after_the_files_are_gone(lung_dir: Path) -> None:
    cached = CTWindowSparseSDF(lung_dir, window_type="lung", resolution=64, min_points=1, max_points=4000,
                               cache_data=True)
    plain = CTWindowSparseSDF(lung_dir, window_type="lung", resolution=64, min_points=1, max_points=4000)
    first = [cached[i] for i in range(len(cached))]
    assert all(_items_equal(a, plain[i]) for i, a in enumerate(first))
    for path in lung_dir.glob("*.npz"):
        path.unlink()
    assert all(_items_equal(a, cached[i]) for i, a in enumerate(first))  # no file was read again
    with pytest.raises(SampleFormatError, match=r"case0\.npz: sample file does not exist"):
        plain[0]


def test_crops_depend_on_seed_and_epoch_only(lung_dir: Path) -> None:
    def crops(seed: int, epoch: int) -> list[np.ndarray]:
        ds = CTWindowSparseSDF(lung_dir, window_type="lung", resolution=64, max_points=3000, seed=seed)
        ds.set_epoch(epoch)
        return [ds[i]["latent_coords"].numpy() for i in range(len(ds))]

    base = crops(0, 0)
    assert all(len(c) for c in base)
    assert all(np.array_equal(a, b) for a, b in zip(base, crops(0, 0), strict=True))
    for other in (crops(1, 0), crops(0, 1)):
        assert any(not np.array_equal(a, b) for a, b in zip(base, other, strict=True))


def test_cropped_items_stay_within_budget(lung_dir: Path) -> None:
    ds = CTWindowSparseSDF(lung_dir, window_type="lung", resolution=64, max_points=3000, min_points=1)
    for i in range(len(ds)):
        item = ds[i]
        assert item["num_points"] <= 3000 and item["coords"].shape[0] == item["num_points"]
        assert item["num_points_full"] >= item["num_points"]
    assert ds[3]["num_points_full"] > 3000


def test_bad_sources_and_arguments_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no \\*.npz files"):
        SparseSDF(tmp_path, resolution=64, max_points=NO_CROP)
    with pytest.raises(DatasetError, match="must be a manifest .csv or a folder"):
        SparseSDF(tmp_path / "missing", resolution=64, max_points=NO_CROP)
    (tmp_path / "m.csv").write_text("case_id,window\nx,lung\n")
    with pytest.raises(DatasetError, match=r"m\.csv: manifest lacks column\(s\) sample_path"):
        SparseSDF(tmp_path / "m.csv", resolution=64, max_points=NO_CROP)
    with pytest.raises(DatasetError, match=r"precompute_sparse=false reads windowed volumes"):
        SparseSDF(tmp_path / "m.csv", resolution=64, max_points=NO_CROP, precompute_sparse=False)
    with pytest.raises(DatasetError, match="max_points must be an int >= 1"):
        SparseSDF(tmp_path, resolution=64, max_points=0)


def test_only_the_train_split_of_a_manifest_is_read(tmp_path: Path) -> None:
    """Val/test rows are dropped before any file is opened: deleting or corrupting them changes nothing."""
    paths = write_cases(tmp_path, RADII)
    split_file = tmp_path / "splits.csv"
    split_file.write_text("case_id,split\ncase0,train\ncase1,val\ncase2,train\ncase3,test\n")
    manifest = write_manifest(tmp_path / "m.csv", paths, min_points=1, split=SplitRule(file=split_file))
    paths[1].unlink()
    paths[3].write_bytes(b"not a sample")
    ds = CTWindowSparseSDF(manifest, window_type="lung", resolution=64,
                           max_points=NO_CROP, min_points=1, cache_data=True)
    assert [r.case_id for r in ds.records] == ["case0", "case2"]
    assert ds.held_out == [("case1", "val"), ("case3", "test")]
    assert [ds[i]["case_id"] for i in range(len(ds))] == ["case0", "case2"]


def test_a_manifest_without_split_column_is_all_train(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.csv", write_cases(tmp_path, RADII), min_points=1)
    table = pd.read_csv(manifest)
    table.drop(columns="split").to_csv(manifest, index=False)  # as written before splits existed
    ds = CTWindowSparseSDF(manifest, window_type="lung", resolution=64, max_points=NO_CROP, min_points=1)
    assert len(ds) == len(RADII) and ds.held_out == []


def test_an_empty_train_split_or_an_unknown_split_is_an_error(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.csv", write_cases(tmp_path, RADII), min_points=1)
    table = pd.read_csv(manifest)
    table.assign(split="val").to_csv(manifest, index=False)
    with pytest.raises(DatasetError, match=r"m\.csv: the train split is empty \(all 4 rows are val/test\)"):
        CTWindowSparseSDF(manifest, window_type="lung", resolution=64, max_points=NO_CROP, min_points=1)
    table.assign(split=["train", "train", "holdout", "val"]).to_csv(manifest, index=False)
    with pytest.raises(DatasetError, match=r"line 4 \(case2\.npz\): split 'holdout' is not one of train"):
        CTWindowSparseSDF(manifest, window_type="lung", resolution=64, max_points=NO_CROP, min_points=1)
