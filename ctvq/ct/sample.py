"""The training-sample contract: one compressed ``.npz`` per case, written by ``ctvq index``.

Everything downstream (datasets, trainer, evaluation, tokens) reads samples through this module, so the
on-disk layout lives in exactly one place. The format is versioned: version 4 is written; versions 3 (full
coordinates and float32 sdf) and 2 (before the surface settings were recorded) are still read, so existing
sample caches keep working; a version-2 sample has the settings it was necessarily made with: raw (no
smoothing, no island removal, no body mask, air padding) and an unknown (NaN) scan extent. Any other version
is refused.

Layout (all arrays C-ordered, voxel coordinates are (x, y, z) indices into the ``resolution``³ grid):

- ``coords``        (N, 3) int16   band voxels (|signed distance| <= band), sorted by latent cell
                                   (lexicographic latent x, y, z), then by local index within the cell.
                                   Stored (version 4) as ``local_index`` (N,) uint16, the index within the
                                   cell ((x % 8) * 64 + (y % 8) * 8 + z % 8): with ``latent_coords`` and
                                   ``cell_start`` it gives the coordinates back exactly.
- ``sdf``           (N,)   float32 signed distance / band, clipped to [-1, 1]; negative inside (HU above iso).
                                   Stored (version 4) as ``sdf_steps`` (N,) int16 = round(sdf * 32767).
- ``latent_coords`` (M, 3) int16   unique ``coords // 8`` in the same order.
- ``cell_start``    (M+1,) int64   ``coords[cell_start[m]:cell_start[m+1]]`` lie in latent cell m.
- ``inside_bits``   (M, 64) uint8  ``np.packbits`` of each latent cell's (8, 8, 8) inside mask (local x, y, z
                                   C order): the truncated sign of every decoded voxel outside the band.
- ``affine``        (4, 4) float64 voxel index (x, y, z, 1) -> patient millimetres (LPS, as SimpleITK).
- ``spacing``       (3,)   float64 voxel spacing (mm) of the original scan (provenance, for the manifest).
- ``scan_extent``   (2, 3) float64 lowest / highest cube index (x, y, z) inside the original scan's field of
                                   view (voxel edges included); NaN when unknown (version 2).
- ``figure_planes`` (3, R, R) uint8, optional: the windowed CT (0-255 for 0-1) on the three planes through
                                   ``figure_centre`` ((3,) int64, the band's centre): plane k is the slice
                                   at ``figure_centre[k]`` along axis k. Evaluation draws its figures over
                                   them, so the full windowed cube need not be kept (``load_figure_planes``).
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

# 2: adds source and spacing (provenance); 3: adds the surface settings and scan extent; 4: stores each
# band voxel as its index within its latent cell (uint16) and its sdf as int16 (``SDF_STEPS`` per band): a
# lung case at 512 is 24 MB instead of 60 MB, and is written in 1 s instead of 7
FORMAT_VERSION = 4
READ_VERSIONS = (2, 3, FORMAT_VERSION)
SDF_STEPS = 32767  # int16 steps per band half-width: 1e-4 voxel at band 3, far below the SDF's own accuracy
LATENT_STRIDE = 8
CELL_VOXELS = LATENT_STRIDE**3

_ARRAYS = ("coords", "sdf", "latent_coords", "cell_start", "inside_bits", "affine", "spacing", "scan_extent")
_STORED_SINCE_V4 = {"coords": "local_index", "sdf": "sdf_steps"}  # in memory -> on disk
_SCALARS = ("case_id", "window", "window_width", "window_level", "iso_value", "resolution", "band", "source",
            "smooth_mm", "min_island_mm3", "body_mask", "pad")
_SINCE_V3 = ("scan_extent", "smooth_mm", "min_island_mm3", "body_mask", "pad")


class SampleFormatError(ValueError):
    """A sample file is missing, of another format version, or internally inconsistent."""


@dataclass(frozen=True)
class FigurePlanes:
    """The windowed CT on the three axis planes through ``centre``: what a figure needs of the cube (3 R²
    bytes instead of 2 R³: 0.8 MB against 268 MB at 512)."""

    centre: np.ndarray  # (3,) int64 cube indices
    planes: np.ndarray  # (3, R, R) uint8; planes[k] = cube[centre[k]] along axis k, 0-255 for 0-1

    @classmethod
    def of(cls, values: np.ndarray, centre: np.ndarray) -> FigurePlanes:
        """The planes of a windowed cube (values in [0, 1]) through ``centre``."""
        centre = np.clip(np.asarray(centre, dtype=np.int64), 0, np.asarray(values.shape) - 1)
        x, y, z = (int(c) for c in centre)  # basic slicing: np.take along an axis copies the whole cube
        planes = np.stack([values[x], values[:, y], values[:, :, z]])
        return cls(centre, np.round(np.clip(planes, 0.0, 1.0) * 255).astype(np.uint8))

    def plane(self, axis: int) -> np.ndarray:
        """Plane ``axis`` as float32 in [0, 1] (the cube's slice at ``centre[axis]`` along ``axis``)."""
        return self.planes[axis].astype(np.float32) / np.float32(255.0)

    def problem(self, resolution: int) -> str | None:
        """What is wrong with the planes for a ``resolution``³ sample, or None."""
        if self.planes.shape != (3, resolution, resolution) or self.planes.dtype != np.uint8:
            return f"figure_planes: {self.planes.shape} {self.planes.dtype}, expected (3, R, R) uint8"
        if self.centre.shape != (3,) or (self.centre < 0).any() or (self.centre >= resolution).any():
            return f"figure_centre {self.centre.tolist()} is not a voxel of the {resolution}^3 cube"
        return None


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
    figure_planes: FigurePlanes | None = None  # written by save_sample; read by load_figure_planes only

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
        if self.figure_planes is not None and self.figure_planes.problem(self.resolution):
            problems.append(str(self.figure_planes.problem(self.resolution)))
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


def local_index(coords: np.ndarray) -> np.ndarray:
    """Each voxel's index within its latent cell, (x % 8) * 64 + (y % 8) * 8 + z % 8 (int64): the order of
    the voxels within a cell, and what version 4 stores instead of the coordinates."""
    local = np.asarray(coords).astype(np.int64) % LATENT_STRIDE
    return (local[:, 0] * LATENT_STRIDE + local[:, 1]) * LATENT_STRIDE + local[:, 2]


def band_centre(coords: np.ndarray) -> np.ndarray:
    """The voxel nearest the mean of the band voxels (int64): where the figures' planes cross."""
    return np.round(np.asarray(coords).mean(axis=0)).astype(np.int64)


def save_sample(sample: SparseSample, path: str | os.PathLike) -> None:
    """Write atomically: a killed or failed write leaves no partial file at ``path``."""
    sample.validate(str(path))
    payload = {name: getattr(sample, name) for name in _ARRAYS if name not in _STORED_SINCE_V4}
    payload["local_index"] = local_index(sample.coords).astype(np.uint16)
    payload["sdf_steps"] = _to_steps(sample.sdf)
    payload.update({name: np.asarray(getattr(sample, name)) for name in _SCALARS})
    payload["format_version"] = np.asarray(FORMAT_VERSION)
    if sample.figure_planes is not None:
        payload.update(figure_planes=sample.figure_planes.planes, figure_centre=sample.figure_planes.centre)
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


def on_sdf_steps(sdf: np.ndarray) -> np.ndarray:
    """``sdf`` rounded to the ``SDF_STEPS`` grid the file stores (float32): ``ctvq index`` and on-the-fly
    samples use it, so a sample is the same in memory and after a save and load, bit for bit."""
    return _from_steps(_to_steps(sdf))


def _to_steps(sdf: np.ndarray) -> np.ndarray:
    """Nearest step, but never 0 for a non-zero value: the sign says inside or outside, and must stay."""
    sdf = np.asarray(sdf, dtype=np.float32)
    steps = np.round(sdf * np.float32(SDF_STEPS))
    steps = np.where((steps == 0) & (sdf != 0), np.sign(sdf), steps)
    return steps.astype(np.int16)


def _from_steps(steps: np.ndarray) -> np.ndarray:
    return steps.astype(np.float32) / np.float32(SDF_STEPS)


def _coords_of(local_index: np.ndarray, latent_coords: np.ndarray, cell_start: np.ndarray) -> np.ndarray:
    """(N, 3) int16 voxel coordinates from each voxel's index within its latent cell (version 4)."""
    counts = np.diff(cell_start)
    if local_index.shape != (int(cell_start[-1]),) or (counts < 0).any():
        raise SampleFormatError(f"local_index of shape {local_index.shape} does not match cell_start")
    base = np.repeat(latent_coords.astype(np.int32) * LATENT_STRIDE, counts, axis=0)
    local = np.stack(np.unravel_index(local_index.astype(np.int32), (LATENT_STRIDE,) * 3), axis=1)
    return (base + local).astype(np.int16)


def load_figure_planes(path: str | os.PathLike) -> FigurePlanes | None:
    """A sample's figure planes, or None for a sample without them (nothing else is decompressed)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if "figure_planes" not in data:
                return None
            return FigurePlanes(data["figure_centre"], data["figure_planes"])
    except Exception as exc:  # zipfile/npy errors: name the file, keep the cause
        raise SampleFormatError(f"{path}: not a readable ctvq sample ({exc})") from exc


def load_sample(path: str | os.PathLike) -> SparseSample:
    path = Path(path)
    if not path.is_file():
        raise SampleFormatError(f"{path}: sample file does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            version = check_format_version(data, path)
            wanted = [_STORED_SINCE_V4.get(k, k) if version >= 4 else k for k in (*_ARRAYS, *_SCALARS)
                      if version >= 3 or k not in _SINCE_V3]
            missing = [k for k in wanted if k not in data]
            if missing:
                raise SampleFormatError(f"{path}: sample lacks {', '.join(missing)}")
            fields = {k: data[k] for k in _ARRAYS if k in wanted}  # absent (version 2): the raw defaults
            if version >= 4:
                fields["coords"] = _coords_of(data["local_index"], fields["latent_coords"],
                                              fields["cell_start"])
                fields["sdf"] = _from_steps(data["sdf_steps"])
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
