"""The torch device a command runs on, checked before any work: ``--device cuda`` on a machine or a torch
build without CUDA is a one-line error, not torch's AssertionError from deep inside the first ``.to()``."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class DeviceError(ValueError):
    """The asked-for device does not exist here; the message says what is missing and the fix."""


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    """``None``: CUDA (GPU ``local_rank``) when available, else the CPU. ``"cpu"``, ``"cuda"`` (GPU
    ``local_rank``) or ``"cuda:N"``: that device, which must exist."""
    import torch

    if name is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise DeviceError(f"--device {name}: not a torch device; use cpu, cuda or cuda:N") from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"--device {name}: ctvq runs on cpu or cuda, not {device.type}")
    if torch.version.cuda is None:
        raise DeviceError(f"--device {name}: this torch build ({torch.__version__}) has no CUDA support; "
                          "install a CUDA build of torch or use --device cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = local_rank if device.index is None else device.index
    if index >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = f"{count} CUDA device(s) visible" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible else "")
        raise DeviceError(f"--device {name}: GPU {index} asked for but torch sees {seen}; use --device cpu "
                          "or run where the GPU is")
    return torch.device("cuda", index)


__all__ = ["DeviceError", "resolve_device"]
