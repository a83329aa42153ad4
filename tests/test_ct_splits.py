"""Manifest splits: the seeded hash, the small-cohort top-up, split files, the `ctvq manifest` options."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from data_helpers import write_cases

from ctvq.cli import main
from ctvq.ct.manifest import read_manifest
from ctvq.ct.splits import DEFAULT_FRACTIONS, SplitError, case_hash, hash_splits, parse_fractions
from ctvq.eval.evaluate import eval_cases

THREE = {"train": 0.6, "val": 0.2, "test": 0.2}


def test_hash_split_is_deterministic_follows_the_fractions_and_survives_cohort_growth() -> None:
    ids = [f"patient{i:04d}" for i in range(4000)]
    splits = hash_splits(ids, [True] * len(ids), {"train": 0.7, "val": 0.2, "test": 0.1}, seed=3)
    counts = Counter(splits)
    assert abs(counts["train"] / 4000 - 0.7) < 0.03 and abs(counts["test"] / 4000 - 0.1) < 0.02
    assert splits == hash_splits(ids, [True] * len(ids), {"train": 0.7, "val": 0.2, "test": 0.1}, seed=3)
    grown = hash_splits(ids + [f"new{i}" for i in range(500)], [True] * 4500,
                        {"train": 0.7, "val": 0.2, "test": 0.1}, seed=3)
    assert grown[:4000] == splits  # adding cases never moves an existing one
    other_seed = hash_splits(ids, [True] * len(ids), {"train": 0.7, "val": 0.2, "test": 0.1}, seed=4)
    assert other_seed != splits
    assert min(case_hash(c, 0) for c in ids) >= 0.0 and max(case_hash(c, 0) for c in ids) < 1.0


@pytest.mark.parametrize("seed", range(12))
def test_small_cohorts_hold_out_one_val_case_and_keep_a_train_case(seed: int) -> None:
    for n in range(2, 7):
        ids = [f"phantom{i:02d}" for i in range(n)]
        counts = Counter(hash_splits(ids, [True] * n, DEFAULT_FRACTIONS, seed))
        assert counts["val"] >= 1 and counts["train"] >= 1, (n, counts)
        three = Counter(hash_splits(ids, [True] * n, THREE, seed))
        assert three["train"] >= 1 and three["val"] >= 1, (n, three)
        if n >= 3:
            assert three["test"] >= 1, (n, three)


def test_top_up_moves_the_train_case_nearest_the_val_bucket() -> None:
    ids = [f"c{i}" for i in range(40)]
    train_only = [c for c in ids if case_hash(c, 0) < 0.8][:4]  # all four hash into train
    splits = hash_splits(train_only, [True] * 4, DEFAULT_FRACTIONS)
    nearest = max(train_only, key=lambda c: case_hash(c, 0))  # val is [0.8, 1): the largest hash
    assert splits == ["val" if c == nearest else "train" for c in train_only]


def test_fewer_than_two_usable_cases_are_all_train_and_filtered_cases_do_not_count() -> None:
    ids = [f"c{i}" for i in range(40)]
    val = [c for c in ids if case_hash(c, 0) >= 0.8]
    train = [c for c in ids if case_hash(c, 0) < 0.8]
    assert hash_splits([val[0], train[0]], [True, False], DEFAULT_FRACTIONS) == ["train", "train"]
    assert hash_splits([val[0]], [True], DEFAULT_FRACTIONS) == ["train"]
    # val holds a filtered case only: an ok train case still moves to val; the filtered one keeps its split
    splits = hash_splits([val[0], train[0], train[1]], [False, True, True], DEFAULT_FRACTIONS)
    assert splits[0] == "val" and sorted(splits[1:]) == ["train", "val"]


def test_a_case_listed_for_several_windows_gets_one_split() -> None:
    ids = [f"c{i}" for i in range(10) for _ in ("lung", "bone")]
    splits = hash_splits(ids, [True] * len(ids), DEFAULT_FRACTIONS)
    assert all(splits[i] == splits[i + 1] for i in range(0, len(ids), 2))
    assert "val" in splits


@pytest.mark.parametrize("text, says", [
    ("train=0.5,val=0.3", "sum to 0.8"),
    ("train=0.8,valid=0.2", "unknown split 'valid'"),
    ("train=0.8;val=0.2", "is not NAME=FRACTION"),
    ("train=0.8,val=x", "is not NAME=FRACTION"),
    ("train=0.5,train=0.5", "train is given twice"),
    ("val=1", "train needs a fraction > 0"),
    ("train=1.5,val=-0.5", "not a fraction in [0, 1]"),
])
def test_bad_fractions_are_one_line_errors_naming_the_option_and_the_fix(text: str, says: str) -> None:
    with pytest.raises(SplitError) as info:
        parse_fractions(text)
    message = str(info.value)
    assert message.startswith(f"--split {text!r}") and says in message and "e.g. --split" in message
    assert len(message.splitlines()) == 1


@pytest.fixture()
def samples(tmp_path: Path) -> list[Path]:
    return write_cases(tmp_path, [10, 11, 12, 1.2])  # case3 is tiny: filtered at --min-points 1000


def _manifest(tmp_path: Path, samples: list[Path], capsys, *extra: str) -> tuple[int, str]:
    code = main(["manifest", *map(str, samples), "-o", str(tmp_path / "m.csv"), "--min-points", "1000",
                 *extra])
    return code, capsys.readouterr().err.strip()


def test_manifest_cli_writes_a_split_per_case_by_default(tmp_path: Path, samples, capsys) -> None:
    code, err = _manifest(tmp_path, samples, capsys)
    assert code == 0 and "ok cases by split: train 2, val 1, test 0" in err
    table = read_manifest(tmp_path / "m.csv")
    assert set(table["split"]) <= {"train", "val"} and table["split"].notna().all()
    assert list(table["split"]) == hash_splits(list(table["case_id"]), list(table["status"] == "ok"),
                                               DEFAULT_FRACTIONS)
    three = ("--split", "train=0.6,val=0.2,test=0.2", "--split-seed", "5")
    code, _ = _manifest(tmp_path, samples, capsys, *three)
    ok = read_manifest(tmp_path / "m.csv").query("status == 'ok'")
    assert code == 0 and sorted(ok["split"]) == ["test", "train", "val"]


def test_manifest_cli_refuses_bad_fractions_in_one_line(tmp_path: Path, samples, capsys) -> None:
    code, err = _manifest(tmp_path, samples, capsys, "--split", "train=0.7,val=0.2")
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("ctvq manifest: error: --split 'train=0.7,val=0.2': fractions sum to 0.9")
    assert not (tmp_path / "m.csv").exists()


def test_split_file_gives_the_splits_and_extra_cases_are_fine(tmp_path: Path, samples, capsys) -> None:
    split_file = tmp_path / "splits.csv"
    split_file.write_text("case_id,split\ncase0,test\ncase1,train\ncase2,val\ncase3,val\nelsewhere,train\n")
    code, err = _manifest(tmp_path, samples, capsys, "--split-file", str(split_file))
    assert code == 0, err
    table = read_manifest(tmp_path / "m.csv")
    assert list(table["split"]) == ["test", "train", "val", "val"]
    # evaluation reads the same splits, and knows each case's id without loading its sample
    cases = eval_cases(tmp_path / "m.csv", ["val"])
    ok_val = table.query("status == 'ok' and split == 'val'")["case_id"]
    assert [(c.case_id, c.split) for c in cases] == [(case, "val") for case in ok_val] and len(cases) >= 1


@pytest.mark.parametrize("rows, says", [
    ("case0,train\ncase1,valid\ncase2,val\ncase3,train\n",
     "line 3: case 'case1' has split 'valid'; use one of"),
    ("case0,train\ncase1,val\ncase0,val\ncase2,val\ncase3,train\n",
     "case 'case0' is listed twice (lines 2 and 4); keep one row per case"),
    ("case0,train\ncase2,val\n",
     "manifest case 'case1' (and 1 more) is missing from the split file; add a row"),
])
def test_bad_split_file_is_a_one_line_error_naming_file_and_case(tmp_path: Path, samples, capsys, rows: str,
                                                                  says: str) -> None:
    split_file = tmp_path / "splits.csv"
    split_file.write_text("case_id,split\n" + rows)
    code, err = _manifest(tmp_path, samples, capsys, "--split-file", str(split_file))
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"ctvq manifest: error: {split_file}: ") and says in err, err
    assert not (tmp_path / "m.csv").exists()


def test_split_file_excludes_the_hash_options(tmp_path: Path, samples, capsys) -> None:
    split_file = tmp_path / "splits.csv"
    split_file.write_text("case_id,split\ncase0,train\n")
    code, err = _manifest(tmp_path, samples, capsys, "--split-file", str(split_file), "--split-seed", "1")
    assert code == 2 and "--split-seed with --split-file" in err and len(err.splitlines()) == 1
