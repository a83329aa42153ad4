"""num_workers is honoured: worker processes yield exactly the batches of the main process."""

from pathlib import Path

import torch
from data_helpers import write_cases
from torch.utils.data import DataLoader

from ctvq.data.collate import SparseCollate
from ctvq.data.datasets import CTWindowSparseSDF


def _epochs(folder: Path, *, num_workers: int, persistent: bool = False, cache: bool = False) -> list:
    ds = CTWindowSparseSDF(folder, window_type="lung", resolution=64, max_points=2500, seed=5,
                           cache_data=cache)
    loader = DataLoader(
        ds, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(11),
        collate_fn=SparseCollate(batch_split=2), num_workers=num_workers,
        persistent_workers=persistent and num_workers > 0,
    )
    out = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        out.append([micro for batch in loader for micro in batch])
    return out


def _same(a: list, b: list) -> bool:
    keys = ("coords", "feats", "latent_coords", "targets", "affines", "point_offsets")
    return len(a) == len(b) and all(
        x["case_ids"] == y["case_ids"] and all(torch.equal(x[k], y[k]) for k in keys)
        for ea, eb in zip(a, b, strict=True) for x, y in zip(ea, eb, strict=True)
    )


def _by_case(epochs: list) -> list[dict[str, torch.Tensor]]:
    """Per epoch: case id -> its (cropped) coords, whatever batch it landed in."""
    return [
        {case: micro["coords"][micro["point_offsets"][b]:micro["point_offsets"][b + 1], 1:]
         for micro in epoch for b, case in enumerate(micro["case_ids"])}
        for epoch in epochs
    ]


def test_two_workers_yield_the_same_batches_as_the_main_process(tmp_path: Path) -> None:
    write_cases(tmp_path, (6.0, 9.0, 12.0, 14.0, 16.0, 18.0, 20.0))
    reference = _epochs(tmp_path, num_workers=0)
    # The epochs differ (new shuffle and new crops), so the comparison below is not trivially true.
    assert not _same([reference[0]], [reference[1]])
    assert _same(_epochs(tmp_path, num_workers=2), reference)
    # Persistent workers still see set_epoch (the epoch lives in shared memory), and the cache travels along.
    # Only the per-case items are compared: torch's persistent iterator draws the shuffle differently.
    persistent = _by_case(_epochs(tmp_path, num_workers=2, persistent=True, cache=True))
    for got, want in zip(persistent, _by_case(reference), strict=True):
        assert got.keys() == want.keys() and all(torch.equal(got[c], want[c]) for c in want)
