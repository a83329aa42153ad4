"""CUDA paths: both conv backends, the model under spconv, fp16 weights, AMP training, attention, chunked
decoding and NCCL. Skipped without a CUDA device (CI has none); `scripts/gpu-check.sh` runs them on one.

Every check compares the CUDA result with an independent reference (dense conv3d, the CPU model, the torch
backend), so a wrong kernel conversion, a precision slip or a device-dependent path fails here.
"""

from __future__ import annotations

import copy
import csv
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_model_chunking import sorted_by_coords
from test_model_vqvae import batch_and_distances, tiny_model
from test_sparse_conv import dense_reference, random_sparse
from train_helpers import write_config, write_data, write_stage1_checkpoint

from ctvq.models import SparseSDFVQVAE
from ctvq.sparse import SparseBackend, SparseConv3d, SparseTensor, spconv_available
from ctvq.sparse.attention import ATTN_MODES
from ctvq.sparse.backends.torch_backend import _SubmanifoldConv, neighbor_map
from ctvq.train.checkpoint import final_path, load_file
from ctvq.train.progress import METRICS_NAME

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
needs_spconv = pytest.mark.skipif(not spconv_available(), reason="spconv-cu120 not installed")
CUDA = torch.device("cuda")


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _params_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}


def _assert_matches_float64_dense_reference(x: SparseTensor, kernel: torch.Tensor, bias: torch.Tensor,
                                            upstream: torch.Tensor, out: torch.Tensor,
                                            grads: tuple[torch.Tensor, ...]) -> None:
    """Float32 sparse results against conv3d in float64 (cuDNN's float32 conv3d may use TF32, ~1e-3)."""
    refs = [t.detach().double().clone().requires_grad_(True) for t in (x.feats, kernel, bias)]
    ref = dense_reference(x.replace(refs[0]), refs[1], refs[2])
    grads_ref = torch.autograd.grad((ref * upstream.double()).sum(), refs)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pairs", [False, True], ids=["implicit_gemm", "pair_lists"])
def test_torch_backend_matches_dense_conv3d_on_cuda(pairs: bool) -> None:
    x = random_sparse(channels=5, shape=(9, 8, 7), dtype=torch.float32).to(CUDA)
    feats = x.feats.clone().requires_grad_(True)
    kernel = torch.randn(27, 5, 6, device=CUDA, requires_grad=True)
    bias = torch.randn(6, device=CUDA, requires_grad=True)
    out = _SubmanifoldConv.apply(feats, kernel, bias, neighbor_map(x, 3), pairs)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad((out * upstream).sum(), (feats, kernel, bias))
    _assert_matches_float64_dense_reference(x, kernel, bias, upstream, out, grads)


def test_cuda_torch_backend_equals_cpu_torch_backend_in_float64() -> None:
    x = random_sparse(channels=4, shape=(10, 9, 8))
    kernel = torch.randn(27, 4, 3, dtype=torch.float64)
    cpu = _SubmanifoldConv.apply(x.feats, kernel, None, neighbor_map(x, 3), None)
    xc = x.to(CUDA)
    gpu = _SubmanifoldConv.apply(xc.feats, kernel.to(CUDA), None, neighbor_map(xc, 3), None)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-12, atol=1e-12)


@needs_spconv
def test_spconv_conv_matches_dense_conv3d_forward_and_backward() -> None:
    x = random_sparse(channels=8, shape=(9, 8, 7), dtype=torch.float32).to(CUDA)
    conv = SparseConv3d(8, 16, backend="spconv").to(CUDA)
    feats = x.feats.clone().requires_grad_(True)
    out = conv(x.replace(feats)).feats
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad((out * upstream).sum(), (feats, conv.conv.kernel, conv.conv.bias))
    _assert_matches_float64_dense_reference(x, conv.conv.kernel, conv.conv.bias, upstream, out, grads)


