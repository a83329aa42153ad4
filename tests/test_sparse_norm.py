"""Per-sample GroupNorm, per-voxel LayerNorm (float32 inside), and the thin per-voxel wrappers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctvq.sparse import (
    SparseGELU,
    SparseGroupNorm,
    SparseLayerNorm,
    SparseLinear,
    SparseSiLU,
    SparseTensor,
)
from ctvq.sparse.norm import group_norm_per_sample


def _uneven_batch(channels: int, dtype: torch.dtype = torch.float32) -> SparseTensor:
    """Two samples of very different size and offset, so pooled statistics would be visibly wrong."""
    g = torch.Generator().manual_seed(0)
    counts = (37, 5)
    coords = torch.cat(
        [
            torch.stack([torch.full((n,), b), torch.arange(n), torch.zeros(n), torch.zeros(n)], 1)
            for b, n in enumerate(counts)
        ]
    ).to(torch.int32)
    feats = torch.randn(sum(counts), channels, generator=g)
    feats[counts[0] :] = feats[counts[0] :] * 5 + 3
    return SparseTensor(coords, feats.to(dtype))


def test_group_norm_equals_nn_group_norm_on_each_sample_separately() -> None:
    x = _uneven_batch(channels=8)
    norm = SparseGroupNorm(4, 8)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
        norm.bias.copy_(torch.randn(8))
    ref = nn.GroupNorm(4, 8)
    ref.load_state_dict(norm.state_dict())
    y = norm(x)
    for s in x.layout:
        want = ref(x.feats[s].T.unsqueeze(0))[0].T
        torch.testing.assert_close(y.feats[s], want, rtol=1e-5, atol=1e-5)
    assert y.coords is x.coords


def test_group_norm_gradients_match_the_per_sample_reference() -> None:
    x = _uneven_batch(channels=4, dtype=torch.float64)
    feats = x.feats.clone().requires_grad_(True)
    norm = SparseGroupNorm(2, 4).double()
    upstream = torch.randn(x.num_voxels, 4, dtype=torch.float64)
    (norm(x.replace(feats)).feats * upstream).sum().backward()
    feats_ref = x.feats.clone().requires_grad_(True)
    ref = nn.GroupNorm(2, 4).double()
    total = sum((ref(feats_ref[s].T.unsqueeze(0))[0].T * upstream[s]).sum() for s in x.layout)
    total.backward()
    torch.testing.assert_close(feats.grad, feats_ref.grad)
    torch.testing.assert_close(norm.weight.grad, ref.weight.grad)


def test_group_norm_in_half_precision_computes_in_float32() -> None:
    x = _uneven_batch(channels=8)
    norm = SparseGroupNorm(4, 8)
    full = norm(x).feats
    half = norm.half()(x.replace(x.feats.half()))
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.feats.float(), full, rtol=1e-2, atol=1e-2)


def test_group_norm_rejects_indivisible_channels() -> None:
    with pytest.raises(ValueError, match="divisible"):
        SparseGroupNorm(3, 8)


def test_layer_norm_normalises_each_voxel_and_has_no_parameters_without_affine() -> None:
    x = _uneven_batch(channels=6)
    norm = SparseLayerNorm(6, eps=1e-6, elementwise_affine=False)
    assert list(norm.state_dict()) == []
    torch.testing.assert_close(norm(x).feats, F.layer_norm(x.feats, (6,), eps=1e-6))
    half = norm(x.replace(x.feats.half()))
    assert half.dtype == torch.float16


def test_per_voxel_wrappers_keep_coords_and_cache() -> None:
    x = _uneven_batch(channels=4)
    linear = SparseLinear(4, 3)
    y = linear(x)
    torch.testing.assert_close(y.feats, x.feats @ linear.weight.T + linear.bias)
    assert y.coords is x.coords and y.cache is x.cache
    assert list(linear.state_dict()) == ["weight", "bias"]
    torch.testing.assert_close(SparseSiLU()(x).feats, F.silu(x.feats))
    torch.testing.assert_close(SparseGELU(approximate="tanh")(x).feats, F.gelu(x.feats, approximate="tanh"))


def test_group_norm_gradient_is_bit_identical_across_repeats_with_two_threads() -> None:
    """The per-sample statistics are broadcast back with index_select: the backward of ``mean[b]`` accumulated
    with atomics on CPU, so when the two threads' halves of the rows met inside one sample (unequal sample
    sizes) the gradient changed from run to run, and so did every training run at 2 threads."""
    g = torch.Generator().manual_seed(0)
    n = 60_000
    feats = torch.randn(n, 8, generator=g)
    batch = (torch.arange(n) >= n // 3).long()  # samples of 20k and 40k rows: the halves meet in sample 1
    upstream = torch.randn(n, 8, generator=g)

    def grad() -> torch.Tensor:
        x = feats.clone().requires_grad_()
        (group_norm_per_sample(x, batch, 2, 8, None, None, 1e-5) * upstream).sum().backward()
        assert x.grad is not None
        return x.grad

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first = grad()
        assert all(torch.equal(first, grad()) for _ in range(5))
    finally:
        torch.set_num_threads(threads)
