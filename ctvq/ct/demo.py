"""``ctvq demo``: the preprocessing half of the pipeline on embedded phantom data, start to finish.

Layout under the output folder: ``scans/<case>.nii.gz``, ``<window>/{windowed,band,samples}/<case>.npz``,
``<window>/manifest.csv`` and ``previews/<case>_<window>.png``. Each step is the CLI step's own function.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from ctvq.ct.manifest import manifest_table, write_manifest
from ctvq.ct.preview import save_preview
from ctvq.ct.sample import load_sample
from ctvq.ct.steps import run_index, run_phantom, run_sdf, run_window
from ctvq.ct.volume_file import load_windowed

DEMO_SHAPE = (224, 224, 72)
DEMO_SPACING = (0.7, 0.7, 2.0)


def run_demo(output_dir: Path, cases: int, resolution: int, windows: Sequence[str], band: float = 3.0,
             min_points: int = 100) -> None:
    if cases < 1:
        raise ValueError(f"--cases {cases}: need at least one case")
    start = time.perf_counter()
    samples: dict[str, list[Path]] = {w: [] for w in windows}
    for i in range(cases):
        case = f"case_{i:03d}"
        scan = output_dir / "scans" / f"{case}.nii.gz"
        run_phantom(scan, seed=i, shape=DEMO_SHAPE, spacing=DEMO_SPACING, noise=12.0, quiet=True)
        counts = []
        for window in windows:
            folder = output_dir / window
            windowed = folder / "windowed" / f"{case}.npz"
            band_file = folder / "band" / f"{case}.npz"
            sample_file = folder / "samples" / f"{case}.npz"
            run_window(scan, windowed, window, None, None, resolution, case, quiet=True)
            run_sdf(windowed, band_file, band, 0.5, quiet=True)
            run_index(band_file, sample_file, quiet=True)
            sample = load_sample(sample_file)
            preview = output_dir / "previews" / f"{case}_{window}.png"
            save_preview(load_windowed(windowed).values, sample, preview)
            samples[window].append(sample_file)
            counts.append(f"{window} {sample.num_points} pts/{sample.num_latent} cells")
        elapsed = time.perf_counter() - start
        print(f"[{i + 1}/{cases}] {case}: {', '.join(counts)} ({elapsed:.1f} s)", flush=True)
    for window, paths in samples.items():
        manifest = output_dir / window / "manifest.csv"
        write_manifest(manifest_table(paths, manifest.parent, min_points), manifest)
        print(f"manifest: {manifest}", flush=True)
    print(f"done in {time.perf_counter() - start:.1f} s; previews in {output_dir / 'previews'}", flush=True)
