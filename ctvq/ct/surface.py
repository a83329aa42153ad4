"""Which surface a window extracts: anatomy, not noise, table or field-of-view caps.

Measured on real CT (TotalSegmentator examples), the raw iso-surface of a window is mostly not anatomy:

- in soft_tissue and brain the iso value sits at the window level, inside the tissue's own intensity
  range, so scan noise alone makes thousands of speck components and pin holes;
- every window also extracts the CT table and headrest (thin plates and arcs around the body);
- where the field of view cuts the body, padding the cube with air caps it with flat artificial walls.

The remedies, each a setting (``SurfaceSettings``, per-window defaults in ``SURFACE_DEFAULTS``):

- ``smooth_mm``: Gaussian sigma in mm applied to the scan at its own resolution before resampling, so it
  also anti-aliases the noise when the cube is coarser than the scan;
- ``min_island_mm3``: inside components and enclosed outside components (holes) smaller than this are
  flipped, at the iso value the band is built for (``ctvq sdf``);
- ``body_mask``: objects above ``BODY_HU`` that are not part of the body (the body: the largest thick
  component and any other thick part of at least ``BODY_PART_MM3``, thickness > 2 x ``BODY_CORE_MM``) are
  set to the window's minimum, with a margin, so the table and headrest leave no surface;
- ``pad``: ``edge`` replicates the scan's border voxels into the cube instead of air, so a cut surface runs
  straight on out of the field of view instead of being capped; the band then keeps only voxels inside
  the scan's extent (``scan_extent``), so nothing outside the scan is supervised.

scipy, scikit-image, cc3d and edt are imported inside the functions that use them: the CLI imports this module
for its settings, and those imports cost about 0.4 s at every `ctvq` start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ctvq.ct.errors import CTInputError

PADS = ("edge", "air")
BODY_HU = -500.0  # body threshold: between air/foam (<= -700) and fat (-100); lungs lie inside the body
BODY_CORE_MM = 6.0  # parts thinner than 2 x this (table tops, headrest shells) are not body cores
BODY_PART_MM3 = 50_000.0  # a thick part this large (a cut arm) is body even when not joined to the torso
BODY_MARGIN_MM = 3.0  # beyond the body's surface: what lies nearer is body (skin rims, touching pads)
AIR_RIM_HU = -900.0  # below lung parenchyma (about -860): the air and foam a table or headrest lies in
_OBJECT_RIM_MM = 3.0  # removed objects are widened by this so their partial-volume rims go too
_COARSE_MM = 3.0  # the body mask is found on a grid of about this voxel size (cheap at 512 and 1024)


@dataclass(frozen=True)
class SurfaceSettings:
    """How the iso-surface of a window is cleaned; recorded in the windowed volume and the band."""

    smooth_mm: float = 0.0
    min_island_mm3: float = 0.0
    body_mask: bool = False
    pad: str = "air"

    def check(self, cli: bool = False) -> SurfaceSettings:
        """Raise a one-line CTInputError naming the bad key (as a ``ctvq window`` flag if ``cli``)."""
        def key(name: str) -> str:
            return "--" + name.replace("_", "-") if cli else f"surface setting {name}"

        if not (math.isfinite(self.smooth_mm) and self.smooth_mm >= 0):
            raise CTInputError(f"{key('smooth_mm')} {self.smooth_mm:g}: must be >= 0 mm (0: no smoothing)")
        if not (math.isfinite(self.min_island_mm3) and self.min_island_mm3 >= 0):
            raise CTInputError(f"{key('min_island_mm3')} {self.min_island_mm3:g}: must be >= 0 (0: keep all)")
        if self.pad not in PADS:
            raise CTInputError(f"{key('pad')} {self.pad!r}: use one of {', '.join(PADS)}")
        return self

    def describe(self) -> str:
        return (f"smooth {self.smooth_mm:g} mm, islands < {self.min_island_mm3:g} mm³ removed, body mask "
                f"{'on' if self.body_mask else 'off'}, pad {self.pad}")


# Measured on real CT (TotalSegmentator examples) at 128 and 256: noise specks need smoothing only where the
# iso value lies inside soft tissue (soft_tissue, brain); lung and bone specks are few and small (bone's
# islands stay below 5 mm³: 20 mm³ already erased rib pieces of the small phantom).
SURFACE_DEFAULTS: dict[str, SurfaceSettings] = {
    "lung": SurfaceSettings(smooth_mm=0.0, min_island_mm3=20.0, body_mask=True, pad="edge"),
    "bone": SurfaceSettings(smooth_mm=0.0, min_island_mm3=5.0, body_mask=True, pad="edge"),
    "soft_tissue": SurfaceSettings(smooth_mm=1.0, min_island_mm3=200.0, body_mask=True, pad="edge"),
    "brain": SurfaceSettings(smooth_mm=1.5, min_island_mm3=200.0, body_mask=True, pad="edge"),
}
CUSTOM_DEFAULT = SurfaceSettings(body_mask=True, pad="edge")
RAW = SurfaceSettings()  # no cleaning, air padding: the surface as windowed (old files, comparisons)


def surface_settings(window_name: str, smooth_mm: float | None = None, min_island_mm3: float | None = None,
                     body_mask: bool | None = None, pad: str | None = None, cli: bool = False
                     ) -> SurfaceSettings:
    """The window's defaults with the given settings (not None) replacing them; checked."""
    base = SURFACE_DEFAULTS.get(window_name, CUSTOM_DEFAULT)
    given = {k: v for k, v in (("smooth_mm", smooth_mm), ("min_island_mm3", min_island_mm3),
                               ("body_mask", body_mask), ("pad", pad)) if v is not None}
    return replace(base, **given).check(cli)


