"""The training data stream: dataset from the config, a resumable per-rank sampler, the DataLoader.

The order of epoch ``e`` is a permutation drawn from (seed, e) alone and sharded over ranks like
DistributedSampler (padded to a multiple of the world size), so a resumed run can start in the middle of
an epoch at (epoch, batch) and see exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ctvq.config import DatasetConfig
from ctvq.data.collate import SparseCollate
from ctvq.data.datasets import CTWindowSparseSDF, SparseSDF


class EpochSampler(Sampler[int]):
    """This rank's share of epoch ``epoch``'s permutation, from position ``start`` on."""

    def __init__(self, size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        if size < 1:
            raise ValueError("EpochSampler needs a non-empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.size = size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.start = 0

    @property
    def per_rank(self) -> int:
        return math.ceil(self.size / self.world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start {start} outside this rank's {self.per_rank} samples per epoch")
        self.epoch = epoch
        self.start = start

    def order(self) -> list[int]:
        gen = torch.Generator()
        gen.manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.size, generator=gen).tolist()
        total = self.per_rank * self.world_size
        perm = (perm * math.ceil(total / self.size))[:total]
        return perm[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start


def build_dataset(cfg: DatasetConfig, source: Path) -> CTWindowSparseSDF | SparseSDF:
    """The dataset class the config names, over ``source`` (manifest CSV or folder of samples).

    A manifest's val/test rows are left out by the dataset (train split only); one line says how many.
    """
    common = dict(resolution=cfg.resolution, min_points=cfg.min_points, max_points=cfg.max_points,
                  cache_data=cfg.cache_data, precompute_sparse=cfg.precompute_sparse, band=cfg.band,
                  iso_value=cfg.iso_value, seed=cfg.seed, augment=cfg.augment)
    if cfg.name == "CTWindowSparseSDF":
        dataset = CTWindowSparseSDF(source, window_type=cfg.window_type, window_width=cfg.window_width,
                                    window_level=cfg.window_level, **common)
    elif cfg.name == "SparseSDF":
        dataset = SparseSDF(source, **common)
    else:
        raise ValueError(f"dataset.name={cfg.name!r}; use CTWindowSparseSDF or SparseSDF")
    report_held_out(dataset)
    return dataset


def report_held_out(dataset: CTWindowSparseSDF | SparseSDF) -> None:
    """Print (rank 0 only) how many cases training uses and how many it holds out, so neither is silent."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    held = Counter(split for _, split in dataset.held_out)
    kept = f"{len(dataset)} train case(s) used ({len(dataset.filtered)} filtered)"
    if dataset.other_windows:
        kept += ("; rows of other windows left out: "
                 + ", ".join(f"{window} {n}" for window, n in sorted(dataset.other_windows.items())))
    if held:
        parts = ", ".join(f"{split} {n}" for split, n in sorted(held.items()))
        print(f"ctvq train: {dataset.source}: {kept}; {sum(held.values())} held out and never read "
              f"({parts})", file=sys.stdout, flush=True)
    else:
        print(f"ctvq train: {dataset.source}: {kept}; no case held out", file=sys.stdout, flush=True)


def build_loader(dataset: Dataset, sampler: EpochSampler, *, batch_size: int, batch_split: int,
                 num_workers: int, pin_memory: bool = False) -> DataLoader:
    """Batches of ``batch_size`` samples, each a list of ``batch_split`` micro-batches (split by samples)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=False,
        num_workers=num_workers,
        collate_fn=SparseCollate(batch_split),
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )


__all__ = ["EpochSampler", "build_dataset", "build_loader", "report_held_out"]
