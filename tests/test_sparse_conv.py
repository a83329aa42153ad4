"""Submanifold sparse conv (torch backend) against a dense conv3d oracle; parameter layout; caching."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctvq.sparse import SparseBackend, SparseConv3d, SparseTensor, set_sparse_backend
from ctvq.sparse.backends.torch_backend import build_neighbor_map, kernel_offsets, submanifold_conv3d


def random_sparse(
    channels: int,
    shape: tuple[int, int, int] = (7, 6, 5),
    batch: int = 2,
    density: float = 0.35,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> SparseTensor:
    """Random voxels per sample, rows shuffled inside each sample (the conv must not rely on row order)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand((batch, *shape), generator=g) < density
    coords = torch.nonzero(mask).to(torch.int32)
    jitter = torch.rand(coords.shape[0], generator=g, dtype=torch.float64) * 0.5
    coords = coords[torch.argsort(coords[:, 0].double() + jitter)]
    feats = torch.randn(coords.shape[0], channels, generator=g, dtype=dtype)
    return SparseTensor(coords, feats, batch_size=batch, spatial_shape=shape)


def dense_weight(kernel: torch.Tensor) -> torch.Tensor:
    """torchsparse [27, in, out] (k = x + 3y + 9z) -> conv3d weight [out, in, x, y, z]."""
    c_in, c_out = kernel.shape[1], kernel.shape[2]
    return kernel.reshape(3, 3, 3, c_in, c_out).permute(4, 3, 2, 1, 0)


def dense_reference(x: SparseTensor, kernel: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    out = F.conv3d(x.dense(), dense_weight(kernel), bias, padding=1)
    b, i, j, k = x.coords.long().unbind(1)
    return out.permute(0, 2, 3, 4, 1)[b, i, j, k]


def test_torch_backend_matches_dense_conv3d_forward_and_backward() -> None:
    x = random_sparse(channels=3)
    feats = x.feats.clone().requires_grad_(True)
    kernel = torch.randn(27, 3, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    out = submanifold_conv3d(x.replace(feats), kernel, bias)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad((out * upstream).sum(), (feats, kernel, bias))

    feats_ref = x.feats.clone().requires_grad_(True)
    kernel_ref = kernel.detach().clone().requires_grad_(True)
    bias_ref = bias.detach().clone().requires_grad_(True)
    ref = dense_reference(x.replace(feats_ref), kernel_ref, bias_ref)
    grads_ref = torch.autograd.grad((ref * upstream).sum(), (feats_ref, kernel_ref, bias_ref))

    assert x.batch_counts.min() > 10
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_module_forward_matches_dense_conv3d_and_keeps_coords() -> None:
    x = random_sparse(channels=2, seed=3)
    conv = SparseConv3d(2, 5).double()
    y = conv(x)
    assert y.coords is x.coords
    ref = dense_reference(x, conv.conv.kernel, conv.conv.bias)
    torch.testing.assert_close(y.feats, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("offset", "index"), [((1, 0, 0), 14), ((0, 1, 0), 16), ((0, 0, 1), 22), ((-1, -1, -1), 0)]
)
def test_kernel_index_is_x_plus_3y_plus_9z_and_reads_the_neighbour_at_p_plus_offset(
    offset: tuple[int, int, int], index: int
) -> None:
    p = (2, 2, 2)
    q = tuple(a + d for a, d in zip(p, offset, strict=True))
    coords = torch.tensor([[0, *p], [0, *q]], dtype=torch.int64)
    x = SparseTensor(coords, torch.tensor([[1.0], [10.0]], dtype=torch.float64))
    kernel = torch.zeros(27, 1, 1, dtype=torch.float64)
    kernel[index] = 1.0
    out = submanifold_conv3d(x, kernel, None)
    assert out[:, 0].tolist() == [10.0, 0.0]
    assert kernel_offsets(3)[index].tolist() == list(offset)


def test_gradcheck_of_the_custom_autograd_function() -> None:
    x = random_sparse(channels=2, shape=(4, 4, 3), density=0.5, seed=5)
    feats = x.feats.clone().requires_grad_(True)
    kernel = torch.randn(27, 2, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda f, k, b: submanifold_conv3d(x.replace(f), k, b), (feats, kernel, bias)
    )


def test_kernel_size_one_is_a_per_voxel_linear_map() -> None:
    x = random_sparse(channels=3, seed=1)
    conv = SparseConv3d(3, 4, kernel_size=1).double()
    assert conv.conv.kernel.shape == (3, 4)
    y = conv(x)
    torch.testing.assert_close(y.feats, x.feats @ conv.conv.kernel + conv.conv.bias)


def test_state_dict_uses_torchsparse_keys_and_shapes() -> None:
    model = nn.Sequential(SparseConv3d(32, 64), SparseConv3d(64, 64), SparseConv3d(32, 64, kernel_size=1))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # the same shapes as Direct3D-S2's encoder.downsample.0.{out_layers.0, out_layers.3, skip_connection}
    assert shapes == {
        "0.conv.kernel": (27, 32, 64),
        "0.conv.bias": (64,),
        "1.conv.kernel": (27, 64, 64),
        "1.conv.bias": (64,),
        "2.conv.kernel": (32, 64),
        "2.conv.bias": (64,),
    }
    clone = nn.Sequential(SparseConv3d(32, 64), SparseConv3d(64, 64), SparseConv3d(32, 64, kernel_size=1))
    clone.load_state_dict(model.state_dict(), strict=True)


def test_neighbour_map_is_cached_on_the_tensor_and_shared_by_replace() -> None:
    x = random_sparse(channels=2, seed=2)
    conv = SparseConv3d(2, 2).double()
    y = conv(x)
    assert ("neighbors", 3) in x.cache
    nmap = x.cache.get_or_build(("neighbors", 3), lambda c: pytest.fail("rebuilt"))
    conv(y)
    assert y.cache.get_or_build(("neighbors", 3), lambda c: pytest.fail("rebuilt")) is nmap


def test_neighbour_map_pairs_are_symmetric_and_batches_never_mix() -> None:
    x = random_sparse(channels=1, seed=4)
    nmap = build_neighbor_map(x.coords, 3)
    batch = x.coords[:, 0].long()
    for k in range(27):
        if k == nmap.center:
            continue
        o, i = nmap.out_index[k].long(), nmap.in_index[k].long()
        assert torch.equal(batch[o], batch[i])
        mirror = 26 - k
        assert torch.equal(torch.sort(i).values, torch.sort(nmap.out_index[mirror].long()).values)


def test_duplicate_voxels_are_rejected() -> None:
    coords = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]])
    with pytest.raises(ValueError, match="duplicate"):
        build_neighbor_map(coords, 3)