def smooth_hu(hu: np.ndarray, spacing: tuple[float, float, float], sigma_mm: float) -> np.ndarray:
    """Gaussian-smoothed copy of a scan (float32), sigma in mm per axis from the voxel spacing.

    Truncated at 3 sigma: the tails beyond change the iso-surface by far less than the quantisation.
    """
    from scipy import ndimage
    sigma = [sigma_mm / s for s in spacing]
    return ndimage.gaussian_filter(np.asarray(hu, dtype=np.float32), sigma, truncate=3.0, mode="nearest")


def island_flips(inside: np.ndarray, min_voxels: int
                 ) -> tuple[tuple[slice, slice, slice], np.ndarray | None, int, int]:
    """Where island removal changes ``inside``: (box, flips within the box or None, inside islands removed,
    holes filled). Face-connected components of either side smaller than ``min_voxels`` take the other
    side's label; the outside component touching the border of the inside voxels' bounding box (the box
    looked in) is never a hole, however small.

    Both sides are labelled in one cc3d pass (a two-valued image: components never cross a value change);
    sizes are one bincount and every small component is found through one lookup, so the cost does not grow
    with their number (bone at 512³ has thousands): about 1 s for an 80 M voxel box, against 2.9 s for a
    pass per side that cleared each component on its own.
    """
    import cc3d
    whole = (slice(None),) * 3
    if min_voxels <= 1 or not inside.any():
        return whole, None, 0, 0  # type: ignore[return-value]
    lo, hi = _box(inside)
    box = tuple(slice(a, b + 1) for a, b in zip(lo, hi, strict=True))
    sides = inside[box].view(np.uint8) + np.uint8(1)  # 1 outside, 2 inside (cc3d leaves 0 unlabelled)
    labels, count = cc3d.connected_components(sides, connectivity=6, return_N=True)
    is_inside = np.zeros(count + 1, dtype=bool)
    is_inside[labels[sides == 2]] = True
    del sides
    small = _label_counts(labels, count) < min_voxels
    small[0] = False
    for face in (labels[0], labels[-1], labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]):
        border = np.unique(face)
        small[border[~is_inside[border]]] = False  # open to the outside air: not a hole
    removed, filled = int((small & is_inside).sum()), int((small & ~is_inside).sum())
    if not (removed or filled):
        return box, None, 0, 0  # type: ignore[return-value]
    return box, small[labels], removed, filled  # type: ignore[return-value]


