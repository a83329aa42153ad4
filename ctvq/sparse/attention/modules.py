"""Transformer layers over sparse voxels: attention, feed-forward, pre-norm block, position embedding.

Layers take plain tensors, ``feats [N, C]`` and ``coords [N, 4]`` (batch, x, y, z at the latent
resolution), so they do not depend on a SparseTensor type. Parameter names follow Direct3D-S2 / TRELLIS
(``attn.to_qkv``, ``attn.to_out``, ``mlp.mlp.0``, ``mlp.mlp.2``; LayerNorms without affine) so pretrained
weights load strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ctvq.sparse.attention.attention import AttentionBackend, check_attention_backend, grouped_attention
from ctvq.sparse.attention.rope import apply_rope, rope_frequencies, rope_phases
from ctvq.sparse.attention.serialize import SerializeMode
from ctvq.sparse.attention.windows import AttnMode, BlockAttention, attention_groups, check_attention_args


def resolve_num_heads(model_channels: int, num_heads: int | None, num_head_channels: int | None) -> int:
    """Number of heads: ``num_heads`` when set (it wins), else ``model_channels / num_head_channels``."""
    if num_heads is not None:
        if num_heads < 1 or model_channels % num_heads != 0:
            raise ValueError(f"model_channels {model_channels} is not divisible by num_heads {num_heads}; "
                             f"pick num_heads dividing {model_channels} or set num_heads null and use "
                             f"num_head_channels")
        return num_heads
    if num_head_channels is None:
        raise ValueError("set num_heads or num_head_channels (both are null)")
    if num_head_channels < 1 or model_channels % num_head_channels != 0:
        raise ValueError(f"model_channels {model_channels} is not divisible by num_head_channels "
                         f"{num_head_channels}; pick num_head_channels dividing {model_channels}")
    return model_channels // num_head_channels


def layer_norm_no_affine(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over channels without affine, computed in at least float32 (fp16 stays stable), cast back."""
    work = torch.promote_types(x.dtype, torch.float32)
    return F.layer_norm(x.to(work), (x.shape[-1],), eps=eps).to(x.dtype)


class LayerNorm32(nn.Module):
    """Parameter-free LayerNorm (eps 1e-6) evaluated in at least float32."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_no_affine(x, self.eps)


class MultiHeadRMSNorm(nn.Module):
    """RMS norm of each head's vector with a learnable per-head, per-channel gain ``gamma`` [H, D]."""

    def __init__(self, head_dim: int, num_heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(num_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(work)
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.gamma.to(work)).to(x.dtype)


class SparseMultiHeadAttention(nn.Module):
    """Self-attention within the groups that ``attn_mode`` and the shift arguments define (see ``windows``).

    ``qk_rms_norm`` adds ``q_rms_norm.gamma`` / ``k_rms_norm.gamma``; ``use_rope`` rotates q and k by the
    voxel coordinates (after the RMS norm, so scores stay a function of relative position only).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        attn_mode: AttnMode = "full",
        window_size: int = 8,
        shift_window: int = 0,
        shift_sequence: int = 0,
        serialize_mode: SerializeMode = "z_order",
        qk_rms_norm: bool = False,
        use_rope: bool = False,
        attention_backend: AttentionBackend = "sdpa",
    ) -> None:
        super().__init__()
        if num_heads < 1 or channels % num_heads != 0:
            raise ValueError(f"channels {channels} must be divisible by num_heads {num_heads}")
        self.channels = channels
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.pattern = BlockAttention(attn_mode, window_size, shift_window, shift_sequence, serialize_mode)
        check_attention_args(self.pattern)
        self.use_rope = use_rope
        if use_rope:
            rope_frequencies(self.head_dim)  # raises a clear error for a head size RoPE cannot use
        check_attention_backend(attention_backend)
        self.attention_backend: AttentionBackend = attention_backend
        self.to_qkv = nn.Linear(channels, 3 * channels)
        self.to_out = nn.Linear(channels, channels)
        self.qk_rms_norm = qk_rms_norm
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)

    def forward(self, feats: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        if feats.ndim != 2 or feats.shape[1] != self.channels or coords.shape[0] != feats.shape[0]:
            raise ValueError(f"expected feats [N, {self.channels}] and coords [N, 4], got "
                             f"{tuple(feats.shape)} and {tuple(coords.shape)}")
        n = feats.shape[0]
        q, k, v = self.to_qkv(feats).reshape(n, 3, self.num_heads, self.head_dim).unbind(dim=1)
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        if self.use_rope:
            phases = rope_phases(coords[:, 1:], self.head_dim)
            q, k = apply_rope(q, phases), apply_rope(k, phases)
        groups = attention_groups(coords, self.pattern)
        out = grouped_attention(q, k, v, groups, backend=self.attention_backend)
        return self.to_out(out.reshape(n, self.channels))


class SparseFeedForward(nn.Module):
    """Linear(C, C * mlp_ratio) -> GELU(tanh) -> Linear(C * mlp_ratio, C), stored as ``mlp.0`` / ``mlp.2``."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(channels * mlp_ratio)
        if hidden < 1:
            raise ValueError(f"mlp_ratio {mlp_ratio} gives an empty hidden layer for {channels} channels")
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class SparseTransformerBlock(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + mlp(LN(x)); optional gradient checkpointing in training."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attn_mode: AttnMode = "full",
        window_size: int = 8,
        shift_window: int = 0,
        shift_sequence: int = 0,
        serialize_mode: SerializeMode = "z_order",
        use_checkpoint: bool = False,
        qk_rms_norm: bool = False,
        use_rope: bool = False,
        attention_backend: AttentionBackend = "sdpa",
    ) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.norm1 = LayerNorm32()
        self.norm2 = LayerNorm32()
        self.attn = SparseMultiHeadAttention(channels, num_heads, attn_mode, window_size, shift_window,
                                             shift_sequence, serialize_mode, qk_rms_norm, use_rope,
                                             attention_backend)
        self.mlp = SparseFeedForward(channels, mlp_ratio)

    def _body(self, feats: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        feats = feats + self.attn(self.norm1(feats), coords)
        return feats + self.mlp(self.norm2(feats))

    def forward(self, feats: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._body, feats, coords, use_reentrant=False)
        return self._body(feats, coords)


class AbsolutePositionEmbedder(nn.Module):
    """Fixed sin/cos embedding of 3-D positions, no parameters.

    Layout (as Direct3D-S2 / TRELLIS, so pretrained weights see the features they were trained with): per axis
    ``[sin(p * f), cos(p * f)]`` with f = 10000^(-i / F), i < F = channels // 3 // 2; axes x | y | z;
    zero padding up to ``channels``.
    """

    def __init__(self, channels: int, in_channels: int = 3) -> None:
        super().__init__()
        self.channels = channels
        self.in_channels = in_channels
        self.freq_dim = channels // in_channels // 2
        if self.freq_dim < 1:
            raise ValueError(f"channels {channels} too small for a sin/cos embedding of {in_channels} axes "
                             f"(need >= {2 * in_channels})")

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        if xyz.ndim != 2 or xyz.shape[1] != self.in_channels:
            raise ValueError(f"expected positions [N, {self.in_channels}], got {tuple(xyz.shape)}")
        steps = torch.arange(self.freq_dim, dtype=torch.float32, device=xyz.device) / self.freq_dim
        freqs = 1.0 / 10000**steps
        angles = xyz.to(torch.float32)[:, :, None] * freqs  # [N, A, F]
        embed = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(xyz.shape[0], -1)
        return F.pad(embed, (0, self.channels - embed.shape[1]))
