"""Cubes as NIfTI files with their patient geometry, to look at a case in 3D Slicer next to its scan.

The cube's affine (voxel index x, y, z -> LPS mm) becomes the image's spacing (column lengths), direction
(unit columns) and origin, as SimpleITK stores them; ITK's NIfTI writer turns that into the file's RAS
qform/sform, so Slicer places the cube exactly over the original scan.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ctvq.atomic import atomic_output, incomplete_write_error
from ctvq.ct.errors import CTInputError
from ctvq.ct.io import CTImage, _check_nifti, _itk_write, to_sitk

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def cube_geometry_of(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(spacing, origin, row-major direction) of a voxel -> mm affine."""
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = affine[:3, :3] / spacing
    return tuple(map(float, spacing)), tuple(map(float, affine[:3, 3])), tuple(map(float, direction.ravel()))


def cube_image(values: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A float32 SimpleITK image of ``values`` (indexed x, y, z) placed by ``affine``."""
    spacing, origin, direction = cube_geometry_of(affine)
    ct = CTImage(hu=np.asarray(values, dtype=np.float32), spacing=spacing, origin=origin,  # type: ignore[arg-type]
                 direction=direction, source="")
    return to_sitk(ct, pixel_type=sitk.sitkFloat32)


def check_nifti_path(path: str | os.PathLike, flag: str = "--nifti") -> Path:
    """Refuse, before any work, an output name that is not NIfTI (the suffix picks ITK's writer)."""
    path = Path(path)
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise CTInputError(f"{flag} {path}: not a NIfTI name; end it with .nii.gz (or .nii)")
    return path


def write_cube_nifti(values: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> None:
    """Write ``values`` as a compressed float32 NIfTI with the cube's geometry, atomically; read back
    before it is moved into place (ITK's NIfTI writer does not report a full disk)."""
    path = check_nifti_path(path)
    image = cube_image(values, affine)
    with atomic_output(path) as tmp:
        _itk_write(path, lambda: sitk.WriteImage(image, str(tmp), useCompression=True))
        try:
            _check_nifti(tmp)
        except CTInputError as exc:
            raise incomplete_write_error(path) from exc
