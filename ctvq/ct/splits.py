"""Train / val / test split per case, written into the manifest's ``split`` column.

Hash rule (the default): each case id gets ``u = sha256(f"{seed}:{case_id}")`` read as a number in [0, 1),
and the cumulative fractions, in the order train, val, test, bucket it (``train=0.8,val=0.2``: u < 0.8 is
train, the rest val). A case's split depends on its id and the seed only, so growing the cohort never moves
an existing case; the only exception is the small-cohort top-up below, which can hand a case back once the
hash itself fills the split.

Top-up, counted over usable cases (manifest status ``ok``) only, so that tiny cohorts still hold one out:
- fewer than 2 usable cases: every case is train (no hold-out is possible);
- train got no usable case: the usable case with the hash nearest the train bucket moves to train;
- then val, then test (each only when its fraction is > 0) got no usable case: the usable train case with
  the hash nearest that split's bucket moves there, provided train keeps at least one usable case; val (the
  headline of `ctvq eval`) comes before test, so when train cannot give one (2 usable cases: train + test)
  val takes the test case instead.
Filtered cases get a split too (harmless: nothing reads them). A case id listed several times (several
windows in one manifest) gets one split, so a case is never train in one window and val in another.

A split file (``case_id,split`` CSV) replaces all of this: it is taken as written, no top-up.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ctvq.ct.errors import CTInputError

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS: Mapping[str, float] = {"train": 0.8, "val": 0.2}
_EXAMPLE = "e.g. --split train=0.8,val=0.2 or train=0.7,val=0.15,test=0.15"


class SplitError(CTInputError):
    """A split option or split file is unusable; the message names it and says how to fix it."""


def check_fractions(fractions: Mapping[str, float], where: str = "--split") -> dict[str, float]:
    """Fractions of known splits, each in [0, 1], train > 0, summing to 1 (checked here, not at training)."""
    unknown = [name for name in fractions if name not in SPLITS]
    if unknown:
        raise SplitError(f"{where}: unknown split {unknown[0]!r}; use train, val and test ({_EXAMPLE})")
    out = {name: float(fractions[name]) for name in SPLITS if name in fractions}
    bad = [name for name, value in out.items() if not 0.0 <= value <= 1.0]
    if bad:
        raise SplitError(f"{where}: {bad[0]}={out[bad[0]]:g} is not a fraction in [0, 1] ({_EXAMPLE})")
    if out.get("train", 0.0) <= 0.0:
        raise SplitError(f"{where}: train needs a fraction > 0, training reads the train split ({_EXAMPLE})")
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise SplitError(f"{where}: fractions sum to {total:g}, they must sum to 1 ({_EXAMPLE})")
    return out


def parse_fractions(text: str, where: str = "--split") -> dict[str, float]:
    """``train=0.8,val=0.2`` -> {"train": 0.8, "val": 0.2}, validated by `check_fractions`."""
    fractions: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not name or number is None:
            raise SplitError(f"{where} {text!r}: {part.strip()!r} is not NAME=FRACTION ({_EXAMPLE})")
        if name in fractions:
            raise SplitError(f"{where} {text!r}: {name} is given twice ({_EXAMPLE})")
        fractions[name] = number
    return check_fractions(fractions, f"{where} {text!r}")


def case_hash(case_id: str, seed: int) -> float:
    """The case's position in [0, 1): the first 53 bits of sha256(f"{seed}:{case_id}") over 2**53 (exact)."""
    digest = hashlib.sha256(f"{seed}:{case_id}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / 2.0**53


def _buckets(fractions: Mapping[str, float]) -> dict[str, tuple[float, float]]:
    """[lo, hi) per split with a fraction > 0, cumulative in the order train, val, test."""
    out, lo = {}, 0.0
    for name in SPLITS:
        width = fractions.get(name, 0.0)
        if width > 0:
            out[name] = (lo, lo + width)
            lo += width
    last = next(reversed(out))
    out[last] = (out[last][0], 1.0)  # rounding of the sum never leaves a gap at the top
    return out


def _distance(u: float, bucket: tuple[float, float]) -> float:
    lo, hi = bucket
    return lo - u if u < lo else max(0.0, u - hi)


def _top_up(assigned: dict[str, str], hashes: dict[str, float], usable: set[str],
            buckets: Mapping[str, tuple[float, float]]) -> None:
    """Give train, then val, then test one usable case each when the hash left them empty (in place)."""
    def members(name: str) -> list[str]:
        return [c for c in usable if assigned[c] == name]

    if not members("train"):
        mover = min(usable, key=lambda c: (_distance(hashes[c], buckets["train"]), c))
        assigned[mover] = "train"
    for name in ("val", "test"):
        train = members("train")
        donors = train if len(train) >= 2 else members("test") if name == "val" else []
        if name in buckets and not members(name) and donors:
            mover = min(donors, key=lambda c: (_distance(hashes[c], buckets[name]), c))
            assigned[mover] = name


def hash_splits(case_ids: Sequence[str], usable: Sequence[bool], fractions: Mapping[str, float],
                seed: int = 0) -> list[str]:
    """The split of each row by the hash rule plus the top-up (module docstring); ``usable``: status ok."""
    buckets = _buckets(check_fractions(fractions))
    hashes = {c: case_hash(c, seed) for c in case_ids}
    assigned = {c: next(n for n, b in buckets.items() if b[0] <= u < b[1]) for c, u in hashes.items()}
    ok = {c for c, good in zip(case_ids, usable, strict=True) if good}
    if len(ok) < 2:
        return ["train"] * len(case_ids)
    _top_up(assigned, hashes, ok, buckets)
    return [assigned[c] for c in case_ids]


def read_split_file(path: str | os.PathLike) -> dict[str, str]:
    """``case_id,split`` rows as a dict; unknown split names and duplicate case ids are one-line errors."""
    import pandas as pd  # ~0.25 s to import: only when a split file is read, not for every CLI start

    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise SplitError(
            f"{path}: not a readable split file ({exc}); write a CSV with columns case_id,split") from exc
    if not {"case_id", "split"} <= set(table.columns):
        raise SplitError(f"{path}: split file needs columns case_id,split (it has {','.join(table.columns)})")
    out: dict[str, str] = {}
    lines: dict[str, int] = {}
    for line, (case, split) in enumerate(zip(table["case_id"], table["split"], strict=True), start=2):
        case, split = case.strip(), split.strip()
        if split not in SPLITS:
            raise SplitError(f"{path}: line {line}: case {case!r} has split {split!r}; "
                             f"use one of {', '.join(SPLITS)}")
        if case in out:
            raise SplitError(f"{path}: case {case!r} is listed twice (lines {lines[case]} and {line}); "
                             "keep one row per case")
        out[case], lines[case] = split, line
    return out


def file_splits(case_ids: Sequence[str], path: str | os.PathLike) -> list[str]:
    """The split file's split of each row; a manifest case missing from the file is an error."""
    given = read_split_file(path)
    missing = sorted({c for c in case_ids if c not in given})
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SplitError(f"{path}: manifest case {missing[0]!r}{more} is missing from the split file; "
                         f"add a row '{missing[0]},train' (or val / test) per missing case")
    return [given[c] for c in case_ids]


@dataclass(frozen=True)
class SplitRule:
    """How `ctvq manifest` assigns splits: a split file when ``file`` is set, else the hash rule."""

    fractions: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_FRACTIONS))
    seed: int = 0
    file: Path | None = None

    def assign(self, case_ids: Sequence[str], usable: Sequence[bool]) -> list[str]:
        if self.file is not None:
            return file_splits(case_ids, self.file)
        return hash_splits(case_ids, usable, self.fractions, self.seed)


ALL_TRAIN = SplitRule(fractions={"train": 1.0})

__all__ = ["ALL_TRAIN", "DEFAULT_FRACTIONS", "SPLITS", "SplitError", "SplitRule", "case_hash",
           "check_fractions", "file_splits", "hash_splits", "parse_fractions", "read_split_file"]
