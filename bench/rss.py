"""This process's resident memory, read from /proc/self/status (Linux).

Benchmarks measure each run in a fresh child process. Its peak must be read as ``VmHWM`` (the high-water mark
of its own address space, which starts anew at exec), not as ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux
folds the parent's high-water mark into the child's ``ru_maxrss`` across fork and exec, so a child smaller
than its parent reads as the parent's size (a parent holding 1 GiB: the child's ru_maxrss 1051 MB, its
VmHWM 14 MB).
"""

from __future__ import annotations


def status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB; NaN where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def current_rss_mb() -> float:
    return status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's own peak RSS in MiB (VmHWM)."""
    return status_mb("VmHWM")
