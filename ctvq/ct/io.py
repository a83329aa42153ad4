"""Reading and writing CT scans (NIfTI, NRRD, MHA/MHD, DICOM series) with SimpleITK, plus the HU check.

Arrays are indexed (x, y, z), the order of SimpleITK's image index and of the sample contract; SimpleITK's
numpy view is (z, y, x), so every conversion transposes exactly here and nowhere else.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ctvq.ct.atomic import atomic_directory, atomic_output
from ctvq.ct.errors import CTInputError

FILE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
AIR_HU = -1024.0

# HU plausibility: CT air is about -1000; padding outside the field of view is often -2048, -3024 or even
# -32768 (set to air on reading); dense metal reaches a few thousand. Stored values without the DICOM
# rescale have no negative air; MR has none either.
_MIN_PLAUSIBLE_HU = -32768.0
_PADDING_BELOW_HU = -1500.0  # no tissue or air noise is this low: only padding
_MAX_PLAUSIBLE_HU = 32767.0
_AIR_BELOW_HU = -700.0
_MIN_AIR_FRACTION = 1e-3


@dataclass(frozen=True)
class CTImage:
    """A scan in Hounsfield units. ``hu`` is float32 indexed (x, y, z); geometry as SimpleITK (LPS, mm)."""

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3 row-major, columns are the x, y, z index axes in patient space
    source: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)  # type: ignore[return-value]

    def affine(self) -> np.ndarray:
        """4x4 voxel index (x, y, z, 1) -> patient millimetres."""
        out = np.eye(4)
        out[:3, :3] = np.asarray(self.direction).reshape(3, 3) * np.asarray(self.spacing)[None, :]
        out[:3, 3] = self.origin
        return out


def read_ct(path: str | os.PathLike, require_volume: bool = True) -> CTImage:
    """Read a scan file or a DICOM series folder, check it holds CT HU, and return it.

    ``require_volume=False`` accepts a single slice (size 1 along z), e.g. for an HU check of one DICOM file.
    Raises CTInputError (message starts with the path) for anything that is not a usable CT.
    """
    path = Path(path)
    if not path.exists():
        raise CTInputError(f"{path}: no such file or directory")
    image = _read_dicom_series(path) if path.is_dir() else _read_file(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CTInputError(f"{path}: image has {image.GetNumberOfComponentsPerPixel()} components per voxel, "
                           "a CT scan has one (grey values)")
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    if image.GetDimension() != 3:
        raise CTInputError(f"{path}: image has {image.GetDimension()} dimensions, a CT volume has 3")
    size = image.GetSize()
    if require_volume and min(size) < 2:
        raise CTInputError(f"{path}: a single 2-D slice (size {'x'.join(map(str, size))}); "
                           "a 3-D volume is required (give the whole DICOM series folder)")
    hu = sitk.GetArrayViewFromImage(image).astype(np.float32).transpose(2, 1, 0)
    check_hu(hu, str(path))
    np.putmask(hu, hu < _PADDING_BELOW_HU, np.float32(AIR_HU))  # field-of-view padding -> air
    return CTImage(
        hu=hu,
        spacing=tuple(float(s) for s in image.GetSpacing()),
        origin=tuple(float(o) for o in image.GetOrigin()),
        direction=tuple(float(d) for d in image.GetDirection()),
        source=str(path),
    )


def check_hu(hu: np.ndarray, source: str) -> None:
    """Refuse values that are not CT Hounsfield units (MR, unscaled raw values, constant or broken data)."""
    if hu.size == 0:
        raise CTInputError(f"{source}: image is empty")
    lo, hi = float(hu.min()), float(hu.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise CTInputError(f"{source}: image holds NaN or infinite values, not CT HU")
    if lo == hi:
        raise CTInputError(f"{source}: image is constant ({lo:g}), not a CT scan")
    if lo < _MIN_PLAUSIBLE_HU or hi > _MAX_PLAUSIBLE_HU:
        raise CTInputError(f"{source}: values {lo:g}..{hi:g} are outside the CT HU range "
                           f"[{_MIN_PLAUSIBLE_HU:g}, {_MAX_PLAUSIBLE_HU:g}]; not CT, or rescale not applied")
    step = max(1, int(round((hu.size / 4_000_000) ** (1 / 3))))  # a ~4 M voxel subsample is plenty
    air = float(np.mean(hu[::step, ::step, ::step] < _AIR_BELOW_HU))
    if air < _MIN_AIR_FRACTION:
        raise CTInputError(f"{source}: no air (values below {_AIR_BELOW_HU:g} HU in {air:.2%} of voxels, "
                           f"minimum {lo:g}): not CT HU (MR-like, or rescale slope/intercept not applied)")


@contextmanager
def _native_stderr_captured() -> Iterator[list[str]]:
    """Route file descriptor 2 to a temporary file while ITK runs: its readers print diagnostics straight
    to C++ ``std::cerr``, which would break the one-line error contract. Yields the captured lines."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(line.strip() for line in sink.read().decode(errors="replace").splitlines()
                         if line.strip())


