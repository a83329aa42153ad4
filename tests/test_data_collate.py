"""Sparse collate: batch index column, offsets, and batch_split by samples balanced by point count."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from data_helpers import sphere_sample

from ctvq.data.collate import SparseCollate, collate_sparse, split_batch
from ctvq.data.datasets import sample_to_item

RADII = (4.0, 13.0, 7.0, 10.0, 5.0, 15.0)


@pytest.fixture(scope="module")
def items() -> list[dict]:
    out = []
    for i, r in enumerate(RADII):
        sample = sphere_sample(f"c{i}", resolution=48, spheres=[(20.0 + i, 24.0, 22.0, r)])
        sample = replace(sample, affine=np.diag([1.0 + i, 1.0, 1.0, 1.0]))
        out.append(sample_to_item(sample, num_points_full=sample.num_points))
    return out


def test_collate_prefixes_each_sample_with_its_batch_index(items: list[dict]) -> None:
    batch = collate_sparse(items)
    assert batch["batch_size"] == len(items) and batch["case_ids"] == [f"c{i}" for i in range(len(items))]
    total = sum(i["num_points"] for i in items)
    assert batch["coords"].dtype == torch.int32 and batch["coords"].shape == (total, 4)
    assert batch["feats"].shape == (batch["coords"].shape[0], 1)
    assert batch["targets"].shape == (batch["latent_coords"].shape[0], 8, 8, 8)
    p, m = batch["point_offsets"], batch["latent_offsets"]
    for b, item in enumerate(items):
        rows = batch["coords"][p[b]:p[b + 1]]
        assert torch.all(rows[:, 0] == b)
        torch.testing.assert_close(rows[:, 1:], item["coords"])
        torch.testing.assert_close(batch["feats"][p[b]:p[b + 1]], item["feats"])
        lat = batch["latent_coords"][m[b]:m[b + 1]]
        assert torch.all(lat[:, 0] == b)
        torch.testing.assert_close(lat[:, 1:], item["latent_coords"])
        torch.testing.assert_close(batch["targets"][m[b]:m[b + 1]], item["targets"])
        torch.testing.assert_close(batch["affines"][b], item["affine"])
    assert p[-1] == batch["coords"].shape[0] and m[-1] == batch["latent_coords"].shape[0]


def test_split_partitions_by_whole_samples_with_balanced_points(items: list[dict]) -> None:
    groups = split_batch(items, 3)
    assert len(groups) == 3 and all(groups)
    ids = [item["case_id"] for group in groups for item in group]
    assert sorted(ids) == sorted(i["case_id"] for i in items)  # a partition: every sample exactly once
    loads = [sum(i["num_points"] for i in g) for g in groups]
    assert max(loads) - min(loads) <= max(i["num_points"] for i in items)
    # Largest-first greedy beats a naive split into consecutive thirds here.
    naive = [sum(i["num_points"] for i in items[k:k + 2]) for k in (0, 2, 4)]
    assert max(loads) - min(loads) < max(naive) - min(naive)


def test_greedy_split_of_known_counts() -> None:
    fake = [{"case_id": str(n), "num_points": n} for n in (10, 9, 8, 7, 6, 5, 4)]
    groups = split_batch(fake, 3)
    assert [[i["num_points"] for i in g] for g in groups] == [[10, 5, 4], [9, 6], [8, 7]]


def test_micro_batches_together_equal_the_full_batch(items: list[dict]) -> None:
    micro = SparseCollate(batch_split=2)(items)
    full = collate_sparse(items)
    assert len(micro) == 2
    assert sorted(c for mb in micro for c in mb["case_ids"]) == sorted(full["case_ids"])
    assert sum(mb["coords"].shape[0] for mb in micro) == full["coords"].shape[0]

    def per_case(batch: dict) -> dict[str, torch.Tensor]:
        off = batch["point_offsets"]
        return {c: batch["coords"][off[b]:off[b + 1], 1:] for b, c in enumerate(batch["case_ids"])}

    joined = {case: rows for mb in micro for case, rows in per_case(mb).items()}
    for case, rows in per_case(full).items():
        torch.testing.assert_close(joined[case], rows)


def test_batch_split_larger_than_batch_is_an_error_but_a_short_last_batch_is_split_per_sample(
    items: list[dict],
) -> None:
    with pytest.raises(ValueError, match="batch_split=4 exceeds the 2 samples"):
        split_batch(items[:2], 4)
    assert len(SparseCollate(batch_split=4)(items[:2])) == 2
    with pytest.raises(ValueError, match="batch_split"):
        SparseCollate(batch_split=0)


def test_a_batch_mixing_resolutions_is_refused(items: list[dict]) -> None:
    other = dict(items[0], resolution=64, case_id="odd")
    with pytest.raises(ValueError, match="mixes resolutions.*odd"):
        collate_sparse([items[1], other])
