"""Sparse SDF encoder, laid out like Direct3D-S2's ``SparseSDFEncoder`` so its weights load strictly.

512³ sdf voxels -> Linear(1 -> mc/16) -> three 2x down blocks (mc/16 -> mc/8 -> mc/4 -> mc) ->
Linear(mc -> mc) -> absolute sin/cos position embedding -> transformer blocks at 64³ ->
LayerNorm (no affine) -> Linear(mc -> 2 * latent). The vector quantizer uses the first ``latent``
output channels (Direct3D-S2's posterior mean); the second half is kept only so that the pretrained
``out_layer`` loads unchanged.

GroupNorm uses 32 groups as Direct3D-S2 when the channel count allows, else the largest divisor <= 32
(``group_count``), so narrow test and ablation models (model_channels 32..256) work; at model_channels 512
every GroupNorm has 32 groups, as in the pretrained model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ctvq.models.torso import TransformerSettings, transformer_blocks
from ctvq.sparse import (
    SparseConv3d,
    SparseDownsample,
    SparseGroupNorm,
    SparseLinear,
    SparseSiLU,
    SparseTensor,
)
from ctvq.sparse.attention import AbsolutePositionEmbedder
from ctvq.sparse.attention.modules import layer_norm_no_affine

MAX_GROUPS = 32


def group_count(channels: int, preferred: int = MAX_GROUPS) -> int:
    """Largest divisor of ``channels`` that is <= ``preferred`` (32 for every width of the 512 model)."""
    if channels < 1:
        raise ValueError(f"group_count: channels={channels} must be >= 1")
    return max(g for g in range(1, min(preferred, channels) + 1) if channels % g == 0)


def check_model_channels(model_channels: int) -> None:
    """The down/up blocks use mc/16, mc/8 and mc/4 channels: mc must be a positive multiple of 16."""
    if model_channels < 16 or model_channels % 16:
        raise ValueError(
            f"model_channels={model_channels} must be a positive multiple of 16 (the sdf blocks use "
            "model_channels/16, /8 and /4 channels); Direct3D-S2 uses 512"
        )


def sdf_block_channels(model_channels: int, sdf_channels: Sequence[int] | None) -> tuple[int, int, int]:
    """Channels of the sdf blocks at full, half and quarter resolution (the latent level has mc).

    None is Direct3D-S2's layout, mc/16, mc/8, mc/4: at the 512 model 32/64/128, but at a narrow model only
    4/8/16, so every full-resolution voxel is described by 4 numbers. A narrow transformer with wider sdf
    blocks decouples the two (pretrained weights need the default).
    """
    check_model_channels(model_channels)
    if sdf_channels is None:
        return model_channels // 16, model_channels // 8, model_channels // 4
    chans = tuple(sdf_channels)
    if len(chans) != 3 or any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in chans):
        raise ValueError(
            f"sdf_channels={list(chans)} must be 3 positive ints (full, half and quarter resolution) or null"
        )
    return chans  # type: ignore[return-value]


class SparseDownBlock3d(nn.Module):
    """GroupNorm, SiLU, 2x mean pool, conv3, GroupNorm, SiLU, conv3, plus a pooled 1x1-conv skip."""

    def __init__(self, channels: int, out_channels: int, use_checkpoint: bool = False) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels
        self.use_checkpoint = use_checkpoint
        self.act_layers = nn.Sequential(SparseGroupNorm(group_count(channels), channels), SparseSiLU())
        self.down = SparseDownsample(2)
        self.out_layers = nn.Sequential(
            SparseConv3d(channels, out_channels, 3),
            SparseGroupNorm(group_count(out_channels), out_channels),
            SparseSiLU(),
            SparseConv3d(out_channels, out_channels, 3),
        )
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else SparseConv3d(channels, out_channels, 1)
        )

    def _body(self, x: SparseTensor) -> SparseTensor:
        h = self.down(self.act_layers(x))
        skip = self.skip_connection(self.down(x))
        h = self.out_layers(h)
        return h.replace(h.feats + skip.feats)

    def forward(self, x: SparseTensor) -> SparseTensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._body, x, use_reentrant=False)
        return self._body(x)


def init_linear_layers(module: nn.Module) -> None:
    """Direct3D-S2's init: Xavier-uniform weights and zero biases for every linear layer."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.xavier_uniform_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)


def convert_linear_and_conv(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast linear and sparse-conv parameters (not norms) inside ``module`` to ``dtype``."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear | SparseConv3d):
            for p in sub.parameters():
                p.data = p.data.to(dtype)


class SparseSDFEncoder(nn.Module):
    """sdf voxels at 8x the latent resolution -> [M, 2 * latent_channels] at the latent resolution."""

    def __init__(
        self, settings: TransformerSettings, latent_channels: int, sdf_channels: Sequence[int] | None
    ) -> None:
        super().__init__()
        model_channels, pe_mode = settings.model_channels, settings.pe_mode
        c_full, c_half, c_quarter = sdf_block_channels(model_channels, sdf_channels)
        mc = model_channels
        self.model_channels = mc
        self.latent_channels = latent_channels
        self.pe_mode = pe_mode
        self.dtype = torch.float32
        self.input_layer1 = SparseLinear(1, c_full)
        self.downsample = nn.ModuleList(
            [
                SparseDownBlock3d(c_full, c_half, settings.use_checkpoint),
                SparseDownBlock3d(c_half, c_quarter, settings.use_checkpoint),
                SparseDownBlock3d(c_quarter, mc, settings.use_checkpoint),
            ]
        )
        self.input_layer = SparseLinear(mc, mc)
        self.pos_embedder = AbsolutePositionEmbedder(mc) if pe_mode == "ape" else None
        self.blocks = transformer_blocks(settings)
        self.out_layer = SparseLinear(mc, 2 * latent_channels)
        # Xavier weights on the output layer too (Direct3D-S2 zero-initialises it): from scratch, a zero
        # output maps every cell to one latent, hence one code; measured on bone phantoms at 64^3, 300
        # steps: codebook usage 0.03 with the zero init, 0.56 with Xavier. Pretrained weights overwrite both.
        init_linear_layers(self)
        nn.init.zeros_(self.out_layer.bias)

    def torso(self) -> list[nn.Module]:
        """The parts that run in half precision under use_fp16 (their norms stay float32)."""
        return [self.downsample, self.input_layer, self.blocks]

    def forward(self, x: SparseTensor) -> SparseTensor:
        if x.num_channels != 1:
            raise ValueError(f"SparseSDFEncoder expects one sdf channel per voxel, got {x.num_channels}")
        h = self.input_layer1(x.replace(x.feats.float()))
        h = h.replace(h.feats.to(self.dtype))
        for block in self.downsample:
            h = block(h)
        h = self.input_layer(h)
        feats = h.feats
        if self.pos_embedder is not None:
            feats = feats + self.pos_embedder(h.coords[:, 1:]).to(feats.dtype)
        for block in self.blocks:
            feats = block(feats, h.coords)
        feats = layer_norm_no_affine(feats.float(), eps=1e-5)
        return self.out_layer(h.replace(feats))


__all__ = [
    "MAX_GROUPS",
    "SparseDownBlock3d",
    "SparseSDFEncoder",
    "check_model_channels",
    "convert_linear_and_conv",
    "group_count",
    "init_linear_layers",
    "sdf_block_channels",
]
