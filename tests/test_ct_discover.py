"""Scan discovery on real files written by SimpleITK, `ctvq discover`, and failure records of unusable scans
passed from `ctvq window` through sdf and index into the manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ctvq.cli import main
from ctvq.ct.discover import discover_scans, scan_suffix
from ctvq.ct.errors import CTInputError
from ctvq.ct.io import CTImage, read_ct, write_ct, write_dicom_series
from ctvq.ct.phantom import chest_phantom


@pytest.fixture(scope="module")
def tiny_ct() -> CTImage:
    return chest_phantom((24, 24, 8), (2.0, 2.0, 4.0), seed=1)


def _two_series_folder(ct: CTImage, folder: Path, tmp: Path) -> tuple[str, str]:
    """One folder holding two DICOM series, as a scanner export puts two reconstructions side by side."""
    uids = ("1.2.826.0.1.3680043.8.498.101", "1.2.826.0.1.3680043.8.498.202")
    folder.mkdir(parents=True)
    for n, uid in enumerate(uids):
        write_dicom_series(ct, tmp / f"s{n}", series_uid=uid)
        for f in (tmp / f"s{n}").iterdir():
            shutil.move(str(f), folder / f"s{n}_{f.name}")
    return uids


def test_discovery_finds_files_and_series_at_any_depth_and_says_what_it_skipped(
        tiny_ct: CTImage, tmp_path: Path) -> None:
    root = tmp_path / "scans"
    (root / "flat").mkdir(parents=True)
    write_ct(tiny_ct, root / "flat" / "chest.nii.gz")
    (root / "flat" / "chest.nii.gz").rename(root / "flat" / "Chest 2.NII.GZ")  # case-insensitive, space
    write_ct(tiny_ct, root / "flat" / "head.nhdr")  # header + separate voxel file
    write_dicom_series(tiny_ct, root / "patient1" / "study1" / "series1")
    uids = _two_series_folder(tiny_ct, root / "patient2" / "study", tmp_path)
    (root / "flat" / "notes.txt").write_text("not a scan")
    (root / ".cache").mkdir()

    found = discover_scans(root)
    by_id = {c.case_id: c for c in found.cases}
    assert sorted(by_id) == ["flat_Chest_2", "flat_head", "patient1_study1_series1", "patient2_study_498.101",
                             "patient2_study_498.202"]
    assert by_id["flat_head"].kind == "file" and by_id["flat_Chest_2"].path.endswith("Chest 2.NII.GZ")
    series1 = by_id["patient1_study1_series1"]
    assert series1.kind == "dicom" and series1.series_uid is None
    assert by_id["patient2_study_498.202"].series_uid == uids[1]
    skipped = {Path(s.path).name: s.reason for s in found.skipped}
    assert "not a scan file" in skipped["notes.txt"] and skipped[".cache"] == "hidden folder"
    assert any(name.startswith("head.raw") for name in skipped)  # the .nhdr voxel file: no case
    assert scan_suffix("X.NRRD") == ".nrrd" and scan_suffix("slice.dcm") is None

    # each series of the shared folder reads on its own; the folder alone is refused naming the way out
    one = read_ct(root / "patient2" / "study", series_uid=uids[0])
    np.testing.assert_array_equal(one.hu, read_ct(root / "patient1" / "study1" / "series1").hu)
    with pytest.raises(CTInputError, match="2 DICOM series .*--series UID"):
        read_ct(root / "patient2" / "study")


def test_two_paths_giving_one_case_id_are_refused_naming_both(tiny_ct: CTImage, tmp_path: Path) -> None:
    write_ct(tiny_ct, tmp_path / "a_b.nii.gz")
    (tmp_path / "a").mkdir()
    write_ct(tiny_ct, tmp_path / "a" / "b.mha")
    with pytest.raises(CTInputError, match=r"a/b\.mha and .*a_b\.nii\.gz both give case id 'a_b'|"
                                           r"a_b\.nii\.gz and .*a/b\.mha both give case id 'a_b'"):
        discover_scans(tmp_path)
    with pytest.raises(CTInputError, match="is not a folder"):
        discover_scans(tmp_path / "missing")


def test_discover_command_lists_cases_as_json(tiny_ct: CTImage, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    write_dicom_series(tiny_ct, tmp_path / "p" / "s")
    assert main(["discover", str(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["cases"] == [{"case_id": "p_s", "path": str(tmp_path / "p" / "s"), "kind": "dicom",
                                "series_uid": None}]


def test_failure_record_passes_through_sdf_and_index_into_the_manifest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scan = tmp_path / "cut.nii.gz"
    write_ct(chest_phantom((48, 48, 16), (1.5, 1.5, 4.0), seed=2), scan)
    scan.write_bytes(scan.read_bytes()[:2000])  # an interrupted copy
    w, b, s = (tmp_path / f"{step}.npz" for step in ("w", "b", "s"))
    window = ["window", str(scan), "-o", str(w), "--window", "lung", "--resolution", "64"]
    assert main(window) == 2 and not w.exists()  # the command line's default: fail loudly
    assert main([*window, "--record-failure"]) == 0
    assert main(["sdf", str(w), "-o", str(b)]) == 2  # a record is no windowed volume
    assert main(["sdf", str(w), "-o", str(b), "--record-failure"]) == 0
    assert main(["index", str(b), "-o", str(s), "--record-failure"]) == 0
    capsys.readouterr()
    assert main(["manifest", str(s), "-o", str(tmp_path / "m.csv")]) == 0
    assert "1 failed" in capsys.readouterr().err
    row = pd.read_csv(tmp_path / "m.csv", keep_default_na=False).iloc[0]
    assert row.case_id == "cut" and row.window == "lung" and row.num_points == ""
    assert row.status.startswith("failed: window: ") and "truncated" in row.status
