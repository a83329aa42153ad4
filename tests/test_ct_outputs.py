"""Writers fail in one line and leave nothing behind: unwritable folder, a folder where the file should go, a
file where the DICOM folder should go, a full disk (a real ENOSPC from /dev/full)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ctvq.atomic import FileSystemError, atomic_output, file_system_error
from ctvq.cli import main

PHANTOM = ["--shape", "32", "32", "12"]


def _phantom(output: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code = main(["phantom", "-o", str(output), *PHANTOM, *extra])
    return code, capsys.readouterr().err


def _one_error_line(err: str, output: Path, command: str = "phantom") -> None:
    """The progress lines of the finished stages, then exactly one error line, naming the output."""
    lines = err.splitlines()
    assert "Traceback" not in err and [line for line in lines if "error" in line] == lines[-1:], err
    assert lines[-1].startswith(f"ctvq {command}: error: {output}: "), err


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process may not write to: chmod 555 for a normal user; root ignores file modes, so there
    the read-only sysfs stands in (it refuses new files even to root)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if not Path("/sys/kernel").is_dir():
        pytest.skip("running as root without a read-only sysfs: no unwritable folder to test with")
    return Path("/sys")


@pytest.mark.parametrize("dicom", [False, True], ids=["file", "dicom"])
def test_unwritable_folder_fails_in_one_line_and_leaves_nothing(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str],
                                                                dicom: bool) -> None:
    folder = _unwritable_folder(tmp_path)
    before = sorted(p.name for p in folder.iterdir())
    output = folder / ("ctvq_test_series" if dicom else "ctvq_test.nii.gz")
    try:
        code, err = _phantom(output, capsys, *(["--dicom"] if dicom else []))
    finally:
        if folder != Path("/sys"):
            folder.chmod(0o755)
    assert code == 2
    _one_error_line(err, output)
    assert "cannot write the output" in err and "permission denied; choose a path you may use" in err
    assert sorted(p.name for p in folder.iterdir()) == before


def test_output_path_that_is_a_folder_fails_in_one_line(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "scan.nii.gz"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    code, err = _phantom(folder, capsys)
    assert code == 2
    _one_error_line(err, folder)
    assert "is a folder, not a file; give a file name" in err
    assert [p.name for p in tmp_path.iterdir()] == ["scan.nii.gz"]
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]


def test_dicom_output_that_is_a_file_fails_in_one_line(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "series"
    target.write_text("not a folder")
    code, err = _phantom(target, capsys, "--dicom")
    assert code == 2
    _one_error_line(err, target)
    assert "exists and is a file, not a folder" in err
    assert [p.name for p in tmp_path.iterdir()] == ["series"] and target.read_text() == "not a folder"


def test_window_output_that_is_a_folder_fails_in_one_line(small_scan: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "w.npz"
    folder.mkdir()
    code = main(["window", str(small_scan), "-o", str(folder), "--window", "lung", "--resolution", "64"])
    err = capsys.readouterr().err
    assert code == 2
    _one_error_line(err, folder, "window")
    assert "is a folder, not a file" in err and list(folder.iterdir()) == []


def _disk_full() -> OSError:
    """The OSError of a real write to a full device (/dev/full answers every write with ENOSPC)."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    try:
        with open("/dev/full", "wb", buffering=0) as fh:
            fh.write(b"voxels")
    except OSError as exc:
        return exc
    raise AssertionError("/dev/full accepted a write")


def test_full_disk_error_becomes_one_line_naming_the_target() -> None:
    exc = _disk_full()
    assert exc.errno == errno.ENOSPC
    message = str(file_system_error(Path("out/scan.nii.gz"), exc))
    assert message == ("out/scan.nii.gz: cannot write the output (No space left on device): no space left on "
                       "the device; free some space or write to another disk")
    assert "\n" not in message


def test_full_disk_during_an_atomic_write_leaves_no_file(tmp_path: Path) -> None:
    """The writer's own ENOSPC (here from a real write to /dev/full) becomes the one-line error and the
    temporary folder with the half-written file is removed."""
    target = tmp_path / "sample.npz"
    full = r"sample\.npz: cannot write the output \(No space left on device\)"
    with pytest.raises(FileSystemError, match=full), atomic_output(target) as tmp:
        tmp.write_bytes(b"half of the data")
        raise _disk_full()
    assert list(tmp_path.iterdir()) == []


def test_errors_without_an_errno_are_not_disguised(tmp_path: Path) -> None:
    """An OSError raised by code (no errno) is a bug or a message of its own, not a file-system failure."""
    with pytest.raises(OSError, match="custom failure"), atomic_output(tmp_path / "x.npz") as tmp:
        tmp.write_bytes(b"x")
        raise OSError("custom failure")
    assert list(tmp_path.iterdir()) == []


def test_outputs_respect_the_umask(tmp_path: Path) -> None:
    """Temporary files and folders are private (mkstemp/mkdtemp: 0600/0700); what is moved into place gets
    the mode the user's umask gives, so a shared cohort folder stays readable by the group."""
    from ctvq.atomic import atomic_directory, atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_directory(tmp_path / "series") as folder:
            (folder / "slice.dcm").write_bytes(b"x")
        with atomic_output(tmp_path / "b.bin") as tmp, open(tmp, "wb") as fh:
            fh.write(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "series").stat().st_mode & 0o777 == 0o755
