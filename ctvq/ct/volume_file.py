"""The windowed-volume file: output of ``ctvq window``, input of ``ctvq sdf`` and of on-the-fly datasets.

One ``.npz`` holding the windowed cube quantised to uint16 (step 1/65535 of the window: far below the
sub-voxel precision the SDF needs), the voxel -> mm affine, the window, the source and case id, and the
original scan spacing, and how its surface was cleaned (``ctvq.ct.surface``: the settings and the scan's
extent in cube voxels, which ``ctvq sdf`` applies and records). Zip members are stored, not deflated: the
cube is large and mostly noise, and deflating 256 MB costs more seconds than the whole narrow-band SDF
(measured: bench/preprocess.py).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctvq.atomic import atomic_output
from ctvq.ct.errors import CTInputError
from ctvq.ct.surface import RAW, SurfaceSettings
from ctvq.ct.windows import Window

VOLUME_FORMAT_VERSION = 2  # 2: adds the surface settings and the scan extent
_QUANT = 65535.0
_KIND = "ctvq-windowed-volume"


@dataclass(frozen=True)
class WindowedVolume:
    """A windowed cube (float32 in [0, 1], indexed x, y, z) with everything needed to build a sample."""

    values: np.ndarray
    affine: np.ndarray
    window: Window
    case_id: str
    source: str
    spacing: tuple[float, float, float]  # of the original scan (mm), for the manifest
    surface: SurfaceSettings = RAW
    scan_extent: np.ndarray | None = None  # (2, 3) lowest/highest cube index inside the scan; None: all

    @property
    def resolution(self) -> int:
        return int(self.values.shape[0])


def save_npz_atomic(path: str | os.PathLike, arrays: dict[str, np.ndarray], level: int | None = None) -> None:
    """Write arrays as an ``.npz`` readable by ``np.load``, atomically; ``level`` None stores uncompressed,
    otherwise deflates at that level (1-9)."""
    method = zipfile.ZIP_STORED if level is None else zipfile.ZIP_DEFLATED
    with (
        atomic_output(path) as tmp,
        zipfile.ZipFile(tmp, "w", method, compresslevel=level) as zf,
    ):
        for name, value in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)


def load_npz(
    path: str | os.PathLike, kind: str, version: int, keys: tuple[str, ...], *,
    error: type[ValueError] = CTInputError, remedy: str = "re-run the step that wrote it",
    optional: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """Read an ``.npz`` of ``kind``/``version`` with ``keys`` (and ``optional`` ones where present); any
    problem raises ``error`` naming the file.

    Shared by every versioned ctvq file (windowed volumes, bands, tokens); ``remedy`` says how to remake one.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            found_kind = str(data["kind"]) if "kind" in data else None
            if found_kind != kind:
                raise error(f"{path}: not a {kind} file (kind {found_kind!r}); {remedy}")
            found_version = int(data["format_version"])
            if found_version != version:
                raise error(f"{path}: {kind} format version {found_version}, this ctvq reads {version}; "
                            f"{remedy}")
            missing = [k for k in keys if k not in data]
            if missing:
                raise error(f"{path}: {kind} file lacks {', '.join(missing)}; {remedy}")
            return {k: data[k] for k in (*keys, *optional) if k in data}
    except error:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise error(f"{path}: not a readable {kind} file ({exc})") from exc


def save_windowed(volume: WindowedVolume, path: str | os.PathLike) -> None:
    quantised = quantise(volume.values)
    save_npz_atomic(path, {
        "kind": np.asarray(_KIND),
        "format_version": np.asarray(VOLUME_FORMAT_VERSION),
        "values": quantised,
        "affine": np.asarray(volume.affine, dtype=np.float64),
        "window": np.asarray(volume.window.name),
        "window_width": np.asarray(volume.window.width),
        "window_level": np.asarray(volume.window.level),
        "case_id": np.asarray(volume.case_id),
        "source": np.asarray(volume.source),
        "spacing": np.asarray(volume.spacing, dtype=np.float64),
        **surface_arrays(volume.surface, volume.scan_extent, volume.resolution),
    })


def surface_arrays(surface: SurfaceSettings, extent: np.ndarray | None, resolution: int
                   ) -> dict[str, np.ndarray]:
    """The surface settings and scan extent as file members (shared by the windowed and band files)."""
    return {"smooth_mm": np.asarray(surface.smooth_mm), "min_island_mm3": np.asarray(surface.min_island_mm3),
            "body_mask": np.asarray(surface.body_mask), "pad": np.asarray(surface.pad),
            "scan_extent": extent_or_cube(extent, resolution)}


def extent_or_cube(extent: np.ndarray | None, resolution: int) -> np.ndarray:
    """The scan extent as a (2, 3) float64 array; None (the scan fills the cube) as the whole cube."""
    full = np.array([[-0.5] * 3, [resolution - 0.5] * 3])
    return np.asarray(full if extent is None else extent, dtype=np.float64)


SURFACE_KEYS = ("smooth_mm", "min_island_mm3", "body_mask", "pad", "scan_extent")


def surface_from(data: dict[str, np.ndarray]) -> tuple[SurfaceSettings, np.ndarray]:
    surface = SurfaceSettings(smooth_mm=float(data["smooth_mm"]),
                              min_island_mm3=float(data["min_island_mm3"]),
                              body_mask=bool(data["body_mask"]), pad=str(data["pad"]))
    return surface, np.asarray(data["scan_extent"], dtype=np.float64)


def quantise(values: np.ndarray, slab: int = 16) -> np.ndarray:
    """uint16 = round(values * 65535) in the same memory layout, slab by slab through one small reused
    float32 buffer."""
    if values.flags.f_contiguous and not values.flags.c_contiguous:
        return quantise(values.T, slab).T
    values = np.ascontiguousarray(values)
    out = np.empty(values.shape, dtype=np.uint16)
    buffer = np.empty((min(slab, values.shape[0]), *values.shape[1:]), dtype=np.float32)
    for start in range(0, values.shape[0], slab):
        part = buffer[: min(slab, values.shape[0] - start)]
        np.multiply(values[start:start + part.shape[0]], np.float32(_QUANT), out=part)
        np.rint(part, out=part)
        out[start:start + part.shape[0]] = part
    return out


def load_windowed(path: str | os.PathLike) -> WindowedVolume:
    keys = ("values", "affine", "window", "window_width", "window_level", "case_id", "source", "spacing",
            *SURFACE_KEYS)
    data = load_npz(path, _KIND, VOLUME_FORMAT_VERSION, keys)
    values = data["values"]
    if values.ndim != 3 or len(set(values.shape)) != 1 or values.dtype != np.uint16:
        raise CTInputError(f"{path}: windowed values have shape {values.shape} {values.dtype}, "
                           "expected a uint16 cube")
    out = np.multiply(values, np.float32(1.0 / _QUANT), dtype=np.float32)
    del values
    surface, extent = surface_from(data)
    return WindowedVolume(
        values=out,
        affine=data["affine"],
        window=Window(str(data["window"]), float(data["window_width"]), float(data["window_level"])),
        case_id=str(data["case_id"]),
        source=str(data["source"]),
        spacing=tuple(float(s) for s in data["spacing"]),  # type: ignore[arg-type]
        surface=surface,
        scan_extent=extent,
    )
