"""Metrics on cases with known answers: identical and offset surfaces, a sphere vs itself and a larger one."""

from __future__ import annotations

import numpy as np
import pytest
from data_helpers import sample_from_distance, spheres_distance

from ctvq.ct.sample import decoder_targets
from ctvq.eval.evaluate import compare_fields
from ctvq.eval.metrics import (
    SurfaceIndex,
    code_histogram,
    codebook_stats,
    occupancy_iou,
    point_triangle_distance,
    surface_distances,
    voxel_edge_mm,
)
from ctvq.eval.surfaces import sparse_surface
from ctvq.eval.tokens import cell_voxels

# Anisotropic, mirrored, translated voxel grid: lengths must come out in mm through it.
AFFINE = np.array([[-0.7, 0.0, 0.0, 20.0], [0.0, 0.9, 0.0, -5.0], [0.0, 0.0, 1.3, 100.0], [0, 0, 0, 1.0]])
GRID = 40


def sphere_mesh(radius_mm: float, shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)):
    """Band of a sphere's exact signed distance (mm) on the anisotropic grid, meshed in mm."""
    idx = np.stack(np.meshgrid(*[np.arange(GRID)] * 3, indexing="ij"), -1).reshape(-1, 3)
    mm = idx @ AFFINE[:3, :3].T + AFFINE[:3, 3]
    centre = np.array([GRID / 2] * 3) @ AFFINE[:3, :3].T + AFFINE[:3, 3] + np.asarray(shift_mm)
    dist = np.linalg.norm(mm - centre, axis=1) - radius_mm
    keep = np.abs(dist) < 3.0
    return sparse_surface(idx[keep], dist[keep] / 3.0, AFFINE), centre


def test_identical_surfaces_give_chamfer_zero_and_fscore_one():
    mesh, _ = sphere_mesh(10.0)
    out = surface_distances(mesh.vertices, mesh.faces, mesh.vertices, mesh.faces, points=5000, seed=3)
    assert out["chamfer_l1_mm"] == pytest.approx(0.0, abs=1e-9)
    assert out["chamfer_l2_mm2"] == pytest.approx(0.0, abs=1e-12)
    assert out["fscore_0.5mm"] == 1.0 and out["fscore_1mm"] == 1.0


def test_surface_offset_by_one_mm_gives_chamfer_one_mm():
    inner, _ = sphere_mesh(10.0)
    outer, _ = sphere_mesh(11.0)
    out = surface_distances(outer.vertices, outer.faces, inner.vertices, inner.faces, points=5000, seed=0)
    assert out["chamfer_l1_mm"] == pytest.approx(1.0, abs=0.03)
    assert out["chamfer_l2_mm2"] == pytest.approx(1.0, abs=0.06)
    assert out["fscore_0.5mm"] == 0.0


def test_voxel_unit_metrics_scale_by_the_voxel_edge():
    """A 1 mm offset is half a voxel of 2 mm (every point within one voxel) and two voxels of 0.5 mm."""
    inner, _ = sphere_mesh(10.0)
    outer, _ = sphere_mesh(11.0)
    args = (outer.vertices, outer.faces, inner.vertices, inner.faces)
    plain = surface_distances(*args, points=5000, seed=0)
    coarse = surface_distances(*args, points=5000, seed=0, voxel_mm=2.0)
    fine = surface_distances(*args, points=5000, seed=0, voxel_mm=0.5)
    assert coarse["chamfer_l1_vox"] == pytest.approx(plain["chamfer_l1_mm"] / 2.0)
    assert coarse["fscore_1vox"] == 1.0 and fine["fscore_1vox"] == 0.0
    assert {k: coarse[k] for k in plain} == plain and "fscore_2mm" not in coarse  # mm keys unchanged
    assert fine["fscore_1vox"] == fine["fscore_0.5mm"]  # a voxel edge that is also a mm threshold keeps both
    empty = np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    none = surface_distances(*empty, inner.vertices, inner.faces, points=100, voxel_mm=1.0)
    assert none["chamfer_l1_vox"] is None and none["fscore_1vox"] == 0.0 and none["fscore_1mm"] == 0.0


def test_translated_plane_by_one_mm_gives_chamfer_one_mm():
    idx = np.stack(np.meshgrid(*[np.arange(24)] * 3, indexing="ij"), -1).reshape(-1, 3)
    mm = idx @ AFFINE[:3, :3].T + AFFINE[:3, 3]
    level = mm[:, 1].mean()
    a = sparse_surface(idx, np.clip((mm[:, 1] - level) / 3, -1, 1), AFFINE)
    b = sparse_surface(idx, np.clip((mm[:, 1] - level - 1.0) / 3, -1, 1), AFFINE)
    out = surface_distances(b.vertices, b.faces, a.vertices, a.faces, points=4000, seed=1)
    # Points near the plane's rim see the other plane's edge slightly farther away: a small excess.
    assert out["chamfer_l1_mm"] == pytest.approx(1.0, abs=0.02)


