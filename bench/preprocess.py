"""Benchmark: CT preprocessing (window + sdf + index) of a chest phantom, narrow band vs a full-grid EDT.

Both methods run the same CLI steps (``ctvq window``, ``ctvq index`` through their functions, files
written as the CLI writes them); only the sdf step differs:

- ``narrow_band``: ``ctvq sdf`` (sub-voxel interface distances, Eikonal marching inside the band only);
- ``reference``: the straightforward method: ``scipy.ndimage.distance_transform_edt`` of the inside and of
  the outside over the full grid, signed, shifted by half a voxel (centre-to-surface), then truncated.

Each method and window runs in a fresh subprocess, and reports that run's own peak (VmHWM, ``bench/rss.py``).
Accuracy is measured against the exact distance to the marching-cubes surface of the windowed volume
(point-to-triangle distances) on a random sample of voxels within the band in a crop with a safety margin. The
surface cleaning (``ctvq.ct.surface``: smoothing, body mask, island removal) is timed on its own in the
narrow-band run, step by step on the same scan, and reported as a share of that run's total. ``--input`` runs
a real scan instead of the phantom. Writes JSON (default ``bench/results/preprocess.json``).

    .venv/bin/python bench/preprocess.py [--resolution 512] [--windows lung bone]
        [--shape 512 512 200] [--spacing 0.7 0.7 1.5] [--samples 20000] [--out bench/results/preprocess.json]
        [--methods narrow_band reference] [--input SCAN]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rss import peak_rss_mb  # bench/ is the script's folder, so its siblings import by name

METHODS = ("narrow_band", "reference")


def _child(args: argparse.Namespace) -> None:
    """One method on one window, in this (fresh) process; prints a JSON line."""
    from ctvq.ct.band import BandField, compute_band, save_band
    from ctvq.ct.steps import run_index, run_window
    from ctvq.ct.volume_file import load_windowed

    work = Path(args.workdir)
    windowed, band_file, sample = (work / f"{args.window}_{name}.npz" for name in
                                   ("windowed", f"band_{args.child}", f"sample_{args.child}"))
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    run_window(Path(args.scan), windowed, args.window, None, None, args.resolution, "bench", quiet=True)
    seconds["window"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    volume = load_windowed(windowed)
    if args.child == "narrow_band":
        field = compute_band(volume, band=args.band)
    else:
        field = _reference_band(volume, args.band, BandField)
    del volume
    save_band(field, band_file)
    seconds["sdf"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_index(band_file, sample, quiet=True)
    seconds["index"] = time.perf_counter() - t0
    cleaning = None
    if args.child == "narrow_band":
        cleaning = _cleaning_seconds(Path(args.scan), args.window, args.resolution)
    print(json.dumps({"seconds": seconds, "total_seconds": sum(seconds.values()),
                      "cleaning_seconds": cleaning,
                      "peak_rss_gib": peak_rss_mb() / 1024,
                      "num_points": int(field.coords.shape[0]), "sample": str(sample)}))


def _cleaning_seconds(scan: Path, window: str, resolution: int) -> dict[str, float]:
    """Seconds of each surface-cleaning step with the window's default settings, run on their own."""
    from dataclasses import replace

    from ctvq.ct.band import extent_box, surface_volume
    from ctvq.ct.io import read_ct
    from ctvq.ct.resample import canonical_orientation, resample_to_cube, scan_extent
    from ctvq.ct.surface import foreign_objects, island_voxels, smooth_hu, surface_settings
    from ctvq.ct.windows import WINDOWS

    settings = surface_settings(window)
    ct = canonical_orientation(read_ct(scan))
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    smoothed = replace(ct, hu=smooth_hu(ct.hu, ct.spacing, settings.smooth_mm)) if settings.smooth_mm else ct
    out["smooth"] = time.perf_counter() - t0
    cube, affine = resample_to_cube(smoothed, resolution, pad=settings.pad)
    step = float(np.linalg.norm(affine[:3, 0]))
    t0 = time.perf_counter()
    foreign = foreign_objects(cube, step, scan_extent(ct, affine)) if settings.body_mask else None
    out["body_mask"] = time.perf_counter() - t0
    values = WINDOWS[window].apply(cube, out=cube)
    if foreign is not None:
        np.copyto(values, np.float32(0.0), where=foreign)
    del foreign
    t0 = time.perf_counter()
    box = extent_box(scan_extent(ct, affine), resolution) if settings.pad == "edge" else (slice(None),) * 3
    surface_volume(values, 0.5, island_voxels(settings.min_island_mm3, step), box)
    out["islands"] = time.perf_counter() - t0
    out["total"] = sum(out.values())
    return out


