"""Datasets over ctvq training samples: `CTWindowSparseSDF` (one CT window) and `SparseSDF` (any samples).

A source is a manifest CSV written by `ctvq manifest` (``sample_path`` relative to the manifest's folder), a
folder of sample ``*.npz`` files written by `ctvq index`, or, with ``precompute_sparse=False``, a folder of
windowed volumes written by `ctvq window` whose samples are built on the fly.

Held-out evaluation is the norm: a manifest's rows whose ``split`` is not ``train`` (val / test, see
`ctvq.ct.splits`) are dropped before anything is read, so their files are never opened; a manifest without
a ``split`` column (older manifests) and a folder of samples are all train. ``dataset.held_out`` lists them.

Fail loudly: a broken file raises naming it (never a substitute sample, TRELLIS's known defect); a sample of
another window or resolution is an error, not skipped. Cases below ``min_points`` are filtered and recorded
in ``dataset.filtered``. Cases above ``max_points`` are cut to a latent-aligned crop (`ctvq.data.crop`)
drawn from ``(seed, epoch, index)`` only, so results do not depend on ``num_workers`` or worker order.

Cost of ``precompute_sparse=False``: the point count of a windowed volume is only known once its sample is
built, so the constructor builds every case once (for ``min_points``) and ``__getitem__`` builds it again,
unless ``cache_data`` keeps the first build. Precomputed samples are only peeked at (file headers).
"""

from __future__ import annotations

import logging
import operator
import os
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from ctvq.config.schema import DatasetConfig
from ctvq.ct.manifest import read_manifest
from ctvq.ct.sample import (
    SampleFormatError,
    SparseSample,
    check_format_version,
    decoder_targets,
    load_sample,
)
from ctvq.ct.splits import SPLITS
from ctvq.ct.windows import CUSTOM, WINDOWS
from ctvq.data.augment import AUGMENTS, apply_symmetry, random_symmetry
from ctvq.data.crop import crop_to_budget

logger = logging.getLogger(__name__)

MANIFEST_REQUIRED_COLUMNS = ("case_id", "sample_path", "window", "resolution", "num_points", "status")


class DatasetError(ValueError):
    """A dataset source is unusable: wrong window/resolution, stale manifest, nothing left after filtering."""


@dataclass(frozen=True)
class CaseRecord:
    """What the dataset knows about one case before loading it (from the manifest or the file header)."""

    case_id: str
    path: Path
    window: str
    resolution: int | None  # None only on manifest rows filtered for another reason than min_points
    num_points: int | None
    status: str = "ok"
    window_width: float | None = None  # known from sample headers, not from a manifest
    window_level: float | None = None
    split: str = "train"  # manifest's split column; training reads train rows only


def _usable_status(status: str) -> bool:
    """A manifest's own min_points verdict is redone with the dataset's threshold; other verdicts stand."""
    return status == "ok" or status.startswith("filtered: min_points")


@dataclass(frozen=True)
class WindowSpec:
    """The window a `CTWindowSparseSDF` accepts; every sample must carry this width and level."""

    name: str
    width: float | None = None
    level: float | None = None


def resolve_window(window_type: str, width: float | None, level: float | None) -> WindowSpec:
    """Check the dataset's window against the CT window registry: named windows have fixed W/L."""
    if window_type == CUSTOM:
        if width is None or level is None:
            raise DatasetError("window_type='custom' needs both window_width and window_level (HU)")
        return WindowSpec(CUSTOM, float(width), float(level))
    if window_type not in WINDOWS:
        raise DatasetError(f"unknown window_type {window_type!r}; accepted: {', '.join([*WINDOWS, CUSTOM])}")
    named = WINDOWS[window_type]
    for name, given, fixed in (("window_width", width, named.width), ("window_level", level, named.level)):
        if given is not None and not np.isclose(given, fixed):
            raise DatasetError(
                f"window_type={window_type!r} has {name}={fixed}; use window_type='custom' for {name}={given}"
            )
    return WindowSpec(window_type, named.width, named.level)


