"""Sparse convolution backends: the explicit switch between pure PyTorch and spconv.

The backend is a value passed to the conv modules (or set on a model with `set_sparse_backend`), never
read from global state at import. `resolve_backend` is the one place that may consult the
`CTVQ_SPARSE_BACKEND` variable, and only when asked for "auto".
"""

from __future__ import annotations

import enum
import importlib.util
import os

import torch

ENV_VAR = "CTVQ_SPARSE_BACKEND"


class SparseBackend(enum.Enum):
    """Which implementation runs the 3x3x3 sparse convolutions."""

    TORCH = "torch"
    SPCONV = "spconv"

    @classmethod
    def parse(cls, value: SparseBackend | str) -> SparseBackend:
        if isinstance(value, SparseBackend):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            choices = ", ".join(repr(b.value) for b in cls)
            raise ValueError(
                f"unknown sparse backend {value!r}; choose one of {choices} (or 'auto' where allowed)"
            ) from None


def spconv_available() -> bool:
    """True when the `spconv` package can be imported (GPU extra `spconv-cu120`, or the CPU wheel)."""
    return importlib.util.find_spec("spconv") is not None


def resolve_backend(
    requested: SparseBackend | str = "auto", device: torch.device | str | None = None
) -> SparseBackend:
    """Turn "auto" | "torch" | "spconv" into a backend for tensors on `device`.

    "auto" reads `CTVQ_SPARSE_BACKEND` (if set, it must be one of auto/torch/spconv) and otherwise picks
    spconv only when it imports AND `device` is CUDA, else torch. An explicit "spconv" that cannot be
    imported raises.
    """
    if isinstance(requested, str) and requested.strip().lower() == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env and env != "auto":
            try:
                requested = SparseBackend.parse(env)
            except ValueError as err:
                raise ValueError(f"environment variable {ENV_VAR}={env!r} is invalid: {err}") from None
        else:
            dev = torch.device(device) if device is not None else torch.device("cpu")
            if dev.type == "cuda" and spconv_available():
                return SparseBackend.SPCONV
            return SparseBackend.TORCH
    backend = SparseBackend.parse(requested)
    if backend is SparseBackend.SPCONV and not spconv_available():
        raise RuntimeError(
            "sparse backend 'spconv' was requested but the spconv package is not installed; install the GPU "
            "extra (pip install 'ctvq[gpu]', i.e. spconv-cu120) or use backend 'torch'"
        )
    return backend


__all__ = ["ENV_VAR", "SparseBackend", "resolve_backend", "spconv_available"]
