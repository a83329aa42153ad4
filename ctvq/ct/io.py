"""Reading and writing CT scans (NIfTI, NRRD, MHA/MHD, DICOM series) with SimpleITK, plus the HU check.

Arrays are indexed (x, y, z), the order of SimpleITK's image index and of the sample contract; SimpleITK's
numpy view is (z, y, x), so every conversion transposes exactly here and nowhere else.

A damaged scan is refused before it can become training data, because SimpleITK often reads one without
complaint: a NIfTI file cut short is zero-filled (0 HU, a slab of soft tissue) and its NaN voxels become 0,
a zero or NaN NIfTI pixdim becomes 1 mm, a DICOM series with a missing slice or two volumes under one
series UID is stacked with an averaged slice spacing. So the header is checked on its own (size against
memory, spacing, NIfTI pixdim and data length), a NIfTI file's voxel bytes are counted (and float voxels
scanned for NaN) in one extra pass (about 0.7 s for a 75 MB 512x512x300 ``.nii.gz`` here, next to ITK's own
0.8 s read), DICOM slice positions are checked for duplicates and gaps, and ITK's diagnostics on the C++
stderr are captured and turned into one line.
"""

from __future__ import annotations

import gzip
import locale
import math
import os
import sys
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import SimpleITK as sitk

from ctvq.atomic import FileSystemError, atomic_directory, atomic_output, incomplete_write_error
from ctvq.ct.errors import CTInputError, CTInputWarning
from ctvq.ct.resources import machine_memory_bytes

_T = TypeVar("_T")

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

# Voxel sizes outside this range are legal but almost always a unit mistake in the header (micrometres or
# centimetres written as millimetres): warned about, not refused.
MIN_PLAUSIBLE_SPACING_MM = 0.05
MAX_PLAUSIBLE_SPACING_MM = 20.0
# Reading holds the float32 ITK image, its float32 numpy copy and, for a non-LPS scan, the reoriented copy.
_READ_BYTES_PER_VOXEL = 12
# DICOM slice positions are written with a few decimals: closer than this is the same position.
_SAME_POSITION_MM = 0.01
_SPACING_TOLERANCE = 0.01  # relative deviation of a slice gap from the series' step that counts as uneven
_TRUNCATED = ("not read completely", "fread got only", "bytes but received")


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


def read_ct(path: str | os.PathLike, require_volume: bool = True, series_uid: str | None = None) -> CTImage:
    """Read a scan file or a DICOM series folder, check it holds CT HU, and return it.

    ``require_volume=False`` accepts a single slice (size 1 along z), e.g. for an HU check of one DICOM file.
    ``series_uid`` picks one series of a folder holding several (without it such a folder is refused).
    Raises CTInputError (message starts with the path) for anything that is not a usable CT.
    """
    path = Path(path)
    if not path.exists():
        raise CTInputError(f"{path}: no such file or directory")
    if series_uid is not None and not path.is_dir():
        raise CTInputError(f"{path}: a DICOM series UID is given but this is a file, not a series folder")
    image = _read_dicom_series(path, series_uid) if path.is_dir() else _read_file(path)
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
    if path.is_dir():  # a file's header was checked before its voxels were read
        check_geometry(image.GetSpacing(), image.GetDirection(), str(path))
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


