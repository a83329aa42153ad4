"""Every attention mode equals a dense [N, N] masked reference whose mask is built independently here."""

import math

import pytest
import torch

from ctvq.sparse.attention.attention import grouped_attention
from ctvq.sparse.attention.modules import SparseMultiHeadAttention
from ctvq.sparse.attention.serialize import serialize
from ctvq.sparse.attention.windows import (
    ATTN_MODES,
    BlockAttention,
    attention_groups,
    block_attention_args,
    serialized_groups,
    swin_groups,
)

WINDOW = 4  # swin boxes of 4^3 voxels, serialized chunks of 64 tokens


def _random_coords(counts=(110, 90), side=12, seed=0) -> torch.Tensor:
    """Unique voxels per sample on a side^3 grid, rows grouped by batch, shuffled within each sample."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for b, n in enumerate(counts):
        flat = torch.randperm(side**3, generator=gen)[:n]
        xyz = torch.stack([flat // (side * side), (flat // side) % side, flat % side], dim=1)
        parts.append(torch.cat([torch.full((n, 1), b), xyz], dim=1))
    return torch.cat(parts).to(torch.int64)


def _reference_mask(coords: torch.Tensor, attn: BlockAttention) -> torch.Tensor:
    """Which pairs may attend, from the mode's definition (not from windows.py)."""
    b = coords[:, 0]
    same_batch = b[:, None] == b[None, :]
    if attn.attn_mode == "full":
        return same_batch
    if attn.attn_mode == "swin":
        box = (coords[:, 1:] + attn.shift_window) // attn.window_size
        return same_batch & (box[:, None, :] == box[None, :, :]).all(dim=2)
    shifted = coords.clone()
    shifted[:, 1:] += attn.shift_window
    keys = serialize(shifted, attn.serialize_mode).tolist()
    chunk_len = attn.window_size**3
    chunk = [0] * coords.shape[0]
    for sample in set(b.tolist()):
        rows = sorted((i for i in range(len(keys)) if b[i] == sample), key=lambda i: keys[i])
        for rank, i in enumerate(rows):
            chunk[i] = (rank + attn.shift_sequence) // chunk_len
    chunk_t = torch.tensor(chunk)
    return same_batch & (chunk_t[:, None] == chunk_t[None, :])


def _dense_attention(q, k, v, mask):
    scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(q.shape[-1])
    weights = torch.softmax(scores.masked_fill(~mask[None], float("-inf")), dim=-1)
    return torch.einsum("hij,jhd->ihd", weights, v)


