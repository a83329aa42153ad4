"""``ctvq plan``: the memory model against the benchmark it was fitted to; patches that fit and validate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_helpers import write_cases, write_manifest

from ctvq.cli import main
from ctvq.cli.plan import memory_mb
from ctvq.config import load_config
from ctvq.train import plan

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "vqvae" / "tiny_stage2.json"
BENCH = ROOT / "bench"


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
    import sys

    sys.path.insert(0, str(BENCH))
    try:
        from memory import _run_config
    finally:
        sys.path.remove(str(BENCH))
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
