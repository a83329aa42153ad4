"""Meshes of sparse SDFs: patient-mm placement, outward winding, PLY round trip, no false surfaces."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from ctvq.eval.surfaces import dense_box, sparse_surface, write_ply

AFFINE = np.array([[-0.7, 0.0, 0.0, 20.0], [0.0, 0.9, 0.0, -5.0], [0.0, 0.0, 1.3, 100.0], [0, 0, 0, 1.0]])


def test_sphere_ply_loads_in_trimesh_with_bounds_and_volume_in_mm(tmp_path):
    grid, radius = 40, 10.0
    idx = np.stack(np.meshgrid(*[np.arange(grid)] * 3, indexing="ij"), -1).reshape(-1, 3)
    mm = idx @ AFFINE[:3, :3].T + AFFINE[:3, 3]
    centre = np.array([17.0, 21.0, 19.0]) @ AFFINE[:3, :3].T + AFFINE[:3, 3]
    dist = np.linalg.norm(mm - centre, axis=1) - radius
    band = np.abs(dist) < 3.0
    mesh = sparse_surface(idx[band], dist[band] / 3.0, AFFINE)
    path = tmp_path / "sphere.ply"
    write_ply(mesh, path)
    loaded = trimesh.load(path)
    np.testing.assert_allclose(loaded.bounds, [centre - radius, centre + radius], atol=0.05)
    # Outward normals (positive volume) even though the affine mirrors x.
    assert loaded.volume == pytest.approx(4 / 3 * np.pi * radius**3, rel=0.02)
    assert loaded.is_watertight


def test_known_inside_voxels_next_to_unknown_ones_make_no_surface():
    # One latent cell entirely inside (-1) with nothing known around it: the +1 fill must not draw a box.
    idx = np.stack(np.meshgrid(*[np.arange(8)] * 3, indexing="ij"), -1).reshape(-1, 3) + 8
    assert sparse_surface(idx, -np.ones(len(idx)), AFFINE).num_faces == 0


def test_dense_box_lookup_returns_values_and_marks_unknown_voxels():
    box = dense_box(np.array([[2, 3, 4], [5, 5, 5]]), np.array([0.25, -0.5]))
    values, known = box.lookup(np.array([[5, 5, 5], [2, 3, 4], [3, 3, 3], [50, 0, 0]]))
    np.testing.assert_array_equal(known, [True, True, False, False])
    np.testing.assert_allclose(values[:2], [-0.5, 0.25])
