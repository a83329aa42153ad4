"""The Snakemake DAG run for real: dry-run counts, job resources, config errors, a full run then a no-op and
the exact reruns each setting causes, and a truncated scan as a failed case."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from data_helpers import write_cases, write_manifest
from workflow_helpers import ROOT, job_counts, snakemake, write_config

from ctvq.ct.resources import preprocess_mem_mb
from ctvq.ct.sample import load_sample


def test_dry_run_lists_one_job_per_case_and_window(tmp_path: Path) -> None:
    write_config(tmp_path, inputs={"phantoms": 3}, windows=["lung", "bone"])
    run = snakemake(tmp_path, "-n", "--cores", "1")
    assert run.returncode == 0, run.stderr
    counts = job_counts(run.stdout + run.stderr)
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
    config = write_config(tmp_path, resolution=1024, inputs={"phantoms": 1})
    settings = yaml.safe_load(config.read_text())
    settings["train"].update(stage_configs)
    config.write_text(yaml.safe_dump(settings))
    run = snakemake(tmp_path, "-n", "--cores", "1", "--", "results/samples/lung/phantom00.npz")
    said = run.stdout + run.stderr
    assert run.returncode == 0, said
    blocks = re.split(r"^\s*rule ", said, flags=re.M)[1:]  # one per job (indented within the case group)
    requested = {b.split(":", 1)[0]: m.group(1) for b in blocks if (m := re.search(r"mem_mb=(\d+)", b))}
    assert requested == {step: str(preprocess_mem_mb(step, 1024)) for step in ("window", "sdf", "index")}
    assert int(requested["sdf"]) >= 26000  # a real chest/abdomen CT peaks at 17.4 GiB there


def test_bad_pipeline_config_is_refused_naming_the_key(tmp_path: Path) -> None:
    write_config(tmp_path, windows=["lung", "lungs"])
    run = snakemake(tmp_path, "-n", "--cores", "1")
    assert run.returncode != 0
    said = run.stdout + run.stderr
    assert "pipeline.yaml (over configs/pipeline.yaml): windows: 'lungs' is not a ctvq window; choose from " \
        "lung, bone, soft_tissue, brain" in said, said
    write_config(tmp_path, experiment="demo")  # a key older configs carried, which named nothing
    run = snakemake(tmp_path, "-n", "--cores", "1")
    said = run.stdout + run.stderr
    assert "pipeline.yaml (over configs/pipeline.yaml): experiment: no longer a setting" in said, said


def test_band_per_window_reaches_sdf_and_training(tmp_path: Path) -> None:
    from ctvq.ct.band import default_band

    configs = ROOT / "configs" / "vqvae"
    write_config(tmp_path, inputs={"phantoms": 1}, windows=["lung", "bone"], band={"lung": 2.5},
                  train={"windows": ["lung", "bone"], "stage1_config": str(configs / "tiny_stage1.json"),
                         "stage2_config": str(configs / "tiny_stage2.json")})
    run = snakemake(tmp_path, "-n", "-p", "--cores", "1")
    said = run.stdout + run.stderr
    assert run.returncode == 0, said
    assert re.search(r"sdf results/windowed/lung/\S+ .*--band 2\.5 ", said)
    assert re.search(rf"sdf results/windowed/bone/\S+ .*--band {default_band('bone')} ", said)
    assert re.search(rf"train .*--window bone --band {default_band('bone')} ", said)


def test_resolution_per_window_reaches_preprocessing_planning_and_training(tmp_path: Path) -> None:
    configs = ROOT / "configs" / "vqvae"
    both = {"windows": ["lung", "bone"], "stage1_config": str(configs / "tiny_stage1.json"),
            "stage2_config": str(configs / "tiny_stage2.json")}
    two = {"inputs": {"phantoms": 1}, "windows": ["lung", "bone"], "train": both}
    write_config(tmp_path, **two, resolution={"lung": 64, "bone": 128})
    run = snakemake(tmp_path, "-n", "-p", "--cores", "1")
    said = run.stdout + run.stderr
    assert run.returncode == 0, said
    for window, side in (("lung", 64), ("bone", 128)):
        assert re.search(rf"--window {window} --resolution {side} ", said), said
    assert re.search(r"plan --config \S+ --data results/manifests/bone\.csv --resolution 128", said), said
    assert re.search(r"train --config \S+tiny_stage2\.json .*--window bone --band \S+ --resolution 128 ",
                     said)
    assert re.search(r"train --config \S+tiny_stage1\.json .*--window lung --band \S+ --resolution 64 ", said)
    refusals = {  # setting -> what the message names
        "a window without one": ({"resolution": {"lung": 64}},
                                 "resolution: no resolution for 'bone'; give every window of `windows` one"),
        "an unknown window": ({"resolution": {"lung": 64, "bone": 64, "lungs": 64}},
                              "resolution: 'lungs' is not a ctvq window"),
        "a side off the grid": ({"resolution": {"lung": 64, "bone": 100}}, "resolution"),
    }
    chunked = json.loads((configs / "tiny_stage2.json").read_text())
    chunked["models"]["vqvae"]["args"]["chunk_size"] = 2  # divides 64/8, not 72/8
    (tmp_path / "chunked.json").write_text(json.dumps(chunked))
    refusals["a config invalid at a window's resolution"] = (
        {"resolution": {"lung": 64, "bone": 72},
         "train": {**both, "stage2_config": str(tmp_path / "chunked.json")}},
        "train.stage2_config at the bone window's resolution 72: ")
    for case, (settings, message) in refusals.items():
        write_config(tmp_path, **{**two, **settings})
        run = snakemake(tmp_path, "-n", "--cores", "1")
        said = run.stdout + run.stderr
        assert run.returncode != 0 and message in said, (case, said[-2000:])


def test_job_memory_comes_from_ctvq_plan_unless_mem_mb_is_given(tmp_path: Path) -> None:
    write_config(tmp_path)  # train.mem_mb and evaluate.mem_mb: null, the defaults
    said = snakemake(tmp_path, "-n", "--cores", "1").stdout
    assert job_counts(said)["plan"] == 2, said  # one per stage of the window
    assert said.count("mem_mb=<TBD>") == 3, said  # both training jobs and evaluation: no plan yet
    (tmp_path / "results" / "manifests").mkdir(parents=True)
    write_manifest(tmp_path / "results" / "manifests" / "lung.csv",
                   write_cases(tmp_path / "samples", [10.0, 20.0]))
    plans = [f"results/train/lung/plan/stage{stage}.json" for stage in (1, 2)]
    run = snakemake(tmp_path, "--cores", "1", "--", *plans)  # the plan rule runs `ctvq plan` for real
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    stage1, stage2 = (json.loads((tmp_path / p).read_text()) for p in plans)
    assert stage1["train_mem_mb"] >= stage1["train_peak_mb"] * 1.25 and stage2["eval_mem_mb"] >= 1000
    said = snakemake(tmp_path, "-n", "--cores", "1").stdout
    assert f"mem_mb={stage1['train_mem_mb']}," in said and f"mem_mb={stage2['eval_mem_mb']}," in said, said
    write_config(tmp_path, train={"windows": ["lung"], "stage1_config": str(ROOT / "configs" / "vqvae" /
                                                                             "tiny_stage1.json"),
                                   "stage2_config": str(ROOT / "configs" / "vqvae" / "tiny_stage2.json"),
                                   "mem_mb": 6000}, evaluate={"mem_mb": 5000, "allow_collapse": True})
    said = snakemake(tmp_path, "-n", "--cores", "1", "--forceall").stdout
    assert "plan" not in job_counts(said) and "mem_mb=6000," in said and "mem_mb=5000," in said, said
    write_config(tmp_path, evaluate={"chunk_size": 2, "allow_collapse": True})  # ctvq plan's eval remedy
    said = snakemake(tmp_path, "-n", "-p", "--cores", "1", "--forceall").stdout
    assert re.search(r"plan --config \S+tiny_stage2\.json .*--eval-chunk-size 2 --requests-out", said), said
    assert re.search(r"ctvq eval .*--allow-collapse --chunk-size 2 ", said), said
    assert "tiny_stage1.json --data results/manifests/lung.csv --resolution 64 --requests-out" in said, said


def test_workflow_messages_name_the_configfile_given(tmp_path: Path) -> None:
    config = write_config(tmp_path, train={"windows": ["bone"], "stage1_config": "x", "stage2_config": "y"})
    run = snakemake(tmp_path, "-n", "--cores", "1")
    said = run.stdout + run.stderr
    assert run.returncode != 0 and f"{config} (over configs/pipeline.yaml): train.windows" in said, said


def test_surface_settings_reach_ctvq_window_and_bad_ones_are_refused(tmp_path: Path) -> None:
    write_config(tmp_path, inputs={"phantoms": 1}, windows=["lung", "bone"],
                  surface={"lung": {"smooth_mm": 0.5, "body_mask": False}, "bone": {"pad": "air"}})
    run = snakemake(tmp_path, "-n", "-p", "--cores", "1", "--", "results/windowed/lung/phantom00.npz",
                     "results/windowed/bone/phantom00.npz")
    said = run.stdout + run.stderr
    assert run.returncode == 0, said
    assert re.search(r"--window lung .*--smooth-mm 0\.5 --no-body-mask", said)
    assert re.search(r"--window bone .*--pad air", said)
    write_config(tmp_path, surface={"lung": {"smooth_mm": -1}})
    run = snakemake(tmp_path, "-n", "--cores", "1")
    said = run.stdout + run.stderr
    assert run.returncode != 0 and "smooth_mm" in said and "-1" in said


@pytest.mark.slow
def test_full_run_trains_evaluates_and_a_second_run_does_nothing(tmp_path: Path) -> None:
    ran = yaml.safe_load(write_config(tmp_path).read_text())
    run = snakemake(tmp_path, "--cores", "2")
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
    again = snakemake(tmp_path, "-n", "--cores", "2")
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr
    benchmarks = {p.relative_to(tmp_path / "logs" / "benchmark").parts[0]
                  for p in (tmp_path / "logs" / "benchmark").rglob("*.tsv")}
    assert benchmarks == {"phantom", "window", "sdf", "index", "manifest", "train", "evaluate"}
    report = snakemake(tmp_path, "--report", str(tmp_path / "report.zip"))
    assert report.returncode == 0, (report.stdout + report.stderr)[-2000:]
    with zipfile.ZipFile(tmp_path / "report.zip") as archive:
        names = archive.namelist()
    files = [Path(n).name for n in names if "/data/raw/" in n]  # report/data/raw/<hash>/<file>
    assert {"training_curves.png", "metrics.json"} <= set(files), names
    assert files.count("phantom00.png") == files.count("phantom01.png") == 2, names  # preview, eval figure
    write_config(tmp_path, split={"fractions": {"train": 0.5, "val": 0.5}, "seed": 1})
    resplit = snakemake(tmp_path, "-n", "--cores", "2")  # the split is a param of the manifest rule
    assert resplit.returncode == 0
    counts = job_counts(resplit.stdout + resplit.stderr)
    assert counts["manifest"] == 1 and counts["evaluate"] == 1 and "index" not in counts
    # every setting that changes an output reruns exactly the jobs it affects (against the run made above:
    # the resplit was a dry run only)
    longer = {**ran["train"], "max_steps": 4}
    write_config(tmp_path, train=longer)
    counts = job_counts(snakemake(tmp_path, "-n", "--cores", "2").stdout)
    assert counts == {"all": 1, "evaluate": 1, "train_stage1": 1, "train_stage2": 1}, counts
    write_config(tmp_path, band=2.5)
    counts = job_counts(snakemake(tmp_path, "-n", "--cores", "2").stdout)
    # the windowed volumes were temp(): they are made again, the phantoms are not
    assert counts["sdf"] == counts["window"] == 2 and counts["train_stage1"] == 1, counts
    assert "phantom" not in counts, counts
    assert not list((tmp_path / "results").glob("windowed/*/*.npz"))  # gone after the run above
    write_config(tmp_path, resolution=72)  # the same training configs, run at 72 (ctvq train --resolution)
    counts = job_counts(snakemake(tmp_path, "-n", "--cores", "2").stdout)
    assert counts["window"] == counts["index"] == 2 and counts["evaluate"] == 1 and "phantom" not in counts
    write_config(tmp_path, windows=["lung", "bone"])  # a window more: its chain and manifest only
    counts = job_counts(snakemake(tmp_path, "-n", "--cores", "2").stdout)
    assert counts == {"all": 1, "window": 2, "sdf": 2, "index": 2, "manifest": 1}, counts
    write_config(tmp_path)
    stage2 = json.loads(Path(ran["train"]["stage2_config"]).read_text())
    stage2["trainer"]["args"]["optimizer"]["args"]["lr"] = 0.002  # a value in a training JSON
    edited = tmp_path / "stage2.json"
    edited.write_text(json.dumps(stage2))
    write_config(tmp_path, train={**ran["train"], "stage2_config": str(edited)})
    counts = job_counts(snakemake(tmp_path, "-n", "--cores", "2").stdout)
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
    config = write_config(tmp_path, inputs={"phantoms": 2, "scan_dir": str(tmp_path / "scans")})
    settings = yaml.safe_load(config.read_text())
    settings["train"]["max_steps"] = 1
    config.write_text(yaml.safe_dump(settings))
    run = snakemake(tmp_path, "--cores", "2", "train")
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
