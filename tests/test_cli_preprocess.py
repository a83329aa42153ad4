"""The preprocessing commands end to end through ``ctvq.cli.main``: success paths, bad inputs, atomicity."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from ctvq.atomic import atomic_output
from ctvq.cli import COMMANDS, main
from ctvq.ct.io import CTImage, write_ct
from ctvq.ct.manifest import read_manifest
from ctvq.ct.sample import load_sample
from ctvq.ct.volume_file import WindowedVolume, save_windowed
from ctvq.ct.windows import get_window

PREPROCESS = ("phantom", "window", "sdf", "index", "manifest", "demo")


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def _chain(scan: Path, out: Path, window: str, capsys: pytest.CaptureFixture[str]) -> Path:
    w, b, s = out / f"{window}_w.npz", out / f"{window}_b.npz", out / f"{window}_s.npz"
    assert _run(["window", str(scan), "-o", str(w), "--window", window, "--resolution", "64"], capsys)[0] == 0
    assert _run(["sdf", str(w), "-o", str(b), "--band", "2.5"], capsys)[0] == 0
    assert _run(["index", str(b), "-o", str(s)], capsys)[0] == 0
    return s


@pytest.mark.parametrize("command", PREPROCESS)
def test_every_preprocessing_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: ctvq" in capsys.readouterr().out
    assert command in COMMANDS


def test_phantom_to_manifest_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scan = tmp_path / "scans" / "p1.nrrd"
    code, err = _run(["phantom", "-o", str(scan), "--seed", "1", "--shape", "80", "80", "32"], capsys)
    assert code == 0 and scan.is_file() and "ctvq phantom" in err
    samples = [_chain(scan, tmp_path / "out", w, capsys) for w in ("lung", "bone")]
    sample = load_sample(samples[0])
    assert (sample.case_id, sample.window, sample.resolution, sample.band) == ("p1", "lung", 64, 2.5)
    manifest = tmp_path / "out" / "manifest.csv"
    big = sample.num_points
    code, _ = _run(["manifest", *map(str, samples), "-o", str(manifest), "--min-points", str(big)], capsys)
    assert code == 0
    table = read_manifest(manifest)
    assert list(table.columns) == ["case_id", "source", "sample_path", "window", "resolution", "spacing",
                                   "num_points", "num_latent", "bbox", "status", "split", "smooth_mm",
                                   "min_island_mm3", "body_mask", "pad", "scan_extent"]
    assert list(table["split"]) == ["train", "train"]  # one case only: no hold-out possible
    lung, bone = table.iloc[0], table.iloc[1]
    assert lung["status"] == "ok" and lung["sample_path"] == "lung_s.npz" and lung["source"] == str(scan)
    assert lung["spacing"] == "0.7,0.7,2" and lung["num_points"] == big
    assert bone["status"] == f"filtered: min_points ({bone['num_points']} < {big})"
    x0, y0, z0, x1, y1, z1 = map(int, lung["bbox"].split(","))
    assert 0 <= x0 < x1 < 64 and 0 <= y0 < y1 < 64 and 0 <= z0 < z1 < 64
    assert isinstance(pd.read_csv(manifest), pd.DataFrame)


def test_dicom_series_folder_is_a_valid_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    series = tmp_path / "series"
    assert _run(["phantom", "-o", str(series), "--dicom", "--shape", "64", "64", "16"], capsys)[0] == 0
    assert load_sample(_chain(series, tmp_path, "lung", capsys)).case_id == "series"


def _mr_like(path: Path) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 900, (16, 16, 16))
                                           .astype(np.int16)), str(path))
    return path


def _fat_only(path: Path) -> Path:
    """A CT (air and fat) that the brain window sees as all below its range: no surface."""
    hu = np.full((32, 32, 16), -1000.0, np.float32)
    hu[8:24, 8:24, 4:12] = -100.0
    write_ct(CTImage(hu=hu, spacing=(1.0, 1.0, 1.0), origin=(0, 0, 0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
                     source="fat"), path)
    return path


def _bad_inputs(tmp: Path, ct_small_dcm: Path) -> dict[str, tuple[Path, list[str], str]]:
    corrupt = tmp / "corrupt.mha"
    corrupt.write_bytes(b"ObjectType = Image\nNDims = 3\nthis is not an image\n")
    empty = tmp / "empty_dir"
    empty.mkdir()
    return {
        "corrupt": (corrupt, ["--window", "lung"], "not a readable image file"),
        "mr": (_mr_like(tmp / "mr.nii.gz"), ["--window", "lung"], "no air"),
        "slice": (ct_small_dcm, ["--window", "lung"], "a single 2-D slice"),
        "no_surface": (_fat_only(tmp / "fat.nii.gz"), ["--window", "brain"], "has no surface"),
        "missing": (tmp / "missing.nii.gz", ["--window", "lung"], "no such file or directory"),
        "empty": (empty, ["--window", "lung"], "folder is empty"),
    }


@pytest.mark.parametrize("case", ["corrupt", "mr", "slice", "no_surface", "missing", "empty"])
def test_bad_input_gives_one_line_error_and_no_output(case: str, tmp_path: Path, ct_small_dcm: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    source, options, reason = _bad_inputs(tmp_path, ct_small_dcm)[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, err = _run(["window", str(source), "-o", str(out_dir / "w.npz"), *options, "--resolution", "64"],
                     capsys)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"ctvq window: error: {source}: ") and reason in err
    assert list(out_dir.iterdir()) == []


def test_native_library_messages_do_not_reach_the_terminal(tmp_path: Path) -> None:
    """ITK prints MetaIO parse errors on the C++ stderr; the user must still see exactly one line."""
    corrupt = tmp_path / "corrupt.mha"
    corrupt.write_bytes(b"ObjectType = Image\nNDims = 3\n")
    argv = ["window", str(corrupt), "-o", str(tmp_path / "w.npz"), "--window", "lung"]
    done = subprocess.run([sys.executable, "-m", "ctvq", *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"ctvq window: error: {corrupt}: not a readable image file")
    assert not (tmp_path / "w.npz").exists()


def test_no_surface_at_the_iso_value_fails_the_sdf_step(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    values = np.full((64, 64, 64), 0.2, np.float32)
    values[20:40, 20:40, 20:40] = 0.45  # contrast, but nothing reaches the iso value 0.5
    save_windowed(WindowedVolume(values=values, affine=np.eye(4), window=get_window("brain"), case_id="c",
                                 source="flat.nii.gz", spacing=(1.0, 1.0, 1.0)), tmp_path / "w.npz")
    code, err = _run(["sdf", str(tmp_path / "w.npz"), "-o", str(tmp_path / "b.npz")], capsys)
    assert code == 2 and "no iso-surface at 0.5" in err and err.count("\n") == 1
    assert err.startswith("ctvq sdf: error: c (flat.nii.gz): window 'brain'")
    assert not (tmp_path / "b.npz").exists()


def test_wrong_file_kind_is_refused(tmp_path: Path, small_scan: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(["sdf", str(small_scan), "-o", str(tmp_path / "b.npz")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"ctvq sdf: error: {small_scan}: not a readable")
    code, err = _run(["manifest", str(small_scan), "-o", str(tmp_path / "m.csv")], capsys)
    assert code == 2 and err.startswith(f"ctvq manifest: error: {small_scan}")
    assert not (tmp_path / "m.csv").exists()


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "result.npz"
    with pytest.raises(RuntimeError, match="killed mid-write"), atomic_output(target) as tmp:
        tmp.write_bytes(b"half of the data")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"all of it")
    assert target.read_bytes() == b"all of it" and [p.name for p in tmp_path.iterdir()] == ["result.npz"]


def test_failed_write_keeps_the_previous_complete_file(tmp_path: Path) -> None:
    target = tmp_path / "manifest.csv"
    target.write_text("old,complete\n")
    with pytest.raises(OSError), atomic_output(target) as tmp:
        tmp.write_text("new,half")
        raise OSError("disk full")
    assert target.read_text() == "old,complete\n" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.slow
def test_demo_writes_samples_manifests_and_previews(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--output-dir", str(tmp_path), "--cases", "2", "--resolution", "64"])
    out = capsys.readouterr().out
    assert code == 0 and "[2/2] case_001" in out
    for window in ("lung", "bone"):
        table = read_manifest(tmp_path / window / "manifest.csv")
        assert list(table["case_id"]) == ["case_000", "case_001"] and (table["status"] == "ok").all()
        assert all((tmp_path / window / p).is_file() for p in table["sample_path"])
    pngs = sorted(p.name for p in (tmp_path / "previews").iterdir())
    assert pngs == ["case_000_bone.png", "case_000_lung.png", "case_001_bone.png", "case_001_lung.png"]
    assert (tmp_path / "previews" / pngs[0]).read_bytes()[:4] == b"\x89PNG"
