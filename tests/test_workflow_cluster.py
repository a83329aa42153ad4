"""The same DAG submitted to a real single-node SLURM cluster (scripts/slurm-local.sh), and the training rule
on several GPUs (torchrun)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from workflow_helpers import ROOT, snakemake, write_config

from ctvq.ct.sample import load_sample


def _slurm_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root to install and start the local SLURM cluster"
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        return "needs Debian packages (apt-get) for slurm-wlm"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_slurm_available() is not None, reason=str(_slurm_available()))
def test_slurm_profile_runs_every_job_under_slurm_with_outputs_equal_to_a_local_run(tmp_path: Path) -> None:
    script = ROOT / "scripts" / "slurm-local.sh"
    up = subprocess.run(["bash", str(script), "up"], capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stdout + up.stderr
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    for workdir in (local, cluster):
        workdir.mkdir()
        write_config(workdir, inputs={"phantoms": 1})
    assert snakemake(local, "--cores", "2", "preprocess").returncode == 0
    # The plugin can hang on status polling: a hard timeout keeps the suite bounded.
    run = snakemake(cluster, "--profile", str(ROOT / "workflow" / "profiles" / "slurm-local"), timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    submitted = re.findall(r"submitted with SLURM jobid (\d+)", run.stdout + run.stderr)
    # one "case" group job (phantom, window, sdf, index), train_stage1, train_stage2, evaluate; the
    # manifest and `all` run locally
    assert len(submitted) == 4, run.stdout + run.stderr
    sacct = subprocess.run(["sacct", "-X", "-n", "-P", "--format=JobID,State", "-j", ",".join(submitted)],
                           capture_output=True, text=True, check=True).stdout
    states = dict(line.split("|") for line in sacct.strip().splitlines())
    assert states == {job: "COMPLETED" for job in submitted}
    a = load_sample(local / "results" / "samples" / "lung" / "phantom00.npz")
    b = load_sample(cluster / "results" / "samples" / "lung" / "phantom00.npz")
    for name in ("coords", "sdf", "latent_coords", "cell_start", "inside_bits", "affine"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_training_rule_given_several_gpus_launches_torchrun_with_one_process_each(tmp_path: Path) -> None:
    write_config(tmp_path)
    gpus = ("--set-resources", "train_stage1:gpu=4")
    run = snakemake(tmp_path, "-n", "-p", "--cores", "1", *gpus, "--", "train")
    said = run.stdout + run.stderr
    assert run.returncode == 0, said
    stage1 = next(line for line in said.splitlines() if "train --config" in line and "tiny_stage1" in line)
    stage2 = next(line for line in said.splitlines() if "train --config" in line and "tiny_stage2" in line)
    assert "torch.distributed.run --standalone --nproc_per_node 4 -m ctvq train" in stage1
    assert "torch.distributed.run" not in stage2
