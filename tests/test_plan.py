"""``ctvq plan``: the memory model against the benchmark it was fitted to; patches that fit and validate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_helpers import bench_module, write_cases, write_manifest

from ctvq.cli import main
from ctvq.cli.plan import memory_mb
from ctvq.config import load_config
from ctvq.train import plan

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "vqvae" / "tiny_stage2.json"
BENCH = ROOT / "bench"


def bench_memory():
    return bench_module("memory")


def test_memory_sizes_parse_with_binary_and_decimal_units():
    assert memory_mb("24GiB") == 24 * 1024
    assert memory_mb("16 GB") == pytest.approx(16e9 / 2**20)
    assert memory_mb("8000") == 8000
    with pytest.raises(Exception, match="give a size such as 24GiB"):
        memory_mb("lots")


def test_the_largest_micro_batch_is_made_of_the_largest_cropped_cases():
    cfg = load_config(TINY)  # batch 2 in 2 micro-batches: one case each; max_points 30000
    cases = [plan.CaseSize("a", 10_000, 50), plan.CaseSize("b", 90_000, 300), plan.CaseSize("c", 40_000, 100)]
    step = plan.largest_micro_batch(cfg, cases)
    assert (step.samples, step.points, step.latent) == (1, 30_000, 100)  # b cropped to a third of its cells
    assert step.decoded == 100 * 512


def test_shipped_coefficients_predict_every_benchmark_run_within_20_percent():
    """The benchmark's runs (bench/results/memory*.json: the knob table and the validation configs) against
    the model ctvq plan uses; a model change that moves memory shows up here."""
    _run_config = bench_memory()._run_config
    errors = {}
    for path in sorted((BENCH / "results").glob("memory*.json")):
        recorded = json.loads(path.read_text())
        if "cases" not in recorded:
            continue
        cases = [plan.CaseSize(c["case_id"], c["points"], c["latent"]) for c in recorded["cases"]
                 if c["split"] == "train"]
        for run in recorded["runs"]:
            predicted = plan.predict_training_peak(_run_config(run["knob"], run["max_points"]), cases).peak_mb
            errors[f"{path.name}: {run['knob']} @ {run['max_points']}"] = predicted / run["peak_rss_mb"] - 1
    assert len(errors) >= 30
    worst = max(errors, key=lambda k: abs(errors[k]))
    assert abs(errors[worst]) <= 0.20, f"{worst}: {errors[worst]:+.1%}"


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return write_manifest(tmp_path / "m.csv", write_cases(tmp_path, [10.0, 14.0, 18.0]))


def test_a_config_that_fits_exits_0(manifest: Path, capsys):
    assert main(["plan", "--config", str(TINY), "--data", str(manifest), "--memory", "24GiB"]) == 0
    assert "fits in 24.00 GiB" in capsys.readouterr().out


def test_the_patch_for_a_small_budget_fits_and_validates(manifest: Path, tmp_path: Path, capsys):
    cases = plan.case_sizes(manifest)
    base = plan.predict_training_peak(load_config(TINY), cases).peak_mb
    budget = base - 0.3 * plan.predict_training_peak(load_config(TINY), cases).parts["activations"]
    out = tmp_path / "patch.json"
    code = main(["plan", "--config", str(TINY), "--data", str(manifest), "--memory", f"{budget:.0f}MiB",
                 "--patch-out", str(out)])
    printed = capsys.readouterr().out
    assert code == 1 and "does not fit" in printed and "dataset.args.max_points = 15000" in printed
    patch = json.loads(out.read_text())
    merged = json.loads(TINY.read_text())
    for section, values in patch.items():
        for sub, inner in values.items():
            merged[section][sub].update(inner)
    patched = tmp_path / "patched.json"
    patched.write_text(json.dumps(merged))
    assert main(["validate-config", str(patched)]) == 0
    assert plan.predict_training_peak(load_config(patched), cases).peak_mb <= float(f"{budget:.0f}")


def test_a_budget_no_remedy_reaches_exits_2_naming_what_was_tried(manifest: Path, capsys):
    assert main(["plan", "--config", str(TINY), "--data", str(manifest), "--memory", "100MB"]) == 2
    assert "the reference's remedies do not make it fit (tried dataset.args.max_points=15000)" in \
        capsys.readouterr().err


def test_a_manifest_at_another_resolution_is_refused(manifest: Path, capsys):
    stage2 = ROOT / "configs" / "vqvae" / "stage2.json"  # trains at 512
    assert main(["plan", "--config", str(stage2), "--data", str(manifest)]) == 2
    assert "samples at resolution 64, but the config trains at dataset.args.resolution 512" in \
        capsys.readouterr().err


def test_resolution_plans_a_config_at_the_manifests_resolution(manifest: Path, tmp_path: Path, capsys):
    """--resolution 64 plans the 512 config on the 64 manifest, as `ctvq train --resolution 64` would train
    it: the same prediction as the config edited by hand to 64 (and its latent grid to 8)."""
    stage2 = ROOT / "configs" / "vqvae" / "stage2.json"  # trains at 512
    out = tmp_path / "requests.json"
    assert main(["plan", "--config", str(stage2), "--data", str(manifest), "--resolution", "64",
                 "--requests-out", str(out)]) == 0
    edited = json.loads(stage2.read_text())
    edited["dataset"]["args"]["resolution"], edited["models"]["vqvae"]["args"]["resolution"] = 64, 8
    by_hand = tmp_path / "stage2_64.json"
    by_hand.write_text(json.dumps(edited))
    expected = plan.predict_training_peak(load_config(by_hand), plan.case_sizes(manifest)).peak_mb
    assert json.loads(out.read_text())["train_peak_mb"] == round(expected)
    assert main(["plan", "--config", str(stage2), "--data", str(manifest), "--resolution", "100"]) == 2
    assert "dataset.args.resolution" in capsys.readouterr().err  # 100 is not a multiple of 8


def test_an_eval_case_is_sized_by_its_largest_chunk_with_halo_and_its_box():
    import numpy as np

    near = np.array([[x, y, z] for x in range(2) for y in range(2) for z in range(2)])  # 8 cells at 0
    far = 12 + np.array([[x, y, z] for x in range(3) for y in range(3) for z in range(3)])  # 27 at 12-14
    cells = np.concatenate([near, far])
    whole = plan.eval_case_size("c", cells, resolution=16, chunk_size=1)
    assert (whole.cells, whole.chunk_cells) == (35, 35)
    assert whole.box_voxels == (15 * 8 + 2) ** 3  # cells 0..14 on each axis, one voxel of padding per side
    # chunk_size 2: 8^3-cell chunks whose halo of 4 cells never reaches the other cluster
    assert plan.eval_case_size("c", cells, resolution=16, chunk_size=2).chunk_cells == 27
    cfg = load_config(TINY)
    one = plan.predict_eval_peak(cfg, [whole]).parts
    split = plan.predict_eval_peak(cfg, [plan.eval_case_size("c", cells, 16, 2)]).parts
    assert split["decoding (largest chunk)"] < one["decoding (largest chunk)"]
    assert split["dense box (metrics, meshes)"] == one["dense box (metrics, meshes)"]  # the whole case's box


def test_requests_out_writes_each_jobs_request_and_checks_no_budget(manifest: Path, tmp_path: Path, capsys):
    out = tmp_path / "requests.json"
    assert main(["plan", "--config", str(TINY), "--data", str(manifest), "--requests-out", str(out)]) == 0
    requests = json.loads(out.read_text())
    cfg = load_config(TINY)
    train = plan.predict_training_peak(cfg, plan.case_sizes(manifest)).peak_mb
    latents = plan.largest_eval_cases(manifest, 64)
    evaluation = plan.predict_eval_peak(cfg, plan.eval_sizes(cfg, latents)).peak_mb
    assert requests["train_mem_mb"] == plan.request_mb(train) and requests["train_peak_mb"] == round(train)
    assert requests["eval_mem_mb"] == plan.request_mb(evaluation) and requests["eval_chunk_size"] == 1
    assert plan.request_mb(5000.0) == 6300 and plan.request_mb(10.0) == plan.MIN_REQUEST_MB
    assert "evaluation, chunk_size 1: largest case case2" in capsys.readouterr().out


def test_evaluation_that_does_not_fit_is_told_the_eval_chunk_size_that_does(tmp_path: Path, capsys):
    """Training crops to max_points, evaluation decodes whole cases: a budget between the two is met by
    `ctvq eval --chunk-size` (the same output), not by a config change that would also change training. At
    256^3 (a 32^3 latent grid) a chunk and its halo of 4 cells are a part of the case; at 64^3 the halo alone
    spans the grid."""
    manifest = write_manifest(tmp_path / "m.csv", write_cases(tmp_path, [70.0], resolution=256))
    small = json.loads(TINY.read_text())
    small["dataset"]["args"].update(max_points=2000, resolution=256)
    small["models"]["vqvae"]["args"]["resolution"] = 32
    config = tmp_path / "small.json"
    config.write_text(json.dumps(small))
    cfg = load_config(config)
    latents = plan.largest_eval_cases(manifest, 256)
    train = plan.predict_training_peak(cfg, plan.case_sizes(manifest)).peak_mb
    whole = plan.predict_eval_peak(cfg, plan.eval_sizes(cfg, latents)).peak_mb
    chunk4 = plan.predict_eval_peak(cfg, plan.eval_sizes(cfg, latents, 4)).peak_mb
    assert train < chunk4 < whole
    budget = (chunk4 + whole) / 2
    out = tmp_path / "patch.json"
    code = main(["plan", "--config", str(config), "--data", str(manifest), "--memory", f"{budget:.1f}MiB",
                 "--patch-out", str(out)])
    printed = capsys.readouterr().out
    assert code == 1 and not out.exists(), printed  # training fits: no config patch
    chunk = int(printed.split("ctvq eval --chunk-size ")[1].split("`")[0])
    assert chunk in (2, 4) and "evaluate.chunk_size: " in printed
    assert plan.predict_eval_peak(cfg, plan.eval_sizes(cfg, latents, chunk)).peak_mb <= budget
    assert main(["plan", "--config", str(config), "--data", str(manifest), "--memory", f"{budget:.1f}MiB",
                 "--eval-chunk-size", str(chunk)]) == 0


def test_shipped_eval_coefficients_predict_every_benchmark_run_within_20_percent():
    """`ctvq eval` runs of bench/results/memory_eval*.json against the evaluation model ctvq plan uses."""
    eval_run_config = bench_memory().eval_run_config
    errors = {}
    for path in sorted((BENCH / "results").glob("memory_eval*.json")):
        for run in json.loads(path.read_text())["runs"]:
            size = plan.EvalCaseSize(run["case_id"], run["cells"], run["chunk_cells"], run["box_voxels"])
            predicted = plan.predict_eval_peak(eval_run_config(run), [size]).peak_mb
            errors[f"{path.name}: {run['knob']} @ {run['resolution']}"] = predicted / run["peak_rss_mb"] - 1
    assert len(errors) >= 16
    worst = max(errors, key=lambda k: abs(errors[k]))
    assert abs(errors[worst]) <= 0.20, f"{worst}: {errors[worst]:+.1%}"
