"""Training jobs of the workflow killed the way schedulers and users kill them: the trainer mid-run (a rerun
resumes it), and Snakemake alone (its orphaned trainer keeps the run folder)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from workflow_helpers import ROOT, SNAKEMAKE, snakemake, write_config


def _stage1_job(tmp_path: Path, **trainer: int) -> tuple[str, list[str]]:
    """(target, snakemake command) of a one-phantom workflow whose stage-1 config has ``trainer`` args
    (checkpoints every 5 steps)."""
    stage1 = json.loads((ROOT / "configs" / "vqvae" / "tiny_stage1.json").read_text())
    stage1["trainer"]["args"].update(i_save=5, i_print=5, **trainer)
    (tmp_path / "stage1.json").write_text(json.dumps(stage1))
    config = write_config(tmp_path, inputs={"phantoms": 1})
    settings = yaml.safe_load(config.read_text())
    settings["train"].update(stage1_config=str(tmp_path / "stage1.json"), max_steps=None)
    config.write_text(yaml.safe_dump(settings))
    target = "results/train/lung/stage1/ckpts/final.pt"
    return target, [SNAKEMAKE, "--snakefile", str(ROOT / "workflow" / "Snakefile"), "--directory",
                    str(tmp_path), "--configfile", str(config), "--cores", "1", target]


@pytest.mark.slow
def test_training_job_killed_mid_run_resumes_from_its_last_checkpoint_when_rerun(tmp_path: Path) -> None:
    target, cmd = _stage1_job(tmp_path, max_steps=150, i_sample=1000)
    ckpts = tmp_path / "results" / "train" / "lung" / "stage1" / "ckpts"
    job = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list(ckpts.glob("misc_step*.pt")) and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.2)
        assert list(ckpts.glob("misc_step*.pt")), "no checkpoint was written before the deadline"
        # What a scheduler does to a job past its limit: SIGKILL to the training job, Snakemake lives on.
        subprocess.run(["pkill", "-9", "-f", str(tmp_path / "stage1.json")], check=True)
        assert job.wait(timeout=120) != 0
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert not (ckpts / "final.pt").exists()
    rerun = snakemake(tmp_path, "--cores", "1", "--rerun-incomplete", target)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    log = (tmp_path / "logs" / "train" / "lung" / "stage1.log").read_text()
    resumed = re.search(r"resumed from step (\d+)", log)
    assert resumed and int(resumed.group(1)) >= 5, log[-2000:]
    assert (ckpts / "final.pt").exists()


@pytest.mark.slow
def test_an_orphaned_trainer_keeps_its_run_folder_when_the_workflow_is_rerun(tmp_path: Path) -> None:
    """SIGKILL to Snakemake alone leaves its trainer running; a rerun must not start a second trainer on the
    same run folder (interleaved checkpoints, duplicated metrics rows): the run lock refuses it."""
    target, cmd = _stage1_job(tmp_path, max_steps=100_000, i_sample=100_000)
    run_dir = tmp_path / "results" / "train" / "lung" / "stage1"
    job = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list((run_dir / "ckpts").glob("misc_step*.pt")) and time.monotonic() < deadline:
            assert job.poll() is None, "the workflow ended before training wrote a checkpoint"
            time.sleep(0.2)
        os.kill(job.pid, signal.SIGKILL)  # Snakemake only: its trainer lives on, orphaned
        job.wait()
        holder = json.loads((run_dir / "run.lock").read_text())
        assert snakemake(tmp_path, "--unlock").returncode == 0
        rerun = snakemake(tmp_path, "--cores", "1", "--rerun-incomplete", target)
        assert rerun.returncode != 0
        log = (tmp_path / "logs" / "train" / "lung" / "stage1.log").read_text(errors="replace")
        assert f"another trainer is using this run folder (pid {holder['pid']} on this host" in log
        steps = [int(r.split(",")[0]) for r in (run_dir / "metrics.csv").read_text().splitlines()[1:] if r]
        assert steps == sorted(set(steps)), "two trainers wrote metrics.csv"
    finally:
        subprocess.run(["pkill", "-9", "-f", str(tmp_path / "stage1.json")], check=False)
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