@needs_spconv
def test_model_under_spconv_equals_model_under_torch_backend() -> None:
    """Same weights, same batch: recon, losses and every parameter gradient agree across backends."""
    data, _ = batch_and_distances()
    data = _to(data, CUDA)
    results = {}
    for backend in ("torch", "spconv"):
        model = tiny_model(sparse_backend=backend, model_channels=64, num_head_channels=32).to(CUDA)
        out = model(data, loss_type="l1")
        (out["recon_loss"] + out["codebook_loss"] + 0.25 * out["commitment_loss"]).backward()
        results[backend] = (out["recon"].feats.detach().cpu(), out["indices"].cpu(), _params_grads(model))
    (rec_t, idx_t, g_t), (rec_s, idx_s, g_s) = results["torch"], results["spconv"]
    assert torch.equal(idx_t, idx_s)
    torch.testing.assert_close(rec_s, rec_t, rtol=1e-3, atol=1e-3)
    assert g_t.keys() == g_s.keys() and len(g_t) > 20
    for name in g_t:
        torch.testing.assert_close(g_s[name], g_t[name], rtol=1e-2, atol=1e-3, msg=name)


def test_auto_backend_picks_spconv_on_cuda_only_when_installed() -> None:
    data, _ = batch_and_distances()
    model = tiny_model().to(CUDA)
    model.eval()
    with torch.no_grad():
        model.encode(_to(data, CUDA))
    want = SparseBackend.SPCONV if spconv_available() else SparseBackend.TORCH
    backends = {m.backend for m in model.modules() if isinstance(m, SparseConv3d)}
    assert backends == {want}


@pytest.mark.parametrize("attn_mode", ATTN_MODES)
def test_every_attention_mode_gives_the_same_model_output_on_cuda_and_cpu(attn_mode: str) -> None:
    data, _ = batch_and_distances()
    model = tiny_model(attn_mode=attn_mode, sparse_backend="torch")
    model.eval()
    with torch.no_grad():
        cpu = model.decode(model.encode(data)[0]).feats
        model.to(CUDA)
        gpu = model.decode(model.encode(_to(data, CUDA))[0]).feats.cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)


def test_fp16_model_keeps_norms_in_float32_and_tracks_the_float32_model() -> None:
    data, _ = batch_and_distances()
    data = _to(data, CUDA)
    ref_model = tiny_model(model_channels=64, num_head_channels=32).to(CUDA)
    half_model = copy.deepcopy(ref_model)
    half_model.convert_to_fp16()
    assert any(p.dtype == torch.float16 for p in half_model.parameters())
    norms = [m for m in half_model.modules() if isinstance(m, torch.nn.GroupNorm | torch.nn.LayerNorm)]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    assert half_model.quantizer.embedding.weight.dtype == torch.float32
    out32, out16 = ref_model(data), half_model(data)
    (out16["recon_loss"] + out16["commitment_loss"]).backward()
    grads = _params_grads(half_model)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    diff = (out16["recon"].feats.float() - out32["recon"].feats).abs().max()
    assert float(diff.detach()) < 5e-2 * float(out32["recon"].feats.abs().max()) + 1e-3


