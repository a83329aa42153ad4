"""Kill -9 a real training process and start it again: it resumes and ends exactly where an uninterrupted
run of the same seed ends. A kill while a checkpoint set is being written leaves the previous set usable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import write_config, write_data

from ctvq.train.checkpoint import complete_steps, final_path, load_file, misc_path

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--threads", "1", "--deterministic", "--no-tensorboard"]


def _command(config: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ctvq", "train", "--config", str(config), "--data", str(data),
            "--output-dir", str(out), *FLAGS, *extra]


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.is_file() and text in path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"ended (rc {proc.returncode}) before {text!r}: {proc.stderr.read()}")
        time.sleep(0.01)
    raise AssertionError(f"{text!r} never appeared in {path}")


def _assert_same_model(a: Path, b: Path) -> None:
    sa, sb = load_file(a)["vae"], load_file(b)["vae"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = write_data(root / "data", cases=3)
    # stage 2 (everything trains) from a stage-1 checkpoint, batch 2 of 3 cases: epochs end mid-way
    from train_helpers import write_stage1_checkpoint

    ckpt = root / "s1.pt"
    write_stage1_checkpoint(ckpt)
    config = write_config(root / "cfg.json", training_stage=2, pretrained_vae_path=str(ckpt), max_steps=14,
                          i_save=4, i_print=1, i_log=1, ema_rate=[0.9, 0.99], i_sample=5)
    reference = root / "reference"
    _run(_command(config, data, reference))
    return root, data, config, reference


def test_kill_at_arbitrary_step_then_resume_matches_uninterrupted_run(setup):
    root, data, config, reference = setup
    out = root / "killed"
    proc = subprocess.Popen(_command(config, data, out), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(out / "log.txt", "step 6/14", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not final_path(out).exists()
    resumed_from = complete_steps(out / "ckpts", (0.9, 0.99))[-1]
    assert 4 <= resumed_from < 14
    _run(_command(config, data, out))
    log = (out / "log.txt").read_text()
    assert f"resumed from step {resumed_from}" in log
    _assert_same_model(final_path(reference), final_path(out))
    for name in ("vqvae_ema0.9_step0000014.pt", "vqvae_ema0.99_step0000014.pt"):
        _assert_same_model(reference / "ckpts" / name, out / "ckpts" / name)
    ref_misc = load_file(misc_path(reference / "ckpts", 14))
    out_misc = load_file(misc_path(out / "ckpts", 14))
    assert ref_misc["scheduler"] == out_misc["scheduler"]
    assert torch.equal(ref_misc["clipper"]["buffer"], out_misc["clipper"]["buffer"])
    steps = [int(line.split(",")[0]) for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 15))  # rows past the checkpoint were dropped, none is missing


_SLOW_MISC = """
import sys, time, torch
real = torch.save
def save(obj, fh, *args, **kwargs):
    name = getattr(fh, "name", "")
    if "misc_step0000008" in str(name):
        real(obj, fh, *args, **kwargs)
        fh.flush()
        open(sys.argv[1], "w").close()
        time.sleep(600)
    return real(obj, fh, *args, **kwargs)
torch.save = save
from ctvq.cli import main
sys.exit(main(["train", *sys.argv[2:]]))
"""


def test_kill_while_writing_a_checkpoint_leaves_previous_set_loadable(setup):
    root, data, config, reference = setup
    out = root / "killed_in_save"
    marker = root / "writing_misc"
    cmd = [sys.executable, "-c", _SLOW_MISC, str(marker), *_command(config, data, out)[4:]]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < end, "the step-8 misc file was never written"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpts = out / "ckpts"
    assert (ckpts / "vqvae_step0000008.pt").is_file()  # model of the interrupted set is in place ...
    assert not misc_path(ckpts, 8).exists()  # ... but its misc is not: the set is incomplete
    assert list(ckpts.glob(".misc_step0000008.pt.*.tmp"))  # the half-written file is only a temp file
    assert complete_steps(ckpts, (0.9, 0.99)) == [4]
    load_file(misc_path(ckpts, 4))
    _run(_command(config, data, out))
    assert "resumed from step 4" in (out / "log.txt").read_text()
    assert not list(ckpts.glob(".*.tmp"))
    _assert_same_model(final_path(reference), final_path(out))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_saves_the_step_reached_and_resume_matches_uninterrupted_run(setup, signum):
    """What SLURM preemption (SIGTERM) or --signal USR1 before the time limit does: the trainer finishes its
    step, saves it (6 is not a multiple of i_save 4), exits 128 + signal; the rerun resumes from that step."""
    root, data, config, reference = setup
    out = root / f"stopped_{signum.name}"
    proc = subprocess.Popen(_command(config, data, out), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(out / "log.txt", "step 6/14", proc)
    os.kill(proc.pid, signum)
    assert proc.wait(timeout=120) == 128 + signum, proc.stderr.read()
    stopped_at = complete_steps(out / "ckpts", (0.9, 0.99))[-1]
    assert stopped_at not in (4, 8, 12) and 6 <= stopped_at < 14
    log = (out / "log.txt").read_text()
    assert f"stop requested ({signum.name}) at step {stopped_at}: checkpoint saved" in log
    assert not (out / "run.lock").exists() and not final_path(out).exists()
    _run(_command(config, data, out))
    assert f"resumed from step {stopped_at}" in (out / "log.txt").read_text()
    _assert_same_model(final_path(reference), final_path(out))
    steps = [int(line.split(",")[0]) for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 15))


def test_a_second_trainer_on_a_live_run_folder_refuses_naming_the_holder(setup):
    root, data, config, _ = setup
    endless = write_config(root / "endless.json", **{**json.loads(config.read_text())["trainer"]["args"],
                                                      "max_steps": 100_000})
    out = root / "locked"
    first = subprocess.Popen(_command(endless, data, out), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out / "log.txt", "step 5/100000", first)
        second = subprocess.run(_command(endless, data, out), cwd=ROOT, capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"another trainer is using this run folder (pid {first.pid} on this host" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()
    # the holder died (SIGKILL): its lock is stale and the next trainer takes it over
    last = complete_steps(out / "ckpts", (0.9, 0.99))[-1]
    done = subprocess.run(_command(endless, data, out, "--max-steps", str(last + 2)), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"took over the run lock of a dead trainer (pid {first.pid}" in done.stderr
    steps = [int(line.split(",")[0]) for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, last + 3))
