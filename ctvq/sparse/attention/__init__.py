"""Sparse attention: serialization curves, window partitions, grouped SDPA, RoPE and transformer blocks."""

from ctvq.sparse.attention.attention import ATTENTION_BACKENDS, AttentionBackend, grouped_attention
from ctvq.sparse.attention.modules import (
    AbsolutePositionEmbedder,
    MultiHeadRMSNorm,
    SparseFeedForward,
    SparseMultiHeadAttention,
    SparseTransformerBlock,
    resolve_num_heads,
)
from ctvq.sparse.attention.serialize import SERIALIZE_MODES, SerializeMode, hilbert_key, morton_key, serialize
from ctvq.sparse.attention.windows import (
    ATTN_MODES,
    AttnMode,
    BlockAttention,
    attention_groups,
    block_attention_args,
)

__all__ = [
    "ATTENTION_BACKENDS",
    "ATTN_MODES",
    "SERIALIZE_MODES",
    "AbsolutePositionEmbedder",
    "AttentionBackend",
    "AttnMode",
    "BlockAttention",
    "MultiHeadRMSNorm",
    "SerializeMode",
    "SparseFeedForward",
    "SparseMultiHeadAttention",
    "SparseTransformerBlock",
    "attention_groups",
    "block_attention_args",
    "grouped_attention",
    "hilbert_key",
    "morton_key",
    "resolve_num_heads",
    "serialize",
]
