"""Multi-process training helpers: process group from torchrun's environment, replica checks, gathering.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; one process per GPU uses NCCL, CPU processes use gloo.
``check_replicas`` (``i_ddpcheck``) compares a per-tensor checksum of every parameter across ranks: DDP keeps
replicas equal only if every rank runs the same updates, and a rank that silently diverged (a skipped step,
a rank-local random choice) would otherwise go unnoticed until evaluation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ctvq.device import resolve_device


class ReplicaMismatchError(RuntimeError):
    """Model replicas differ across ranks (the message names the step, the ranks and the tensors)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from exc


def setup(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (if WORLD_SIZE > 1) and pick this rank's device.

    ``device``: "cpu", "cuda" or None (cuda when available). Called by the CLI, never at import.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def parameter_checksums(model: nn.Module) -> torch.Tensor:
    """[P, 2] float64: sum and sum of |x| of every parameter (in ``named_parameters`` order)."""
    rows = [torch.stack([p.detach().double().sum(), p.detach().double().abs().sum()])
            for p in model.parameters()]
    return torch.stack(rows)


def check_replicas(model: nn.Module, step: int) -> None:
    """Raise ReplicaMismatchError on every rank if any rank's parameters differ from rank 0's."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    names = [n for n, _ in model.named_parameters()]
    local = parameter_checksums(model)
    device = next(model.parameters()).device
    sums = local.to(device)
    gathered = [torch.zeros_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    reference = gathered[0].cpu()
    problems = []
    for rank, other in enumerate(gathered[1:], start=1):
        differs = (other.cpu() != reference).any(dim=1)
        if bool(differs.any()):
            bad = [names[i] for i in torch.nonzero(differs).flatten().tolist()]
            problems.append(
                f"rank {rank} differs from rank 0 in {len(bad)} tensors (e.g. {', '.join(bad[:3])})"
            )
    if problems:
        raise ReplicaMismatchError(
            f"i_ddpcheck at step {step}: model replicas diverged: " + "; ".join(problems)
            + ". Every rank must run the same updates; stop and resume from the last checkpoint"
        )


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a list of one element when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of scalar logs over ranks (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (a stop request reaching some ranks only)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


__all__ = [
    "DistInfo",
    "ReplicaMismatchError",
    "all_gather_objects",
    "all_mean",
    "any_rank",
    "barrier",
    "check_replicas",
    "parameter_checksums",
    "setup",
    "teardown",
]
