"""Optimizer and learning-rate scheduler from the config, by registered name (no if-chains, no kwargs leak).

Schedulers are stepped once per training step, so ``T_max`` and ``step_size`` count steps.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import MappingProxyType

import torch

from ctvq.config import OptimizerConfig, SchedulerConfig

OPTIMIZERS = MappingProxyType({
    "AdamW": torch.optim.AdamW,
    "Adam": torch.optim.Adam,
    "SGD": torch.optim.SGD,
})
SCHEDULERS = MappingProxyType({
    "CosineAnnealingLR": torch.optim.lr_scheduler.CosineAnnealingLR,
    "ExponentialLR": torch.optim.lr_scheduler.ExponentialLR,
    "StepLR": torch.optim.lr_scheduler.StepLR,
})


def build_optimizer(cfg: OptimizerConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"trainer.args.optimizer.name={cfg.name!r}; use one of {', '.join(OPTIMIZERS)}")
    params = list(params)
    if not params:
        raise ValueError("the optimizer got no trainable parameters (see build_optimizer's caller)")
    kwargs = cfg.kwargs()
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return OPTIMIZERS[cfg.name](params, **kwargs)


def build_scheduler(cfg: SchedulerConfig | None, optimizer: torch.optim.Optimizer
                    ) -> torch.optim.lr_scheduler.LRScheduler | None:
    if cfg is None:
        return None
    if cfg.name not in SCHEDULERS:
        raise ValueError(f"trainer.args.lr_scheduler.name={cfg.name!r}; use one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[cfg.name](optimizer, **cfg.kwargs())


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


__all__ = ["OPTIMIZERS", "SCHEDULERS", "build_optimizer", "build_scheduler", "current_lr"]