def check_geometry(spacing: tuple[float, ...], direction: tuple[float, ...], source: str) -> None:
    """Refuse a spacing that is not positive and finite or direction cosines that are not a rotation; warn
    (CTInputWarning) about a spacing outside the plausible CT range, usually a unit mistake."""
    mm = "x".join(f"{s:g}" for s in spacing)
    values = np.asarray(spacing, dtype=np.float64)
    if not (np.all(np.isfinite(values)) and np.all(values > 0)):
        raise CTInputError(f"{source}: voxel spacing {mm} mm is not positive and finite (damaged header); "
                           "fix the spacing in the header or export the scan again")
    n = len(values)
    cosines = np.asarray(direction, dtype=np.float64).reshape(n, n)
    if not np.all(np.isfinite(cosines)) or not np.allclose(cosines.T @ cosines, np.eye(n), atol=1e-3):
        raise CTInputError(f"{source}: direction cosines {', '.join(f'{c:g}' for c in direction)} are not a "
                           "rotation (damaged header); fix the orientation in the header or export it again")
    if values.min() < MIN_PLAUSIBLE_SPACING_MM or values.max() > MAX_PLAUSIBLE_SPACING_MM:
        warnings.warn(f"{source}: voxel spacing {mm} mm is outside the usual CT range "
                      f"{MIN_PLAUSIBLE_SPACING_MM:g}..{MAX_PLAUSIBLE_SPACING_MM:g} mm; check the header's "
                      "units (the scan is used as these millimetres)", CTInputWarning, stacklevel=3)


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
def _locale_kept() -> Iterator[None]:
    """Set the process locale back to what it was on entry."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


@contextmanager
def _itk_contained() -> Iterator[list[str]]:
    """Contain what an ITK call does to the process. File descriptor 2 goes to a temporary file while ITK
    runs: its readers print diagnostics straight to C++ ``std::cerr``, which would break the one-line error
    contract (yields the captured lines). The locale is restored afterwards: writing a DICOM slice (GDCM) or
    reading a VTK file leaves the process in the C locale, where Python's default text encoding is ASCII for
    the rest of the run (a later "mm³" in a log line would raise UnicodeEncodeError)."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with _locale_kept(), tempfile.TemporaryFile(mode="w+b") as sink:
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
    """Read the header, check it (memory, NIfTI pixdim and data length), then read the voxels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetOutputPixelType(sitk.sitkFloat32)
    _itk_call(path, reader.ReadImageInformation)
    _check_header_size(path, reader.GetSize(), reader.GetNumberOfComponents())
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti(path)
    check_geometry(reader.GetSpacing(), reader.GetDirection(), str(path))
    return _itk_call(path, reader.Execute)


def _itk_call(path: Path, call: Callable[[], _T]) -> _T:
    """Run a SimpleITK reader step with its C++ diagnostics captured; a failure becomes one CTInputError."""
    with _itk_contained() as native:
        try:
            return call()
        except RuntimeError as exc:
            error = exc
    messages = [*native, *str(error).strip().splitlines()]
    raise _unreadable(path, messages) from error


def _unreadable(path: Path, messages: list[str]) -> CTInputError:
    text = " ".join(messages)
    if any(marker in text for marker in _TRUNCATED):
        return _truncated(path, "the file ends before the voxel data its header declares")
    if "Unable to determine ImageIO reader" in text:
        detail = "no reader recognises its format: damaged, truncated or not an image"
    else:
        detail = next((m for m in messages if "required" in m or "cannot" in m.lower()), "damaged file")
        detail = detail.split("): ", 1)[-1].replace(str(path), "").strip(" :")
    return CTInputError(f"{path}: not a readable image file ({detail[:160]})")


def _truncated(path: Path, what: str) -> CTInputError:
    return CTInputError(f"{path}: truncated: {what} (an interrupted download or copy); copy the file again")


def _check_header_size(path: Path, size: tuple[int, ...], components: int) -> None:
    """Refuse a header whose voxel count cannot fit in memory (a damaged or hostile header) before ITK
    allocates it: the allocation would fail with a C++ error or, worse, be overcommitted and kill the job."""
    memory = machine_memory_bytes()
    if memory is None:  # the OS does not say: no limit but the allocator's
        return
    need = math.prod(int(n) for n in size) * max(1, int(components)) * _READ_BYTES_PER_VOXEL
    if need > memory:
        voxels = "x".join(map(str, size))
        raise CTInputError(f"{path}: header declares {voxels} voxels ({need / 2**30:.1f} GiB to read), more "
                           f"than this machine's {memory / 2**30:.1f} GiB of memory: a damaged header, or "
                           "crop or downsample the volume first")


_NIFTI_FIELDS = ["dim", "datatype", "bitpix", "pixdim", "vox_offset", "magic"]
_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # datatype codes of float32 and float64 voxels


def _nifti_dtype(version: int, order: str) -> np.dtype:
    """The fields of a NIfTI-1 (348 bytes) or NIfTI-2 (540 bytes) header that say where the voxels are."""
    if version == 1:
        formats = [(f"{order}i2", (8,)), f"{order}i2", f"{order}i2", (f"{order}f4", (8,)), f"{order}f4", "S4"]
        return np.dtype({"names": _NIFTI_FIELDS, "formats": formats, "offsets": [40, 70, 72, 76, 108, 344],
                         "itemsize": 348})
    formats = [(f"{order}i8", (8,)), f"{order}i2", f"{order}i2", (f"{order}f8", (8,)), f"{order}i8", "S8"]
    return np.dtype({"names": _NIFTI_FIELDS, "formats": formats, "offsets": [16, 12, 14, 104, 168, 4],
                     "itemsize": 540})


def _nifti_header(raw: bytes) -> np.void | None:
    """The parsed single-file NIfTI-1/2 header in ``raw``, or None if it is not one."""
    for version, size in ((1, 348), (2, 540)):
        for order in "<>":
            if len(raw) >= size and int(np.frombuffer(raw, f"{order}i4", 1)[0]) == size:
                header = np.frombuffer(raw, _nifti_dtype(version, order), 1)[0]
                return header if bytes(header["magic"]).startswith((b"n+1", b"n+2")) else None
    return None


def _check_nifti(path: Path) -> None:
    """Check a NIfTI file itself, because ITK hides three faults: a pixdim that is zero, negative or NaN (read
    as 1 mm or as a negative spacing), voxel data shorter than the header declares (zero-filled) and NaN or
    infinite float voxels (read as 0)."""
    compressed = path.name.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as fh:
            header = _nifti_header(fh.read(540))
    except EOFError as exc:
        raise _truncated(path, "the compressed header ends early") from exc
    except (OSError, zlib.error) as exc:
        raise CTInputError(f"{path}: not a readable image file (damaged compressed data: {exc})") from exc
    if header is None:
        return
    ndim = int(header["dim"][0])
    if not 1 <= ndim <= 7:
        raise CTInputError(f"{path}: NIfTI header has dim[0] = {ndim}, not 1..7 (damaged header)")
    pixdim = [float(p) for p in header["pixdim"][1:min(ndim, 3) + 1]]
    if not all(math.isfinite(p) and p > 0 for p in pixdim):
        mm = " x ".join(f"{p:g}" for p in pixdim)
        raise CTInputError(f"{path}: NIfTI voxel size (pixdim) {mm} mm is not "
                           "positive and finite (SimpleITK would silently use 1 mm or a negative spacing); "
                           "fix pixdim in the header or export the scan again")
    dims = [int(n) for n in header["dim"][1:ndim + 1]]
    bitpix = int(header["bitpix"])
    if min(dims) < 1 or bitpix < 1:
        return  # ITK refuses or handles these itself
    offset, data_bytes = int(header["vox_offset"]), math.prod(dims) * bitpix // 8
    floats = _NIFTI_FLOATS.get(int(header["datatype"]))
    dtype = None if floats is None else header.dtype["bitpix"].str[0] + floats  # the header's byte order
    if compressed or dtype is not None:
        found, nonfinite = _scan_data(path, compressed, offset, data_bytes, dtype)
    else:
        found, nonfinite = path.stat().st_size, 0
    if found < offset + data_bytes:
        raise _truncated(path, f"the header declares {offset + data_bytes} bytes of header and voxels, the "
                               f"{'decompressed ' if compressed else ''}file holds {found}")
    if nonfinite:
        raise CTInputError(f"{path}: image holds NaN or infinite values, not CT HU ({nonfinite} voxels; "
                           "SimpleITK would read them as 0)")


def _scan_data(path: Path, compressed: bool, offset: int, data_bytes: int,
               dtype: str | None) -> tuple[int, int]:
    """(length of the (decompressed) file, count of non-finite voxels when ``dtype`` is a float type), reading
    it once in 4 MiB blocks; for gzip the module's CRC check also catches damage inside the stream."""
    total = nonfinite = 0
    carry = b""
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as fh:
            total = len(fh.read(offset))
            while chunk := fh.read(1 << 22):
                voxels = chunk[: max(0, offset + data_bytes - total)]  # bytes after the voxels are not voxels
                total += len(chunk)
                if dtype is None or not voxels:
                    continue
                data = carry + voxels
                usable = len(data) - len(data) % np.dtype(dtype).itemsize
                values = np.frombuffer(data, dtype, usable // np.dtype(dtype).itemsize)
                nonfinite += int(values.size - np.count_nonzero(np.isfinite(values)))
                carry = data[usable:]
    except EOFError as exc:
        raise _truncated(path, "the compressed data ends before its end-of-stream marker") from exc
    except (OSError, zlib.error) as exc:
        raise CTInputError(f"{path}: not a readable image file (damaged compressed data: {exc}); "
                           "copy the file again") from exc
    return total, nonfinite


def dicom_series(folder: str | os.PathLike) -> dict[str, list[str]]:
    """The DICOM series among ``folder``'s own files (not its sub-folders): series UID -> slice files, as
    GDCM groups them; empty when none is an image slice."""
    reader = sitk.ImageSeriesReader()
    with _itk_contained():
        uids = reader.GetGDCMSeriesIDs(str(folder))
        return {uid: list(reader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in uids}


def _read_dicom_series(path: Path, series_uid: str | None = None) -> sitk.Image:
    if not any(path.iterdir()):
        raise CTInputError(f"{path}: folder is empty (expected a DICOM series)")
    reader = sitk.ImageSeriesReader()
    with _itk_contained():
        series = reader.GetGDCMSeriesIDs(str(path))
    if not series:
        raise CTInputError(f"{path}: folder holds no DICOM series (one in a sub-folder: give that folder; "
                           "`ctvq discover` lists every series below a folder)")
    if series_uid is not None:
        if series_uid not in series:
            raise CTInputError(f"{path}: folder holds no DICOM series {series_uid} (it holds "
                               f"{', '.join(series[:3])}{'...' if len(series) > 3 else ''})")
        series = (series_uid,)
    if len(series) > 1:
        raise CTInputError(f"{path}: folder holds {len(series)} DICOM series ({', '.join(series[:3])}...); "
                           "give a folder with exactly one, or pick one with --series UID")
    with _itk_contained():
        files = reader.GetGDCMSeriesFileNames(str(path), series[0])
    reader.SetFileNames(files)
    reader.SetOutputPixelType(sitk.sitkFloat32)
    reader.MetaDataDictionaryArrayUpdateOn()
    with _itk_contained() as native:  # ITK's "non uniform sampling" warning: checked below instead
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            detail = next((m for m in native if "rror" in m), str(exc).strip())
            raise CTInputError(f"{path}: DICOM series could not be read ({detail[:160]})") from exc
    keys = ("0020|0032", "0020|0037")  # Image Position, Image Orientation (Patient)
    if all(reader.HasMetaDataKey(i, k) for i in range(len(files)) for k in keys):
        def tag(i: int, key: str) -> list[float]:
            return [float(v) for v in reader.GetMetaData(i, key).split("\\")]

        positions = [tag(i, keys[0]) for i in range(len(files))]
        orientation = tag(0, keys[1])
        check_slice_positions(np.asarray(positions), np.asarray(orientation), [Path(f).name for f in files],
                              f"{path}", series[0])
    return image


def check_slice_positions(positions: np.ndarray, orientation: np.ndarray, names: list[str], source: str,
                          series_uid: str) -> None:
    """Refuse a DICOM series whose slices are not one evenly spaced stack: two slices at one position (several
    volumes under one series UID) or an uneven gap (a missing slice). ITK only warns and averages the spacing.

    ``positions`` (N, 3) are the Image Position (Patient) tags, ``orientation`` the six row/column cosines.
    """
    if len(positions) < 2:
        return
    normal = np.cross(orientation[:3], orientation[3:6])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    gaps = np.diff(along)
    same = np.flatnonzero(gaps < _SAME_POSITION_MM)
    if same.size:
        a, b = names[order[same[0]]], names[order[same[0] + 1]]
        raise CTInputError(f"{source}: {same.size} pair(s) of slices share a position (first {a} and {b} at "
                           f"{along[same[0]]:.2f} mm): several volumes (interleaved acquisitions, phases or "
                           f"echoes) share series UID {series_uid}; put each volume in its own folder")
    step = float(np.median(gaps))
    deviation = np.abs(gaps - step)
    worst = int(np.argmax(deviation))
    if deviation[worst] > max(_SAME_POSITION_MM, _SPACING_TOLERANCE * step):
        a, b = names[order[worst]], names[order[worst + 1]]
        raise CTInputError(f"{source}: slice spacing is not even ({step:g} mm between most slices, "
                           f"{gaps[worst]:g} mm between {a} and {b}): a slice is missing or the series mixes "
                           "spacings; give the complete, evenly spaced series")


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
    compress = path.suffix.lower() in (".mhd", ".mha", ".nrrd")
    with atomic_output(path) as tmp:
        _itk_write(path, lambda: sitk.WriteImage(image, str(tmp), useCompression=compress))
        if path.name.lower().endswith((".nii", ".nii.gz")):
            # ITK's NIfTI writer ignores failed writes (measured: writing through a link to /dev/full
            # "succeeds"), so a full disk would leave a short file: read the result back before it is moved.
            try:
                _check_nifti(tmp)
            except CTInputError as exc:
                raise incomplete_write_error(path) from exc


def _itk_write(target: Path, call: Callable[[], None]) -> None:
    """Run a SimpleITK writer contained (``_itk_contained``); a failure (ITK reports a full disk or an
    unwritable folder as a RuntimeError, not an OSError) becomes one FileSystemError naming ``target``."""
    with _itk_contained() as native:
        try:
            return call()
        except RuntimeError as exc:
            error = exc
    detail = next((m for m in [*native, *str(error).strip().splitlines()] if "rror" in m or "annot" in m),
                  "ITK writer failed").split("): ", 1)[-1].strip(" :")
    raise FileSystemError(f"{target}: cannot write the output ({detail[:160]}): check the free space and "
                          "that the folder is writable") from error


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
            _itk_write(Path(folder), lambda image=slice_image: writer.Execute(image))