def read_case_records(path: Path) -> list[CaseRecord]:
    """Rows of a `ctvq manifest` CSV as records, sample paths resolved against the manifest's folder."""
    try:
        table = read_manifest(path)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DatasetError(f"{path}: not a readable manifest CSV ({exc})") from exc
    missing = [c for c in MANIFEST_REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise DatasetError(f"{path}: manifest lacks column(s) {', '.join(missing)}; re-run `ctvq manifest`")
    if table.empty:
        raise DatasetError(f"{path}: manifest has no rows")
    records = []
    for number, row in enumerate(table.itertuples(index=False), start=2):  # line 1 is the header
        status = str(row.status).strip()
        counts = {}
        for name in ("resolution", "num_points"):
            value = getattr(row, name)
            where = f"{path}: line {number} ({row.sample_path})"
            if pd.isna(value):
                if _usable_status(status):
                    raise DatasetError(f"{where} has status {status!r} but no {name}")
                counts[name] = None
                continue
            try:
                counts[name] = int(value)
            except ValueError as exc:
                raise DatasetError(f"{where}: {name} {value!r} is not an integer") from exc
        records.append(CaseRecord(
            case_id=str(row.case_id), path=path.parent / str(row.sample_path), window=str(row.window),
            status=status, split=_row_split(row, f"{path}: line {number} ({row.sample_path})"), **counts,
        ))
    return records


def _row_split(row: Any, where: str) -> str:
    """A row's split; a manifest written before splits existed has no column and is all train."""
    split = getattr(row, "split", "train")
    if split not in SPLITS:
        raise DatasetError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}; "
                           "re-run `ctvq manifest`")
    return split


def peek_sample(path: Path) -> CaseRecord:
    """Header-only look at a sample file (scalars and the coords shape), without decompressing the arrays."""
    try:
        with np.load(path, allow_pickle=False) as data:
            version = check_format_version(data, path)
            case_id, window, resolution, width, level = (
                data[k].item() for k in ("case_id", "window", "resolution", "window_width", "window_level")
            )
        per_voxel = "local_index.npy" if version >= 4 else "coords.npy"
        with zipfile.ZipFile(path) as archive, archive.open(per_voxel) as fh:
            major, _ = np.lib.format.read_magic(fh)
            if major not in (1, 2):
                raise SampleFormatError(f"{path}: {per_voxel} stored with npy format {major}, "
                                        "expected 1 or 2")
            fmt = np.lib.format
            shape, _, _ = (fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0)(fh)
    except SampleFormatError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise SampleFormatError(f"{path}: not a readable ctvq sample ({exc})") from exc
    return CaseRecord(case_id=str(case_id), path=path, window=str(window), resolution=int(resolution),
                      num_points=int(shape[0]), window_width=float(width), window_level=float(level))


