"""Scan discovery: which cases a folder of scans holds, walked at any depth, and what was skipped and why.

Exports come as flat folders of scan files as well as nested patient/study/series trees of DICOM slices, so
every folder is looked at. A folder with several DICOM series (scanner exports put the scout and each
reconstruction of a study side by side) gives one case per series rather than being refused: sorting slices
into folders by hand is what a user cannot easily do. Case ids come from the path relative to the scan folder
(``patient1/ct.nii.gz`` -> ``patient1_ct``), so they stay put when the cohort grows; two paths that give one
id are refused, naming both. Everything not taken is listed with its reason, so no scan disappears silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ctvq.ct.case_id import safe_case_id
from ctvq.ct.errors import CTInputError
from ctvq.ct.io import FILE_SUFFIXES, dicom_series

DICOM_SUFFIX = ".dcm"
SCAN_SUFFIXES = tuple(s for s in FILE_SUFFIXES if s != DICOM_SUFFIX)  # one file is one scan
_SERIES_TAIL = 8  # characters of the series UID in a case id when a folder holds several series


@dataclass(frozen=True)
class ScanCase:
    """One discovered case: ``kind`` is ``file`` or ``dicom`` (a series folder; ``series_uid`` names the
    series when the folder holds more than one)."""

    case_id: str
    path: str
    kind: str
    series_uid: str | None = None


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass(frozen=True)
class Discovery:
    cases: tuple[ScanCase, ...]
    skipped: tuple[Skipped, ...]


def scan_suffix(name: str) -> str | None:
    """The scan-file suffix ``name`` ends with, in any case (``CT.NII.GZ`` -> ``.nii.gz``), else None."""
    lower = name.lower()
    return next((s for s in sorted(SCAN_SUFFIXES, key=len, reverse=True) if lower.endswith(s)), None)


def discover_scans(folder: str | os.PathLike) -> Discovery:
    """Scan files and DICOM series under ``folder`` at any depth, as cases with ids from their relative
    paths, plus every file or folder left out with its reason. Raises CTInputError for a missing folder and
    for two paths giving one case id."""
    root = Path(folder)
    if not root.is_dir():
        raise CTInputError(f"{root}: scan folder is not a folder; give the folder holding the scans")
    cases: list[ScanCase] = []
    skipped: list[Skipped] = []
    for here, dirs, files in os.walk(root):
        here_path = Path(here)
        for name in sorted(d for d in dirs if d.startswith(".")):
            skipped.append(Skipped(str(here_path / name), "hidden folder"))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found, left = _folder_cases(root, here_path, sorted(files))
        cases.extend(found)
        skipped.extend(left)
    _refuse_collisions(cases)
    return Discovery(tuple(sorted(cases, key=lambda c: c.case_id)), tuple(skipped))


def _folder_cases(root: Path, here: Path, files: list[str]) -> tuple[list[ScanCase], list[Skipped]]:
    """The cases of one folder's own files: scan files by suffix, the rest read as DICOM by GDCM."""
    cases, skipped, others = [], [], []
    for name in files:
        path = here / name
        suffix = scan_suffix(name)
        if name.startswith("."):
            skipped.append(Skipped(str(path), "hidden file"))
        elif suffix is not None:
            rel = path.relative_to(root).as_posix()[: -len(suffix)]
            cases.append(ScanCase(_case_id(rel), str(path), "file"))
        elif name.upper() == "DICOMDIR":
            skipped.append(Skipped(str(path), "DICOM directory index (series are read from their folders)"))
        else:
            others.append(name)
    if not others:
        return cases, skipped
    series = dicom_series(here)
    taken = {Path(f).name for files_of in series.values() for f in files_of}
    base = here.relative_to(root).as_posix()
    base = root.resolve().name if base == "." else base
    tails = _series_tails(list(series))
    for uid, tail in tails.items():
        case_id = _case_id(base if len(series) == 1 else f"{base}_{tail}")
        cases.append(ScanCase(case_id, str(here), "dicom", uid if len(series) > 1 else None))
    for name in others:
        if name not in taken:
            reason = ("DICOM file outside any readable image series" if name.lower().endswith(DICOM_SUFFIX)
                      else f"not a scan file ({', '.join(SCAN_SUFFIXES)}) or DICOM slice")
            skipped.append(Skipped(str(here / name), reason))
    return cases, skipped


def _series_tails(uids: list[str]) -> dict[str, str]:
    """The shortest UID ends (at least ``_SERIES_TAIL`` characters) that tell a folder's series apart."""
    for width in range(_SERIES_TAIL, max((len(u) for u in uids), default=0) + 1):
        tails = {u: u[-width:].lstrip(".") for u in uids}
        if len(set(tails.values())) == len(uids):
            return tails
    return {u: u for u in uids}


def _case_id(relative: str) -> str:
    """``a/b c/ct`` -> ``a_b_c_ct``: path separators and other characters become '_' (see ctvq.ct.case_id)."""
    return safe_case_id(relative.replace("/", "_"))


def _refuse_collisions(cases: list[ScanCase]) -> None:
    seen: dict[str, ScanCase] = {}
    for case in cases:
        other = seen.setdefault(case.case_id, case)
        if other is not case:
            raise CTInputError(f"{other.path} and {case.path} both give case id {case.case_id!r}; rename one "
                               "of them or list them under inputs.scans with ids of your own")


__all__ = ["Discovery", "SCAN_SUFFIXES", "ScanCase", "Skipped", "discover_scans", "scan_suffix"]