def _read_file(path: Path) -> sitk.Image:
    with _native_stderr_captured() as native:
        try:
            return sitk.ReadImage(str(path), outputPixelType=sitk.sitkFloat32)
        except RuntimeError as exc:
            error = exc
    messages = [*native, *str(error).strip().splitlines()]
    if any("Unable to determine ImageIO reader" in m for m in messages):
        detail = "no reader recognises its format: damaged, truncated or not an image"
    else:
        detail = next((m for m in messages if "required" in m or "cannot" in m.lower()), "damaged file")
        detail = detail.split("): ", 1)[-1].replace(str(path), "").strip(" :")
    raise CTInputError(f"{path}: not a readable image file ({detail[:160]})") from error


def _read_dicom_series(path: Path) -> sitk.Image:
    if not any(path.iterdir()):
        raise CTInputError(f"{path}: folder is empty (expected a DICOM series)")
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(path))
    if not series:
        raise CTInputError(f"{path}: folder holds no DICOM series")
    if len(series) > 1:
        raise CTInputError(f"{path}: folder holds {len(series)} DICOM series ({', '.join(series[:3])}...); "
                           "give a folder with exactly one")
    files = reader.GetGDCMSeriesFileNames(str(path), series[0])
    reader.SetFileNames(files)
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise CTInputError(f"{path}: DICOM series could not be read ({str(exc).strip()[:160]})") from exc


def to_sitk(ct: CTImage, pixel_type: int = sitk.sitkInt16) -> sitk.Image:
    """SimpleITK image of ``ct`` (rounded to int16 HU by default, as scanners store it)."""
    values = ct.hu.transpose(2, 1, 0)
    if pixel_type == sitk.sitkInt16:
        values = np.clip(np.rint(values), -32768, 32767).astype(np.int16)
    image = sitk.GetImageFromArray(np.ascontiguousarray(values))
    image.SetSpacing(ct.spacing)
    image.SetOrigin(ct.origin)
    image.SetDirection(ct.direction)
    return image


def write_ct(ct: CTImage, path: str | os.PathLike) -> None:
    """Write a scan file (format from the suffix: .nii(.gz), .nrrd, .mha, .mhd) atomically, int16 HU."""
    path = Path(path)
    if not path.name.lower().endswith(FILE_SUFFIXES[:-1]):
        raise CTInputError(f"{path}: unknown output format; use one of {', '.join(FILE_SUFFIXES[:-1])}")
    image = to_sitk(ct)
    with atomic_output(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=path.suffix.lower() in (".mhd", ".mha", ".nrrd"))


DEFAULT_SERIES_UID = "1.2.826.0.1.3680043.2.1125.1"


def write_dicom_series(ct: CTImage, folder: str | os.PathLike, series_uid: str = DEFAULT_SERIES_UID) -> None:
    """Write one int16 CT slice file per z index (geometry in the tags, HU = stored value), atomically."""
    image = to_sitk(ct)
    direction = np.asarray(ct.direction).reshape(3, 3)
    orientation = "\\".join(f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    with atomic_directory(folder) as tmp:
        for z in range(image.GetDepth()):
            slice_image = image[:, :, z]
            position = image.TransformIndexToPhysicalPoint((0, 0, z))
            tags = {
                "0008|0060": "CT",
                "0020|000d": series_uid + ".0",
                "0020|000e": series_uid,
                "0008|0018": f"{series_uid}.{z + 1}",
                "0020|0013": str(z + 1),
                "0020|0032": "\\".join(f"{p:.6f}" for p in position),
                "0020|0037": orientation,
                "0018|0050": f"{ct.spacing[2]:.6f}",
                "0028|1052": "0",
                "0028|1053": "1",
            }
            for key, value in tags.items():
                slice_image.SetMetaData(key, value)
            writer.SetFileName(str(tmp / f"slice_{z:04d}.dcm"))
            writer.Execute(slice_image)