def peek_band_and_iso(path: Path) -> tuple[float, float]:
    """The band and iso value a sample was made with (two scalars: nothing else is decompressed)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            check_format_version(data, path)
            return float(data["band"]), float(data["iso_value"])
    except SampleFormatError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise SampleFormatError(f"{path}: not a readable ctvq sample ({exc})") from exc


def build_from_windowed(path: Path, *, band: float, iso_value: float) -> SparseSample:
    """The sample of a windowed volume (`ctvq window` output), built now instead of by `ctvq index`."""
    try:
        from ctvq.ct.pipeline import build_sample, load_windowed  # heavy (SimpleITK): only on this path
    except ImportError as exc:
        raise DatasetError(
            f"{path}: precompute_sparse=false needs ctvq.ct.pipeline (load_windowed, build_sample), which "
            f"cannot be imported ({exc}); precompute samples with `ctvq index` and use precompute_sparse=true"
        ) from exc
    try:
        return build_sample(load_windowed(path), band=band, iso_value=iso_value)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot build a sample from this windowed volume ({exc})") from exc


def sample_to_item(sample: SparseSample, *, num_points_full: int) -> dict[str, Any]:
    """The training item of one (possibly cropped) sample, as torch tensors."""
    return {
        "coords": torch.from_numpy(sample.coords.astype(np.int32)),
        "feats": torch.from_numpy(sample.sdf.astype(np.float32).reshape(-1, 1)),
        "latent_coords": torch.from_numpy(sample.latent_coords.astype(np.int32)),
        "targets": torch.from_numpy(decoder_targets(sample)),
        "affine": torch.tensor(sample.affine, dtype=torch.float64),  # a copy: never alias a cached sample
        "case_id": sample.case_id,
        "window": sample.window,
        "resolution": sample.resolution,
        "num_points": sample.num_points,
        "num_points_full": int(num_points_full),
    }


def _check_window(record: CaseRecord, spec: WindowSpec | None, origin: str) -> None:
    if spec is None:
        return
    if record.window != spec.name:
        raise DatasetError(
            f"{origin}: case {record.case_id!r} has window {record.window!r}, this dataset reads "
            f"window_type={spec.name!r}; point the dataset at that window's samples"
        )
    for name, want, got in (("window_width", spec.width, record.window_width),
                            ("window_level", spec.level, record.window_level)):
        if want is not None and got is not None and not np.isclose(want, got):
            raise DatasetError(f"{origin}: {name} is {got}, this dataset reads {name}={want}")


def _check_resolution(record: CaseRecord, resolution: int, origin: str) -> None:
    if record.resolution is not None and record.resolution != resolution:
        raise DatasetError(
            f"{origin}: case {record.case_id!r} has resolution {record.resolution}, this dataset reads "
            f"resolution={resolution}; re-run `ctvq window --resolution {resolution}` or change the config"
        )


def _record_of(sample: SparseSample, path: Path) -> CaseRecord:
    return CaseRecord(case_id=sample.case_id, path=path, window=sample.window, resolution=sample.resolution,
                      num_points=sample.num_points, window_width=sample.window_width,
                      window_level=sample.window_level)


class _SparseDataset(Dataset):
    """Shared machinery; the public classes differ only in the window they accept."""

    def __init__(
        self,
        source: str | os.PathLike,
        *,
        window: WindowSpec | None,
        resolution: int,
        min_points: int,
        max_points: int,
        cache_data: bool,
        precompute_sparse: bool,
        band: float,
        iso_value: float,
        seed: int,
        augment: str,
    ) -> None:
        if augment not in AUGMENTS:
            raise DatasetError(f"augment={augment!r}; use one of {AUGMENTS}")
        for name, value, low in (("resolution", resolution, 8), ("min_points", min_points, 0),
                                 ("max_points", max_points, 1), ("seed", seed, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise DatasetError(f"{name} must be an int >= {low}, got {value!r}")
        if band <= 0 or not 0.0 < iso_value < 1.0:
            raise DatasetError(f"band must be > 0 and iso_value in (0, 1), got {band=}, {iso_value=}")
        self.source = Path(source)
        self.window = window
        self.resolution = resolution
        self.min_points = min_points
        self.max_points = max_points
        self.cache_data = cache_data
        self.precompute_sparse = precompute_sparse
        self.band = float(band)
        self.iso_value = float(iso_value)
        self.seed = seed
        self.augment = augment
        # Shared memory, so set_epoch reaches persistent DataLoader workers too.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.filtered: list[tuple[str, str]] = []
        self.held_out: list[tuple[str, str]] = []  # (case_id, split) of manifest rows not in train
        self.other_windows: dict[str, int] = {}  # rows of a multi-window manifest left to the other windows
        built: dict[Path, SparseSample] = {}
        records = self._index_source(built)
        _check_no_duplicates(records, self.source)
        self.records: list[CaseRecord] = []
        for record in records:
            reason = self._filter_reason(record)
            if reason is None:
                self.records.append(record)
            else:
                self.filtered.append((record.case_id, reason))
                logger.info("filtered case %s (%s): %s", record.case_id, record.path, reason)
        self._check_made_as_configured(self.records)
        if not self.records:
            raise DatasetError(
                f"{self.source}: no usable case left ({len(self.filtered)} filtered: "
                + "; ".join(f"{c}: {r}" for c, r in self.filtered[:5]) + ")"
            )
        # cache_data loads every case once, here, in the constructing process. DataLoader workers inherit
        # this cache (fork: shared copy-on-write pages; spawn: one pickled copy per worker), so it costs one
        # copy of the data per process at most and the files are never read again.
        self._cache: list[SparseSample] | None = None
        if cache_data:
            self._cache = [
                self._verify(built[r.path], r) if r.path in built else self._load(r) for r in self.records
            ]

    # -- indexing -------------------------------------------------------------------------------------------
    def _index_source(self, built: dict[Path, SparseSample]) -> list[CaseRecord]:
        src = self.source
        if src.is_file() and src.suffix.lower() == ".csv":
            if not self.precompute_sparse:
                raise DatasetError(
                    f"{src}: precompute_sparse=false reads windowed volumes (`ctvq window` outputs) from a "
                    "folder, not a manifest of samples; pass that folder or set precompute_sparse=true"
                )
            return self._select_manifest_rows(read_case_records(src))
        if src.is_dir():
            paths = sorted(src.glob("*.npz"))
            if not paths:
                raise DatasetError(f"{src}: folder holds no *.npz files")
            records = []
            for path in paths:
                if self.precompute_sparse:
                    record = peek_sample(path)
                else:
                    sample = build_from_windowed(path, band=self.band, iso_value=self.iso_value)
                    record = _record_of(sample, path)
                    logger.info("built sample %s from %s: %d points", record.case_id, path, record.num_points)
                    if self.cache_data:
                        built[path] = sample
                _check_window(record, self.window, str(path))
                _check_resolution(record, self.resolution, str(path))
                records.append(record)
            return records
        raise DatasetError(f"{src}: dataset source must be a manifest .csv or a folder of .npz files")

    def _select_manifest_rows(self, records: list[CaseRecord]) -> list[CaseRecord]:
        src = self.source
        if self.window is not None:
            windows = sorted({r.window for r in records})
            if self.window.name not in windows:
                raise DatasetError(
                    f"{src}: manifest has no rows of window_type={self.window.name!r} (it lists "
                    f"{', '.join(windows)}); point the dataset at that window's manifest"
                )
            self.other_windows = dict(Counter(r.window for r in records if r.window != self.window.name))
            records = [r for r in records if r.window == self.window.name]
        for record in records:
            _check_resolution(record, self.resolution, f"{src} (row of {record.path})")
        self.held_out = [(r.case_id, r.split) for r in records if r.split != "train"]
        train = [r for r in records if r.split == "train"]
        if not train:
            raise DatasetError(
                f"{src}: the train split is empty (all {len(records)} rows are val/test) and training "
                "reads train rows only; re-run `ctvq manifest` with a train fraction or a split file "
                "that lists train cases"
            )
        if self.held_out:
            logger.info("%s: %d case(s) held out of training (%s)", src, len(self.held_out),
                        ", ".join(f"{c}: {s}" for c, s in self.held_out))
        return train

    def _filter_reason(self, record: CaseRecord) -> str | None:
        if not _usable_status(record.status):
            return f"manifest status: {record.status}"
        if record.num_points is not None and record.num_points < self.min_points:
            return f"min_points ({record.num_points} < {self.min_points})"
        return None

    # -- loading --------------------------------------------------------------------------------------------
    def _load(self, record: CaseRecord) -> SparseSample:
        if self.precompute_sparse:
            sample = load_sample(record.path)
        else:
            sample = build_from_windowed(record.path, band=self.band, iso_value=self.iso_value)
        return self._verify(sample, record)

    def _check_made_as_configured(self, records: list[CaseRecord]) -> None:
        """Precomputed samples keep the band and iso value they were made with; the config must name them,
        or the run (and eval, encode and decode after it, which read the config) would state other ones."""
        if not self.precompute_sparse:
            return
        for record in records:
            band, iso = peek_band_and_iso(record.path)
            for key, made, configured in (("band", band, self.band), ("iso_value", iso, self.iso_value)):
                if not np.isclose(made, configured):
                    raise DatasetError(
                        f"{record.path}: made with {key} {made:g} but dataset.args.{key} is {configured:g}; "
                        f"set dataset.args.{key} to {made:g}" + (" (or `ctvq train --band`)" if key == "band"
                                                                  else "")
                        + " so the run records what it trains on, or re-make the samples"
                    )

    def _verify(self, sample: SparseSample, record: CaseRecord) -> SparseSample:
        """The loaded sample must be the case the index promised: window, resolution, point count."""
        origin = str(record.path)
        _check_window(_record_of(sample, record.path), self.window, origin)
        _check_resolution(_record_of(sample, record.path), self.resolution, origin)
        if sample.num_points != record.num_points:
            raise DatasetError(
                f"{origin}: holds {sample.num_points} points but {self.source} says {record.num_points}; "
                "the manifest is stale, re-run `ctvq manifest`"
            )
        return sample

    # -- Dataset API ----------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Select the crops of ``epoch``: call before iterating a DataLoader over this dataset each epoch."""
        if epoch < 0:
            raise DatasetError(f"epoch must be >= 0, got {epoch}")
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = operator.index(index)
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for {len(self.records)} cases")
        record = self.records[index]
        sample = self._cache[index] if self._cache is not None else self._load(record)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        cropped = crop_to_budget(sample, self.max_points, rng)
        if self.augment != "none":
            cropped = apply_symmetry(cropped, *random_symmetry(rng, self.augment))
        return sample_to_item(cropped, num_points_full=sample.num_points)


