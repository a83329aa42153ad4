"""Isotropic resampling into the ``resolution``³ training cube, centred, padded with air, affine kept.

Every scan is first put into one anatomical orientation, LPS: index x runs towards the patient's left, y
towards posterior, z towards superior (head). Scanners and converters store the same anatomy in different
axis orders and signs (NIfTI tools often write RAS, DICOM series come head-first or feet-first), and
without this step the same spine lands on opposite sides of the cube, so the training data would mix
mirrored anatomy. LPS is the patient coordinate system of DICOM and of ITK, so an axis-aligned scan in LPS
has the identity direction matrix and its cube affine is just the voxel size and an origin.

The reorientation (SimpleITK's DICOMOrient) permutes and flips axes only: voxel values are moved, never
interpolated, and origin, spacing and direction are rewritten so the voxel -> patient-mm affine still maps
every voxel to the same physical point (meshes stay in patient mm). An oblique scan (tilted gantry,
rotated acquisition) gets the axis-aligned orientation closest to its direction cosines; the remaining
rotation (each axis within 55 degrees of L, P or S, in practice a few degrees of tilt) is kept, not
resampled away: the cube takes the reoriented scan's direction, so its affine holds that rotation exactly
and no extra interpolation is spent on it. Cubes of a tilted and an untilted scan of one patient therefore
differ by that small rotation; the affine says by how much.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ctvq.ct.errors import CTInputError
from ctvq.ct.io import AIR_HU, CTImage, to_sitk
from ctvq.ct.resources import machine_memory_bytes, preprocess_peak_bytes

STANDARD_RESOLUTIONS = (256, 512, 1024)
CANONICAL_ORIENTATION = "LPS"


def check_resolution(resolution: int) -> None:
    """256, 512, 1024, or any multiple of 8 >= 64 (small grids for tests and demos), whose preprocessing fits
    in this machine's memory (refused before ITK tries to allocate the cube and fails with a C++ error)."""
    if not (resolution in STANDARD_RESOLUTIONS or (resolution >= 64 and resolution % 8 == 0)):
        raise CTInputError(f"resolution {resolution}: use 256, 512, 1024 or a multiple of 8 that is >= 64")
    memory = machine_memory_bytes()
    need = preprocess_peak_bytes(resolution)
    if memory is not None and need > memory:
        fits = max(64, int(1024 * (memory / preprocess_peak_bytes(1024)) ** (1 / 3)) // 8 * 8)
        raise CTInputError(f"resolution {resolution}: preprocessing a {resolution}^3 cube needs about "
                           f"{need / 2**30:,.0f} GiB, more than this machine's {memory / 2**30:.0f} GiB; "
                           f"use a resolution <= {fits}")


def orientation_of(ct: CTImage) -> str:
    """Three letters naming where the scan's index axes point (closest axis for oblique scans), e.g. "RAS"."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(ct.direction)


def canonical_orientation(ct: CTImage) -> CTImage:
    """``ct`` with its axes permuted and flipped into LPS (returned as is if already there); lossless."""
    if orientation_of(ct) == CANONICAL_ORIENTATION:
        return ct
    image = sitk.DICOMOrient(to_sitk(ct, pixel_type=sitk.sitkFloat32), CANONICAL_ORIENTATION)
    return CTImage(
        hu=sitk.GetArrayFromImage(image).transpose(2, 1, 0),
        spacing=tuple(float(s) for s in image.GetSpacing()),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in image.GetOrigin()),  # type: ignore[arg-type]
        direction=tuple(float(d) for d in image.GetDirection()),
        source=ct.source,
    )


def cube_geometry(ct: CTImage, resolution: int) -> np.ndarray:
    """4x4 affine of the output cube: isotropic voxels, the longest physical axis spans ``resolution``.

    The scan's extent (voxel edges included) is centred in the cube; the cube keeps the scan's direction
    (``resample_to_cube`` passes the scan in canonical orientation).
    """
    size = np.asarray(ct.shape, dtype=np.float64)
    spacing = np.asarray(ct.spacing, dtype=np.float64)
    direction = np.asarray(ct.direction, dtype=np.float64).reshape(3, 3)
    step = float((size * spacing).max()) / resolution
    centre_index = (size - 1.0) / 2.0
    centre_mm = np.asarray(ct.origin) + direction @ (spacing * centre_index)
    origin = centre_mm - direction @ np.full(3, step * (resolution - 1) / 2.0)
    affine = np.eye(4)
    affine[:3, :3] = direction * step
    affine[:3, 3] = origin
    return affine


def resample_to_cube(ct: CTImage, resolution: int, pad: str = "air") -> tuple[np.ndarray, np.ndarray]:
    """Return (HU cube float32 (R, R, R) indexed x, y, z; affine voxel -> mm) of ``ct`` in LPS orientation.

    Linear interpolation; voxels outside the scan get air (-1024 HU) with ``pad="air"``, or the nearest
    border voxel's value with ``pad="edge"`` (ITK's nearest-neighbour extrapolator): a surface the field of
    view cuts then runs straight on to the cube's border instead of being capped by the air. The cube is the
    transposed view of SimpleITK's (z, y, x) buffer, so it is Fortran-ordered (x fastest in memory).
    Asking SimpleITK for the axes in our order instead makes it walk the input along z for every output
    row: 4-5x slower at 512³, and a transposing copy costs more than the resampling itself (measured).
    """
    check_resolution(resolution)
    ct = canonical_orientation(ct)
    affine = cube_geometry(ct, resolution)
    step = float(np.linalg.norm(affine[:3, 0]))
    direction = affine[:3, :3] / step
    image = to_sitk(ct, pixel_type=sitk.sitkFloat32)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize((resolution,) * 3)
    resampler.SetOutputSpacing((step,) * 3)
    resampler.SetOutputOrigin(tuple(affine[:3, 3]))
    resampler.SetOutputDirection(tuple(direction.ravel()))
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(AIR_HU)
    if pad == "edge":
        resampler.SetUseNearestNeighborExtrapolator(True)
    elif pad != "air":
        raise CTInputError(f"pad {pad!r}: use edge or air")
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    out = resampler.Execute(image)
    del image
    cube = sitk.GetArrayFromImage(out).transpose(2, 1, 0)
    return cube, affine


def scan_extent(ct: CTImage, affine: np.ndarray) -> np.ndarray:
    """(2, 3) float64: lowest and highest cube index (x, y, z) inside the scan's field of view, voxel edges
    included; ``ct`` in the orientation the cube was made from (its direction is the cube's)."""
    ct = canonical_orientation(ct)
    step = float(np.linalg.norm(affine[:3, 0]))
    direction = affine[:3, :3] / step
    size, spacing = np.asarray(ct.shape, dtype=np.float64), np.asarray(ct.spacing, dtype=np.float64)
    scan_dir = np.asarray(ct.direction, dtype=np.float64).reshape(3, 3)
    corners = [np.asarray(ct.origin) + scan_dir @ (spacing * idx) for idx in (np.full(3, -0.5), size - 0.5)]
    a, b = (direction.T @ (c - affine[:3, 3]) / step for c in corners)
    return np.stack([np.minimum(a, b), np.maximum(a, b)])
