"""The transformer torso that encoder and decoder share, and the one object that describes it.

``TransformerSettings`` is built once from the model's config (``models.vqvae.args``) and passed whole to
the encoder and the decoder, so the eleven transformer arguments are written down in one place: the config
schema, which also holds their defaults and documentation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from ctvq.sparse.attention import SparseTransformerBlock, block_attention_args, resolve_num_heads


@dataclass(frozen=True, kw_only=True)
class TransformerSettings:
    """Width, depth, heads, attention pattern and memory switches of one transformer torso."""

    model_channels: int
    num_blocks: int
    num_heads: int | None
    num_head_channels: int | None
    mlp_ratio: float
    attn_mode: str
    window_size: int
    pe_mode: str
    use_checkpoint: bool
    qk_rms_norm: bool
    attention_backend: str

    @classmethod
    def from_model_args(cls, args: Mapping[str, Any]) -> TransformerSettings:
        """The transformer's part of a complete ``models.vqvae.args`` mapping."""
        return cls(**{f.name: args[f.name] for f in fields(cls)})

    @property
    def heads(self) -> int:
        return resolve_num_heads(self.model_channels, self.num_heads, self.num_head_channels)


def transformer_blocks(settings: TransformerSettings) -> nn.ModuleList:
    """The blocks of one torso (swin shifts on odd blocks, etc.: ``block_attention_args``)."""
    if settings.pe_mode not in ("ape", "rope"):
        raise ValueError(f"pe_mode={settings.pe_mode!r}; use 'ape' or 'rope'")
    heads = settings.heads
    blocks = []
    for i in range(settings.num_blocks):
        args = block_attention_args(settings.attn_mode, settings.window_size, i)  # type: ignore[arg-type]
        blocks.append(
            SparseTransformerBlock(
                settings.model_channels,
                heads,
                mlp_ratio=settings.mlp_ratio,
                attn_mode=args.attn_mode,
                window_size=args.window_size,
                shift_window=args.shift_window,
                shift_sequence=args.shift_sequence,
                serialize_mode=args.serialize_mode,
                use_checkpoint=settings.use_checkpoint,
                qk_rms_norm=settings.qk_rms_norm,
                use_rope=settings.pe_mode == "rope",
                attention_backend=settings.attention_backend,  # type: ignore[arg-type]
            )
        )
    return nn.ModuleList(blocks)


__all__ = ["TransformerSettings", "transformer_blocks"]