class SparseSDF(_SparseDataset):
    """Generic sparse SDF samples of any window (one resolution): see the module docstring."""

    def __init__(
        self,
        source: str | os.PathLike,
        *,
        resolution: int,
        max_points: int,
        min_points: int = DatasetConfig.min_points,
        cache_data: bool = DatasetConfig.cache_data,
        precompute_sparse: bool = DatasetConfig.precompute_sparse,
        band: float = DatasetConfig.band,
        iso_value: float = DatasetConfig.iso_value,
        seed: int = DatasetConfig.seed,
        augment: str = DatasetConfig.augment,
    ) -> None:
        super().__init__(source, window=None, resolution=resolution, min_points=min_points,
                         max_points=max_points, cache_data=cache_data, precompute_sparse=precompute_sparse,
                         band=band, iso_value=iso_value, seed=seed, augment=augment)


def _check_no_duplicates(records: list[CaseRecord], source: Path) -> None:
    """A case listed twice would be trained on twice as often and counted twice: refuse it, naming both."""
    seen_ids: dict[str, Path] = {}
    seen_files: dict[Path, str] = {}
    for record in records:
        path = Path(record.path).resolve()
        if path in seen_files:
            raise DatasetError(f"{source}: {record.path} is listed twice (cases {seen_files[path]!r} and "
                               f"{record.case_id!r}); list each sample once")
        if record.case_id in seen_ids:
            raise DatasetError(f"{source}: case id {record.case_id!r} names two samples "
                               f"({seen_ids[record.case_id]} and {record.path}); case ids must be unique: "
                               "rename one case")
        seen_ids[record.case_id], seen_files[path] = record.path, record.case_id


