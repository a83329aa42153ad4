"""The training-sample contract: one compressed ``.npz`` per case, written by ``ctvq index``.

Everything downstream (datasets, trainer, evaluation, tokens) reads samples through this module, so the
on-disk layout lives in exactly one place. The format is versioned: version 3 is written; version 2 (before
the surface settings were recorded) is still read, so existing sample caches keep working, with the settings
it was necessarily made with: raw (no smoothing, no island removal, no body mask, air padding) and an
unknown (NaN) scan extent. Any other version is refused.

Layout (all arrays C-ordered, voxel coordinates are (x, y, z) indices into the ``resolution``³ grid):

- ``coords``        (N, 3) int16   band voxels (|signed distance| <= band), sorted by latent cell
                                   (lexicographic latent x, y, z), then by local index within the cell.
- ``sdf``           (N,)   float32 signed distance / band, clipped to [-1, 1]; negative inside (HU above iso).
- ``latent_coords`` (M, 3) int16   unique ``coords // 8`` in the same order.
- ``cell_start``    (M+1,) int64   ``coords[cell_start[m]:cell_start[m+1]]`` lie in latent cell m.
- ``inside_bits``   (M, 64) uint8  ``np.packbits`` of each latent cell's (8, 8, 8) inside mask (local x, y, z
                                   C order): the truncated sign of every decoded voxel outside the band.
- ``affine``        (4, 4) float64 voxel index (x, y, z, 1) -> patient millimetres (LPS, as SimpleITK).
- ``spacing``       (3,)   float64 voxel spacing (mm) of the original scan (provenance, for the manifest).
- ``scan_extent``   (2, 3) float64 lowest / highest cube index (x, y, z) inside the original scan's field of
                                   view (voxel edges included); NaN when unknown (version 2).
- scalars: ``format_version``, ``case_id``, ``window``, ``window_width``, ``window_level``, ``iso_value``
  (on the windowed [0, 1] scale), ``resolution``, ``band`` (voxels), ``source`` (the scan it came from),
  and how ``ctvq window`` cleaned the surface (``ctvq.ct.surface.SurfaceSettings``): ``smooth_mm``,
  ``min_island_mm3``, ``body_mask``, ``pad`` (``edge`` or ``air``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctvq.atomic import atomic_output

FORMAT_VERSION = 3  # 2: adds source and spacing (provenance); 3: adds the surface settings and scan extent
READ_VERSIONS = (2, FORMAT_VERSION)
LATENT_STRIDE = 8
CELL_VOXELS = LATENT_STRIDE**3

_ARRAYS = ("coords", "sdf", "latent_coords", "cell_start", "inside_bits", "affine", "spacing", "scan_extent")
_SCALARS = ("case_id", "window", "window_width", "window_level", "iso_value", "resolution", "band", "source",
            "smooth_mm", "min_island_mm3", "body_mask", "pad")
_SINCE_V3 = ("scan_extent", "smooth_mm", "min_island_mm3", "body_mask", "pad")


class SampleFormatError(ValueError):
    """A sample file is missing, of another format version, or internally inconsistent."""


@dataclass(frozen=True)
class SparseSample:
    case_id: str
    window: str
    window_width: float
    window_level: float
    iso_value: float
    resolution: int
    band: float
    affine: np.ndarray
    coords: np.ndarray
    sdf: np.ndarray
    latent_coords: np.ndarray
    cell_start: np.ndarray
    inside_bits: np.ndarray
    source: str = ""
    spacing: np.ndarray = field(default_factory=lambda: np.full(3, np.nan))
    # surface settings of `ctvq window` (defaults: raw, what a version-2 sample was made with)
    smooth_mm: float = 0.0
    min_island_mm3: float = 0.0
    body_mask: bool = False
    pad: str = "air"
    scan_extent: np.ndarray = field(default_factory=lambda: np.full((2, 3), np.nan))

    @property
    def num_points(self) -> int:
        return int(self.coords.shape[0])

    @property
    def num_latent(self) -> int:
        return int(self.latent_coords.shape[0])

    def validate(self, origin: str = "<memory>") -> None:
        """Raise SampleFormatError naming ``origin`` if the arrays disagree with the contract."""
        n, m = self.num_points, self.num_latent
        problems = []
        if self.coords.ndim != 2 or self.coords.shape[1] != 3:
            problems.append(f"coords has shape {self.coords.shape}, expected (N, 3)")
        if self.sdf.shape != (n,):
            problems.append(f"sdf has shape {self.sdf.shape}, expected ({n},)")
        if self.latent_coords.shape != (m, 3):
            problems.append(f"latent_coords has shape {self.latent_coords.shape}, expected (M, 3)")
        if self.cell_start.shape != (m + 1,) or self.cell_start[-1] != n:
            problems.append(f"cell_start has shape {self.cell_start.shape} / end != N={n}")
        if self.inside_bits.shape != (m, CELL_VOXELS // 8):
            problems.append(f"inside_bits has shape {self.inside_bits.shape}, expected ({m}, 64)")
        if self.affine.shape != (4, 4):
            problems.append(f"affine has shape {self.affine.shape}, expected (4, 4)")
        if np.shape(self.scan_extent) != (2, 3):
            problems.append(f"scan_extent has shape {np.shape(self.scan_extent)}, expected (2, 3)")
        if self.pad not in ("edge", "air"):
            problems.append(f"pad {self.pad!r} is not edge or air")
        if self.resolution % LATENT_STRIDE:
            problems.append(f"resolution {self.resolution} is not a multiple of {LATENT_STRIDE}")
        if n and (self.coords.min() < 0 or self.coords.max() >= self.resolution):
            problems.append(f"coords outside the {self.resolution}^3 grid")
        if n and not np.isfinite(self.sdf).all():
            problems.append(f"{int((~np.isfinite(self.sdf)).sum())} sdf value(s) are NaN or infinite")
        elif n and np.abs(self.sdf).max() > 1.0:
            problems.append("sdf values outside [-1, 1]")
        if self.affine.shape == (4, 4):
            if not np.isfinite(self.affine).all():
                problems.append("the affine holds NaN or infinite values")
            elif abs(float(np.linalg.det(self.affine[:3, :3]))) < 1e-12:
                problems.append("the affine is degenerate (zero voxel size or collinear axes)")
        for name in ("band", "iso_value", "window_width", "window_level"):
            if not np.isfinite(float(getattr(self, name))):
                problems.append(f"{name} is {getattr(self, name)}")
        if np.isfinite(float(self.band)) and self.band <= 0:
            problems.append(f"band {self.band} is not positive")
        if problems:
            raise SampleFormatError(f"{origin}: invalid sample: " + "; ".join(problems))


def decoder_targets(sample: SparseSample) -> np.ndarray:
    """Supervision for every decoded voxel: (M, 8, 8, 8) float32 in [-1, 1].

    The decoder emits all 512 children of each latent cell. Inside the band the target is the stored sdf,
    elsewhere the truncated sign (-1 inside, +1 outside) from ``inside_bits``.
    """
    m = sample.num_latent
    inside = np.unpackbits(sample.inside_bits, axis=1, count=CELL_VOXELS).reshape(m, 8, 8, 8).astype(bool)
    target = np.where(inside, np.float32(-1.0), np.float32(1.0))
    if sample.num_points:
        cell_of_point = np.repeat(np.arange(m), np.diff(sample.cell_start))
        local = sample.coords.astype(np.int64) % LATENT_STRIDE
        target[cell_of_point, local[:, 0], local[:, 1], local[:, 2]] = sample.sdf
    return target


def save_sample(sample: SparseSample, path: str | os.PathLike) -> None:
    """Write atomically: a killed or failed write leaves no partial file at ``path``."""
    sample.validate(str(path))
    payload = {name: getattr(sample, name) for name in _ARRAYS}
    payload.update({name: np.asarray(getattr(sample, name)) for name in _SCALARS})
    payload["format_version"] = np.asarray(FORMAT_VERSION)
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **payload)


# the kinds of ctvq.ct.volume_file and ctvq.ct.band (which import this module: named here, not imported)
_STEPS_TO_SAMPLE = {
    "ctvq-windowed-volume": "`ctvq sdf` and then `ctvq index` on it",
    "ctvq-band": "`ctvq index` on it",
}


def check_format_version(data: np.lib.npyio.NpzFile, path: Path) -> int:
    """The file's format version; refuse one this ctvq cannot read (one rule for full loads and peeks).

    Windowed volumes and band files carry a ``kind`` (samples do not) and their own version numbers, which
    would otherwise read as a sample version: they are named for what they are, with the steps still to run.
    """
    if "kind" in data:
        kind = str(data["kind"])
        steps = _STEPS_TO_SAMPLE.get(kind)
        if steps is not None:
            raise SampleFormatError(f"{path}: a {kind} file, not a training sample; run {steps} first")
        raise SampleFormatError(f"{path}: a {kind!r} file, not a ctvq training sample")
    version = int(data["format_version"]) if "format_version" in data else None
    if version not in READ_VERSIONS:
        raise SampleFormatError(
            f"{path}: sample format version {version}, this ctvq reads versions "
            f"{', '.join(map(str, READ_VERSIONS))}; re-run `ctvq index` on the case"
        )
    return version


def load_sample(path: str | os.PathLike) -> SparseSample:
    path = Path(path)
    if not path.is_file():
        raise SampleFormatError(f"{path}: sample file does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            version = check_format_version(data, path)
            wanted = [k for k in (*_ARRAYS, *_SCALARS) if version >= 3 or k not in _SINCE_V3]
            missing = [k for k in wanted if k not in data]
            if missing:
                raise SampleFormatError(f"{path}: sample lacks {', '.join(missing)}")
            fields = {k: data[k] for k in _ARRAYS if k in wanted}  # absent (version 2): the raw defaults
            scalars = {k: data[k].item() for k in _SCALARS if k in wanted}
    except SampleFormatError:
        raise
    except Exception as exc:  # zipfile/npy errors: name the file, keep the cause
        raise SampleFormatError(f"{path}: not a readable ctvq sample ({exc})") from exc
    sample = SparseSample(
        case_id=str(scalars["case_id"]),
        window=str(scalars["window"]),
        window_width=float(scalars["window_width"]),
        window_level=float(scalars["window_level"]),
        iso_value=float(scalars["iso_value"]),
        resolution=int(scalars["resolution"]),
        band=float(scalars["band"]),
        source=str(scalars["source"]),
        **fields,
        **({"smooth_mm": float(scalars["smooth_mm"]), "min_island_mm3": float(scalars["min_island_mm3"]),
            "body_mask": bool(scalars["body_mask"]), "pad": str(scalars["pad"])} if version >= 3 else {}),
    )
    sample.validate(str(path))
    return sample
