import locale
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ctvq.ct.errors import CTInputError
from ctvq.ct.io import CTImage, check_hu, read_ct, to_sitk, write_ct, write_dicom_series


def _assert_same_scan(a: CTImage, b: CTImage) -> None:
    assert a.hu.shape == b.hu.shape
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_allclose(a.spacing, b.spacing, atol=1e-4)
    np.testing.assert_allclose(a.origin, b.origin, atol=1e-3)
    np.testing.assert_allclose(a.direction, b.direction, atol=1e-5)


@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nii", "scan.nrrd", "scan.mha", "scan.mhd"])
def test_scan_file_round_trip_keeps_hu_and_geometry(small_ct: CTImage, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    write_ct(small_ct, path)
    back = read_ct(path)
    _assert_same_scan(small_ct, back)
    assert back.hu.dtype == np.float32
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_dicom_series_round_trip_keeps_hu_and_geometry(small_ct: CTImage, tmp_path: Path) -> None:
    folder = tmp_path / "series"
    write_dicom_series(small_ct, folder)
    assert len(list(folder.iterdir())) == small_ct.shape[2]
    _assert_same_scan(small_ct, read_ct(folder))


def test_writing_a_dicom_series_keeps_the_process_locale(small_ct: CTImage, tmp_path: Path) -> None:
    """GDCM's writer leaves the C locale behind (ASCII default encoding) unless ctvq restores it."""
    before = locale.setlocale(locale.LC_ALL)
    write_dicom_series(small_ct, tmp_path / "series")
    read_ct(tmp_path / "series")
    assert locale.setlocale(locale.LC_ALL) == before


def test_reading_a_vtk_file_keeps_the_process_locale(small_ct: CTImage, tmp_path: Path) -> None:
    """ITK's VTK reader leaves the C locale behind too; every ITK call of ctvq.ct.io restores it."""
    sitk.WriteImage(to_sitk(small_ct), str(tmp_path / "scan.vtk"))  # ctvq writes no VTK, but reads it
    before = locale.setlocale(locale.LC_ALL)
    _assert_same_scan(small_ct, read_ct(tmp_path / "scan.vtk"))
    assert locale.setlocale(locale.LC_ALL) == before


def test_array_axes_are_x_y_z(tmp_path: Path) -> None:
    values = np.full((4, 5, 6), -1000, dtype=np.int16)  # numpy (z, y, x) for SimpleITK
    values[3, 2, 1] = 700
    image = sitk.GetImageFromArray(values)
    sitk.WriteImage(image, str(tmp_path / "axes.mha"))
    ct = read_ct(tmp_path / "axes.mha")
    assert ct.shape == (6, 5, 4)
    assert ct.hu[1, 2, 3] == 700


def test_real_ct_slice_passes_the_hu_check_but_is_not_a_volume(ct_small_dcm: Path) -> None:
    slice_ = read_ct(ct_small_dcm, require_volume=False)
    assert slice_.shape == (128, 128, 1)
    assert -1000 <= slice_.hu.min() < -800  # rescale intercept -1024 applied
    with pytest.raises(CTInputError, match=r"CT_small\.dcm: a single 2-D slice"):
        read_ct(ct_small_dcm)


def test_mr_like_volume_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    mr = rng.uniform(0, 900, size=(16, 16, 16)).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(mr), str(tmp_path / "t1.nii.gz"))
    with pytest.raises(CTInputError, match=r"t1\.nii\.gz: no air"):
        read_ct(tmp_path / "t1.nii.gz")


def test_real_mr_slice_is_refused_as_not_hu(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    with pytest.raises(CTInputError, match=r"MR_small\.dcm: no air"):
        read_ct(get_testdata_file("MR_small.dcm"), require_volume=False)


@pytest.mark.parametrize("padding", [-2048, -3024, -32768])
def test_field_of_view_padding_becomes_air(small_ct: CTImage, tmp_path: Path, padding: int) -> None:
    hu = small_ct.hu.copy()
    hu[:6, :6, :] = padding
    padded = CTImage(hu, small_ct.spacing, small_ct.origin, small_ct.direction, "padded")
    write_ct(padded, tmp_path / "p.nrrd")
    back = read_ct(tmp_path / "p.nrrd")
    assert (back.hu[:6, :6, :] == -1024).all()
    np.testing.assert_array_equal(back.hu[6:], small_ct.hu[6:])
    assert back.hu.min() < -1024  # air noise below -1024 is data, not padding


def test_unscaled_and_out_of_range_values_are_refused() -> None:
    raw = np.linspace(0, 4095, 4096, dtype=np.float32).reshape(16, 16, 16)
    with pytest.raises(CTInputError, match="no air"):
        check_hu(raw, "raw.dcm")
    with pytest.raises(CTInputError, match="outside the CT HU range"):
        check_hu(raw - 40000, "shifted.nii")
    with pytest.raises(CTInputError, match="outside the CT HU range"):
        check_hu(raw * 100, "scaled.nii")
    with pytest.raises(CTInputError, match="constant"):
        check_hu(np.zeros((4, 4, 4), np.float32), "flat.nii")


def test_corrupt_missing_and_empty_inputs_name_the_path(tmp_path: Path) -> None:
    corrupt = tmp_path / "broken.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not really a nifti file")
    with pytest.raises(CTInputError, match=r"broken\.nii\.gz: not a readable image file"):
        read_ct(corrupt)
    with pytest.raises(CTInputError, match=r"nothing\.nrrd: no such file or directory"):
        read_ct(tmp_path / "nothing.nrrd")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CTInputError, match=r"empty: folder is empty"):
        read_ct(empty)
    (empty / "notes.txt").write_text("no dicom here")
    with pytest.raises(CTInputError, match="no DICOM series"):
        read_ct(empty)


def test_unknown_output_suffix_is_refused(small_ct: CTImage, tmp_path: Path) -> None:
    with pytest.raises(CTInputError, match="unknown output format"):
        write_ct(small_ct, tmp_path / "scan.png")
    assert list(tmp_path.iterdir()) == []
