"""Canonical LPS orientation: the same physical scan stored with other axis orders and signs preprocesses to
the same windowed cube, sample and affine (real files written by SimpleITK, real CLI steps)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ctvq.cli import main
from ctvq.ct.io import CTImage, read_ct, write_ct, write_dicom_series
from ctvq.ct.resample import canonical_orientation, orientation_of, resample_to_cube
from ctvq.ct.sample import load_sample
from ctvq.ct.volume_file import load_windowed


def _stored_as(ct: CTImage, perm: tuple[int, int, int], signs: tuple[int, int, int]) -> CTImage:
    """``ct`` (LPS) stored with index axis k along patient axis ``perm[k]``, reversed where ``signs[k] < 0``:
    a different file layout of the identical physical image."""
    hu = ct.hu.transpose(perm)
    flips = tuple(k for k in range(3) if signs[k] < 0)
    hu = np.flip(hu, axis=flips) if flips else hu
    direction = np.zeros((3, 3))
    for k in range(3):
        direction[perm[k], k] = signs[k]
    first = [0, 0, 0]  # the LPS index of the stored volume's first voxel
    for k in range(3):
        if signs[k] < 0:
            first[perm[k]] = ct.shape[perm[k]] - 1
    origin = ct.affine() @ np.array([*first, 1.0])
    return CTImage(hu=np.ascontiguousarray(hu), spacing=tuple(ct.spacing[p] for p in perm),  # type: ignore[arg-type]
                   origin=tuple(float(o) for o in origin[:3]),  # type: ignore[arg-type]
                   direction=tuple(float(d) for d in direction.ravel()), source=f"{ct.source}:{perm}{signs}")


LAYOUTS = {
    "lps": ((0, 1, 2), (1, 1, 1)),
    "ras": ((0, 1, 2), (-1, -1, 1)),  # NIfTI tools' usual layout: direction diag(-1, -1, 1)
    "permuted": ((2, 0, 1), (-1, 1, -1)),  # sagittal-like: index axes along I, L, A
}


def test_stored_layouts_are_the_same_physical_image(small_ct: CTImage) -> None:
    rng = np.random.default_rng(0)
    for name, (perm, signs) in LAYOUTS.items():
        stored = _stored_as(small_ct, perm, signs)
        for _ in range(20):
            index = rng.integers(0, stored.shape)
            point = stored.affine() @ np.array([*index, 1.0])
            lps = np.rint(np.linalg.solve(small_ct.affine(), point)[:3]).astype(int)
            np.testing.assert_allclose(small_ct.affine() @ np.array([*lps, 1.0]), point, atol=1e-9)
            assert stored.hu[tuple(index)] == small_ct.hu[tuple(lps)], name
    assert orientation_of(_stored_as(small_ct, *LAYOUTS["ras"])) == "RAS"
    assert orientation_of(_stored_as(small_ct, *LAYOUTS["permuted"])) == "ILA"


@pytest.mark.parametrize("layout", ["ras", "permuted"])
def test_reorientation_is_lossless_and_keeps_every_voxel_at_its_patient_point(small_ct: CTImage,
                                                                               layout: str) -> None:
    back = canonical_orientation(_stored_as(small_ct, *LAYOUTS[layout]))
    np.testing.assert_array_equal(back.hu, small_ct.hu)  # moved, not interpolated
    assert back.spacing == small_ct.spacing
    np.testing.assert_allclose(back.affine(), small_ct.affine(), atol=1e-9)
    assert canonical_orientation(small_ct) is small_ct  # already LPS: no copy


def test_oblique_scan_gets_the_closest_orientation_and_keeps_its_residual_rotation(small_ct: CTImage) -> None:
    angle = math.radians(10.0)
    c, s = math.cos(angle), math.sin(angle)
    tilt = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])  # 10 degrees about the patient z axis
    ras = _stored_as(small_ct, *LAYOUTS["ras"])
    direction = tuple((tilt @ np.diag([-1.0, -1.0, 1.0])).ravel())
    oblique = CTImage(ras.hu, ras.spacing, ras.origin, direction, "tilt")
    assert orientation_of(oblique) == "RAS"
    back = canonical_orientation(oblique)
    np.testing.assert_array_equal(back.hu, small_ct.hu)
    np.testing.assert_allclose(np.asarray(back.direction).reshape(3, 3), tilt, atol=1e-12)  # 10 degrees stay
    corners = np.array([[i, j, k, 1.0] for i in (0, 95) for j in (0, 95) for k in (0, 31)])
    flipped = corners.copy()
    flipped[:, :2] = 95 - corners[:, :2]
    np.testing.assert_allclose(corners @ back.affine().T, flipped @ oblique.affine().T, atol=1e-9)
    _, affine = resample_to_cube(oblique, 64)
    np.testing.assert_allclose(affine[:3, :3] / np.linalg.norm(affine[:3, 0]), tilt, atol=1e-12)


def _write(ct: CTImage, path: Path) -> Path:
    if path.suffix == ".dicom":
        write_dicom_series(ct, path)
    else:
        write_ct(ct, path)
    return path


def _preprocess(scan: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    out.mkdir()
    windowed, band, sample = out / "w.npz", out / "b.npz", out / "s.npz"
    for argv in (["window", str(scan), "-o", str(windowed), "--window", "bone", "--resolution", "64",
                  "--case-id", "chest"],
                 ["sdf", str(windowed), "-o", str(band)],
                 ["index", str(band), "-o", str(sample)]):
        assert main(argv) == 0, capsys.readouterr().err
    return windowed, sample


@pytest.mark.parametrize(("layout", "name"), [("ras", "scan.nii.gz"), ("ras", "scan.dicom"),
                                              ("permuted", "scan.nrrd"), ("permuted", "scan.mha")])
def test_any_stored_layout_preprocesses_to_the_same_cube_sample_and_affine(
        small_ct: CTImage, tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str, name: str,
) -> None:
    reference = _write(small_ct, tmp_path / "lps" / name)
    other = _write(_stored_as(small_ct, *LAYOUTS[layout]), tmp_path / layout / name)
    stored = read_ct(other)
    assert orientation_of(stored) == {"ras": "RAS", "permuted": "ILA"}[layout]
    assert not np.array_equal(stored.hu, small_ct.hu)  # the file really holds another layout
    w_ref, s_ref = _preprocess(reference, tmp_path / "out_lps", capsys)
    w_other, s_other = _preprocess(other, tmp_path / "out_other", capsys)
    a, b = load_windowed(w_ref), load_windowed(w_other)
    np.testing.assert_array_equal(a.values, b.values)
    # NIfTI stores origin and spacing as float32: the two files' geometry agrees to ~1e-6 mm, not exactly
    np.testing.assert_allclose(a.affine, b.affine, rtol=0, atol=1e-5)
    assert a.spacing == pytest.approx(b.spacing, abs=1e-6) and a.spacing == pytest.approx(small_ct.spacing)
    np.testing.assert_allclose(a.affine[:3, :3], np.eye(3) * a.affine[0, 0], atol=1e-9)  # axes L, P, S
    x, y = load_sample(s_ref), load_sample(s_other)
    for field in ("coords", "sdf", "latent_coords", "cell_start", "inside_bits"):
        np.testing.assert_array_equal(getattr(x, field), getattr(y, field), err_msg=field)
    np.testing.assert_allclose(x.affine, y.affine, rtol=0, atol=1e-5)
    corners = np.array([[i, j, k, 1.0] for i in (0, 63) for j in (0, 63) for k in (0, 63)])
    np.testing.assert_allclose(corners @ x.affine.T, corners @ y.affine.T, atol=1e-5)  # same patient mm


def test_spine_lies_posterior_in_the_cube_whatever_the_layout(small_ct: CTImage) -> None:
    """The phantom's spine is at +y (posterior): after reorientation bone sits in the back of the cube."""
    for perm, signs in LAYOUTS.values():
        cube, _ = resample_to_cube(_stored_as(small_ct, perm, signs), 64)
        bone = cube > 300
        assert bone[:, 40:].sum() > 3 * bone[:, :24].sum()