class CTWindowSparseSDF(_SparseDataset):
    """Samples of one CT window (``window_type``); a manifest listing several windows is narrowed to it.

    ``band`` and ``iso_value`` apply when ``precompute_sparse=False`` (precomputed samples carry their own).
    ``window_type`` is a registered window (`ctvq.ct.windows.WINDOWS`, fixed W/L) or ``'custom'`` with
    ``window_width`` and ``window_level``; every sample must carry that width and level.
    """

    def __init__(
        self,
        source: str | os.PathLike,
        *,
        window_type: str,
        resolution: int,
        max_points: int,
        min_points: int = DatasetConfig.min_points,
        cache_data: bool = DatasetConfig.cache_data,
        precompute_sparse: bool = DatasetConfig.precompute_sparse,
        band: float = DatasetConfig.band,
        iso_value: float = DatasetConfig.iso_value,
        seed: int = DatasetConfig.seed,
        window_width: float | None = DatasetConfig.window_width,
        window_level: float | None = DatasetConfig.window_level,
        augment: str = DatasetConfig.augment,
    ) -> None:
        window = resolve_window(window_type, window_width, window_level)
        super().__init__(source, window=window, resolution=resolution, min_points=min_points,
                         max_points=max_points, cache_data=cache_data, precompute_sparse=precompute_sparse,
                         band=band, iso_value=iso_value, seed=seed, augment=augment)