def _reference_band(volume: Any, band: float, band_type: type) -> Any:
    """Full-grid exact EDT both ways (float64), signed, half-voxel shift, truncated; same inside bits."""
    from scipy import ndimage

    from ctvq.ct.band import flat_cells
    from ctvq.ct.sample import CELL_VOXELS

    inside = volume.values > 0.5
    outside_d = ndimage.distance_transform_edt(~inside)
    inside_d = ndimage.distance_transform_edt(inside)
    signed = np.where(inside, 0.5 - inside_d, outside_d - 0.5)
    del outside_d, inside_d
    flat = np.flatnonzero(np.abs(signed) <= band)
    coords = np.stack(np.unravel_index(flat, signed.shape), axis=1).astype(np.int16)
    sdf = (signed.ravel()[flat] / band).astype(np.float32)
    del signed
    res = volume.resolution
    side = res // 8
    cells = np.unique(flat_cells(coords, res))
    latent = np.stack(np.unravel_index(cells, (side,) * 3), axis=1).astype(np.int16)
    blocks = inside.reshape(side, 8, side, 8, side, 8)[latent[:, 0], :, latent[:, 1], :, latent[:, 2], :]
    bits = np.packbits(blocks.reshape(-1, CELL_VOXELS), axis=1)
    return band_type(coords=coords, sdf=sdf, latent_coords=latent, inside_bits=bits, band=band, iso_value=0.5,
                     resolution=res, affine=volume.affine, window=volume.window, case_id=volume.case_id,
                     source=volume.source, spacing=volume.spacing)


