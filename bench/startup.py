"""Startup time of the ``ctvq`` command line: wall time of ``--help`` runs, median of several fresh processes.

Preprocessing commands run once per scan and window in the workflow, so their fixed start-up cost (imports)
multiplies; they must not import torch. The goal on a 2-core machine is <= 0.5 s for ``window``/``index``;
``train --help`` imports the trainer (torch) and is listed for contrast.

    python bench/startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMANDS = (["window", "--help"], ["index", "--help"], ["train", "--help"])


def wall_times(args: list[str], runs: int) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ctvq", *args], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per command (default 5)")
    runs = parser.parse_args().runs
    wall_times(["--help"], 1)  # warm the file cache so the first row is not penalised
    print(f"{'command':<20} {'median s':>9} {'min s':>7} {'max s':>7}")
    for args in COMMANDS:
        times = wall_times(args, runs)
        print(f"{'ctvq ' + ' '.join(args):<20} {statistics.median(times):>9.3f} {min(times):>7.3f} "
              f"{max(times):>7.3f}")


if __name__ == "__main__":
    main()
