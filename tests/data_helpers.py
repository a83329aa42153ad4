"""Synthetic training samples that honour the sample contract, built from analytic signed distances.

Tests of the datasets, the crop and the collate need real `SparseSample`s without running the CT pipeline.
A union of spheres on a small grid gives an exact signed distance, so the band, the inside mask and the
decoder targets are known in closed form and the samples exercise every field of the contract.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ctvq.ct import manifest as ct_manifest
from ctvq.ct.sample import LATENT_STRIDE, SparseSample, save_sample
from ctvq.ct.splits import ALL_TRAIN, SplitRule
from ctvq.ct.windows import WINDOWS

NO_CROP = 10**6  # a dataset max_points above every test sample's point count
WINDOW_WL = {name: (w.width, w.level) for name, w in WINDOWS.items()}


def spheres_distance(resolution: int, spheres: Sequence[tuple[float, float, float, float]]) -> np.ndarray:
    """Signed distance in voxels (negative inside) to a union of spheres (cx, cy, cz, radius), x-y-z order."""
    if not spheres:
        raise ValueError("spheres_distance needs at least one sphere")
    axis = np.arange(resolution, dtype=np.float32)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    dist = np.full((resolution,) * 3, np.inf, dtype=np.float32)
    for cx, cy, cz, r in spheres:
        np.minimum(dist, np.sqrt((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) - r, out=dist)
    return dist


def sample_from_distance(
    dist: np.ndarray,
    *,
    case_id: str,
    band: float = 3.0,
    window: str = "lung",
    window_width: float | None = None,
    window_level: float | None = None,
    affine: np.ndarray | None = None,
) -> SparseSample:
    """Turn a dense signed-distance grid (voxels) into a contract-conforming sample.

    Band voxels are |d| <= band, sorted by latent cell (lexicographic) then local C-order index, exactly as
    `ctvq index` must write them; ``inside_bits`` covers all 512 children of every occupied latent cell.
    """
    res = dist.shape[0]
    if dist.shape != (res, res, res) or res % LATENT_STRIDE:
        raise ValueError(f"distance grid must be a cube with a multiple-of-8 side, got {dist.shape}")
    width, level = WINDOW_WL.get(window, (window_width, window_level))
    width = width if window_width is None else window_width
    level = level if window_level is None else window_level
    if width is None or level is None:
        raise ValueError(f"window {window!r} is not named; pass window_width and window_level")
    coords = np.argwhere(np.abs(dist) <= band).astype(np.int64)
    lat = coords // LATENT_STRIDE
    local = coords % LATENT_STRIDE
    n_lat = res // LATENT_STRIDE
    cell_key = (lat[:, 0] * n_lat + lat[:, 1]) * n_lat + lat[:, 2]
    local_key = (local[:, 0] * LATENT_STRIDE + local[:, 1]) * LATENT_STRIDE + local[:, 2]
    order = np.argsort(cell_key * LATENT_STRIDE**3 + local_key, kind="stable")
    coords, cell_key = coords[order], cell_key[order]
    keys, first, counts = np.unique(cell_key, return_index=True, return_counts=True)
    latent = coords[first] // LATENT_STRIDE
    cell_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    blocks = dist.reshape(n_lat, LATENT_STRIDE, n_lat, LATENT_STRIDE, n_lat, LATENT_STRIDE)
    blocks = blocks.transpose(0, 2, 4, 1, 3, 5).reshape(n_lat**3, LATENT_STRIDE**3)
    inside_bits = np.packbits(blocks[keys] < 0, axis=1)
    sdf = np.clip(dist[coords[:, 0], coords[:, 1], coords[:, 2]] / band, -1.0, 1.0).astype(np.float32)
    sample = SparseSample(
        case_id=case_id, window=window, window_width=float(width), window_level=float(level), iso_value=0.5,
        resolution=res, band=float(band), affine=np.eye(4) if affine is None else affine,
        coords=coords.astype(np.int16), sdf=sdf, latent_coords=latent.astype(np.int16),
        cell_start=cell_start, inside_bits=inside_bits, source=f"synthetic/{case_id}",
        spacing=np.array([0.7, 0.7, 2.0]),
    )
    sample.validate(f"<synthetic {case_id}>")
    return sample


def sphere_sample(
    case_id: str,
    *,
    resolution: int = 64,
    spheres: Sequence[tuple[float, float, float, float]] | None = None,
    window: str = "lung",
    band: float = 3.0,
    window_width: float | None = None,
    window_level: float | None = None,
) -> SparseSample:
    """One sample of a union of spheres; the default is a single centred sphere of radius resolution/4."""
    half = resolution / 2
    spheres = spheres if spheres is not None else [(half, half, half, resolution / 4)]
    affine = np.diag([0.7, 0.7, 2.0, 1.0])
    return sample_from_distance(spheres_distance(resolution, spheres), case_id=case_id, band=band,
                                window=window, window_width=window_width, window_level=window_level,
                                affine=affine)


def write_cases(
    folder: Path, radii: Sequence[float], *, resolution: int = 64, window: str = "lung"
) -> list[Path]:
    """Write one centred-sphere sample per radius as ``case{i}.npz``; a tiny radius gives a tiny case."""
    paths = []
    half = resolution / 2
    for i, radius in enumerate(radii):
        sample = sphere_sample(f"case{i}", resolution=resolution, window=window,
                               spheres=[(half + 0.3 * i, half - 0.2 * i, half + 0.1 * i, radius)])
        path = folder / f"case{i}.npz"
        save_sample(sample, path)
        paths.append(path)
    return paths


def write_manifest(path: Path, sample_paths: Sequence[Path], *, min_points: int = 100,
                   split: SplitRule = ALL_TRAIN) -> Path:
    """A manifest CSV for already written samples, made by the real `ctvq manifest` code.

    Every case is train unless ``split`` says otherwise: these tests are about the data, not the hold-out.
    """
    table = ct_manifest.manifest_table(sample_paths, path.parent, min_points=min_points, split=split)
    ct_manifest.write_manifest(table, path)
    return path


def bench_module(name: str):
    """``bench/<name>.py`` as a module (bench scripts import their siblings by name, as run as scripts)."""
    import importlib
    import sys

    bench = str(Path(__file__).resolve().parents[1] / "bench")
    sys.path.insert(0, bench)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(bench)
