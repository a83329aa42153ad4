"""Collapse guard: notice when training has silently stopped producing a surface, and say so loudly.

On thin anatomy (the bone window: ~3 % of the decoded voxels inside) a plain mean reconstruction loss is
minimised early by "outside everywhere": tanh saturates at +1, the gradients vanish and the loss curve goes
flat, with nothing failing. Two checks, both pure functions here (the trainer only calls them):

- ``surface_check`` (every ``i_sample`` step): within the latent cells where the target has a surface (both
  signs among the cell's 512 targets) the decoded sdf must have both signs too; if every decoded voxel there
  is on one side there is no surface to mesh.
- ``update_grad_state`` (every step): the gradient norm stays below ``GRAD_RATIO`` x the median of the first
  ``BASELINE_STEPS`` measured steps for ``PATIENCE`` consecutive steps.

The constants come from real runs (3 chest phantoms at 64³, stage 2 from a random stage-1 checkpoint,
``loss_type l1``, per-step norms from metrics.csv with ``i_log 1``; ratio = norm / median of the first 10):

  run (model; recon_weighting; encoder output init)     min ratio  max ratio of the  fires at step, ratio
                                                        after 10   quietest 50 steps 1e-2 / 3e-2 / 5e-2 / 1e-1
  collapsed: bone, tiny_stage2, uniform, zero init      3.2e-5     2.6e-4            61 / 60 / 60 / 60
  collapsed: bone, tiny_stage2, uniform, Xavier init    5.5e-3     2.0e-2            -- / 62 / 60 / 60
  collapsed: bone, test model, uniform, zero init       5.1e-4     6.9e-3            193 / 86 / 74 / 73
  collapsed: bone, test model, uniform, Xavier init     3.8e-3     4.7e-2            -- / -- / 376 / 104
  collapsed: same, lambda_vq = lambda_commitment = 0    0          8.3e-5            73 / 73 / 73 / 73
  healthy: lung, tiny_stage2, uniform                   0.31       35                never
  healthy: lung, tiny_stage2, l1_l2                     0.98       18                never
  healthy: bone, tiny_stage2, balanced                  0.78       9.0               never
  healthy: lung, test model (cosine lr 1e-3), 2 inits   0.12       2.0               never

(tiny_stage2 = configs/vqvae/tiny_stage2.json, 64 channels, 2 blocks, 200-300 steps; test model =
tests/train_helpers.py, 32 channels, 1 block, lr 3e-3, 3000-point crops.) ``GRAD_RATIO`` 5e-2 catches every
collapse of the table and stays 40x below the quietest healthy 50-step window. The total norm includes the
VQ terms, which keep the encoder and codebook learning while the decoder is saturated: with the Xavier
encoder init a collapsed run's norm sits at 1-5e-2, not ~0 (the reason for 5e-2 rather than 1e-2).
Surface warnings wait ``SURFACE_GRACE_STEPS``: a fresh run's zero-initialised output layer decodes sdf 0
(no surface) at first; healthy lung runs got a surface by step 10 (tiny_stage2, flickering off again at
steps 15-20) and step 55-60 (the test model, cosine lr 1e-3), so 100 steps is about twice the slowest.
Runs whose decoder does not train (stage 1 with a frozen decoder) are not guarded: nothing there can collapse.
Steps without a finite norm (no clipper configured, skipped overflow steps) are neither counted nor reset.
After a warning, the guard re-arms only once the norm has stayed above the threshold for ``PATIENCE``
consecutive steps, so one spike in a collapsed run does not make it warn again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ctvq.ct.sample import LATENT_STRIDE

GRAD_RATIO = 5e-2
PATIENCE = 50
BASELINE_STEPS = 10
SURFACE_GRACE_STEPS = 100
REMEDY = ('try trainer.args.recon_weighting "balanced" (thin anatomy such as the bone window) or a lower '
          "optimizer lr")
PRED_INSIDE_KEY = "guard/pred_inside_fraction"
TARGET_INSIDE_KEY = "guard/target_inside_fraction"
WARNING_PREFIX = "WARNING: collapse:"


# -- surface ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SurfaceCheck:
    """Inside (sdf < 0) fractions of a batch; ``region_*``: voxels of the cells whose target has a surface."""

    pred_inside: float  # over all decoded voxels
    target_inside: float
    region_voxels: int  # decoded voxels in latent cells whose targets have both signs
    region_pred_inside: int  # of those, how many the decoder puts inside

    @property
    def collapsed(self) -> bool:
        """The targets have a surface but the prediction is on one side of it everywhere there."""
        return self.region_voxels > 0 and self.region_pred_inside in (0, self.region_voxels)

    def describe(self) -> str:
        side = "outside (sdf >= 0)" if self.region_pred_inside == 0 else "inside (sdf < 0)"
        return (f"no surface in the reconstruction: all {self.region_voxels} decoded voxels of the cells "
                f"where the target has one are {side}; inside fraction predicted "
                f"{100 * self.pred_inside:.1f} % vs target {100 * self.target_inside:.1f} %")

    def scalars(self) -> dict[str, float]:
        return {PRED_INSIDE_KEY: self.pred_inside, TARGET_INSIDE_KEY: self.target_inside}


def surface_cells(coords: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bool [N]: the decoded voxel's latent cell (batch, xyz // 8) has targets of both signs."""
    cells = coords.long().clone()
    cells[:, 1:] = torch.div(cells[:, 1:], LATENT_STRIDE, rounding_mode="floor")
    _, inverse = torch.unique(cells, dim=0, return_inverse=True)
    count = int(inverse.max()) + 1 if inverse.numel() else 0
    total = torch.bincount(inverse, minlength=count)
    inside = torch.bincount(inverse, weights=(target < 0).double(), minlength=count)
    return ((inside > 0) & (inside < total))[inverse]


