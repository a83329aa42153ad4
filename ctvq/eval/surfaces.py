"""Zero-level surfaces of sparse SDFs as triangle meshes in patient millimetres, and PLY files of them.

A sparse field knows values only at some voxels (the decoded latent cells, or the band). It is scattered into
a dense box around those voxels only (never the full 512³ grid); unknown voxels get +1 (outside). A cube with
an unknown corner would produce a false surface where known inside voxels meet the +1 fill, so triangles of
such cubes are dropped: every true surface cube has all corners within ~1.7 voxels of the surface, i.e. in
the band, so no real surface is lost.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from skimage.measure import marching_cubes

from ctvq.atomic import atomic_output

_CORNERS = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.int64)


@dataclass(frozen=True)
class DenseBox:
    """Values of a sparse field on the box ``origin + index``; ``known`` marks the voxels that had a value."""

    values: np.ndarray  # float32 (X, Y, Z)
    known: np.ndarray  # bool (X, Y, Z)
    origin: np.ndarray  # (3,) int64: grid voxel of values[0, 0, 0]

    def lookup(self, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values, known) at grid voxels ``coords`` (N, 3); voxels outside the box are unknown."""
        local = np.asarray(coords, dtype=np.int64) - self.origin
        inside = np.all((local >= 0) & (local < np.array(self.values.shape)), axis=1)
        vals = np.full(local.shape[0], np.nan, dtype=np.float32)
        known = np.zeros(local.shape[0], dtype=bool)
        li = local[inside]
        vals[inside] = self.values[li[:, 0], li[:, 1], li[:, 2]]
        known[inside] = self.known[li[:, 0], li[:, 1], li[:, 2]]
        return vals, known


def bounding_box(*coord_sets: np.ndarray, pad: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(lo, shape) of the box holding every voxel of every set, ``pad`` voxels wider on each side."""
    nonempty = [np.asarray(c, dtype=np.int64) for c in coord_sets if len(c)]
    if not nonempty:
        raise ValueError("bounding_box: no voxels")
    lo = np.min([c.min(axis=0) for c in nonempty], axis=0) - pad
    hi = np.max([c.max(axis=0) for c in nonempty], axis=0) + pad
    return lo, hi - lo + 1


def dense_box(coords: np.ndarray, values: np.ndarray, lo: np.ndarray | None = None,
              shape: np.ndarray | None = None, fill: float = 1.0) -> DenseBox:
    """Scatter a sparse field into a dense box (default: its own bounding box padded by one voxel)."""
    coords = np.asarray(coords, dtype=np.int64)
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    if coords.ndim != 2 or coords.shape[1] != 3 or coords.shape[0] != values.shape[0]:
        raise ValueError(f"dense_box: coords {coords.shape} and values {values.shape} do not pair up")
    if lo is None or shape is None:
        lo, shape = bounding_box(coords)
    local = coords - lo
    if local.size and (local.min() < 0 or np.any(local.max(axis=0) >= shape)):
        raise ValueError("dense_box: voxels outside the requested box")
    grid = np.full(tuple(int(s) for s in shape), fill, dtype=np.float32)
    known = np.zeros(grid.shape, dtype=bool)
    grid[local[:, 0], local[:, 1], local[:, 2]] = values
    known[local[:, 0], local[:, 1], local[:, 2]] = True
    return DenseBox(grid, known, np.asarray(lo, dtype=np.int64))


@dataclass(frozen=True)
class Mesh:
    """A triangle mesh; vertices in mm (patient coordinates) unless stated otherwise."""

    vertices: np.ndarray  # (V, 3) float64
    faces: np.ndarray  # (F, 3) int64, counter-clockwise seen from outside (normals point outward)

    @property
    def num_faces(self) -> int:
        return int(self.faces.shape[0])

    @property
    def area(self) -> float:
        tri = self.vertices[self.faces]
        cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        return float(0.5 * np.linalg.norm(cross, axis=1).sum())

    @staticmethod
    def empty() -> Mesh:
        return Mesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64))


def to_patient_mm(points_vox: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel (x, y, z) positions (fractional allowed) -> patient mm through the 4x4 affine."""
    affine = np.asarray(affine, dtype=np.float64)
    return np.asarray(points_vox, dtype=np.float64) @ affine[:3, :3].T + affine[:3, 3]


def box_surface(box: DenseBox, affine: np.ndarray, level: float = 0.0) -> Mesh:
    """Level set (inside = below ``level``) of a box, in mm; drops triangles of cubes with unknown corners."""
    values = box.values
    if values.size == 0 or not (values.min() < level < values.max()):
        return Mesh.empty()
    # skimage's "descent" winding gives outward normals for a field that is negative inside (checked by the
    # signed volume of a sphere in the tests).
    verts, faces, _, _ = marching_cubes(values, level=level, gradient_direction="descent",
                                        allow_degenerate=True)
    faces = faces.astype(np.int64)
    cube = np.floor(verts[faces].mean(axis=1)).astype(np.int64)
    cube = np.clip(cube, 0, np.array(values.shape) - 2)
    corners = cube[:, None, :] + _CORNERS[None]
    all_known = box.known[corners[..., 0], corners[..., 1], corners[..., 2]].all(axis=1)
    faces = faces[all_known]
    if faces.shape[0] == 0:
        return Mesh.empty()
    used, inverse = np.unique(faces, return_inverse=True)
    faces = inverse.reshape(-1, 3)
    vertices = to_patient_mm(verts[used].astype(np.float64) + box.origin, affine)
    if np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]) < 0:  # a mirroring affine flips winding
        faces = faces[:, ::-1].copy()
    return Mesh(vertices, faces)


