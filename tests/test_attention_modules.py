"""Transformer block, RoPE, RMS norm, position embedding, head resolution and weight-key layout."""

import importlib.util

import pytest
import torch

from ctvq.sparse.attention import (
    AbsolutePositionEmbedder,
    SparseMultiHeadAttention,
    SparseTransformerBlock,
    resolve_num_heads,
)
from ctvq.sparse.attention.rope import apply_rope, rope_phases

# From the Direct3D-S2 512 sparse VAE state dict, `encoder.blocks.0.` prefix removed.
FACT_BLOCK_KEYS = {
    "attn.to_qkv.weight": (1536, 512),
    "attn.to_qkv.bias": (1536,),
    "attn.to_out.weight": (512, 512),
    "attn.to_out.bias": (512,),
    "mlp.mlp.0.weight": (2048, 512),
    "mlp.mlp.0.bias": (2048,),
    "mlp.mlp.2.weight": (512, 2048),
    "mlp.mlp.2.bias": (512,),
}


def _coords(n_per_sample=(60, 40), side=10, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for b, n in enumerate(n_per_sample):
        flat = torch.randperm(side**3, generator=gen)[:n]
        xyz = torch.stack([flat // (side * side), (flat // side) % side, flat % side], dim=1)
        parts.append(torch.cat([torch.full((n, 1), b), xyz], dim=1))
    return torch.cat(parts)


def test_block_state_dict_matches_direct3d_s2_fact_file():
    block = SparseTransformerBlock(512, 8, mlp_ratio=4.0, attn_mode="swin", window_size=8)
    got = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    assert got == FACT_BLOCK_KEYS


def test_qk_rms_norm_adds_only_its_gains_and_changes_the_output():
    torch.manual_seed(0)
    plain = SparseMultiHeadAttention(32, 4, "full").double()
    normed = SparseMultiHeadAttention(32, 4, "full", qk_rms_norm=True).double()
    extra = set(normed.state_dict()) - set(plain.state_dict())
    assert extra == {"q_rms_norm.gamma", "k_rms_norm.gamma"}
    assert normed.q_rms_norm.gamma.shape == (4, 8)
    normed.load_state_dict(plain.state_dict(), strict=False)
    coords = _coords()
    feats = 3.0 * torch.randn(coords.shape[0], 32, dtype=torch.float64)
    assert not torch.allclose(plain(feats, coords), normed(feats, coords))
    unit = normed.q_rms_norm(torch.randn(5, 4, 8, dtype=torch.float64) * 7.0)
    torch.testing.assert_close(unit.pow(2).mean(dim=-1), torch.ones(5, 4, dtype=torch.float64))


def test_rope_scores_depend_only_on_relative_position():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 30, 3, 64, generator=gen, dtype=torch.float64)
    pos = torch.randint(0, 40, (30, 3), generator=gen)
    shift = torch.tensor([[5, 11, 23]])

    def scores(p):
        phases = rope_phases(p, 64)
        return torch.einsum("ihd,jhd->hij", apply_rope(q, phases), apply_rope(k, phases))

    torch.testing.assert_close(scores(pos), scores(pos + shift), rtol=1e-9, atol=1e-9)
    plain = torch.einsum("ihd,jhd->hij", q, k)
    assert not torch.allclose(scores(pos), plain)


@pytest.mark.parametrize(("attn_mode", "shift"), [("full", (3, 5, 7)), ("swin", (4, 8, 0))])
def test_rope_attention_is_unchanged_by_translating_all_coords(attn_mode, shift):
    torch.manual_seed(0)
    module = SparseMultiHeadAttention(48, 2, attn_mode, 4, use_rope=True, qk_rms_norm=True).double()
    coords = _coords()
    moved = coords.clone()
    moved[:, 1:] += torch.tensor(shift)
    feats = torch.randn(coords.shape[0], 48, dtype=torch.float64)
    torch.testing.assert_close(module(feats, coords), module(feats, moved), rtol=1e-9, atol=1e-9)
    without = SparseMultiHeadAttention(48, 2, attn_mode, window_size=4, qk_rms_norm=True).double()
    without.load_state_dict(module.state_dict())
    assert not torch.allclose(module(feats, coords), without(feats, coords))


@pytest.mark.parametrize(("channels", "heads", "match"), [(30, 2, "must be even"), (16, 4, "must be >= 6")])
def test_rope_rejects_head_sizes_it_cannot_rotate(channels, heads, match):
    with pytest.raises(ValueError, match=match):
        SparseMultiHeadAttention(channels, heads, use_rope=True)


def _block_grads(use_checkpoint: bool, state: dict, feats: torch.Tensor, coords: torch.Tensor):
    block = SparseTransformerBlock(32, 4, 2.0, "swin", 4, shift_window=2, use_checkpoint=use_checkpoint,
                                   use_rope=True).double()
    block.load_state_dict(state)
    block.train()
    x = feats.clone().requires_grad_(True)
    block(x, coords).pow(2).sum().backward()
    return x.grad, {n: p.grad for n, p in block.named_parameters()}


def test_gradients_flow_and_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    state = SparseTransformerBlock(32, 4, 2.0, "swin", 4, shift_window=2, use_rope=True).double().state_dict()
    coords = _coords()
    feats = torch.randn(coords.shape[0], 32, dtype=torch.float64)
    x_plain, p_plain = _block_grads(False, state, feats, coords)
    x_ckpt, p_ckpt = _block_grads(True, state, feats, coords)
    assert torch.isfinite(x_plain).all() and x_plain.abs().sum() > 0
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in p_plain.values())
    torch.testing.assert_close(x_ckpt, x_plain, rtol=1e-12, atol=1e-12)
    for name, grad in p_plain.items():
        torch.testing.assert_close(p_ckpt[name], grad, rtol=1e-12, atol=1e-12)


def test_block_is_pre_norm_residual_with_parameter_free_layernorm():
    torch.manual_seed(0)
    block = SparseTransformerBlock(16, 2, 4.0, "full").double()
    coords = _coords()
    x = torch.randn(coords.shape[0], 16, dtype=torch.float64)
    ln = torch.nn.functional.layer_norm
    h = x + block.attn(ln(x, (16,), eps=1e-6), coords)
    expected = h + block.mlp(ln(h, (16,), eps=1e-6))
    torch.testing.assert_close(block(x, coords), expected, rtol=1e-12, atol=1e-12)


def test_half_precision_block_keeps_dtype_and_stays_finite():
    torch.manual_seed(0)
    block = SparseTransformerBlock(16, 2, 4.0, "swin", 4).to(torch.bfloat16)
    coords = _coords()
    out = block(100.0 * torch.randn(coords.shape[0], 16).to(torch.bfloat16), coords)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_absolute_position_embedding_layout_and_padding():
    embed = AbsolutePositionEmbedder(512)
    xyz = torch.tensor([[0, 0, 0], [3, 17, 63]])
    out = embed(xyz)
    assert out.shape == (2, 512) and list(embed.parameters()) == []
    freq_dim = 512 // 3 // 2  # 85 per axis
    torch.testing.assert_close(out[1, 0], torch.sin(torch.tensor(3.0)))
    torch.testing.assert_close(out[1, freq_dim], torch.cos(torch.tensor(3.0)))
    torch.testing.assert_close(out[1, 2 * freq_dim], torch.sin(torch.tensor(17.0)))
    second_freq = 1 / 10000 ** (1 / freq_dim)
    torch.testing.assert_close(out[1, 4 * freq_dim + 1], torch.sin(torch.tensor(63.0 * second_freq)))
    assert torch.all(out[:, 6 * freq_dim:] == 0)
    at_origin = torch.tensor([0.0, 1.0]).repeat_interleave(freq_dim).repeat(3)
    torch.testing.assert_close(out[0, :6 * freq_dim], at_origin)


def test_resolve_num_heads_derives_or_checks_and_explains_errors():
    assert resolve_num_heads(512, None, 64) == 8
    assert resolve_num_heads(512, 16, 64) == 16
    with pytest.raises(ValueError, match="not divisible by num_heads 7"):
        resolve_num_heads(512, 7, None)
    with pytest.raises(ValueError, match="not divisible by num_head_channels 60"):
        resolve_num_heads(512, None, 60)
    with pytest.raises(ValueError, match="both are null"):
        resolve_num_heads(512, None, None)


def test_optional_backends_explain_how_to_install_when_missing_at_construction():
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed")
    with pytest.raises(ImportError, match="pip install flash-attn"):
        SparseMultiHeadAttention(16, 2, "full", attention_backend="flash_attn")


def test_unknown_attention_backend_is_rejected_at_construction():
    with pytest.raises(ValueError, match="unknown attention backend"):
        SparseMultiHeadAttention(16, 2, "full", attention_backend="triton")


@pytest.mark.parametrize("attn_mode", ["full", "swin", "shift_window", "shift_sequence", "shift_order"])
def test_block_accepts_int32_coords_a_single_voxel_and_an_empty_batch(attn_mode):
    torch.manual_seed(0)
    block = SparseTransformerBlock(16, 2, 2.0, attn_mode, 4)
    coords = _coords().to(torch.int32)
    feats = torch.randn(coords.shape[0], 16)
    torch.testing.assert_close(block(feats, coords), block(feats, coords.long()), rtol=0, atol=0)
    assert block(feats[:1], coords[:1]).shape == (1, 16)
    assert block(feats[:0], coords[:0]).shape == (0, 16)


@pytest.mark.parametrize(("training", "forward_calls"), [(True, 2), (False, 1)])
def test_checkpointing_recomputes_the_block_in_backward_only_when_training(training, forward_calls):
    block = SparseTransformerBlock(16, 2, 2.0, "full", use_checkpoint=True).train(training)
    calls = []
    block.attn.register_forward_hook(lambda *_: calls.append(1))
    coords = _coords()
    x = torch.randn(coords.shape[0], 16, requires_grad=True)
    block(x, coords).sum().backward()
    assert len(calls) == forward_calls and x.grad is not None
