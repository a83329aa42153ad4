"""Sparse SDF decoder, laid out like Direct3D-S2's ``SparseSDFDecoder`` so its weights load strictly.

latent [M, latent] at 64³ -> Linear(latent -> mc) -> position embedding -> transformer blocks -> three
subdivide blocks (conv3, SiLU, 8 children, conv3, SiLU; mc -> mc/4 -> mc/8 -> mc/16, or ``sdf_channels``)
-> Linear(-> 1) -> tanh. Every latent voxel decodes to all 512 of its children (no pruning, as Direct3D-S2).

The work is split in two so the model can chunk the second half: ``features`` (input layer + transformer,
global) and ``head`` (upsampling + output, local: receptive field < 3 latent voxels, no normalisation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ctvq.models.encoder import init_linear_layers, sdf_block_channels
from ctvq.models.torso import TransformerSettings, transformer_blocks
from ctvq.sparse import SparseConv3d, SparseLinear, SparseSiLU, SparseSubdivide, SparseTanh, SparseTensor
from ctvq.sparse.attention import AbsolutePositionEmbedder


class SparseSubdivideBlock3d(nn.Module):
    """conv3 (in -> out), SiLU, subdivide into 8 children, conv3, SiLU."""

    def __init__(self, channels: int, out_channels: int, use_checkpoint: bool = False) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels
        self.use_checkpoint = use_checkpoint
        self.act_layers = nn.Sequential(SparseConv3d(channels, out_channels, 3), SparseSiLU())
        self.sub = SparseSubdivide()
        self.out_layers = nn.Sequential(SparseConv3d(out_channels, out_channels, 3), SparseSiLU())

    def _body(self, x: SparseTensor) -> SparseTensor:
        return self.out_layers(self.sub(self.act_layers(x)))

    def forward(self, x: SparseTensor) -> SparseTensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._body, x, use_reentrant=False)
        return self._body(x)


class SparseSDFDecoder(nn.Module):
    """[M, latent] at the latent resolution -> [M * 512, 1] sdf in [-1, 1] at 8x the resolution."""

    def __init__(
        self, settings: TransformerSettings, latent_channels: int, sdf_channels: Sequence[int] | None
    ) -> None:
        super().__init__()
        c_full, c_half, c_quarter = sdf_block_channels(settings.model_channels, sdf_channels)
        mc = settings.model_channels
        self.model_channels = mc
        self.latent_channels = latent_channels
        self.dtype = torch.float32
        self.input_layer = SparseLinear(latent_channels, mc)
        self.pos_embedder = AbsolutePositionEmbedder(mc) if settings.pe_mode == "ape" else None
        self.blocks = transformer_blocks(settings)
        self.upsample = nn.ModuleList(
            [
                SparseSubdivideBlock3d(mc, c_quarter, settings.use_checkpoint),
                SparseSubdivideBlock3d(c_quarter, c_half, settings.use_checkpoint),
                SparseSubdivideBlock3d(c_half, c_full, settings.use_checkpoint),
            ]
        )
        self.out_layer = SparseLinear(c_full, 1)
        self.out_active = SparseTanh()
        init_linear_layers(self)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    def torso(self) -> list[nn.Module]:
        """The parts that run in half precision under use_fp16."""
        return [self.blocks, self.upsample]

    def features(self, latent: SparseTensor) -> SparseTensor:
        """Input layer, position embedding and transformer blocks: [M, mc] in the torso dtype."""
        if latent.num_channels != self.latent_channels:
            raise ValueError(
                f"SparseSDFDecoder expects {self.latent_channels} latent channels, got {latent.num_channels}"
            )
        h = self.input_layer(latent.replace(latent.feats.float()))
        feats = h.feats
        if self.pos_embedder is not None:
            feats = feats + self.pos_embedder(h.coords[:, 1:])
        feats = feats.to(self.dtype)
        for block in self.blocks:
            feats = block(feats, h.coords)
        return h.replace(feats)

    def head(self, h: SparseTensor) -> SparseTensor:
        """Upsampling and output: [K, mc] latent features -> [K * 512, 1] float32 sdf in [-1, 1]."""
        for block in self.upsample:
            h = block(h)
        out = self.out_layer(h.replace(h.feats.float()))
        return self.out_active(out)

    def forward(self, latent: SparseTensor) -> SparseTensor:
        return self.head(self.features(latent))


__all__ = ["SparseSDFDecoder", "SparseSubdivideBlock3d"]