@torch.no_grad()
def surface_check(coords: torch.Tensor, pred: torch.Tensor, target: torch.Tensor) -> SurfaceCheck:
    """Compare predicted and target signs of one batch (decoded coords [N, 4], pred [N], target [N])."""
    pred, target = pred.detach().reshape(-1).float(), target.detach().reshape(-1).float()
    n = max(int(pred.numel()), 1)
    region = surface_cells(coords.detach(), target)
    return SurfaceCheck(pred_inside=float((pred < 0).sum()) / n, target_inside=float((target < 0).sum()) / n,
                        region_voxels=int(region.sum()), region_pred_inside=int((pred[region] < 0).sum()))


def surface_warning_due(step: int, check: SurfaceCheck) -> bool:
    """Warn about a missing surface only after ``SURFACE_GRACE_STEPS``: the zero-initialised output layer
    gives no surface at the start of every fresh run, healthy ones included."""
    return check.collapsed and step > SURFACE_GRACE_STEPS


def surface_message(step: int, check: SurfaceCheck) -> str:
    return f"{WARNING_PREFIX} step {step}: {check.describe()}; {REMEDY}"


# -- gradient norm ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GradState:
    """What the gradient guard remembers between steps (saved in the checkpoint's misc file)."""

    baseline: tuple[float, ...] = ()  # the first BASELINE_STEPS finite norms
    low_run: int = 0  # consecutive steps below the threshold
    high_run: int = 0  # consecutive steps above it (re-arms a guard that warned)
    warned: bool = False
    fired: bool = False  # this update crossed into collapse: warn now

    @property
    def reference(self) -> float:
        """Median of the baseline norms (nan until it is complete)."""
        if len(self.baseline) < BASELINE_STEPS:
            return math.nan
        ordered = sorted(self.baseline)
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def update_grad_state(state: GradState, grad_norm: float, ratio: float = GRAD_RATIO,
                      patience: int = PATIENCE) -> GradState:
    """The state after one step's gradient norm; ``fired`` is True on the step the guard should warn."""
    state = replace(state, fired=False)
    if not math.isfinite(grad_norm):
        return state
    if len(state.baseline) < BASELINE_STEPS:
        return replace(state, baseline=(*state.baseline, float(grad_norm)))
    if grad_norm < ratio * state.reference:
        low = state.low_run + 1
        fired = not state.warned and low >= patience
        return replace(state, low_run=low, high_run=0, warned=state.warned or fired, fired=fired)
    high = state.high_run + 1
    return replace(state, low_run=0, high_run=high, warned=state.warned and high < patience)


def grad_message(step: int, grad_norm: float, state: GradState, ratio: float = GRAD_RATIO) -> str:
    return (f"{WARNING_PREFIX} step {step}: gradient norm {grad_norm:.2e} has stayed below {ratio:g} x the "
            f"median of the first {BASELINE_STEPS} steps ({state.reference:.3g}) for {state.low_run} "
            f"consecutive steps: the model has stopped learning (typically a decoder saturated at one sign); "
            f"{REMEDY}")


def grad_state_dict(state: GradState) -> dict[str, object]:
    return {"baseline": list(state.baseline), "low_run": state.low_run, "high_run": state.high_run,
            "warned": state.warned}


def grad_state_from_dict(data: dict[str, object] | None) -> GradState:
    """The saved state; a checkpoint from before the guard (None) starts a fresh one."""
    if data is None:
        return GradState()
    return GradState(baseline=tuple(float(x) for x in data["baseline"]),  # type: ignore[union-attr]
                     low_run=int(data["low_run"]), high_run=int(data["high_run"]),  # type: ignore[arg-type]
                     warned=bool(data["warned"]))


__all__ = ["BASELINE_STEPS", "GRAD_RATIO", "PATIENCE", "PRED_INSIDE_KEY", "REMEDY", "TARGET_INSIDE_KEY",
           "WARNING_PREFIX", "GradState", "SurfaceCheck", "grad_message", "grad_state_dict",
           "grad_state_from_dict", "surface_cells", "surface_check", "surface_message", "update_grad_state"]