def test_point_triangle_distance_matches_dense_sampling_of_the_triangle():
    rng = np.random.default_rng(0)
    a, b, c = rng.normal(size=(3, 3))
    points = rng.normal(scale=2.0, size=(50, 3))
    u, v = np.meshgrid(np.linspace(0, 1, 400), np.linspace(0, 1, 400))
    keep = u + v <= 1
    dense = a + u[keep, None] * (b - a) + v[keep, None] * (c - a)
    brute = np.array([np.linalg.norm(dense - p, axis=1).min() for p in points])
    exact = point_triangle_distance(points, *(np.repeat(t[None], len(points), 0) for t in (a, b, c)))
    assert np.all(exact <= brute + 1e-12)
    np.testing.assert_allclose(exact, brute, atol=0.01)


def test_surface_index_agrees_with_brute_force_over_all_triangles():
    mesh, centre = sphere_mesh(8.0)
    rng = np.random.default_rng(1)
    points = centre + rng.normal(scale=6.0, size=(300, 3))
    tri = mesh.vertices[mesh.faces]
    brute = np.array([point_triangle_distance(np.repeat(p[None], len(tri), 0), tri[:, 0], tri[:, 1],
                                              tri[:, 2]).min() for p in points])
    fast = SurfaceIndex.build(mesh.vertices, mesh.faces).distance(points)
    assert np.all(fast >= brute - 1e-9)
    np.testing.assert_allclose(fast, brute, rtol=1e-2, atol=1e-9)


def test_empty_reconstruction_has_no_chamfer_and_zero_fscore():
    mesh, _ = sphere_mesh(10.0)
    empty = np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    out = surface_distances(*empty, mesh.vertices, mesh.faces, points=100)
    assert out["chamfer_l1_mm"] is None and out["fscore_1mm"] == 0.0


def test_sphere_reconstructed_from_its_own_sdf_has_iou_one_and_no_error():
    affine = np.diag([0.8, 0.8, 0.8, 1.0])
    dist = spheres_distance(64, [(31.3, 30.8, 32.2, 12.0)])
    sample = sample_from_distance(dist, case_id="s", affine=affine)
    coords = cell_voxels(sample.latent_coords)
    _, _, out = compare_fields(sample, coords, decoder_targets(sample).reshape(-1))
    assert out["occupancy_iou"] == 1.0
    assert out["sdf_mae_vox"] == 0.0 and out["sdf_mae_mm"] == 0.0


def test_sphere_reconstructed_one_voxel_larger_has_expected_iou_and_sdf_error():
    affine = np.diag([0.8, 0.8, 0.8, 1.0])
    centre, radius = (31.3, 30.8, 32.2), 12.0
    sample = sample_from_distance(spheres_distance(64, [(*centre, radius)]), case_id="s", affine=affine)
    coords = cell_voxels(sample.latent_coords)
    larger = np.linalg.norm(coords - np.array(centre), axis=1) - (radius + 1.0)
    _, _, out = compare_fields(sample, coords, np.clip(larger / sample.band, -1, 1))
    # Every voxel inside the input sphere is inside the larger one: IoU = volume ratio (r / (r + 1))^3.
    assert out["occupancy_iou"] == pytest.approx((radius / (radius + 1)) ** 3, abs=0.03)
    # The SDF is off by exactly one voxel except where clipping at -band hides part of it (d < -2).
    d = sample.sdf * sample.band
    expected = np.mean(np.abs(np.clip(d - 1, -3, 3) - d))
    assert out["sdf_mae_vox"] == pytest.approx(expected, rel=1e-5)
    assert out["sdf_mae_mm"] == pytest.approx(expected * 0.8, rel=1e-5)


def test_iou_is_one_for_two_empty_masks_and_zero_for_disjoint_ones():
    assert occupancy_iou(np.zeros(5, bool), np.zeros(5, bool)) == 1.0
    assert occupancy_iou(np.array([1, 0], bool), np.array([0, 1], bool)) == 0.0


def test_codebook_usage_and_perplexity_of_a_uniform_half_codebook():
    counts = code_histogram(np.array([0, 1, 2, 3] * 5), 8)
    stats = codebook_stats(counts)
    assert stats["codebook_usage"] == 0.5
    assert stats["perplexity"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="outside"):
        code_histogram(np.array([8]), 8)


def test_voxel_edge_is_the_column_norm():
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) * 0.5
    affine = np.eye(4)
    affine[:3, :3] = rot
    assert voxel_edge_mm(affine) == pytest.approx(0.5)


def test_offset_iou_is_the_iou_of_the_surface_moved_by_the_offset() -> None:
    from ctvq.eval.metrics import offset_iou

    slab = np.array([1.5, 0.5, -0.5, -1.5, -0.5, 0.5, 1.5])  # 3 voxels inside, distances in voxels
    assert offset_iou(slab, 0.6) == pytest.approx(3 / 5)  # grows by one voxel on each side
    assert offset_iou(slab, -0.6) == pytest.approx(1 / 3)  # shrinks to the middle voxel
    assert offset_iou(slab, 0.1) == 1.0
