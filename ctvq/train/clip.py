"""Gradient clipping: a fixed norm clip, or TRELLIS's AdaptiveGradClipper (percentile of recent norms).

A fixed threshold that suits the first steps is either too loose later (rare spikes pass) or too tight
(every step is clipped). The adaptive clipper remembers the last ``buffer_size`` total gradient norms and,
once that buffer is full, clips to min(max_norm, the ``clip_percentile``-th percentile of them).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from ctvq.config import GradClipConfig

DEFAULT_BUFFER_SIZE = 1000  # TRELLIS's buffer length


class NormClipper:
    """Plain ``clip_grad_norm_`` at ``max_norm``; returns the norm before clipping."""

    def __init__(self, max_norm: float) -> None:
        if not max_norm > 0:
            raise ValueError(f"grad_clip max_norm={max_norm} must be > 0")
        self.max_norm = float(max_norm)

    def __call__(self, params: Iterable[torch.Tensor]) -> float:
        return float(torch.nn.utils.clip_grad_norm_(list(params), self.max_norm))

    def state_dict(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.max_norm = float(state["max_norm"])


class AdaptiveGradClipper:
    """Clip to ``max_norm`` until ``buffer_size`` norms are known, then to min(max_norm, percentile).

    Non-finite norms are not recorded (the step that produced them is skipped by the caller anyway).
    """

    def __init__(self, max_norm: float, clip_percentile: float,
                 buffer_size: int = DEFAULT_BUFFER_SIZE) -> None:
        if not max_norm > 0:
            raise ValueError(f"AdaptiveGradClipper max_norm={max_norm} must be > 0")
        if not 0 <= clip_percentile <= 100:
            raise ValueError(f"AdaptiveGradClipper clip_percentile={clip_percentile} must lie in [0, 100]")
        if buffer_size < 1:
            raise ValueError(f"AdaptiveGradClipper buffer_size={buffer_size} must be >= 1")
        self.max_norm = float(max_norm)
        self.clip_percentile = float(clip_percentile)
        self.buffer = np.zeros(buffer_size, dtype=np.float64)
        self.count = 0  # norms recorded so far (the buffer is a ring once count >= buffer_size)

    @property
    def threshold(self) -> float:
        if self.count < self.buffer.shape[0]:
            return self.max_norm
        return min(self.max_norm, float(np.percentile(self.buffer, self.clip_percentile)))

    def __call__(self, params: Iterable[torch.Tensor]) -> float:
        norm = float(torch.nn.utils.clip_grad_norm_(list(params), self.threshold))
        if np.isfinite(norm):
            self.buffer[self.count % self.buffer.shape[0]] = norm
            self.count += 1
        return norm

    def state_dict(self) -> dict[str, Any]:
        return {
            "max_norm": self.max_norm,
            "clip_percentile": self.clip_percentile,
            "buffer": torch.from_numpy(self.buffer.copy()),
            "count": self.count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        buffer = state["buffer"].numpy() if isinstance(state["buffer"], torch.Tensor) else state["buffer"]
        if buffer.shape != self.buffer.shape:
            raise ValueError(
                f"AdaptiveGradClipper state holds {buffer.shape[0]} norms, this clipper "
                f"{self.buffer.shape[0]}"
            )
        self.max_norm = float(state["max_norm"])
        self.clip_percentile = float(state["clip_percentile"])
        self.buffer = np.asarray(buffer, dtype=np.float64).copy()
        self.count = int(state["count"])


Clipper = NormClipper | AdaptiveGradClipper


def build_clipper(cfg: GradClipConfig | None) -> Clipper | None:
    """The clipper a ``trainer.args.grad_clip`` section asks for (None: no clipping)."""
    if cfg is None:
        return None
    if cfg.name == "norm":
        return NormClipper(cfg.max_norm)
    if cfg.name == "AdaptiveGradClipper":
        if cfg.clip_percentile is None:
            raise ValueError("grad_clip AdaptiveGradClipper needs clip_percentile")
        return AdaptiveGradClipper(cfg.max_norm, cfg.clip_percentile)
    raise ValueError(f"trainer.args.grad_clip.name={cfg.name!r}; use a number or AdaptiveGradClipper")


__all__ = ["DEFAULT_BUFFER_SIZE", "AdaptiveGradClipper", "Clipper", "NormClipper", "build_clipper"]
