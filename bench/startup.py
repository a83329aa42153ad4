"""Startup time of the ``ctvq`` command line: wall time of ``--help`` runs, median of several fresh processes.

Preprocessing commands run once per scan and window in the workflow, so their fixed start-up cost (imports)
multiplies; they must not import torch. The goal on a 2-core machine is <= 0.5 s for ``window``/``index``;
``train --help`` imports the trainer (torch) and is listed for contrast. CPU seconds (user + system) are
printed too: on shared cores they move less than wall time when other jobs compete.

    python bench/startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

COMMANDS = (["window", "--help"], ["index", "--help"], ["train", "--help"])


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timings(args: list[str], runs: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of ``runs`` fresh ``python -m ctvq <args>`` processes."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    wall, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), _children_cpu()
        subprocess.run([sys.executable, "-m", "ctvq", *args], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall.append(time.perf_counter() - start)
        cpu.append(_children_cpu() - start_cpu)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per command (default 5)")
    runs = parser.parse_args().runs
    timings(["--help"], 1)  # warm the file cache so the first row is not penalised
    print(f"{'command':<20} {'median s':>9} {'min s':>7} {'max s':>7} {'cpu s':>7}")
    for args in COMMANDS:
        wall, cpu = timings(args, runs)
        print(f"{'ctvq ' + ' '.join(args):<20} {statistics.median(wall):>9.3f} {min(wall):>7.3f} "
              f"{max(wall):>7.3f} {statistics.median(cpu):>7.3f}")


if __name__ == "__main__":
    main()
