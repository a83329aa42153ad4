"""The band of one case: output of ``ctvq sdf``, input of ``ctvq index``.

Holds the band voxels with their normalised SDF and, for every latent 8³ cell the band touches, the inside
mask of all 512 children (the decoder's truncated-sign targets), which needs the full windowed volume and so
is taken here, where the volume is in memory. The window step's surface settings are applied here where they
need the iso value (islands below ``min_island_mm3`` are flipped) and the scan's extent (band voxels outside
the field of view are dropped: with edge padding they only continue the border surface straight on), and
recorded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ctvq.ct.errors import CTInputError
from ctvq.ct.sample import CELL_VOXELS, LATENT_STRIDE, FigurePlanes, band_centre
from ctvq.ct.sdf import narrow_band_sdf
from ctvq.ct.surface import RAW, SurfaceSettings, island_flips, island_voxels
from ctvq.ct.volume_file import (
    SURFACE_KEYS,
    WindowedVolume,
    load_npz,
    save_npz_atomic,
    surface_arrays,
    surface_from,
)
from ctvq.ct.windows import Window, check_iso

DEFAULT_BANDS: dict[str, float] = {"lung": 3.0, "bone": 1.5, "soft_tissue": 3.0, "brain": 3.0}
"""Band half-width (voxels) per window when none is given. Thin anatomy learns better in a narrow band. On 4
held-out bone phantoms at 128^3 (tiny configs, 100 + 600 steps) band 1.5 won on every metric: occupancy IoU
0.48 -> 0.61, Chamfer-L1 1.63 -> 0.82 mm, F@1 mm 0.53 -> 0.71, codebook usage 0.62 -> 0.90. At 64^3 it is a
trade (IoU 0.34 -> 0.41, F@1 mm 0.41 -> 0.46, but Chamfer 2.46 -> 2.60 mm, and usage 0.96 -> 0.35 after a
100-step stage 1); band 1 broke the surface (Chamfer 9.6 mm). Lung lost on every metric at 1.5 (64^3: IoU
0.90 -> 0.88, usage 0.85 -> 0.39) and keeps 3."""
FALLBACK_BAND = 3.0  # custom windows


def default_band(window: str) -> float:
    """The band ``ctvq sdf`` and the workflow use for ``window`` unless told otherwise."""
    return DEFAULT_BANDS.get(window, FALLBACK_BAND)


BAND_FORMAT_VERSION = 2  # 2: adds the surface settings and the scan extent
_KIND = "ctvq-band"


@dataclass(frozen=True)
class BandField:
    """Band voxels (x, y, z; ascending C-order index) and per-touched-cell inside bits, plus provenance."""

    coords: np.ndarray  # (N, 3) int16
    sdf: np.ndarray  # (N,) float32, distance / band in [-1, 1], negative inside
    latent_coords: np.ndarray  # (M, 3) int16, lexicographic
    inside_bits: np.ndarray  # (M, 64) uint8, packbits of the (8, 8, 8) inside mask, local x, y, z C order
    band: float
    iso_value: float
    resolution: int
    affine: np.ndarray
    window: Window
    case_id: str
    source: str
    spacing: tuple[float, float, float]
    surface: SurfaceSettings = RAW
    scan_extent: np.ndarray | None = None
    islands_removed: int = 0  # inside components flipped to outside (provenance, logged)
    holes_filled: int = 0
    figure_planes: FigurePlanes | None = None  # the windowed CT through the band's centre, for figures


def surface_volume(values: np.ndarray, iso_value: float, min_voxels: int,
                   box: tuple[slice, slice, slice] = (slice(None),) * 3) -> tuple[np.ndarray, int, int]:
    """``values`` with inside islands and holes below ``min_voxels``, looked for within ``box``, pushed to
    the other side of the iso value (0 or 1, the window's ends: no crossing is left at them); a copy only
    when something changes."""
    inside = np.greater(values[box], iso_value)
    where, flips, removed, filled = island_flips(inside, min_voxels)
    if flips is None:
        return values, 0, 0
    out = values.copy(order="K")
    part, inside = out[box][where], inside[where]
    np.copyto(part, np.float32(0.0), where=flips & inside)
    np.copyto(part, np.float32(1.0), where=flips & ~inside)
    return out, removed, filled


def in_extent(coords: np.ndarray, extent: np.ndarray | None) -> np.ndarray:
    """Which voxel coordinates (N, 3) lie inside the scan's extent ((2, 3) cube indices, edges included)."""
    if extent is None:
        return np.ones(coords.shape[0], dtype=bool)
    lo, hi = np.ceil(extent[0] - 1e-6).astype(np.int64), np.floor(extent[1] + 1e-6).astype(np.int64)
    return np.all((coords >= lo) & (coords <= hi), axis=1)


def extent_box(extent: np.ndarray | None, resolution: int) -> tuple[slice, slice, slice]:
    """The cube's index box inside the scan's extent (the whole cube for None)."""
    if extent is None:
        return (slice(None),) * 3  # type: ignore[return-value]
    lo = np.clip(np.ceil(extent[0] - 1e-6).astype(int), 0, resolution - 1)
    hi = np.clip(np.floor(extent[1] + 1e-6).astype(int), lo, resolution - 1)
    return tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]


