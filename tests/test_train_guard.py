"""The collapse guard: its pure checks, and real `ctvq train` runs on chest phantoms (bone collapses).

The bone run is a real collapse, not a crafted one: the tiny test model with ``recon_weighting uniform`` and
``loss_type l1`` on bone-window phantoms (~3 % of the decoded voxels inside) predicts "outside" at every
check from step 30 on. With the VQ loss terms on, the encoder and codebook keep the total gradient norm at
4-6e-2 of its early median (Xavier-initialised encoder output), at the guard's 5e-2 threshold, so the run
also sets ``lambda_vq`` and ``lambda_commitment`` to 0: then only the reconstruction path trains, tanh
saturates and the norm is exactly 0 from step ~23 (early median 0.95; the gradient warning came at step 73,
measured with --deterministic).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from data_helpers import write_manifest
from train_helpers import train_main as main
from train_helpers import write_config, write_data, write_stage1_checkpoint

from ctvq.ct.phantom import chest_phantom
from ctvq.ct.pipeline import build_sample, window_image
from ctvq.ct.sample import save_sample
from ctvq.ct.windows import get_window
from ctvq.train import guard
from ctvq.train.progress import LOG_NAME, METRICS_NAME, LossEnds, RunLog


def _cells(*cells: tuple[int, list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded coords [N, 4] and targets [N]: each cell (x index, its voxels' targets) on the 8-voxel grid."""
    coords, target = [], []
    for cx, values in cells:
        for i, value in enumerate(values):
            coords.append([0, 8 * cx + i, 0, 0])
            target.append(value)
    return torch.tensor(coords), torch.tensor(target)


def test_surface_check_looks_only_at_cells_where_the_target_has_a_surface() -> None:
    coords, target = _cells((0, [-0.5, 0.5, 1.0]), (1, [1.0, 1.0, 1.0]), (2, [-1.0, -1.0, -1.0]))
    assert guard.surface_cells(coords, target).tolist() == [True] * 3 + [False] * 6
    outside = guard.surface_check(coords, torch.ones(9), target)
    assert outside.collapsed and outside.region_voxels == 3 and outside.pred_inside == 0.0
    assert outside.target_inside == pytest.approx(4 / 9)
    assert "all 3 decoded voxels" in outside.describe() and "outside (sdf >= 0)" in outside.describe()
    # inside only where the target is wholly inside: still no surface where there should be one
    wrong_place = guard.surface_check(coords, torch.tensor([1.0] * 6 + [-1.0] * 3), target)
    assert wrong_place.collapsed and wrong_place.pred_inside == pytest.approx(1 / 3)
    inside = guard.surface_check(coords, -torch.ones(9), target)
    assert inside.collapsed and "inside (sdf < 0)" in inside.describe()
    good = guard.surface_check(coords, torch.tensor([-0.2, 0.3, 0.9] + [1.0] * 3 + [-1.0] * 3), target)
    assert not good.collapsed
    assert good.scalars() == {guard.PRED_INSIDE_KEY: pytest.approx(4 / 9),
                              guard.TARGET_INSIDE_KEY: pytest.approx(4 / 9)}
    no_target_surface = guard.surface_check(coords[3:], torch.ones(6), target[3:])
    assert not no_target_surface.collapsed and no_target_surface.region_voxels == 0


def test_surface_warning_waits_for_the_grace_steps() -> None:
    coords, target = _cells((0, [-0.5, 0.5]))
    check = guard.surface_check(coords, torch.ones(2), target)
    assert not guard.surface_warning_due(guard.SURFACE_GRACE_STEPS, check)
    assert guard.surface_warning_due(guard.SURFACE_GRACE_STEPS + 1, check)
    message = guard.surface_message(300, check)
    assert message.startswith("WARNING: collapse: step 300: no surface") and "balanced" in message
    assert "\n" not in message


def _feed(state: guard.GradState, norms: list[float]) -> tuple[guard.GradState, list[int]]:
    fired = []
    for i, norm in enumerate(norms):
        state = guard.update_grad_state(state, norm)
        if state.fired:
            fired.append(i)
    return state, fired


def test_gradient_guard_warns_once_per_collapse_and_rearms_after_a_recovery() -> None:
    base = [1.0] * guard.BASELINE_STEPS
    low = 1e-3  # 1e-3 x the median: below the 5e-2 threshold
    state, fired = _feed(guard.GradState(), base + [low] * (guard.PATIENCE - 1))
    assert fired == [] and state.reference == 1.0 and state.low_run == guard.PATIENCE - 1
    state, fired = _feed(state, [low] * 30 + [math.nan] + [0.5] + [low] * 100)  # one spike: no new warning
    assert fired == [0] and state.warned
    state, fired = _feed(state, [0.5] * guard.PATIENCE + [low] * guard.PATIENCE)  # recovery, then again
    assert fired == [2 * guard.PATIENCE - 1]
    message = guard.grad_message(200, 1e-3, state)
    assert message.startswith("WARNING: collapse: step 200: gradient norm 1.00e-03") and "lower" in message
    assert guard.grad_state_from_dict(guard.grad_state_dict(state)) == replace(state, fired=False)
    assert guard.grad_state_from_dict(None) == guard.GradState()


def test_gradient_guard_stays_quiet_on_a_healthy_curve_and_without_norms() -> None:
    # a healthy run's norms fall and rise by a factor 10-100; single steps may dip under the threshold
    healthy = [0.2] * 10 + [0.05, 0.005, 3.0, 0.5] * 100
    assert _feed(guard.GradState(), healthy)[1] == []
    state, fired = _feed(guard.GradState(), [math.nan] * 500)  # no clipper: no norm is measured
    assert fired == [] and state.baseline == ()


