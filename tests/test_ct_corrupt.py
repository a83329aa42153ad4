"""Damaged scans are refused in one line naming the file and the reason: truncated data in every format, NaN
or infinite voxels, bad spacing, headers too large for memory, DICOM series with duplicate or missing slices.

Every file is real: written by SimpleITK (or the repository's DICOM writer) and then cut or patched.
"""

from __future__ import annotations

import gzip
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ctvq.cli import main
from ctvq.ct.errors import CTInputError, CTInputWarning
from ctvq.ct.io import CTImage, _locale_kept, check_slice_positions, read_ct, to_sitk, write_dicom_series
from ctvq.ct.phantom import chest_phantom

FORMATS = ["scan.nii.gz", "scan.nii", "scan.mha", "scan.nrrd", "scan.mhd"]


@pytest.fixture(scope="module")
def ct() -> CTImage:
    phantom = chest_phantom((48, 48, 12), (1.5, 1.5, 4.0), seed=2)
    return CTImage(np.rint(phantom.hu), phantom.spacing, phantom.origin, phantom.direction, "phantom")


def _window(path: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> tuple[int, str, Path]:
    """``ctvq window`` in this process; capfd also sees what ITK writes on the C++ stderr."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    code = main(["window", str(path), "-o", str(out / "w.npz"), "--window", "lung", "--resolution", "64"])
    return code, capfd.readouterr().err, out


def _assert_refused(path: Path, reason: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code, err, out = _window(path, tmp_path, capfd)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and "WARNING" not in err, err
    assert err.startswith(f"ctvq window: error: {path}: "), err
    assert reason in err, err
    assert list(out.iterdir()) == []


def _data_file(path: Path) -> Path:
    """The file holding the voxels: the .mhd header's raw or zraw file, else the file itself."""
    if path.suffix != ".mhd":
        return path
    match = re.search(r"ElementDataFile = (\S+)", path.read_text())
    assert match is not None
    return path.parent / match.group(1)


@pytest.mark.parametrize(("name", "compress"), [
    ("scan.nii.gz", True), ("scan.nii", False), ("scan.mha", False), ("scan.mha", True), ("scan.nrrd", False),
    ("scan.nrrd", True), ("scan.mhd", False), ("scan.mhd", True),  # .mhd: the .raw / .zraw data file is cut
])
def test_truncated_data_is_refused_in_every_format(ct: CTImage, tmp_path: Path,
                                                   capfd: pytest.CaptureFixture[str], name: str,
                                                   compress: bool) -> None:
    """ITK zero-fills a cut NIfTI without a word; MHA and NRRD fail with a vague "cannot be read"."""
    path = tmp_path / name
    sitk.WriteImage(to_sitk(ct), str(path), useCompression=compress)
    read_ct(path)  # the complete file is fine
    data = _data_file(path)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # `head -c` half the size
    with pytest.raises(CTInputError, match=rf"^{re.escape(str(path))}: truncated: "):
        read_ct(path)
    _assert_refused(path, "(an interrupted download or copy); copy the file again", tmp_path, capfd)


def test_truncated_scan_gives_one_line_through_the_real_command(ct: CTImage, tmp_path: Path) -> None:
    """MetaIO prints its complaint on the C++ stderr of a fresh process: the user still sees one line."""
    path = tmp_path / "cut.mha"
    sitk.WriteImage(to_sitk(ct), str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    argv = ["window", str(path), "-o", str(tmp_path / "w.npz"), "--window", "lung", "--resolution", "64"]
    done = subprocess.run([sys.executable, "-m", "ctvq", *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"ctvq window: error: {path}: truncated: ")
    assert not (tmp_path / "w.npz").exists()


def test_truncation_inside_the_gzip_stream_and_damage_are_told_apart(ct: CTImage, tmp_path: Path) -> None:
    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(to_sitk(ct), str(path))
    full = path.read_bytes()
    path.write_bytes(full[:-8])  # only the gzip trailer is missing: every voxel is there, still refused
    with pytest.raises(CTInputError, match="truncated: the compressed data ends"):
        read_ct(path)
    damaged = bytearray(full)
    damaged[len(full) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(CTInputError, match=r"scan\.nii\.gz: (not a readable image file|truncated)"):
        read_ct(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", FORMATS)
def test_nan_or_infinite_voxels_are_refused_in_every_format(ct: CTImage, tmp_path: Path,
                                                            capfd: pytest.CaptureFixture[str], name: str,
                                                            bad: float) -> None:
    """ITK's NIfTI reader turns NaN into 0: the NIfTI voxels are scanned before ITK reads them."""
    hu = ct.hu.copy()
    hu[10, 20, 5] = bad
    path = tmp_path / name
    image = to_sitk(CTImage(hu, ct.spacing, ct.origin, ct.direction, "nan"), sitk.sitkFloat32)
    sitk.WriteImage(image, str(path))
    with pytest.raises(CTInputError, match="image holds NaN or infinite values"):
        read_ct(path)
    _assert_refused(path, "NaN or infinite values", tmp_path, capfd)


def _patch_nifti_pixdim(path: Path, axis: int, value: float) -> None:
    raw = bytearray(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes())
    struct.pack_into("<f", raw, 76 + 4 * axis, value)  # pixdim[axis] of the NIfTI-1 header
    path.write_bytes(gzip.compress(bytes(raw)) if path.suffix == ".gz" else bytes(raw))


@pytest.mark.parametrize("value", [0.0, -2.5, np.nan, np.inf])
@pytest.mark.parametrize(("name", "axis"), [("scan.nii", 3), ("scan.nii.gz", 1)])
def test_nifti_pixdim_zero_negative_or_nan_is_refused(ct: CTImage, tmp_path: Path,
                                                      capfd: pytest.CaptureFixture[str], name: str, axis: int,
                                                      value: float) -> None:
    """SimpleITK reads a zero or NaN pixdim as 1 mm without a word: the header is checked itself."""
    path = tmp_path / name
    sitk.WriteImage(to_sitk(ct), str(path))
    _patch_nifti_pixdim(path, axis, value)
    with pytest.raises(CTInputError, match=r"NIfTI voxel size \(pixdim\) .* mm is not positive and finite"):
        read_ct(path)
    _assert_refused(path, "is not positive and finite", tmp_path, capfd)


@pytest.mark.parametrize(("name", "pattern", "replacement"), [
    ("scan.mha", rb"ElementSpacing = [^\n]*", b"ElementSpacing = 1.5 1.5 0"),
    ("scan.mha", rb"ElementSpacing = [^\n]*", b"ElementSpacing = 1.5 nan 4"),
    ("scan.mha", rb"ElementSpacing = [^\n]*", b"ElementSpacing = -1.5 1.5 4"),
    ("scan.nrrd", rb"\(0,0,4\)", b"(0,0,0)"),
])
def test_zero_negative_or_nan_spacing_is_refused(ct: CTImage, tmp_path: Path,
                                                 capfd: pytest.CaptureFixture[str], name: str, pattern: bytes,
                                                 replacement: bytes) -> None:
    path = tmp_path / name
    sitk.WriteImage(to_sitk(ct), str(path), useCompression=False)
    header = path.read_bytes()
    assert re.search(pattern, header), header[:400]
    path.write_bytes(re.sub(pattern, replacement, header, count=1))
    with pytest.raises(CTInputError, match="voxel spacing .* mm is not positive and finite"):
        read_ct(path)
    _assert_refused(path, "not positive and finite (damaged header)", tmp_path, capfd)


@pytest.mark.parametrize("spacing", [(1.5, 1.5, 25.0), (0.04, 1.5, 4.0)])
def test_implausible_spacing_warns_in_one_line_but_is_used(ct: CTImage, tmp_path: Path,
                                                           capfd: pytest.CaptureFixture[str],
                                                           spacing: tuple[float, float, float]) -> None:
    path = tmp_path / "odd.nrrd"
    sitk.WriteImage(to_sitk(CTImage(ct.hu, spacing, ct.origin, ct.direction, "odd")), str(path))
    with pytest.warns(CTInputWarning, match=r"odd\.nrrd: voxel spacing .* mm is outside the usual CT range"):
        assert read_ct(path).spacing == pytest.approx(spacing)
    code, err, out = _window(path, tmp_path, capfd)
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert code == 0 and (out / "w.npz").is_file()
    mm = "x".join(f"{s:g}" for s in spacing)
    assert warnings == [f"ctvq window: warning: {path}: voxel spacing {mm} mm is outside the usual CT range "
                        "0.05..20 mm; check the header's units (the scan is used as these millimetres)"]


def _bomb_headers(tmp_path: Path, ct: CTImage) -> dict[str, Path]:
    mha = tmp_path / "bomb.mha"
    mha.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 100000\n"
                    b"ElementType = MET_SHORT\nElementDataFile = LOCAL\n" + bytes(64))
    nrrd = tmp_path / "bomb.nrrd"
    nrrd.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 100000 100000 100000\nencoding: raw\n"
                     b"endian: little\n\n" + bytes(64))
    nifti = tmp_path / "bomb.nii"
    sitk.WriteImage(to_sitk(ct), str(nifti))
    raw = bytearray(nifti.read_bytes())
    struct.pack_into("<3h", raw, 42, 32767, 32767, 32767)  # dim[1..3]: 3.5e13 voxels
    nifti.write_bytes(bytes(raw))
    return {"mha": mha, "nrrd": nrrd, "nii": nifti}


@pytest.mark.parametrize("kind", ["mha", "nrrd", "nii"])
def test_memory_bomb_header_is_refused_before_allocation(ct: CTImage, tmp_path: Path,
                                                         capfd: pytest.CaptureFixture[str],
                                                         kind: str) -> None:
    path = _bomb_headers(tmp_path, ct)[kind]
    with pytest.raises(CTInputError, match=r"header declares \d+x\d+x\d+ voxels .* more than this machine's"):
        read_ct(path)
    _assert_refused(path, "GiB of memory: a damaged header", tmp_path, capfd)


def _series(ct: CTImage, folder: Path) -> Path:
    write_dicom_series(ct, folder)
    return folder


def test_dicom_series_with_a_missing_slice_is_refused(ct: CTImage, tmp_path: Path,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    """ITK only warns ("non uniform sampling") and stacks the slices with an averaged spacing."""
    folder = _series(ct, tmp_path / "series")
    read_ct(folder)
    (folder / "slice_0005.dcm").unlink()
    with pytest.raises(CTInputError, match=r"slice spacing is not even \(4 mm between most slices, 8 mm "
                                           r"between slice_0004\.dcm and slice_0006\.dcm\): a slice is "):
        read_ct(folder)
    _assert_refused(folder, "a slice is missing", tmp_path, capfd)


def test_dicom_folder_with_two_interleaved_volumes_under_one_series_uid_is_refused(
        ct: CTImage, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    folder = _series(ct, tmp_path / "series")
    second = _series(CTImage(ct.hu + 20, ct.spacing, ct.origin, ct.direction, "phase 2"), tmp_path / "second")
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    with _locale_kept():  # GDCM's writer leaves the C locale behind (see ctvq.ct.io._itk_contained)
        for path in sorted(second.iterdir()):  # same series UID, own instance UIDs, as a scanner writes them
            image = sitk.ReadImage(str(path))
            image.SetMetaData("0008|0018", image.GetMetaData("0008|0018") + ".2")
            writer.SetFileName(str(folder / f"phase2_{path.name}"))
            writer.Execute(image)
    shutil.rmtree(second)
    assert len(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))) == 1
    with pytest.raises(CTInputError, match=r"12 pair\(s\) of slices share a position .* share series UID"):
        read_ct(folder)
    _assert_refused(folder, "put each volume in its own folder", tmp_path, capfd)


def test_slice_positions_rounded_by_the_scanner_are_still_even() -> None:
    normal_axial = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    z = np.round(-300.0 + 0.625 * np.arange(400), 2)  # DS values with two decimals: jitter 0.005 mm
    positions = np.stack([np.full(400, -180.0), np.full(400, -200.0), z], axis=1)
    names = [f"s{i}" for i in range(400)]
    check_slice_positions(positions[::-1], normal_axial, names, "series", "1.2.3")  # order does not matter
    with pytest.raises(CTInputError, match=r"series: slice spacing is not even \(0\.625 mm .*1\.2\d mm "
                                           r"between s9 and s11\)"):
        check_slice_positions(np.delete(positions, 10, axis=0), normal_axial, names[:10] + names[11:],
                              "series", "1.2.3")