def compute_band(volume: WindowedVolume, band: float = 3.0, iso_value: float = 0.5) -> BandField:
    """Narrow-band SDF of ``volume`` at ``iso_value`` and the inside masks of the touched latent cells."""
    return band_and_inside(volume, band, iso_value)[0]


def band_and_inside(volume: WindowedVolume, band: float = 3.0, iso_value: float = 0.5
                    ) -> tuple[BandField, np.ndarray]:
    """``compute_band`` and the whole cube's inside mask after island removal (the sign the band's cells
    hold, everywhere: for a dense picture of the field, ``dense_field``)."""
    check_iso(iso_value)
    res = volume.resolution
    if volume.values.shape != (res, res, res) or res % LATENT_STRIDE:
        raise CTInputError(f"{volume.case_id}: windowed volume of shape {volume.values.shape}; "
                           f"expected a cube whose side is a multiple of {LATENT_STRIDE}")
    step = float(np.linalg.norm(np.asarray(volume.affine)[:3, 0]))
    edge = volume.surface.pad == "edge"
    # islands are looked for inside the scan only: beyond it an edge-padded cube just repeats the border
    box = extent_box(volume.scan_extent, res) if edge else (slice(None),) * 3
    values, removed, filled = surface_volume(volume.values, iso_value,
                                             island_voxels(volume.surface.min_island_mm3, step), box)
    try:
        voxels, distance = narrow_band_sdf(values, iso_value, band)
    except CTInputError as exc:
        raise CTInputError(f"{volume.case_id} ({volume.source}): window {volume.window.name!r} "
                           f"(W={volume.window.width:g}, L={volume.window.level:g}): {exc}") from exc
    # with edge padding the surface beyond the scan only repeats its border: not supervised (air padding
    # keeps the whole cap: the surface as windowed)
    keep = in_extent(voxels, volume.scan_extent if edge else None)
    if not keep.all():
        voxels, distance = voxels[keep], distance[keep]
    if voxels.shape[0] == 0:
        raise CTInputError(f"{volume.case_id} ({volume.source}): no iso-surface at {iso_value} "
                           "inside the scan's field of view")
    coords = voxels.astype(np.int16)
    del voxels
    side = res // LATENT_STRIDE
    cells = occupied_cells(flat_cells(coords, res), side)
    latent = np.stack(np.unravel_index(cells, (side,) * 3), axis=1).astype(np.int16)
    inside = np.greater(values, iso_value)
    bits = np.packbits(cell_masks(inside, latent).reshape(-1, CELL_VOXELS), axis=1)
    sdf = np.clip(distance / np.float32(band), -1.0, 1.0).astype(np.float32)
    planes = FigurePlanes.of(volume.values, band_centre(coords))
    return BandField(coords=coords, sdf=sdf, latent_coords=latent, inside_bits=bits, band=float(band),
                     iso_value=float(iso_value), resolution=res, affine=volume.affine, window=volume.window,
                     case_id=volume.case_id, source=volume.source, spacing=volume.spacing,
                     surface=volume.surface, scan_extent=volume.scan_extent, islands_removed=removed,
                     holes_filled=filled, figure_planes=planes), inside


