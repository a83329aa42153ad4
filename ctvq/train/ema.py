"""Exponential moving averages of the trainable parameters, one fp32 copy per rate.

``ema = rate * ema + (1 - rate) * param`` after every applied optimizer step. Copies are float32 whatever the
model's dtype (an fp16 EMA would lose the small updates that 1 - rate makes). A saved EMA is a whole model
state dict: the trainable tensors replaced by their averages, everything else as in the model.
"""

from __future__ import annotations

import torch
from torch import nn


class ParameterEMA:
    """EMA copies of ``model``'s trainable parameters (named, so they map back onto a state dict)."""

    def __init__(self, model: nn.Module, rates: tuple[float, ...] | list[float]) -> None:
        for rate in rates:
            if not 0.0 < rate < 1.0:
                raise ValueError(f"trainer.args.ema_rate: {rate} must lie in (0, 1)")
        self.rates = tuple(float(r) for r in rates)
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.copies: dict[float, list[torch.Tensor]] = {
            rate: [params[n].detach().float().clone() for n in self.names] for rate in self.rates
        }

    @torch.no_grad()
    def update(self, current: list[torch.Tensor]) -> None:
        """Fold in the current trainable values (in ``self.names`` order; fp32 master values if any)."""
        if len(current) != len(self.names):
            raise ValueError(f"EMA update got {len(current)} tensors for {len(self.names)} trainable ones")
        current = [t.detach().float() for t in current]
        for rate, copies in self.copies.items():
            torch._foreach_mul_(copies, rate)
            torch._foreach_add_(copies, current, alpha=1.0 - rate)

    def model_state(self, model: nn.Module, rate: float) -> dict[str, torch.Tensor]:
        """The model's state dict with the trainable tensors replaced by the EMA of ``rate`` (float32)."""
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        for name, tensor in zip(self.names, self.copies[rate], strict=True):
            state[name] = tensor.detach().cpu().clone()
        return state

    def load_model_state(self, rate: float, state: dict[str, torch.Tensor], origin: str) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"{origin}: EMA file lacks {len(missing)} trainable tensors, e.g. {missing[0]}")
        for copy, name in zip(self.copies[rate], self.names, strict=True):
            if tuple(state[name].shape) != tuple(copy.shape):
                raise ValueError(f"{origin}: EMA tensor {name} has shape {tuple(state[name].shape)}, "
                                 f"the model {tuple(copy.shape)}")
            copy.copy_(state[name].float())


__all__ = ["ParameterEMA"]