@pytest.mark.parametrize("backend", ["torch", pytest.param("spconv", marks=needs_spconv)])
def test_float16_autocast_gradients_track_float32_gradients(backend: str) -> None:
    """What fp16_mode "amp" computes: the same loss and, up to float16 rounding, the same gradients."""
    data = _to(batch_and_distances()[0], CUDA)
    model = tiny_model(sparse_backend=backend, model_channels=64, num_head_channels=32).to(CUDA)

    def loss_and_grads(autocast: bool) -> tuple[float, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
            out = model(data)
            loss = out["recon_loss"] + out["commitment_loss"]
        (loss * 1024.0).backward()  # a fixed loss scale, as GradScaler applies
        grads = [p.grad.float().flatten() / 1024.0 for p in model.parameters() if p.grad is not None]
        return float(loss.detach()), torch.cat(grads)

    loss32, grads32 = loss_and_grads(False)
    loss16, grads16 = loss_and_grads(True)
    assert torch.isfinite(grads16).all()
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    assert float(F.cosine_similarity(grads16, grads32, dim=0)) > 0.99
    assert float(grads16.norm() / grads32.norm()) == pytest.approx(1.0, abs=0.05)


def test_chunked_decode_equals_full_decode_on_cuda() -> None:
    torch.manual_seed(0)
    model = SparseSDFVQVAE(resolution=16, model_channels=32, latent_channels=4, num_blocks=1,
                           num_embeddings=16, num_head_channels=16, window_size=4, chunk_size=4).to(CUDA)
    model.eval()
    gen = torch.Generator().manual_seed(1)
    xyz = torch.unique((torch.rand(300, 3, generator=gen) * 16).long(), dim=0)
    coords = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.long), xyz], 1).to(torch.int32).to(CUDA)
    indices = torch.randint(16, (len(xyz),), generator=gen).to(CUDA)
    with torch.no_grad():
        latent = model.latent_from_indices(coords, indices, batch_size=1)
        full = model.decode(latent, chunked=False)
        chunked = model.decode(latent)
    (coords_full, feats_full), (coords_chunked, feats_chunked) = map(sorted_by_coords, (full, chunked))
    assert torch.equal(coords_full, coords_chunked)
    torch.testing.assert_close(feats_chunked, feats_full, rtol=1e-4, atol=1e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nccl_process_group_runs_a_ddp_step_and_collectives() -> None:
    """One GPU allows a one-rank NCCL group only; it still runs NCCL's init, all-reduce and DDP's reducer."""
    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    from torch.nn.parallel import DistributedDataParallel

    from ctvq.train.distributed import DistInfo

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        t = torch.arange(4.0, device=CUDA)
        dist.all_reduce(t)
        assert t.tolist() == [0.0, 1.0, 2.0, 3.0]
        data, _ = batch_and_distances()
        model = tiny_model(sparse_backend="torch").to(CUDA)
        net = DistributedDataParallel(model, device_ids=[0], broadcast_buffers=False)
        out = net(_to(data, CUDA))
        (out["recon_loss"] + out["commitment_loss"]).backward()
        assert all(p.grad is not None for p in model.encoder.parameters())
        assert DistInfo(0, 1, 0, CUDA).is_main
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("fp16_mode", ["amp", "inflat_all"])
def test_stage2_training_on_cuda_reduces_the_loss(tmp_path, fp16_mode: str) -> None:
    from train_helpers import train_main as main

    data = write_data(tmp_path / "data", cases=4)
    ckpt = tmp_path / "s1.pt"
    write_stage1_checkpoint(ckpt)
    config = write_config(tmp_path / "c.json", training_stage=2, pretrained_vae_path=str(ckpt), max_steps=30,
                          fp16_mode=fp16_mode, i_log=5, i_save=30, i_sample=1000,
                          model_args={"sparse_backend": "auto"},
                          optimizer={"name": "AdamW", "args": {"lr": 3e-3}})
    out = tmp_path / "run"
    assert main(["--config", str(config), "--data", str(data), "--output-dir", str(out), "--device", "cuda",
                 "--no-tensorboard"]) == 0
    with (out / METRICS_NAME).open() as fh:
        losses = [float(row["loss"]) for row in csv.DictReader(fh)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.9 * losses[0], losses
    assert load_file(final_path(out))["ctvq"]["step"] == 30
    assert "cuda" in (out / "log.txt").read_text()


def test_dense_reference_helper_is_the_cross_correlation_conv3d_computes() -> None:
    """Guards the oracle itself on CUDA: a single-tap kernel moves each voxel's value by its offset."""
    x = random_sparse(channels=1, shape=(6, 6, 6), dtype=torch.float32).to(CUDA)
    kernel = torch.zeros(27, 1, 1, device=CUDA)
    kernel[1 + 3 * 1 + 9 * 2, 0, 0] = 1.0  # offset (0, 0, +1): out[p] = in[p + (0, 0, 1)]
    dense = x.dense()
    shifted = F.pad(dense[..., 1:], (0, 1))
    b, i, j, k = x.coords.long().unbind(1)
    want = shifted.permute(0, 2, 3, 4, 1)[b, i, j, k]
    torch.testing.assert_close(dense_reference(x, kernel, torch.zeros(1, device=CUDA)), want)
