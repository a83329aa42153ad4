"""The case manifest: one row per training sample, with counts, whether (and why) it is filtered, and its
split (train / val / test; how it is assigned: `ctvq.ct.splits`). Training reads the train rows only."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ctvq.atomic import atomic_output
from ctvq.ct.errors import CTInputError
from ctvq.ct.failure import read_failure
from ctvq.ct.sample import SparseSample, load_sample
from ctvq.ct.splits import SplitRule

COLUMNS = ("case_id", "source", "sample_path", "window", "resolution", "spacing", "num_points", "num_latent",
           "bbox", "status", "split", "smooth_mm", "min_island_mm3", "body_mask", "pad", "scan_extent")


def _refuse_duplicates(rows: list[dict]) -> None:
    """One row per sample file and per (case, window): a case listed twice would count and train twice."""
    files: dict[str, str] = {}
    cases: dict[tuple[str, str], str] = {}
    for row in rows:
        path, key = row["sample_path"], (row["case_id"], row["window"])
        if path in files:
            raise CTInputError(f"{path}: given twice; list each sample once")
        if key in cases:
            raise CTInputError(f"{path}: case {key[0]!r} ({key[1]} window) is also {cases[key]}; case ids "
                               "must be unique per window: rename one case or drop one file")
        files[path], cases[key] = row["case_id"], path


def manifest_table(sample_paths: Sequence[str | os.PathLike], manifest_dir: str | os.PathLike,
                   min_points: int = 100, split: SplitRule | None = None) -> pd.DataFrame:
    """Rows for ``sample_paths`` (paths stored relative to ``manifest_dir``); ``status`` is ``ok`` or
    ``filtered: min_points (N < min_points)``; ``split`` by ``split`` (default: `SplitRule()`, the hash
    rule with train=0.8,val=0.2, seed 0). A failure record (``--record-failure``) gives a row with status
    ``failed: <step>: <reason>`` and no counts. Unreadable samples raise SampleFormatError."""
    rows = []
    for path in sample_paths:
        failure = read_failure(path)
        if failure is not None:
            rows.append({"case_id": failure.case_id, "source": failure.source, "window": failure.window,
                         "sample_path": os.path.relpath(Path(path).resolve(), Path(manifest_dir).resolve()),
                         "status": failure.status})
            continue
        sample = load_sample(path)
        n = sample.num_points
        if n:
            lo, hi = sample.coords.min(axis=0), sample.coords.max(axis=0)
            bbox = ",".join(str(int(v)) for v in (*lo, *hi))
        else:
            bbox = ""
        rows.append({
            "case_id": sample.case_id,
            "source": sample.source,
            "sample_path": os.path.relpath(Path(path).resolve(), Path(manifest_dir).resolve()),
            "window": sample.window,
            "resolution": sample.resolution,
            "spacing": ",".join(f"{float(s):.6g}" for s in sample.spacing),
            "num_points": n,
            "num_latent": sample.num_latent,
            "bbox": bbox,
            "status": "ok" if n >= min_points else f"filtered: min_points ({n} < {min_points})",
            **surface_columns(sample),
        })
    _refuse_duplicates(rows)
    rule = split if split is not None else SplitRule()
    splits = rule.assign([r["case_id"] for r in rows], [r["status"] == "ok" for r in rows])
    for row, name in zip(rows, splits, strict=True):
        row["split"] = name
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    counts = ["resolution", "num_points", "num_latent"]
    table[counts] = table[counts].astype("Int64")  # a failed row has none: stays integer, written empty
    return table


def surface_columns(sample: SparseSample) -> dict[str, object]:
    """How the case's surface was cleaned; ``scan_extent`` (cube indices lo x,y,z,hi x,y,z) is empty when
    unknown (a version-2 sample)."""
    extent = np.asarray(sample.scan_extent, dtype=np.float64).ravel()
    return {"smooth_mm": sample.smooth_mm, "min_island_mm3": sample.min_island_mm3,
            "body_mask": sample.body_mask, "pad": sample.pad,
            "scan_extent": ",".join(f"{v:.6g}" for v in extent) if np.isfinite(extent).all() else ""}


def write_manifest(table: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_output(path) as tmp:
        table.to_csv(tmp, index=False)


TEXT_COLUMNS = ("case_id", "source", "sample_path", "window", "status", "spacing", "bbox", "split", "pad",
                "scan_extent")


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """The manifest CSV as a table: text columns stay text (a case id "007" stays "007"), and an empty cell
    is "" in a text column and NaN in a numeric one (a failed case has no point count)."""
    table = pd.read_csv(path, dtype=dict.fromkeys(TEXT_COLUMNS, str), keep_default_na=False, na_values=[""])
    for column in TEXT_COLUMNS:
        if column in table.columns:
            table[column] = table[column].fillna("")
    return table
