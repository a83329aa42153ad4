"""Backend switch and the torchsparse -> spconv kernel conversion (spconv itself only where installed)."""

import pytest
import torch
import torch.nn.functional as F

from ctvq.sparse import SparseBackend, SparseConv3d, SparseTensor, resolve_backend, spconv_available
from ctvq.sparse.backends import ENV_VAR
from ctvq.sparse.backends.spconv_backend import spconv_to_torchsparse_kernel, torchsparse_to_spconv_kernel
from ctvq.sparse.backends.torch_backend import submanifold_conv3d


def _random_sparse(channels: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> SparseTensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand((2, 6, 5, 7), generator=g) < 0.4
    coords = torch.nonzero(mask).to(torch.int32)
    feats = torch.randn(coords.shape[0], channels, generator=g, dtype=dtype)
    return SparseTensor(coords, feats, batch_size=2, spatial_shape=(6, 5, 7))


def test_conversion_places_each_tap_at_spconv_out_x_y_z_in() -> None:
    kernel = torch.randn(27, 3, 4)
    sp = torchsparse_to_spconv_kernel(kernel)
    assert sp.shape == (4, 3, 3, 3, 3)
    for x in range(3):
        for y in range(3):
            for z in range(3):
                torch.testing.assert_close(sp[:, x, y, z, :], kernel[x + 3 * y + 9 * z].T, rtol=0, atol=0)


def test_dense_conv_built_from_the_spconv_layout_matches_the_torch_backend() -> None:
    x = _random_sparse(channels=3)
    kernel = torch.randn(27, 3, 5, dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64)
    sp = torchsparse_to_spconv_kernel(kernel)  # [out, x, y, z, in]
    dense = F.conv3d(x.dense(), sp.permute(0, 4, 1, 2, 3), bias, padding=1)
    b, i, j, k = x.coords.long().unbind(1)
    ref = dense.permute(0, 2, 3, 4, 1)[b, i, j, k]
    torch.testing.assert_close(submanifold_conv3d(x, kernel, bias), ref, rtol=1e-10, atol=1e-10)


def test_spconv_to_torchsparse_inverts_the_conversion() -> None:
    kernel = torch.randn(27, 6, 2)
    assert torch.equal(spconv_to_torchsparse_kernel(torchsparse_to_spconv_kernel(kernel)), kernel)


def test_conversion_rejects_non_cubic_kernels() -> None:
    with pytest.raises(ValueError, match="cube"):
        torchsparse_to_spconv_kernel(torch.zeros(26, 2, 2))


def test_auto_picks_torch_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend("auto", "cpu") is SparseBackend.TORCH
    assert resolve_backend("torch", "cuda") is SparseBackend.TORCH
    assert resolve_backend(SparseBackend.TORCH) is SparseBackend.TORCH


def test_auto_follows_the_environment_variable_and_rejects_bad_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV_VAR, "torch")
    assert resolve_backend("auto", "cuda") is SparseBackend.TORCH
    monkeypatch.setenv(ENV_VAR, "cuda-magic")
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_backend("auto", "cpu")
    # an explicit request ignores the variable
    assert resolve_backend("torch", "cpu") is SparseBackend.TORCH


def test_unknown_backend_name_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown sparse backend 'minkowski'"):
        resolve_backend("minkowski")


@pytest.mark.skipif(spconv_available(), reason="spconv is installed here")
def test_explicit_spconv_without_the_package_fails_clearly() -> None:
    with pytest.raises(RuntimeError, match="spconv-cu120"):
        resolve_backend("spconv", "cpu")
    x = _random_sparse(channels=2, dtype=torch.float32)
    conv = SparseConv3d(2, 2, backend="spconv")
    with pytest.raises(RuntimeError, match="spconv"):
        conv(x)


@pytest.mark.skipif(not spconv_available(), reason="spconv not installed (GPU extra spconv-cu120)")
def test_spconv_backend_agrees_with_torch_backend() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU wheel's scatter is racy with more threads
    try:
        x = _random_sparse(channels=8, dtype=torch.float32).to(device)
        conv = SparseConv3d(8, 16).to(device)
        ref = conv(x).feats
        conv.backend = SparseBackend.SPCONV
        if device == "cuda":
            kernel = conv.conv.kernel
            out = conv(x).feats
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
            out.square().sum().backward()
            grad_sp = kernel.grad.clone()
            kernel.grad = None
            conv.backend = SparseBackend.TORCH
            conv(x).feats.square().sum().backward()
            torch.testing.assert_close(grad_sp, kernel.grad, rtol=1e-3, atol=1e-3)
        else:
            with torch.no_grad():
                out = conv(x).feats
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(threads)