def test_backward_saves_only_features_and_kernel() -> None:
    """Autograd must not keep per-offset gathers (that would be the [N, 27, C] tensor we avoid)."""
    x = random_sparse(channels=16, shape=(10, 10, 10), density=0.6, dtype=torch.float32)
    feats = x.feats.clone().requires_grad_(True)
    kernel = torch.randn(27, 16, 16, requires_grad=True)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = submanifold_conv3d(x.replace(feats), kernel, None)
    out.sum().backward()
    assert sum(saved) <= feats.numel() + kernel.numel()
    assert feats.grad is not None and kernel.grad is not None


def test_dtype_mismatch_outside_autocast_is_an_error_and_autocast_casts() -> None:
    x = random_sparse(channels=4, dtype=torch.float32, seed=6)
    conv = SparseConv3d(4, 4)
    with pytest.raises(ValueError, match="dtypes disagree"):
        conv(x.replace(x.feats.double()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.feats.dtype == torch.bfloat16
    torch.testing.assert_close(y.feats.float(), conv(x).feats, rtol=0.05, atol=0.05)


def test_set_sparse_backend_updates_every_conv() -> None:
    model = nn.Sequential(SparseConv3d(2, 2), nn.Sequential(SparseConv3d(2, 2, kernel_size=1)))
    assert set_sparse_backend(model, "spconv") == 2
    assert all(m.backend is SparseBackend.SPCONV for m in model.modules() if isinstance(m, SparseConv3d))
    with pytest.raises(ValueError, match="unknown sparse backend"):
        set_sparse_backend(model, "minkowski")
