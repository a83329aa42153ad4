"""Training precision: fp32, autocast + GradScaler ("amp"), or TRELLIS's "inflat_all".

inflat_all keeps float32 master copies of the trainable parameters while the model holds float16 weights.
The loss is multiplied by 2^log_scale (log_scale starts at 20) before backward; the fp16 gradients are copied
to the masters and divided by the scale. A step with a non-finite gradient is skipped and log_scale drops by
1; every applied step raises it by ``fp16_scale_growth``. The optimizer trains the masters, whose values are
then copied back into the model. (TRELLIS flattens the masters into one tensor; separate tensors give the
same arithmetic, since AdamW/Adam/SGD and the total-norm clip are element-wise or global sums.)

"amp" on a GPU is float16 autocast with a GradScaler. On the CPU it is bfloat16 autocast without a scaler:
bfloat16 has float32's exponent range, so gradients do not underflow and no loss scaling is needed.
In every mode a step whose gradients are not finite is skipped (the trainer counts it in ``skipped_steps``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

INITIAL_LOG_SCALE = 20.0
MODES = (None, "amp", "inflat_all")


@dataclass(frozen=True)
class StepResult:
    applied: bool  # False: a non-finite gradient, the optimizer step was skipped
    grad_norm: float  # total norm before clipping (nan when skipped or not computed)


def _finite(tensors: list[torch.Tensor]) -> bool:
    if not tensors:
        return True
    norms = torch.stack([t.detach().float().abs().amax() for t in tensors if t.numel()])
    return bool(torch.isfinite(norms).all())


class Precision:
    """Owns loss scaling, autocast and (inflat_all) the fp32 master parameters of ``params``.

    ``params`` are the model's trainable parameters in ``named_parameters`` order; the optimizer must be
    built over ``optimizer_params()``.
    """

    def __init__(self, mode: str | None, params: list[nn.Parameter], device: torch.device,
                 scale_growth: float = 0.001) -> None:
        if mode not in MODES:
            raise ValueError(f"trainer.args.fp16_mode={mode!r}; use null, 'amp' or 'inflat_all'")
        self.mode = mode
        self.params = params
        self.device = device
        self.scale_growth = float(scale_growth)
        self.log_scale = INITIAL_LOG_SCALE
        self.master: list[nn.Parameter] = []
        if mode == "inflat_all":
            self.master = [nn.Parameter(p.detach().float().clone()) for p in params]
        self.scaler: torch.amp.GradScaler | None = None
        if mode == "amp" and device.type == "cuda":
            self.scaler = torch.amp.GradScaler("cuda")

    # -- forward / backward ---------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.mode != "amp":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        if self.mode == "inflat_all":
            (loss * (2.0 ** self.log_scale)).backward()
        elif self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    # -- optimizer side -------------------------------------------------------------------------------------
    def optimizer_params(self) -> list[nn.Parameter]:
        return self.master if self.mode == "inflat_all" else self.params

    def fp32_values(self) -> list[torch.Tensor]:
        """The trainable values at full precision (the masters under inflat_all), for EMA and checkpoints."""
        source = self.master if self.mode == "inflat_all" else self.params
        return [p.detach() for p in source]

    def zero_grad(self) -> None:
        for p in (*self.params, *self.master):
            p.grad = None

    def step(self, optimizer: torch.optim.Optimizer,
             clip: Callable[[list[torch.Tensor]], float] | None) -> StepResult:
        """Unscale, check, clip and apply one optimizer step; see the module docstring per mode."""
        if self.mode == "inflat_all":
            return self._step_inflat_all(optimizer, clip)
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
            norm = clip(self.params) if clip is not None else math.nan
            before = self.scaler.get_scale()
            self.scaler.step(optimizer)
            self.scaler.update()
            return StepResult(self.scaler.get_scale() >= before, norm)
        grads = [p.grad for p in self.params if p.grad is not None]
        if not _finite(grads):
            return StepResult(False, math.nan)
        norm = clip(self.params) if clip is not None else math.nan
        optimizer.step()
        return StepResult(True, norm)

    def _step_inflat_all(self, optimizer: torch.optim.Optimizer,
                         clip: Callable[[list[torch.Tensor]], float] | None) -> StepResult:
        inv = 1.0 / (2.0 ** self.log_scale)
        for m, p in zip(self.master, self.params, strict=True):
            m.grad = torch.zeros_like(m) if p.grad is None else p.grad.detach().float() * inv
        if not _finite([m.grad for m in self.master if m.grad is not None]):
            self.log_scale -= 1.0
            return StepResult(False, math.nan)
        norm = clip(self.master) if clip is not None else math.nan
        optimizer.step()
        with torch.no_grad():
            for m, p in zip(self.master, self.params, strict=True):
                p.copy_(m)
        self.log_scale += self.scale_growth
        return StepResult(True, norm)

    @property
    def loss_scale(self) -> float:
        if self.mode == "inflat_all":
            return 2.0 ** self.log_scale
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    # -- checkpointing --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "log_scale": self.log_scale,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any], origin: str) -> None:
        if state["mode"] != self.mode:
            raise ValueError(f"{origin}: saved with fp16_mode={state['mode']!r}, this run uses {self.mode!r}")
        self.log_scale = float(state["log_scale"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])

    def load_master_values(self, values: list[torch.Tensor]) -> None:
        """Under inflat_all the masters take these full-precision values (no-op in the other modes)."""
        if not self.master:
            return
        with torch.no_grad():
            for m, v in zip(self.master, values, strict=True):
                m.copy_(v.float())


__all__ = ["INITIAL_LOG_SCALE", "MODES", "Precision", "StepResult"]
