"""The Snakemake DAG run for real: dry-run counts, a full run then a no-op, a truncated scan as a failed case,
and the same DAG submitted to a real single-node SLURM cluster (scripts/slurm-local.sh)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from data_helpers import write_cases, write_manifest

from ctvq.ct.resources import preprocess_mem_mb
from ctvq.ct.sample import load_sample

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def _write_config(workdir: Path, **overrides) -> Path:
    config = {
        "inputs": {"phantoms": 2},
        "windows": ["lung"],
        "resolution": 64,
        "band": 3.0,
        "min_points": 100,
        "results": "results",
        "train": {
            "windows": ["lung"],
            "stage1_config": str(ROOT / "configs" / "vqvae" / "tiny_stage1.json"),
            "stage2_config": str(ROOT / "configs" / "vqvae" / "tiny_stage2.json"),
            "max_steps": 3,
            "threads": 1,
        },
        # 3 steps learn no surface: ctvq eval would exit 3 (collapse); these tests are about the DAG
        "evaluate": {"allow_collapse": True},
    }
    config.update(overrides)
    path = workdir / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _snakemake(workdir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [SNAKEMAKE, "--snakefile", str(ROOT / "workflow" / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "pipeline.yaml"), *args]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=workdir)


def _job_counts(output: str) -> dict[str, int]:
    table = output.split("Job stats:", 1)[1]
    rows = re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)
    return {m.group(1): int(m.group(2)) for m in rows if m.group(1) != "total"}


def test_dry_run_lists_one_job_per_case_and_window(tmp_path: Path) -> None:
    _write_config(tmp_path, inputs={"phantoms": 3}, windows=["lung", "bone"])
    run = _snakemake(tmp_path, "-n", "--cores", "1")
    assert run.returncode == 0, run.stderr
    counts = _job_counts(run.stdout + run.stderr)
    assert counts == {"phantom": 3, "window": 6, "sdf": 6, "index": 6, "manifest": 2, "plan": 2,
                      "train_stage1": 1, "train_stage2": 1, "evaluate": 1, "all": 1}


def test_preprocessing_jobs_request_memory_for_their_resolution(tmp_path: Path) -> None:
    """At 1024 the window job needs ~9 GiB and sdf ~17 GiB: the rules size their memory requests by it."""
    stage_configs = {}
    for stage in (1, 2):
        cfg = json.loads((ROOT / "configs" / "vqvae" / f"tiny_stage{stage}.json").read_text())
        cfg["dataset"]["args"]["resolution"] = 1024
        cfg["models"]["vqvae"]["args"]["resolution"] = 128
        stage_configs[f"stage{stage}_config"] = str(tmp_path / f"stage{stage}.json")
        Path(stage_configs[f"stage{stage}_config"]).write_text(json.dumps(cfg))
    config = _write_config(tmp_path, resolution=1024, inputs={"phantoms": 1})
    settings = yaml.safe_load(config.read_text())
    settings["train"].update(stage_configs)
    config.write_text(yaml.safe_dump(settings))
    run = _snakemake(tmp_path, "-n", "--cores", "1", "--", "results/samples/lung/phantom00.npz")
    said = run.stdout + run.stderr
    assert run.returncode == 0, said
    blocks = re.split(r"^\s*rule ", said, flags=re.M)[1:]  # one per job (indented within the case group)
    requested = {b.split(":", 1)[0]: m.group(1) for b in blocks if (m := re.search(r"mem_mb=(\d+)", b))}
    assert requested == {step: str(preprocess_mem_mb(step, 1024)) for step in ("window", "sdf", "index")}
    assert int(requested["sdf"]) >= 26000  # a real chest/abdomen CT peaks at 17.4 GiB there


def test_bad_pipeline_config_is_refused_naming_the_key(tmp_path: Path) -> None:
    _write_config(tmp_path, windows=["lung", "lungs"])
    run = _snakemake(tmp_path, "-n", "--cores", "1")
    assert run.returncode != 0
    said = run.stdout + run.stderr
    assert "pipeline.yaml (over configs/pipeline.yaml): windows: 'lungs' is not a ctvq window; choose from " \
        "lung, bone, soft_tissue, brain" in said, said
    _write_config(tmp_path, experiment="demo")  # a key older configs carried, which named nothing
    run = _snakemake(tmp_path, "-n", "--cores", "1")
    said = run.stdout + run.stderr
    assert "pipeline.yaml (over configs/pipeline.yaml): experiment: no longer a setting" in said, said


def test_band_per_window_reaches_sdf_and_training(tmp_path: Path) -> None:
    from ctvq.ct.band import default_band

    configs = ROOT / "configs" / "vqvae"
    _write_config(tmp_path, inputs={"phantoms": 1}, windows=["lung", "bone"], band={"lung": 2.5},
                  train={"windows": ["lung", "bone"], "stage1_config": str(configs / "tiny_stage1.json"),
                         "stage2_config": str(configs / "tiny_stage2.json")})
    run = _snakemake(tmp_path, "-n", "-p", "--cores", "1")
    said = run.stdout + run.stderr
    assert run.returncode == 0, said
    assert re.search(r"sdf results/windowed/lung/\S+ .*--band 2\.5 ", said)
    assert re.search(rf"sdf results/windowed/bone/\S+ .*--band {default_band('bone')} ", said)
    assert re.search(rf"train .*--window bone --band {default_band('bone')} ", said)


def test_job_memory_comes_from_ctvq_plan_unless_mem_mb_is_given(tmp_path: Path) -> None:
    _write_config(tmp_path)  # train.mem_mb and evaluate.mem_mb: null, the defaults
    said = _snakemake(tmp_path, "-n", "--cores", "1").stdout
    assert _job_counts(said)["plan"] == 2, said  # one per stage of the window
    assert said.count("mem_mb=<TBD>") == 3, said  # both training jobs and evaluation: no plan yet
    (tmp_path / "results" / "manifests").mkdir(parents=True)
    write_manifest(tmp_path / "results" / "manifests" / "lung.csv",
                   write_cases(tmp_path / "samples", [10.0, 20.0]))
    plans = [f"results/train/lung/plan/stage{stage}.json" for stage in (1, 2)]
    run = _snakemake(tmp_path, "--cores", "1", "--", *plans)  # the plan rule runs `ctvq plan` for real
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    stage1, stage2 = (json.loads((tmp_path / p).read_text()) for p in plans)
    assert stage1["train_mem_mb"] >= stage1["train_peak_mb"] * 1.25 and stage2["eval_mem_mb"] >= 1000
    said = _snakemake(tmp_path, "-n", "--cores", "1").stdout
    assert f"mem_mb={stage1['train_mem_mb']}," in said and f"mem_mb={stage2['eval_mem_mb']}," in said, said
    _write_config(tmp_path, train={"windows": ["lung"], "stage1_config": str(ROOT / "configs" / "vqvae" /
                                                                             "tiny_stage1.json"),
                                   "stage2_config": str(ROOT / "configs" / "vqvae" / "tiny_stage2.json"),
                                   "mem_mb": 6000}, evaluate={"mem_mb": 5000, "allow_collapse": True})
    said = _snakemake(tmp_path, "-n", "--cores", "1", "--forceall").stdout
    assert "plan" not in _job_counts(said) and "mem_mb=6000," in said and "mem_mb=5000," in said, said
    _write_config(tmp_path, evaluate={"chunk_size": 2, "allow_collapse": True})  # ctvq plan's eval remedy
    said = _snakemake(tmp_path, "-n", "-p", "--cores", "1", "--forceall").stdout
    assert re.search(r"plan --config \S+tiny_stage2\.json .*--eval-chunk-size 2 --requests-out", said), said
    assert re.search(r"ctvq eval .*--allow-collapse --chunk-size 2 ", said), said
    assert "tiny_stage1.json --data results/manifests/lung.csv --requests-out" in said, said


def test_workflow_messages_name_the_configfile_given(tmp_path: Path) -> None:
    config = _write_config(tmp_path, train={"windows": ["bone"], "stage1_config": "x", "stage2_config": "y"})
    run = _snakemake(tmp_path, "-n", "--cores", "1")
    said = run.stdout + run.stderr
    assert run.returncode != 0 and f"{config} (over configs/pipeline.yaml): train.windows" in said, said


def test_surface_settings_reach_ctvq_window_and_bad_ones_are_refused(tmp_path: Path) -> None:
    _write_config(tmp_path, inputs={"phantoms": 1}, windows=["lung", "bone"],
                  surface={"lung": {"smooth_mm": 0.5, "body_mask": False}, "bone": {"pad": "air"}})
    run = _snakemake(tmp_path, "-n", "-p", "--cores", "1", "--", "results/windowed/lung/phantom00.npz",
                     "results/windowed/bone/phantom00.npz")
    said = run.stdout + run.stderr
    assert run.returncode == 0, said
    assert re.search(r"--window lung .*--smooth-mm 0\.5 --no-body-mask", said)
    assert re.search(r"--window bone .*--pad air", said)
    _write_config(tmp_path, surface={"lung": {"smooth_mm": -1}})
    run = _snakemake(tmp_path, "-n", "--cores", "1")
    said = run.stdout + run.stderr
    assert run.returncode != 0 and "smooth_mm" in said and "-1" in said


@pytest.mark.slow
def test_full_run_trains_evaluates_and_a_second_run_does_nothing(tmp_path: Path) -> None:
    ran = yaml.safe_load(_write_config(tmp_path).read_text())
    run = _snakemake(tmp_path, "--cores", "2")
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    metrics = json.loads((tmp_path / "results" / "eval" / "lung" / "metrics.json").read_text())
    assert metrics["num_cases"] == 2  # every ok case is evaluated; the headline is the held-out one
    assert metrics["eval_split"] == "val" and metrics["val/num_cases"] == 1 and "val/occupancy_iou" in metrics
    final = tmp_path / "results" / "train" / "lung" / "stage2" / "ckpts" / "final.pt"
    stage2 = torch.load(final, weights_only=False)
    assert stage2["ctvq"]["stage"] == 2
    manifest = (tmp_path / "results" / "manifests" / "lung.csv").read_text()
    assert manifest.count(",ok") == 2 and manifest.count(",ok,val,") == 1  # 2 phantoms: one held out
    sample = load_sample(tmp_path / "results" / "samples" / "lung" / "phantom00.npz")
    assert sample.num_points > 100 and sample.window == "lung" and sample.resolution == 64
    again = _snakemake(tmp_path, "-n", "--cores", "2")
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr
    benchmarks = {p.relative_to(tmp_path / "logs" / "benchmark").parts[0]
                  for p in (tmp_path / "logs" / "benchmark").rglob("*.tsv")}
    assert benchmarks == {"phantom", "window", "sdf", "index", "manifest", "train", "evaluate"}
    report = _snakemake(tmp_path, "--report", str(tmp_path / "report.zip"))
    assert report.returncode == 0, (report.stdout + report.stderr)[-2000:]
    with zipfile.ZipFile(tmp_path / "report.zip") as archive:
        names = archive.namelist()
    files = [Path(n).name for n in names if "/data/raw/" in n]  # report/data/raw/<hash>/<file>
    assert {"training_curves.png", "metrics.json"} <= set(files), names
    assert files.count("phantom00.png") == files.count("phantom01.png") == 2, names  # preview, eval figure
    _write_config(tmp_path, split={"fractions": {"train": 0.5, "val": 0.5}, "seed": 1})
    resplit = _snakemake(tmp_path, "-n", "--cores", "2")  # the split is a param of the manifest rule
    assert resplit.returncode == 0
    counts = _job_counts(resplit.stdout + resplit.stderr)
    assert counts["manifest"] == 1 and counts["evaluate"] == 1 and "index" not in counts
    # every setting that changes an output reruns exactly the jobs it affects (against the run made above:
    # the resplit was a dry run only)
    longer = {**ran["train"], "max_steps": 4}
    _write_config(tmp_path, train=longer)
    counts = _job_counts(_snakemake(tmp_path, "-n", "--cores", "2").stdout)
    assert counts == {"all": 1, "evaluate": 1, "train_stage1": 1, "train_stage2": 1}, counts
    _write_config(tmp_path, band=2.5)
    counts = _job_counts(_snakemake(tmp_path, "-n", "--cores", "2").stdout)
    # the windowed volumes were temp(): they are made again, the phantoms are not
    assert counts["sdf"] == counts["window"] == 2 and counts["train_stage1"] == 1, counts
    assert "phantom" not in counts, counts
    assert not list((tmp_path / "results").glob("windowed/*/*.npz"))  # gone after the run above
    at_72 = {}  # another resolution needs training configs that agree (the workflow checks it)
    for stage in (1, 2):
        cfg = json.loads(Path(ran["train"][f"stage{stage}_config"]).read_text())
        cfg["dataset"]["args"]["resolution"], cfg["models"]["vqvae"]["args"]["resolution"] = 72, 9
        at_72[f"stage{stage}_config"] = str(tmp_path / f"stage{stage}_72.json")
        Path(at_72[f"stage{stage}_config"]).write_text(json.dumps(cfg))
    _write_config(tmp_path, resolution=72, train={**ran["train"], **at_72})
    counts = _job_counts(_snakemake(tmp_path, "-n", "--cores", "2").stdout)
    assert counts["window"] == counts["index"] == 2 and counts["evaluate"] == 1 and "phantom" not in counts
    _write_config(tmp_path, windows=["lung", "bone"])  # a window more: its chain and manifest only
    counts = _job_counts(_snakemake(tmp_path, "-n", "--cores", "2").stdout)
    assert counts == {"all": 1, "window": 2, "sdf": 2, "index": 2, "manifest": 1}, counts
    _write_config(tmp_path)
    stage2 = json.loads(Path(ran["train"]["stage2_config"]).read_text())
    stage2["trainer"]["args"]["optimizer"]["args"]["lr"] = 0.002  # a value in a training JSON
    edited = tmp_path / "stage2.json"
    edited.write_text(json.dumps(stage2))
    _write_config(tmp_path, train={**ran["train"], "stage2_config": str(edited)})
    counts = _job_counts(_snakemake(tmp_path, "-n", "--cores", "2").stdout)
    assert counts == {"all": 1, "plan": 1, "evaluate": 1, "train_stage2": 1}, counts  # stage 2 replanned


@pytest.mark.slow
def test_truncated_scan_in_scan_dir_is_a_failed_case_while_the_others_train(tmp_path: Path) -> None:
    from ctvq.ct.io import write_ct
    from ctvq.ct.phantom import chest_phantom

    scan_dir = tmp_path / "scans" / "site1"
    scan_dir.mkdir(parents=True)
    write_ct(chest_phantom((48, 48, 16), (1.5, 1.5, 4.0), seed=4), scan_dir / "cut.nii.gz")
    whole = (scan_dir / "cut.nii.gz").read_bytes()
    (scan_dir / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])  # as `head -c` of an interrupted copy
    config = _write_config(tmp_path, inputs={"phantoms": 2, "scan_dir": str(tmp_path / "scans")})
    settings = yaml.safe_load(config.read_text())
    settings["train"]["max_steps"] = 1
    config.write_text(yaml.safe_dump(settings))
    run = _snakemake(tmp_path, "--cores", "2", "train")
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    log = (tmp_path / "logs" / "window" / "lung" / "site1_cut.log").read_text()
    assert "cut.nii.gz: truncated" in log
    manifest = pd.read_csv(tmp_path / "results" / "manifests" / "lung.csv", keep_default_na=False)
    status = dict(zip(manifest["case_id"], manifest["status"], strict=True))
    assert status["phantom00"] == status["phantom01"] == "ok"
    assert status["site1_cut"].startswith("failed: window: ") and "truncated" in status["site1_cut"]
    assert (tmp_path / "results" / "train" / "lung" / "stage2" / "ckpts" / "final.pt").exists()
    previews = tmp_path / "results" / "previews" / "lung"  # one per case and window, the failed one included
    assert sorted(p.name for p in previews.iterdir()) == ["phantom00.png", "phantom01.png", "site1_cut.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in previews.iterdir())


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
        _write_config(workdir, inputs={"phantoms": 1})
    assert _snakemake(local, "--cores", "2", "preprocess").returncode == 0
    # The plugin can hang on status polling: a hard timeout keeps the suite bounded.
    run = _snakemake(cluster, "--profile", str(ROOT / "workflow" / "profiles" / "slurm-local"), timeout=900)
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
    _write_config(tmp_path)
    gpus = ("--set-resources", "train_stage1:gpu=4")
    run = _snakemake(tmp_path, "-n", "-p", "--cores", "1", *gpus, "--", "train")
    said = run.stdout + run.stderr
    assert run.returncode == 0, said
    stage1 = next(line for line in said.splitlines() if "train --config" in line and "tiny_stage1" in line)
    stage2 = next(line for line in said.splitlines() if "train --config" in line and "tiny_stage2" in line)
    assert "torch.distributed.run --standalone --nproc_per_node 4 -m ctvq train" in stage1
    assert "torch.distributed.run" not in stage2


def _stage1_job(tmp_path: Path, **trainer: int) -> tuple[str, list[str]]:
    """(target, snakemake command) of a one-phantom workflow whose stage-1 config has ``trainer`` args
    (checkpoints every 5 steps)."""
    stage1 = json.loads((ROOT / "configs" / "vqvae" / "tiny_stage1.json").read_text())
    stage1["trainer"]["args"].update(i_save=5, i_print=5, **trainer)
    (tmp_path / "stage1.json").write_text(json.dumps(stage1))
    config = _write_config(tmp_path, inputs={"phantoms": 1})
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
    rerun = _snakemake(tmp_path, "--cores", "1", "--rerun-incomplete", target)
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
        assert _snakemake(tmp_path, "--unlock").returncode == 0
        rerun = _snakemake(tmp_path, "--cores", "1", "--rerun-incomplete", target)
        assert rerun.returncode != 0
        log = (tmp_path / "logs" / "train" / "lung" / "stage1.log").read_text(errors="replace")
        assert f"another trainer is using this run folder (pid {holder['pid']} on this host" in log
        steps = [int(r.split(",")[0]) for r in (run_dir / "metrics.csv").read_text().splitlines()[1:] if r]
        assert steps == sorted(set(steps)), "two trainers wrote metrics.csv"
    finally:
        subprocess.run(["pkill", "-9", "-f", str(tmp_path / "stage1.json")], check=False)
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
