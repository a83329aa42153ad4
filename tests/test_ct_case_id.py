"""Case ids name files: a user-given id with a path in it is refused, a file-name-derived id is made safe."""

from pathlib import Path

import pytest

from ctvq.cli import main
from ctvq.ct.case_id import case_id_problem, check_case_id, safe_case_id
from ctvq.ct.pipeline import default_case_id


@pytest.mark.parametrize("bad", ["../../x", "/tmp/x", "a/b", "..", ".hidden", "", "a b", "x" * 201, "ü"])
def test_ids_that_cannot_be_one_file_name_are_refused(bad: str) -> None:
    assert case_id_problem(bad) is not None
    with pytest.raises(ValueError, match="--case-id: case id"):
        check_case_id(bad, "--case-id")


def test_plain_ids_pass_and_file_names_are_made_safe() -> None:
    for good in ("phantom_s000", "ts_example_ct", "A-1.2"):
        assert check_case_id(good, "x") == good
    assert safe_case_id("my scan (2)") == "my_scan_2_"
    assert safe_case_id("../..") == "case"
    assert default_case_id(Path("/data/my scan.nii.gz")) == "my_scan"
    assert case_id_problem(default_case_id(Path("/data/..nii.gz"))) is None


def test_window_refuses_a_crafted_case_id_in_one_line(tmp_path: Path, capsys) -> None:
    scan = tmp_path / "in" / "scan.nii.gz"
    scan.parent.mkdir()
    assert main(["phantom", "-o", str(scan), "--seed", "0", "--shape", "40", "40", "24"]) == 0
    out = tmp_path / "in" / "w.npz"
    capsys.readouterr()
    rc = main(["window", str(scan), "-o", str(out), "--window", "lung", "--resolution", "64",
               "--case-id", "../../escaped"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--case-id: case id '../../escaped' is refused" in err[0]
    assert not out.exists()