def _label_counts(labels: np.ndarray, count: int) -> np.ndarray:
    """Voxels per label (0 .. count), in slabs of 4 M voxels: one np.bincount of the whole array first
    casts it to int64, a temporary 2x its size that costs more than the counting (0.8 s against 0.2 s at
    80 M voxels)."""
    flat = labels.ravel(order="K")  # a view: cc3d's labels are contiguous
    counts = np.zeros(count + 1, dtype=np.int64)
    for start in range(0, flat.size, _SLAB):
        counts += np.bincount(flat[start:start + _SLAB], minlength=count + 1)
    return counts


_SLAB = 1 << 22


def _box(mask: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    los, his = [], []
    for axis in range(3):
        hit = np.flatnonzero(np.any(mask, axis=tuple(j for j in range(3) if j != axis)))
        los.append(int(hit[0]))
        his.append(int(hit[-1]))
    return tuple(los), tuple(his)  # type: ignore[return-value]


def foreign_objects(hu_cube: np.ndarray, step_mm: float, extent: np.ndarray | None = None) -> np.ndarray:
    """Mask of the cube's voxels (bool, same layout) that belong to objects outside the body.

    Only the scan's ``extent`` ((2, 3) cube indices; None: all) is examined and the mask is edge-replicated
    beyond it, like an edge-padded cube: replicated copies of a thin table plate would otherwise add up to
    a large, thick-looking object.

    Found on a grid of about ``_COARSE_MM`` (strided view; the mask is a margin-wide zone, so its detail need
    not be finer): thick cores = voxels more than ``BODY_CORE_MM`` inside the HU > ``BODY_HU`` mask; body =
    the largest core and cores of at least ``BODY_PART_MM3``, grown by ``BODY_CORE_MM + BODY_MARGIN_MM``;
    foreign = HU > ``BODY_HU`` outside the body and outside its convex hull in every axial slice, standing
    in air (``_in_air``), widened by ``_OBJECT_RIM_MM`` but never into the body.
    Lungs and gas are below the threshold, so they are never foreign, whatever their shape; for the core
    test they count as body (axial holes filled), so a thin chest wall over a lung stays body.
    """
    shape = np.asarray(hu_cube.shape)
    lo, hi = np.zeros(3, dtype=int), shape - 1
    if extent is not None:
        lo = np.clip(np.ceil(extent[0] - 1e-6).astype(int), 0, shape - 1)
        hi = np.clip(np.floor(extent[1] + 1e-6).astype(int), lo, shape - 1)
    stride = max(1, int(_COARSE_MM / step_mm))
    view = hu_cube[lo[0]:hi[0] + 1:stride, lo[1]:hi[1] + 1:stride, lo[2]:hi[2] + 1:stride]
    coarse = _foreign_coarse(view, step_mm * stride)
    if coarse is None:
        return np.zeros(hu_cube.shape, dtype=bool, order="F" if _fortran(hu_cube) else "C")
    # every cube voxel takes its coarse cell's value: the cell index along each axis is monotone, so this is
    # one repeat per axis (4x faster than one fancy-index gather at 512³); clipping the index repeats the
    # edge beyond the scan, as the edge-padded cube does
    repeats = [np.bincount(np.clip((np.arange(n) - a) // stride, 0, c - 1), minlength=c)
               for n, a, c in zip(shape, lo, coarse.shape, strict=True)]
    if _fortran(hu_cube):
        return np.repeat(np.repeat(np.repeat(coarse.T, repeats[2], 0), repeats[1], 1), repeats[0], 2).T
    return np.repeat(np.repeat(np.repeat(coarse, repeats[0], 0), repeats[1], 1), repeats[2], 2)


def _fortran(a: np.ndarray) -> bool:
    return a.flags.f_contiguous and not a.flags.c_contiguous


def _foreign_coarse(hu: np.ndarray, cstep: float) -> np.ndarray | None:
    """``foreign_objects`` on the coarse grid (voxel ``cstep`` mm); None when there is nothing foreign."""
    import cc3d
    import edt
    coarse = np.ascontiguousarray(hu > BODY_HU)
    if not coarse.any():
        return None
    core = edt.edt(_fill_axial_holes(coarse), anisotropy=(cstep,) * 3, black_border=True) > BODY_CORE_MM
    labels, count = cc3d.connected_components(core, connectivity=6, return_N=True)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = (sizes >= BODY_PART_MM3 / cstep**3) | (np.arange(sizes.size) == int(sizes.argmax()))
    keep[0] = False
    body_core = keep[labels]
    body = edt.edt(~body_core, anisotropy=(cstep,) * 3) <= BODY_CORE_MM + max(BODY_MARGIN_MM, 1.5 * cstep)
    body |= _axial_hulls(body_core)
    objects = _in_air(coarse & ~body, np.ascontiguousarray(hu), cstep)
    if not objects.any():
        return None
    return (edt.edt(~objects, anisotropy=(cstep,) * 3) <= _OBJECT_RIM_MM) & ~body


def _in_air(objects: np.ndarray, hu: np.ndarray, step_mm: float) -> np.ndarray:
    """The objects whose surroundings (a ``_OBJECT_RIM_MM`` shell) are mostly air (HU < ``AIR_RIM_HU``):
    a table or headrest stands in air, a lung vessel the field of view cut off from the body in lung."""
    import cc3d
    import edt
    from scipy import ndimage
    labels, count = cc3d.connected_components(objects, connectivity=26, return_N=True)
    if count == 0:
        return objects
    _, nearest = ndimage.distance_transform_edt(labels == 0, sampling=step_mm, return_indices=True)
    owner = labels[tuple(nearest)]
    distance = edt.edt(labels == 0, anisotropy=(step_mm,) * 3)
    # the shell skips the objects' own partial-volume rim (about a voxel): a thin plate is mostly rim
    shell = (distance > 1.5 * step_mm) & (distance <= 1.5 * step_mm + _OBJECT_RIM_MM)
    air = np.bincount(owner[shell], weights=(hu[shell] < AIR_RIM_HU), minlength=count + 1)
    total = np.bincount(owner[shell], minlength=count + 1)
    keep = air >= 0.5 * np.maximum(total, 1)
    keep[0] = False
    return keep[labels]


def _axial_hulls(mask: np.ndarray) -> np.ndarray:
    """The convex hull of ``mask`` in every axial slice: lung vessels where the field of view cuts a lung
    (so its hole cannot be filled) lie inside the chest's hull; tables and headrests lie outside it."""
    from skimage.morphology import convex_hull_image
    hulls = np.zeros(mask.shape, dtype=bool)
    for z in np.flatnonzero(mask.any(axis=(0, 1))):
        hulls[:, :, z] = convex_hull_image(mask[:, :, z])
    return hulls


def _fill_axial_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with, in every axial (x, y) slice, the background not connected to the slice's border
    filled: lungs and bowel gas make the body look thin (a chest wall) unless counted as body."""
    from scipy import ndimage
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[:, 1, 1] = in_plane[1, :, 1] = True
    labels, count = ndimage.label(~mask, structure=in_plane)
    outside = np.zeros(count + 1, dtype=bool)
    for face in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        outside[np.unique(face)] = True
    outside[0] = True
    return mask | ~outside[labels]


def island_voxels(min_island_mm3: float, step_mm: float) -> int:
    """The island threshold in voxels of the cube (rounded up; at least 1)."""
    return max(1, math.ceil(min_island_mm3 / step_mm**3 - 1e-9))