def _point_triangle_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance from points p (K, 3) to triangles (K, 3) x 3 (closest-point regions)."""
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = (ab * ap).sum(1), (ac * ap).sum(1)
    bp, cp = p - b, p - c
    d3, d4 = (ab * bp).sum(1), (ac * bp).sum(1)
    d5, d6 = (ab * cp).sum(1), (ac * cp).sum(1)
    va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = va + vb + vc
        v, w = vb / denom, vc / denom
        closest = a + ab * v[:, None] + ac * w[:, None]  # interior
        t_ab = d1 / (d1 - d3)
        on_ab = (vc <= 0) & (d1 >= 0) & (d3 <= 0)
        closest = np.where(on_ab[:, None], a + ab * t_ab[:, None], closest)
        t_ac = d2 / (d2 - d6)
        on_ac = (vb <= 0) & (d2 >= 0) & (d6 <= 0)
        closest = np.where(on_ac[:, None], a + ac * t_ac[:, None], closest)
        t_bc = (d4 - d3) / ((d4 - d3) + (d5 - d6))
        on_bc = (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0)
        closest = np.where(on_bc[:, None], b + (c - b) * t_bc[:, None], closest)
    closest = np.where(((d1 <= 0) & (d2 <= 0))[:, None], a, closest)
    closest = np.where(((d3 >= 0) & (d4 <= d3))[:, None], b, closest)
    closest = np.where(((d6 >= 0) & (d5 <= d6))[:, None], c, closest)
    return np.linalg.norm(p - closest, axis=1)


def _accuracy(windowed_path: Path, samples: dict[str, Path], band: float, count: int, seed: int
              ) -> dict[str, Any]:
    """Errors of each method against the exact distance to the marching-cubes surface (voxels)."""
    from scipy.spatial import cKDTree
    from skimage.measure import marching_cubes

    from ctvq.ct.preview import dense_sdf
    from ctvq.ct.sample import load_sample
    from ctvq.ct.volume_file import load_windowed

    values = load_windowed(windowed_path).values
    loaded = {m: load_sample(p) for m, p in samples.items()}
    rng = np.random.default_rng(seed)
    margin = int(np.ceil(band)) + 2
    size = min(96, values.shape[0] - 2 * margin)
    coords = loaded["narrow_band"].coords
    centre = coords[rng.integers(coords.shape[0])].astype(int)
    lo = np.clip(centre - size // 2 - margin, 0, values.shape[0] - size - 2 * margin)
    crop = values[lo[0]:lo[0] + size + 2 * margin, lo[1]:lo[1] + size + 2 * margin,
                  lo[2]:lo[2] + size + 2 * margin]
    verts, faces, _, _ = marching_cubes(crop, level=0.5)
    tri = verts[faces]
    tree = cKDTree(tri.mean(axis=1))
    grids = {m: dense_sdf(s)[lo[0]:lo[0] + crop.shape[0], lo[1]:lo[1] + crop.shape[1],
                             lo[2]:lo[2] + crop.shape[2]] for m, s in loaded.items()}
    inner = np.zeros(crop.shape, bool)
    inner[margin:-margin, margin:-margin, margin:-margin] = True
    valid = inner.copy()
    for grid in grids.values():
        valid &= np.isfinite(grid)
    points = np.argwhere(valid)
    points = points[rng.choice(points.shape[0], size=min(count, points.shape[0]), replace=False)]
    _, near = tree.query(points, k=16)
    dist = np.full(points.shape[0], np.inf)
    for j in range(near.shape[1]):
        t = tri[near[:, j]]
        dist = np.minimum(dist, _point_triangle_distance(points.astype(float), t[:, 0], t[:, 1], t[:, 2]))
    truth = np.where(crop[tuple(points.T)] > 0.5, -dist, dist)
    keep = np.abs(truth) <= band
    result: dict[str, Any] = {"voxels_compared": int(keep.sum()), "crop_origin": lo.tolist(),
                              "crop_size": int(crop.shape[0])}
    for method, grid in grids.items():
        error = np.abs(grid[tuple(points[keep].T)] * band - truth[keep])
        result[method] = {"median_abs_error_vox": float(np.median(error)),
                          "p95_abs_error_vox": float(np.percentile(error, 95)),
                          "max_abs_error_vox": float(error.max())}
    sets = ([set(map(tuple, s.coords.tolist())) for s in loaded.values()]
            if coords.shape[0] < 3e6 and len(loaded) == 2 else None)
    if sets is not None:
        result["band_jaccard"] = len(sets[0] & sets[1]) / len(sets[0] | sets[1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--windows", nargs="+", default=["lung", "bone"])
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 200))
    parser.add_argument("--spacing", type=float, nargs=3, default=(0.7, 0.7, 1.5))
    parser.add_argument("--band", type=float, default=None,
                        help="SDF band half-width in voxels (default: each window's ctvq default)")
    parser.add_argument("--samples", type=int, default=20000, help="voxels for the accuracy check")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="leave out 'reference' where its full-grid EDT cannot fit (~65 GiB at 1024)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/preprocess.json"))
    parser.add_argument("--input", type=Path, help="a real scan (file or DICOM folder), not the phantom")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--scan", help=argparse.SUPPRESS)
    parser.add_argument("--window", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0

    from ctvq.atomic import atomic_output
    from ctvq.ct.band import default_band
    from ctvq.ct.io import write_ct
    from ctvq.ct.phantom import chest_phantom

    results: dict[str, Any] = {
        "benchmark": "preprocess", "resolution": args.resolution, "phantom_shape": list(args.shape),
        "phantom_spacing_mm": list(args.spacing), "band_vox": args.band or "per window",
        "python": platform.python_version(),
        "machine": platform.machine(), "cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "command": " ".join([sys.executable, *sys.argv]), "windows": {}}
    with tempfile.TemporaryDirectory(prefix="ctvq-bench-") as tmp:
        work = Path(tmp)
        scan = work / "chest.nii.gz"
        if args.input is not None:
            scan = args.input.resolve()
            results["input"] = str(args.input)
        else:
            write_ct(chest_phantom(tuple(args.shape), tuple(args.spacing), seed=args.seed), scan)
        for window in args.windows:
            band = args.band if args.band is not None else default_band(window)
            entry: dict[str, Any] = {"band_vox": band}
            for method in args.methods:
                cmd = [sys.executable, __file__, "--child", method, "--scan", str(scan), "--window", window,
                       "--workdir", str(work), "--resolution", str(args.resolution), "--band", str(band)]
                done = subprocess.run(cmd, check=True, capture_output=True, text=True)
                entry[method] = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{window} {method}: {entry[method]['total_seconds']:.1f} s "
                      f"(sdf {entry[method]['seconds']['sdf']:.1f} s), "
                      f"peak RSS {entry[method]['peak_rss_gib']:.2f} GiB", flush=True)
                clean = entry[method].get("cleaning_seconds")
                if clean:
                    share = clean["total"] / entry[method]["total_seconds"]
                    entry[method]["cleaning_share"] = share
                    print(f"{window} {method}: surface cleaning {clean['total']:.2f} s = {100 * share:.1f} % "
                          f"of preprocessing (smooth {clean['smooth']:.2f}, body mask "
                          f"{clean['body_mask']:.2f}, islands {clean['islands']:.2f} s)", flush=True)
            if len(args.methods) == 2:
                nb, ref = entry["narrow_band"], entry["reference"]
                entry["speedup_total"] = ref["total_seconds"] / nb["total_seconds"]
                entry["speedup_sdf_step"] = ref["seconds"]["sdf"] / nb["seconds"]["sdf"]
                print(f"{window}: speedup total {entry['speedup_total']:.1f}x, sdf step "
                      f"{entry['speedup_sdf_step']:.1f}x", flush=True)
            entry["accuracy"] = _accuracy(work / f"{window}_windowed.npz",
                                          {m: Path(entry[m].pop("sample")) for m in args.methods},
                                          band, args.samples, args.seed)
            print(f"{window}: accuracy {json.dumps(entry['accuracy'])}", flush=True)
            results["windows"][window] = entry
    with atomic_output(args.out) as tmp_out:
        tmp_out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
