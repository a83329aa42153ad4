"""Training reads the manifest's train split only: a real tiny run never opens a val or test case's file."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import train_main, write_config, write_data

from ctvq.cli import main as ctvq_main
from ctvq.ct.manifest import read_manifest


def _manifest(samples: list[Path], manifest: Path, split_file: Path) -> int:
    """The real `ctvq manifest`, splits from ``split_file``."""
    return ctvq_main(["manifest", *map(str, samples), "-o", str(manifest), "--split-file", str(split_file)])


@pytest.mark.slow
def test_training_succeeds_without_ever_reading_held_out_cases(tmp_path: Path, capsys) -> None:
    data = write_data(tmp_path / "data", cases=4).parent
    samples = sorted(data.glob("c*.npz"))
    split_file = tmp_path / "splits.csv"
    split_file.write_text("case_id,split\nc0,train\nc1,train\nc2,test\nc3,val\n")
    manifest = data / "manifest.csv"
    assert _manifest(samples, manifest, split_file) == 0
    assert list(read_manifest(manifest)["split"]) == ["train", "train", "test", "val"]
    (data / "c3.npz").write_bytes(b"corrupt: any read of this val case fails the run")
    (data / "c2.npz").unlink()  # and the test case is gone altogether
    config = write_config(tmp_path / "c.json", max_steps=4, i_save=4)
    out = tmp_path / "run"
    args = ["--config", str(config), "--data", str(manifest), "--output-dir", str(out), "--no-tensorboard"]
    assert train_main(args) == 0
    console = capsys.readouterr().out
    assert "2 train case(s) used (0 filtered); 2 held out and never read (test 1, val 1)" in console
    assert (out / "ckpts" / "final.pt").is_file()


def test_a_manifest_with_no_train_case_fails_before_any_work(tmp_path: Path, capsys) -> None:
    data = write_data(tmp_path / "data", cases=2).parent
    split_file = tmp_path / "splits.csv"
    split_file.write_text("case_id,split\nc0,val\nc1,test\n")
    manifest = data / "manifest.csv"
    samples = sorted(data.glob("c*.npz"))
    assert _manifest(samples, manifest, split_file) == 0
    config = write_config(tmp_path / "c.json")
    out = tmp_path / "run"
    args = ["--config", str(config), "--data", str(manifest), "--output-dir", str(out), "--no-tensorboard"]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "the train split is empty (all 2 rows are val/test)" in err
    assert not (out / "ckpts").exists()
