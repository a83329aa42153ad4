"""Sparse batches: concatenate samples with a batch index column, and split batches by SAMPLES.

A micro-batch (``batch_split``, i.e. gradient accumulation) must hold whole samples: splitting a sample's
points between micro-batches (the reference fork's defect) cuts its surface and its latent cells apart.
Micro-batches are balanced by point count, because the sparse convs and the decoder scale with points.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

Item = dict[str, Any]

_TENSOR_KEYS = ("coords", "feats", "latent_coords", "targets", "affine")
_REQUIRED_KEYS = (*_TENSOR_KEYS, "case_id", "num_points", "num_points_full", "resolution")


def split_batch(items: Sequence[Item], batch_split: int) -> list[list[Item]]:
    """Partition ``items`` into ``batch_split`` non-empty groups with balanced total ``num_points``.

    Greedy largest-first: each item (largest first, ties by position) goes to the currently lightest group
    (ties: fewer items, then lower group index). Items keep their batch order inside each group.
    """
    if batch_split < 1:
        raise ValueError(f"batch_split must be >= 1, got {batch_split}")
    if batch_split > len(items):
        raise ValueError(
            f"batch_split={batch_split} exceeds the {len(items)} samples of this batch: micro-batches hold "
            "whole samples, so use batch_split <= batch_size_per_gpu"
        )
    points = [int(item["num_points"]) for item in items]
    order = sorted(range(len(items)), key=lambda i: (-points[i], i))
    load = [0] * batch_split
    members: list[list[int]] = [[] for _ in range(batch_split)]
    for i in order:
        group = min(range(batch_split), key=lambda g: (load[g], len(members[g]), g))
        load[group] += points[i]
        members[group].append(i)
    return [[items[i] for i in sorted(group)] for group in members]


def collate_sparse(items: Sequence[Item]) -> dict[str, Any]:
    """One sparse batch from dataset items (see `ctvq.data.datasets.sample_to_item`).

    Returns ``coords`` [N, 4] int32 (batch, x, y, z), ``feats`` [N, 1], ``latent_coords`` [M, 4] int32,
    ``targets`` [M, 8, 8, 8], ``affines`` [B, 4, 4], ``point_offsets`` / ``latent_offsets`` [B+1] int64
    (sample b owns rows ``offsets[b]:offsets[b+1]``), ``batch_size``, ``case_ids``, ``num_points``,
    ``num_points_full`` (before any crop) and ``resolution``.
    """
    if not items:
        raise ValueError("collate_sparse got an empty batch")
    for item in items:
        missing = [k for k in _REQUIRED_KEYS if k not in item]
        if missing:
            raise ValueError(f"item {item.get('case_id', '?')!r} lacks {', '.join(missing)}")
    resolutions = {int(item["resolution"]) for item in items}
    if len(resolutions) > 1:
        raise ValueError(
            f"one batch mixes resolutions {sorted(resolutions)} (cases {[i['case_id'] for i in items]}); "
            "a model runs at one resolution"
        )

    def with_batch_index(key: str) -> torch.Tensor:
        parts = []
        for b, item in enumerate(items):
            column = torch.full((item[key].shape[0], 1), b, dtype=torch.int32)
            parts.append(torch.cat([column, item[key].to(torch.int32)], 1))
        return torch.cat(parts, 0)

    def offsets(key: str) -> torch.Tensor:
        sizes = torch.tensor([item[key].shape[0] for item in items], dtype=torch.int64)
        return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(sizes, 0)])

    return {
        "coords": with_batch_index("coords"),
        "feats": torch.cat([item["feats"] for item in items], 0),
        "latent_coords": with_batch_index("latent_coords"),
        "targets": torch.cat([item["targets"] for item in items], 0),
        "affines": torch.stack([item["affine"] for item in items], 0),
        "point_offsets": offsets("coords"),
        "latent_offsets": offsets("latent_coords"),
        "batch_size": len(items),
        "case_ids": [str(item["case_id"]) for item in items],
        "num_points": [int(item["num_points"]) for item in items],
        "num_points_full": [int(item["num_points_full"]) for item in items],
        "resolution": resolutions.pop(),
    }


class SparseCollate:
    """DataLoader ``collate_fn``: a batch becomes a list of collated micro-batches (``batch_split`` of them).

    Rule for short batches: the last batch of an epoch (``drop_last=False``) may hold fewer samples than
    ``batch_split``; it is then split into one micro-batch per sample, so the trainer must weight by the
    list's length, not by ``batch_split``. A picklable class, so it works with worker processes.
    """

    def __init__(self, batch_split: int = 1) -> None:
        if not isinstance(batch_split, int) or batch_split < 1:
            raise ValueError(f"batch_split must be an int >= 1, got {batch_split!r}")
        self.batch_split = batch_split

    def __call__(self, items: Sequence[Item]) -> list[dict[str, Any]]:
        if not items:
            raise ValueError("SparseCollate got an empty batch")
        groups = split_batch(items, min(self.batch_split, len(items)))
        return [collate_sparse(group) for group in groups]
