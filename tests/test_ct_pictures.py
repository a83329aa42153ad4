"""Pictures and Slicer files: `ctvq window --preview/--nifti`, `ctvq sdf --nifti`, radiological slices."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.image import imread

from ctvq.cli import main
from ctvq.ct.band import load_band
from ctvq.ct.preview import DPI, FIGURE_INCHES, orient
from ctvq.ct.sample import load_figure_planes, load_sample
from ctvq.ct.volume_file import load_windowed


def _mapping_agrees(image: sitk.Image, affine: np.ndarray, voxels: list[tuple[int, int, int]]) -> None:
    for v in voxels:
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(v), (affine @ [*v, 1])[:3], atol=1e-4)


def test_window_preview_and_nifti_match_the_cube(small_scan: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    w, png, nii = tmp_path / "w.npz", tmp_path / "w.png", tmp_path / "w.nii.gz"
    assert main(["window", str(small_scan), "-o", str(w), "--window", "bone", "--resolution", "64",
                 "--preview", str(png), "--nifti", str(nii)]) == 0
    assert f"wrote {png}" in capsys.readouterr().err
    height, width = imread(png).shape[:2]
    assert (width, height) == (round(FIGURE_INCHES[0] * DPI), round(FIGURE_INCHES[1] * DPI))
    volume = load_windowed(w)
    image = sitk.ReadImage(str(nii))
    assert image.GetSize() == (64, 64, 64)
    _mapping_agrees(image, volume.affine, [(0, 0, 0), (63, 0, 0), (5, 40, 17), (63, 63, 63)])
    back = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
    np.testing.assert_allclose(back, volume.values, atol=0.5 / 65535 + 1e-7)  # the .npz is quantised


def test_sdf_nifti_is_the_band_with_signs_beyond_it(small_scan: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    w, b, nii = tmp_path / "w.npz", tmp_path / "b.npz", tmp_path / "sdf.nii.gz"
    assert main(["window", str(small_scan), "-o", str(w), "--window", "bone", "--resolution", "64"]) == 0
    assert main(["sdf", str(w), "-o", str(b), "--nifti", str(nii)]) == 0
    capsys.readouterr()
    field, volume = load_band(b), load_windowed(w)
    image = sitk.ReadImage(str(nii))
    _mapping_agrees(image, field.affine, [(0, 0, 0), (1, 2, 3), (63, 31, 7)])
    dense = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    c = field.coords.astype(int)
    np.testing.assert_array_equal(dense[c[:, 0], c[:, 1], c[:, 2]], field.sdf)
    beyond = np.ones(dense.shape, dtype=bool)
    beyond[c[:, 0], c[:, 1], c[:, 2]] = False
    assert set(np.unique(dense[beyond])) <= {-1.0, 1.0}
    inside = volume.values > field.iso_value  # bone at 64^3: few islands; nearly all signs agree
    assert np.mean((dense[beyond] < 0) == inside[beyond]) > 0.99


def test_the_sample_carries_the_ct_its_figures_are_drawn_over(small_scan: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    w, b, s = tmp_path / "w.npz", tmp_path / "b.npz", tmp_path / "s.npz"
    assert main(["window", str(small_scan), "-o", str(w), "--window", "bone", "--resolution", "64"]) == 0
    assert main(["sdf", str(w), "-o", str(b)]) == 0
    assert main(["index", str(b), "-o", str(s)]) == 0
    capsys.readouterr()
    planes, sample, cube = load_figure_planes(s), load_sample(s), load_windowed(w).values
    assert planes is not None and sample.figure_planes is None  # training never reads them
    np.testing.assert_array_equal(planes.centre, np.round(sample.coords.mean(axis=0)))
    for axis in range(3):  # 8-bit planes of the windowed cube through the band's centre
        np.testing.assert_allclose(planes.plane(axis), np.take(cube, planes.centre[axis], axis=axis),
                                   atol=0.5 / 255 + 1e-6)


def test_a_failed_case_gets_a_picture_naming_the_failure(small_scan: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    cut = tmp_path / "cut.nii.gz"
    whole = small_scan.read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    w, png = tmp_path / "w.npz", tmp_path / "w.png"
    assert main(["window", str(cut), "-o", str(w), "--window", "bone", "--resolution", "64",
                 "--preview", str(png), "--record-failure"]) == 0
    assert "failed: window:" in capsys.readouterr().err
    assert imread(png).shape[:2] == (round(FIGURE_INCHES[1] * DPI), round(FIGURE_INCHES[0] * DPI))
    wrong = tmp_path / "w.jpg"  # a usage error stays an error, never a recorded case failure
    assert main(["window", str(cut), "-o", str(w), "--window", "bone", "--resolution", "64",
                 "--preview", str(wrong), "--record-failure"]) == 2
    assert "--preview" in capsys.readouterr().err and not wrong.exists()


@pytest.mark.parametrize(("argv", "flag"), [
    (["--preview", "p.jpg"], "--preview"), (["--nifti", "v.nrrd"], "--nifti")])
def test_wrong_picture_name_is_refused_before_any_work(small_scan: Path, tmp_path: Path, argv: list[str],
                                                       flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "w.npz"
    code = main(["window", str(small_scan), "-o", str(out), "--window", "bone", "--resolution", "64",
                 *[str(tmp_path / a) if "." in a else a for a in argv]])
    err = capsys.readouterr().err
    assert code != 0 and flag in err and not out.exists()


def test_slices_are_in_radiological_orientation() -> None:
    """A marker at the patient's left-anterior-superior corner lands where a radiologist expects it."""
    cube = np.zeros((8, 8, 8), dtype=np.float32)
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])  # x grows to the patient's right, y anteriorly (RAS-like cube)
    affine[:3, 3] = (10.0, 20.0, -30.0)
    cube[0, 0, 7] = 1.0  # x index 0: the most left; y index 0: the most posterior; z 7: the most superior
    axial = orient(cube, affine, "axial", 7)
    assert axial.image[-1, -1] == 1.0  # patient left on the right, posterior at the bottom
    left, right, bottom, top = axial.extent
    assert left < right and top < bottom  # x mm grows rightwards; y mm (posterior) grows downwards
    assert (left, right) == (10.0 - 15.0, 10.0 + 1.0)
    coronal = orient(cube, affine, "coronal", 0)
    assert coronal.image[0, -1] == 1.0  # superior at the top, left on the right
    sagittal = orient(cube, affine, "sagittal", 0)
    assert sagittal.image[0, -1] == 1.0  # superior at the top, posterior on the right (anterior left)