def test_loss_ends_average_the_first_and_last_span_of_steps() -> None:
    ends = LossEnds(steps=100)
    assert ends.span == 20
    for i in range(100):
        ends.add(float(i))
    ends.add(math.nan)
    assert ends.start == pytest.approx(9.5) and ends.end == pytest.approx(89.5)
    assert ends.describe() == "loss (mean of first 20 steps) 9.50000 -> (last 20) 89.50000"
    assert LossEnds(steps=3).span == 1 and LossEnds(steps=60).span == 12
    assert math.isnan(LossEnds(steps=5).start)


def test_run_log_widens_metrics_for_late_columns_and_writes_warnings_as_text(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLog(tmp_path, enabled=True, start_step=0, tensorboard=True, stream=io.StringIO())
    log.scalars(1, {"loss": 1.0})
    log.scalars(2, {"loss": 0.5, guard.PRED_INSIDE_KEY: 0.0})
    log.warning(2, "WARNING: collapse: step 2: test")
    log.close()
    rows = list(csv.DictReader((tmp_path / METRICS_NAME).open()))
    assert rows == [{"step": "1", "loss": "1.0", guard.PRED_INSIDE_KEY: ""},
                    {"step": "2", "loss": "0.5", guard.PRED_INSIDE_KEY: "0.0"}]
    assert "WARNING: collapse: step 2: test" in (tmp_path / LOG_NAME).read_text()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert "warnings/text_summary" in events.Tags()["tensors"]


# -- real runs --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Manifests of 3 chest phantoms at 64³, bone and lung windows (the CT pipeline, band 3)."""
    root = tmp_path_factory.mktemp("phantoms")
    manifests = {}
    for window in ("bone", "lung"):
        paths = []
        for seed in range(3):
            ct = chest_phantom((96, 96, 32), (0.8, 0.8, 2.5), seed=seed)
            sample = build_sample(window_image(ct, get_window(window), 64, f"ph{seed}"), band=3.0)
            paths.append(root / window / f"ph{seed}.npz")
            paths[-1].parent.mkdir(exist_ok=True)
            save_sample(sample, paths[-1])
        manifests[window] = write_manifest(root / window / "manifest.csv", paths)
    write_stage1_checkpoint(root / "stage1.pt")
    return {**manifests, "stage1": root / "stage1.pt"}


def _train(tmp_path: Path, phantoms: dict[str, Path], window: str, steps: int, i_sample: int,
           **trainer: object) -> tuple[int, str, Path]:
    config = write_config(tmp_path / "c.json", training_stage=2, pretrained_vae_path=str(phantoms["stage1"]),
                          max_steps=steps, i_sample=i_sample, i_log=10, i_print=50, i_save=10_000,
                          disable_snapshot=True, loss_type="l1", recon_weighting="uniform", **trainer)
    out = tmp_path / "run"
    rc = main(["--config", str(config), "--data", str(phantoms[window]), "--output-dir", str(out),
               "--window", window, "--band", "3", "--threads", "1", "--deterministic"])
    return rc, (out / LOG_NAME).read_text(), out


@pytest.mark.slow
def test_bone_run_that_collapses_warns_in_the_log_and_records_inside_fractions(tmp_path, phantoms, capsys):
    rc, log, out = _train(tmp_path, phantoms, "bone", steps=165, i_sample=55, lambda_vq=0.0,
                          lambda_commitment=0.0, optimizer={"name": "AdamW", "args": {"lr": 3e-3}},
                          lr_scheduler=None)
    assert rc == 0  # a warning, not a failure: the run's files are what a user inspects
    console = capsys.readouterr().out
    warnings = [line for line in console.splitlines() if line.startswith("WARNING: collapse:")]
    surface = [w for w in warnings if "no surface in the reconstruction" in w]
    grad = [w for w in warnings if "gradient norm" in w]
    assert surface and surface[0].startswith("WARNING: collapse: step 110:"), warnings
    assert "outside (sdf >= 0)" in surface[0] and 'recon_weighting "balanced"' in surface[0]
    assert len(grad) == 1 and "stayed below 0.05 x the median" in grad[0], warnings
    assert all(w in log for w in warnings)
    rows = [r for r in csv.DictReader((out / METRICS_NAME).open()) if r[guard.PRED_INSIDE_KEY]]
    assert [int(r["step"]) for r in rows] == [55, 110, 165]
    assert float(rows[-1][guard.PRED_INSIDE_KEY]) == 0.0 < float(rows[-1][guard.TARGET_INSIDE_KEY]) < 0.15
    assert "done: steps 0->165" in console and "loss (mean of first 20 steps)" in console


@pytest.mark.slow
def test_healthy_lung_run_does_not_warn(tmp_path, phantoms, capsys):
    rc, log, out = _train(tmp_path, phantoms, "lung", steps=150, i_sample=30)
    assert rc == 0
    assert "WARNING" not in capsys.readouterr().out and "WARNING" not in log
    rows = [r for r in csv.DictReader((out / METRICS_NAME).open()) if r[guard.PRED_INSIDE_KEY]]
    assert len(rows) == 5 and 0.05 < float(rows[-1][guard.PRED_INSIDE_KEY]) < 0.995


def test_a_stage1_run_with_a_frozen_decoder_is_not_guarded(tmp_path, capsys):
    data = write_data(tmp_path / "data", cases=2)
    config = write_config(tmp_path / "c.json", max_steps=2, i_sample=1, i_log=1)
    assert main(["--config", str(config), "--data", str(data), "--output-dir", str(tmp_path / "run"),
                 "--no-tensorboard"]) == 0
    header = (tmp_path / "run" / METRICS_NAME).read_text().splitlines()[0]
    assert "guard/" not in header and "WARNING" not in capsys.readouterr().out
