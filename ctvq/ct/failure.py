"""Failure records: a preprocessing step run with ``--record-failure`` writes one in place of its output when
the case's input is unusable, so one bad scan does not stop the workflow. The next steps pass it on and
`ctvq manifest` lists the case with status ``failed: <reason>``; training reads ok rows only.

A record sits at the step's own output path (Snakemake needs every declared output to exist, and a second,
sometimes-missing marker output would not do), as an ``.npz`` holding one entry, so the file is what its
name says and no sample loader mistakes it for data.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ctvq.atomic import atomic_output

FAILURE_KEY = "ctvq_failure"


@dataclass(frozen=True)
class CaseFailure:
    """Why a case has no sample: the ``step`` that refused it and its one-line ``reason``."""

    case_id: str
    source: str
    step: str
    reason: str
    window: str = ""

    @property
    def status(self) -> str:
        return f"failed: {self.step}: {self.reason}"


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def write_failure(failure: CaseFailure, path: str | os.PathLike) -> None:
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **{FAILURE_KEY: np.array(json.dumps(asdict(failure)))})


def read_failure(path: str | os.PathLike) -> CaseFailure | None:
    """The failure recorded at ``path``, or None when it holds anything else (left to its own loader)."""
    try:
        with zipfile.ZipFile(Path(path)) as archive:
            if archive.namelist() != [f"{FAILURE_KEY}.npy"]:
                return None
        with np.load(path, allow_pickle=False) as data:
            return CaseFailure(**json.loads(str(data[FAILURE_KEY])))
    except (OSError, zipfile.BadZipFile, ValueError, TypeError, KeyError):
        return None


__all__ = ["FAILURE_KEY", "CaseFailure", "one_line", "read_failure", "write_failure"]