def sparse_surface(coords: np.ndarray, values: np.ndarray, affine: np.ndarray, level: float = 0.0) -> Mesh:
    """Zero-level mesh (mm) of a sparse field given at grid voxels ``coords`` (N, 3)."""
    if len(coords) == 0:
        return Mesh.empty()
    return box_surface(dense_box(coords, values), affine, level)


def no_surface_reason(values: np.ndarray, num_faces: int, level: float = 0.0) -> str | None:
    """Why a decoded field has no surface, in words for a user (None when its mesh has triangles).

    Every voxel on one side is what a collapsed decoder produces (sdf saturated at +1 on thin anatomy);
    both signs but no triangle means the sign changes only next to voxels that were not decoded.
    """
    if num_faces > 0:
        return None
    values = np.asarray(values).reshape(-1)
    inside = int(np.count_nonzero(values < level))
    if inside == 0:
        return f"all {values.size} decoded voxels are outside (sdf >= {level:g})"
    if inside == values.size:
        return f"all {values.size} decoded voxels are inside (sdf < {level:g})"
    return f"{inside} of {values.size} decoded voxels are inside, but no surface triangle joins them"


def write_ply(mesh: Mesh, path: str | os.PathLike) -> None:
    """Binary PLY (vertices in mm), atomically; 3D Slicer, MeshLab and trimesh read it."""
    import trimesh

    tm = trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces, process=False)
    data = tm.export(file_type="ply")
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def collapse_reason(recon: DenseBox, num_faces: int, occupancy_iou: float, input_faces: int) -> str | None:
    """Why a reconstruction counts as collapsed, in words (None when it does not).

    No surface at all (see ``no_surface_reason``), or a surface whose inside overlaps none of the input's
    (IoU 0 while the input has a surface): a few stray triangles elsewhere, measured on real bone at 64³
    (148 faces against 12,706), which a face count alone would let pass.
    """
    if num_faces == 0:  # the decoded values are read only then: a dense copy at every case costs memory
        return f"no reconstructed surface ({no_surface_reason(recon.values[recon.known], num_faces)})"
    if occupancy_iou == 0.0 and input_faces > 0:
        return (f"the reconstructed surface ({num_faces} faces, the input's has {input_faces}) encloses none "
                "of the input's inside (IoU 0)")
    return None


__all__ = ["DenseBox", "Mesh", "bounding_box", "box_surface", "collapse_reason", "dense_box",
           "no_surface_reason", "sparse_surface", "to_patient_mm", "write_ply"]