def dense_field(field: BandField, inside: np.ndarray) -> np.ndarray:
    """The field the decoder learns, on the whole cube (float32): the band's sdf (distance / band) in the
    band, -1 inside and +1 outside elsewhere."""
    out = np.where(inside, np.float32(-1.0), np.float32(1.0))
    c = field.coords.astype(np.intp)
    out[c[:, 0], c[:, 1], c[:, 2]] = field.sdf
    return out


def flat_cells(coords: np.ndarray, resolution: int) -> np.ndarray:
    """Linear latent-cell id (lexicographic x, y, z) of each voxel coordinate."""
    side = resolution // LATENT_STRIDE
    cell = coords.astype(np.int64) // LATENT_STRIDE
    return (cell[:, 0] * side + cell[:, 1]) * side + cell[:, 2]


def cell_masks(mask: np.ndarray, latent: np.ndarray) -> np.ndarray:
    """(M, 8, 8, 8) children of the given latent cells, local (x, y, z) order, from a C- or F-ordered
    (x, y, z) mask without copying the full grid."""
    s = LATENT_STRIDE
    n = mask.shape[0] // s
    x, y, z = latent[:, 0], latent[:, 1], latent[:, 2]
    if mask.flags.f_contiguous and not mask.flags.c_contiguous:
        blocks = mask.T.reshape(n, s, n, s, n, s)[z, :, y, :, x, :]
        return blocks.transpose(0, 3, 2, 1)  # (M, z, y, x) -> (M, x, y, z)
    return np.ascontiguousarray(mask).reshape(n, s, n, s, n, s)[x, :, y, :, z, :]


def occupied_cells(cells: np.ndarray, side: int) -> np.ndarray:
    """Sorted unique latent-cell ids, via a marker over the (side³) latent grid: linear, no sort."""
    marker = np.zeros(side**3, dtype=bool)
    marker[cells] = True
    return np.flatnonzero(marker)


def save_band(field: BandField, path: str | os.PathLike) -> None:
    save_npz_atomic(path, {
        "kind": np.asarray(_KIND),
        "format_version": np.asarray(BAND_FORMAT_VERSION),
        "coords": field.coords, "sdf": field.sdf, "latent_coords": field.latent_coords,
        "inside_bits": field.inside_bits, "band": np.asarray(field.band),
        "iso_value": np.asarray(field.iso_value),
        "resolution": np.asarray(field.resolution), "affine": field.affine,
        "window": np.asarray(field.window.name), "window_width": np.asarray(field.window.width),
        "window_level": np.asarray(field.window.level), "case_id": np.asarray(field.case_id),
        "source": np.asarray(field.source), "spacing": np.asarray(field.spacing, dtype=np.float64),
        **surface_arrays(field.surface, field.scan_extent, field.resolution),
        **({} if field.figure_planes is None else {"figure_planes": field.figure_planes.planes,
                                                   "figure_centre": field.figure_planes.centre}),
    })


def load_band(path: str | os.PathLike) -> BandField:
    keys = ("coords", "sdf", "latent_coords", "inside_bits", "band", "iso_value", "resolution", "affine",
            "window", "window_width", "window_level", "case_id", "source", "spacing", *SURFACE_KEYS)
    d = load_npz(path, _KIND, BAND_FORMAT_VERSION, keys, optional=("figure_planes", "figure_centre"))
    surface, extent = surface_from(d)
    return BandField(
        coords=d["coords"], sdf=d["sdf"], latent_coords=d["latent_coords"], inside_bits=d["inside_bits"],
        band=float(d["band"]), iso_value=float(d["iso_value"]), resolution=int(d["resolution"]),
        affine=d["affine"],
        window=Window(str(d["window"]), float(d["window_width"]), float(d["window_level"])),
        case_id=str(d["case_id"]), source=str(d["source"]),
        spacing=tuple(float(s) for s in d["spacing"]),  # type: ignore[arg-type]
        surface=surface, scan_extent=extent,
        figure_planes=FigurePlanes(d["figure_centre"], d["figure_planes"]) if "figure_planes" in d else None,
    )
