"""Memory and time to request from a scheduler per preprocessing step, scaled from measured peaks by voxel
count.

A SLURM job that asks for too little is killed (and too much wastes the queue): at resolution 1024 the window
step peaks near 9 GiB and the sdf step of a real chest/abdomen CT at 17 GiB. Each step's memory is
dominated by resolution³ arrays, so the request scales the peak measured at 1024 by (resolution / 1024)³,
adds headroom for larger scans and other windows, and never drops below a floor for the interpreter and
libraries.
"""

from __future__ import annotations

import math
import os

# Peak RSS (GiB) at resolution 1024, lung window (the largest band), one `ctvq <step>` process each (GNU
# time), the larger of two scans: the 512x512x200 chest phantom at 0.7x0.7x1.5 mm (window 8.6, sdf 9.3,
# index 2.1) and the real TotalSegmentator aorta CT, chest and abdomen (window 8.2, sdf 17.4, index 3.2: its
# band holds 2.6x the phantom's voxels).
PEAK_GIB_AT_1024 = {"window": 8.6, "sdf": 17.4, "index": 3.2}
HEADROOM = 1.5
FLOOR_MB = 4000
STEP_MB = 500


def preprocess_mem_mb(step: str, resolution: int) -> int:
    """Megabytes to request for `ctvq <step>` at `resolution` (a multiple of 500, at least 4000)."""
    if step not in PEAK_GIB_AT_1024:
        raise ValueError(f"no memory estimate for step {step!r}; known steps: {', '.join(PEAK_GIB_AT_1024)}")
    if resolution < 1:
        raise ValueError(f"resolution={resolution} must be >= 1")
    peak_mb = PEAK_GIB_AT_1024[step] * 1024 * (resolution / 1024) ** 3
    request = max(FLOOR_MB, HEADROOM * peak_mb)
    return int(math.ceil(request / STEP_MB) * STEP_MB)


# Seconds at resolution 1024, lung window of the same phantom (bench/results/preprocess_1024.json).
SECONDS_AT_1024 = {"window": 31.8, "sdf": 38.6, "index": 16.3}
TIME_HEADROOM = 4.0  # real scans are larger than the phantom, and a shared node is slower
FLOOR_MINUTES = 5


def preprocess_runtime_minutes(step: str, resolution: int) -> int:
    """Minutes to request for `ctvq <step>` at `resolution` (at least 5): a case's chain of steps is a
    group job, whose time limit Snakemake adds up from these, so a flat default (an hour per step) would
    ask a scheduler for days."""
    if step not in SECONDS_AT_1024:
        raise ValueError(f"no time estimate for step {step!r}; known steps: {', '.join(SECONDS_AT_1024)}")
    if resolution < 1:
        raise ValueError(f"resolution={resolution} must be >= 1")
    minutes = TIME_HEADROOM * SECONDS_AT_1024[step] * (resolution / 1024) ** 3 / 60
    return max(FLOOR_MINUTES, math.ceil(minutes))


def machine_memory_bytes() -> int | None:
    """Physical memory of this machine, or None where the OS does not say (no sysconf: Windows)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return None


def preprocess_peak_bytes(resolution: int) -> int:
    """The measured peak of the hungriest preprocessing step, scaled to ``resolution`` (no headroom)."""
    return int(max(PEAK_GIB_AT_1024.values()) * 2**30 * (resolution / 1024) ** 3)
