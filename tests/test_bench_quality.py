"""bench/quality.py: repeats (every variant trained with seeds 0..N-1), the spread over those runs, the
per-case rows it takes from ctvq eval and keeps at every curve point."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from data_helpers import bench_module


def test_repeats_set_both_seeds_and_leave_a_single_run_alone():
    quality = bench_module("quality")
    variant = quality.Variant("v", Path("s1.json"), Path("s2.json"), {"trainer.args.lr": 1e-3})
    assert quality.repeated(variant, 0, 1) is variant
    second = quality.repeated(variant, 2, 3)
    assert second.patch == {"trainer.args.lr": 1e-3, "trainer.args.seed": 2, "dataset.args.seed": 2}


def test_spread_is_the_mean_and_range_of_each_variant_and_subset_over_its_runs():
    quality = bench_module("quality")

    def run(variant, repeat, iou, usage):
        summary = {"occupancy_iou": iou, "chamfer_l1_vox": None, "codebook_usage": usage}
        return {"window": "lung", "resolution": 64, "variant": variant, "repeat": repeat,
                "eval": {"phantom": {"summary": summary}}}

    rows = quality.spread([run("a", 0, 0.8, 0.5), run("a", 1, 0.9, 0.7), run("b", 0, 0.5, 0.1)])
    by_variant = {r["variant"]: r for r in rows}
    a = by_variant["a"]
    assert a["runs"] == 2 and a["subset"] == "phantom"
    assert a["occupancy_iou"] == pytest.approx({"mean": 0.85, "min": 0.8, "max": 0.9})
    assert a["codebook_usage"]["mean"] == pytest.approx(0.6)
    assert a["chamfer_l1_vox"] is None  # no run had it
    assert by_variant["b"]["runs"] == 1


def test_case_rows_keep_evals_numbers_with_nan_as_none_and_collapsed_as_bool():
    quality = bench_module("quality")
    table = pd.DataFrame([{"case_id": "case0", "occupancy_iou": 0.0, "chamfer_l1_vox": float("nan"),
                           "fscore_1vox": 0.0, "collapsed": 1}])
    (row,) = quality.case_rows(table)
    assert row["chamfer_l1_vox"] is None and row["collapsed"] is True and row["fscore_1vox"] == 0.0


def test_curve_points_keep_each_cases_numbers_next_to_the_subset_summary():
    quality = bench_module("quality")
    cases = quality.case_rows(pd.DataFrame([
        {"case_id": "p100", "occupancy_iou": 0.7, "chamfer_l1_vox": 0.5, "fscore_1vox": 0.8,
         "sdf_mae_vox": 0.4, "chamfer_l1_mm": 1.0, "collapsed": 0},
        {"case_id": "p101", "occupancy_iou": 0.9, "chamfer_l1_vox": 0.3, "fscore_1vox": 0.9,
         "sdf_mae_vox": 0.3, "chamfer_l1_mm": 0.6, "collapsed": 0}]))
    summary = quality.summarise(cases, {"val/codebook_usage": 0.6})
    point = quality.curve_point(300, {"phantom": {"cases": cases, "summary": summary},
                                      "real": {"returncode": 1, "error_tail": "boom"}})
    assert point["step"] == 300 and point["phantom"]["occupancy_iou"] == pytest.approx(0.8)
    assert [c["case_id"] for c in point["cases"]["phantom"]] == ["p100", "p101"]
    assert point["cases"]["phantom"][1] == {"case_id": "p101", "occupancy_iou": 0.9, "chamfer_l1_vox": 0.3,
                                            "fscore_1vox": 0.9, "sdf_mae_vox": 0.3, "collapsed": False}
    assert point["real"] == {"error_tail": "boom"} and point["cases"]["real"] == []