def _qkv(n, heads=2, dim=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, heads, dim, generator=gen, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("block_index", [0, 1, 2, 3])
@pytest.mark.parametrize("attn_mode", ATTN_MODES)
def test_grouped_attention_equals_dense_masked_reference(attn_mode, block_index):
    coords = _random_coords()
    attn = block_attention_args(attn_mode, WINDOW, block_index)
    q, k, v = _qkv(coords.shape[0])
    out = grouped_attention(q, k, v, attention_groups(coords, attn))
    ref = _dense_attention(q, k, v, _reference_mask(coords, attn))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("attn_mode", ATTN_MODES)
def test_attention_module_equals_dense_reference_with_its_own_weights(attn_mode):
    torch.manual_seed(0)
    coords = _random_coords(seed=3)
    attn = block_attention_args(attn_mode, WINDOW, 1)
    module = SparseMultiHeadAttention(16, 4, attn_mode, WINDOW, attn.shift_window, attn.shift_sequence,
                                      attn.serialize_mode).double()
    feats = torch.randn(coords.shape[0], 16, dtype=torch.float64)
    q, k, v = module.to_qkv(feats).reshape(-1, 3, 4, 4).unbind(dim=1)
    ref = module.to_out(_dense_attention(q, k, v, _reference_mask(coords, attn)).reshape(-1, 16))
    torch.testing.assert_close(module(feats, coords), ref, rtol=1e-10, atol=1e-10)


def test_tiny_score_budget_slices_buckets_without_changing_the_result():
    coords = _random_coords(counts=(150, 60), seed=5)
    groups = swin_groups(coords, WINDOW, 2)
    q, k, v = _qkv(coords.shape[0])
    torch.testing.assert_close(grouped_attention(q, k, v, groups, max_score_elements=1),
                               grouped_attention(q, k, v, groups), rtol=1e-12, atol=1e-12)


def _partition(groups: torch.Tensor) -> torch.Tensor:
    return groups[:, None] == groups[None, :]


def test_swin_shift_changes_windows_and_each_window_is_one_box_of_one_sample():
    coords = _random_coords()
    plain, shifted = swin_groups(coords, WINDOW, 0), swin_groups(coords, WINDOW, WINDOW // 2)
    assert not torch.equal(_partition(plain), _partition(shifted))
    for groups, shift in ((plain, 0), (shifted, WINDOW // 2)):
        box = (coords[:, 1:] + shift) // WINDOW
        for g in groups.unique():
            rows = groups == g
            assert coords[rows, 0].unique().numel() == 1
            assert torch.unique(box[rows], dim=0).shape[0] == 1


@pytest.mark.parametrize("attn_mode", ["swin", "shift_window", "shift_sequence", "shift_order"])
def test_shifted_modes_really_change_the_partition_between_blocks(attn_mode):
    coords = _random_coords()
    even = attention_groups(coords, block_attention_args(attn_mode, WINDOW, 0))
    odd = attention_groups(coords, block_attention_args(attn_mode, WINDOW, 1))
    assert not torch.equal(_partition(even), _partition(odd))


def test_shift_order_cycles_through_four_distinct_partitions():
    coords = _random_coords(counts=(200, 150), side=10)
    parts = [_partition(attention_groups(coords, block_attention_args("shift_order", WINDOW, i)))
             for i in range(4)]
    assert all(not torch.equal(parts[i], parts[j]) for i in range(4) for j in range(i + 1, 4))


def test_serialized_chunks_hold_chunk_len_tokens_except_at_sample_ends():
    coords = _random_coords(counts=(200, 130))
    groups = serialized_groups(coords, 64, shift_sequence=32)
    sizes = sorted(torch.unique(groups, return_counts=True)[1].tolist())
    # sample 0: 32 + 64 + 64 + 40; sample 1: 32 + 64 + 34
    assert sizes == sorted([32, 64, 64, 40, 32, 64, 34])


@pytest.mark.parametrize("attn_mode", ATTN_MODES)
def test_samples_never_attend_across_the_batch(attn_mode):
    torch.manual_seed(0)
    coords = _random_coords()
    module = SparseMultiHeadAttention(16, 2, attn_mode, WINDOW).double()
    feats = torch.randn(coords.shape[0], 16, dtype=torch.float64)
    changed = feats.clone()
    changed[coords[:, 0] == 1] += 5.0
    first = coords[:, 0] == 0
    torch.testing.assert_close(module(feats, coords)[first], module(changed, coords)[first], rtol=0, atol=0)


def test_mode_arguments_that_would_be_ignored_are_rejected():
    with pytest.raises(ValueError, match="does not use shift_window"):
        SparseMultiHeadAttention(16, 2, "full", shift_window=4)
    with pytest.raises(ValueError, match="does not use shift_sequence"):
        SparseMultiHeadAttention(16, 2, "swin", shift_sequence=4)
    with pytest.raises(ValueError, match="unknown attn_mode"):
        SparseMultiHeadAttention(16, 2, "global")
    with pytest.raises(ValueError, match="unknown attn_mode"):
        block_attention_args("global", 8, 0)


@pytest.mark.parametrize("attn_mode", ["swin", "shift_sequence"])
def test_grouped_attention_gradients_equal_dense_reference_gradients(attn_mode):
    coords = _random_coords(counts=(120, 70), seed=7)
    attn = block_attention_args(attn_mode, WINDOW, 1)
    weights = torch.randn(coords.shape[0], 2, 8, dtype=torch.float64)

    def grads(fn):
        qkv = [t.requires_grad_(True) for t in _qkv(coords.shape[0], seed=2)]
        (fn(*qkv) * weights).sum().backward()
        return [t.grad for t in qkv]

    ours = grads(lambda q, k, v: grouped_attention(q, k, v, attention_groups(coords, attn)))
    ref = grads(lambda q, k, v: _dense_attention(q, k, v, _reference_mask(coords, attn)))
    for got, want in zip(ours, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
