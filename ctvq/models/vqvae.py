"""SparseSDFVQVAE: Direct3D-S2's sparse SDF encoder/decoder with a vector quantizer between them.

Public API (used by the trainer, evaluation and the tokenizer):
- ``encode(batch) -> (latent, indices)``: quantized latent SparseTensor [M, latent] at the latent resolution
  and the code index of every latent voxel.
- ``decode(indices or latent, chunked=None) -> SparseTensor``: full-resolution coords, sdf in [-1, 1].
- ``forward(batch, loss_type) -> dict``: reconstruction, matched targets, losses and statistics.

``chunk_size`` > 1 splits the decoder's upsampling (see ``chunking``): in training one random non-empty chunk
is decoded and supervised; in evaluation every chunk is decoded and the results are stitched, equal to the
un-chunked decode. The transformer part always sees the whole latent set.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ctvq.choices import LOSS_TYPES, RECON_WEIGHTINGS
from ctvq.config.schema import ModelConfig
from ctvq.models.chunking import (
    DEFAULT_PADDING,
    UPSAMPLE_FACTOR,
    owned_output_mask,
    pick_training_chunk,
    plan_chunks,
)
from ctvq.models.decoder import SparseSDFDecoder
from ctvq.models.encoder import SparseSDFEncoder, convert_linear_and_conv
from ctvq.models.quantizer import QuantizerOutput, VectorQuantizer
from ctvq.models.torso import TransformerSettings
from ctvq.sparse import SparseTensor, resolve_backend, set_sparse_backend


def _linear_keys(coords: torch.Tensor, extent: list[int]) -> torch.Tensor:
    return ((coords[:, 0] * extent[1] + coords[:, 1]) * extent[2] + coords[:, 2]) * extent[3] + coords[:, 3]


def coordinate_rows(query: torch.Tensor, table: torch.Tensor, what: str = "coords") -> torch.Tensor:
    """Row of ``table`` [M, 4] holding each row of ``query`` [K, 4] (exact coordinate match, any order).

    Raises naming how many query rows are absent: a mismatch means encoder and data disagree on the grid.
    """
    if query.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=query.device)
    q = query.long()
    t = table.long().to(q.device)
    if t.shape[0] == 0:
        raise ValueError(f"{what}: the table is empty but {q.shape[0]} voxels need a row")
    extent = (torch.maximum(q.amax(dim=0), t.amax(dim=0)) + 1).tolist()
    table_keys, order = torch.sort(_linear_keys(t, extent))
    query_keys = _linear_keys(q, extent)
    pos = torch.searchsorted(table_keys, query_keys).clamp_max(table_keys.shape[0] - 1)
    found = table_keys[pos] == query_keys
    if not bool(found.all()):
        missing = query[~found]
        raise ValueError(
            f"{what}: {missing.shape[0]} of {query.shape[0]} voxels have no matching row, e.g. "
            f"{missing[0].tolist()} (batch, x, y, z); the batch's latent_coords must be the input coords // 8"
        )
    return order[pos]


def gather_targets(
    decoded_coords: torch.Tensor, latent_coords: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Target of each decoded voxel: ``targets[row, x % 8, y % 8, z % 8]`` where row holds its parent cell."""
    parents = decoded_coords.long().clone()
    parents[:, 1:] = torch.div(parents[:, 1:], UPSAMPLE_FACTOR, rounding_mode="floor")
    rows = coordinate_rows(parents, latent_coords, "decoded voxels vs batch latent_coords")
    local = decoded_coords[:, 1:].long() % UPSAMPLE_FACTOR
    return targets.to(decoded_coords.device)[rows, local[:, 0], local[:, 1], local[:, 2]]


def voxel_weights(target: torch.Tensor, weighting: str, uniform_mix: float = 0.0) -> torch.Tensor | None:
    """Per-voxel loss weights summing to 1, or None for the plain mean (``uniform``).

    The decoder's targets are four groups: deep inside (-1, sign only), band inside (-1, 0), band outside
    [0, 1) and far outside (+1, sign only). Thin anatomy (bone: 2-10 % of the decoded voxels inside) under the
    plain mean is fitted best by "outside everywhere", and tanh then saturates (measured: every decoded voxel
    at |sdf| > 0.999, +1.000 at the inside ones), so nothing learns again.
    ``balanced``: each non-empty group carries the same share, so neither sign nor the sign-only far field can
    dominate, and the surface is pulled from both sides. ``band``: band voxels and sign-only voxels half each.
    """
    if weighting == "uniform":
        return None
    if weighting not in RECON_WEIGHTINGS:
        raise ValueError(f"recon_weighting={weighting!r}; use one of {RECON_WEIGHTINGS}")
    in_band = target.abs() < 1.0
    if weighting == "band":
        group = in_band.long()
    else:
        group = (target >= 0).long() * 2 + (in_band == (target >= 0)).long()
    counts = torch.bincount(group, minlength=4).float()
    present = counts > 0
    if int(present.sum()) < 2:
        return None
    share = torch.where(present, 1.0 / present.sum() / counts.clamp_min(1.0), torch.zeros_like(counts))
    weights = share[group]
    if uniform_mix > 0.0:
        weights = (1.0 - uniform_mix) * weights + uniform_mix / target.numel()
    return weights


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                        weighting: str = "uniform", uniform_mix: float = 0.0) -> torch.Tensor:
    """mse | l1 | l1_l2 (= 0.5 * L1 + 0.5 * MSE), weighted means over voxels (see ``voxel_weights``)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}; use one of {LOSS_TYPES}")
    diff = pred - target
    per_voxel = {"mse": lambda: diff.square(), "l1": lambda: diff.abs(),
                 "l1_l2": lambda: 0.5 * diff.abs() + 0.5 * diff.square()}[loss_type]()
    weights = voxel_weights(target, weighting, uniform_mix)
    if weights is None:
        return per_voxel.mean()
    return (per_voxel * weights).sum()


class SparseSDFVQVAE(nn.Module):
    """Encoder (Direct3D-S2 layout) -> VectorQuantizer on the first ``latent_channels`` -> decoder."""

    def __init__(self, **args: Any) -> None:
        """Keyword arguments are the keys of ``models.vqvae.args`` (docs/CONFIG.md); a key left out gets the
        config schema's default, the same as a config file that leaves it out."""
        super().__init__()
        a = model_args(args)
        self.config: dict[str, Any] = a
        resolution, chunk_size = a["resolution"], a["chunk_size"]
        if resolution < 1:
            raise ValueError(f"resolution={resolution} must be >= 1 (the latent grid edge, e.g. 64)")
        if chunk_size < 1 or resolution % chunk_size:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1 and divide resolution={resolution}")
        representation = a["representation_config"]
        if representation is not None and not isinstance(representation, dict):
            kind = type(representation).__name__
            raise ValueError(f"representation_config must be a dict or null, got {kind}")
        if a["sdf_input_scale"] <= 0:
            raise ValueError(f"sdf_input_scale={a['sdf_input_scale']} must be > 0")
        self.resolution = resolution
        self.latent_channels = a["latent_channels"]
        self.chunk_size = chunk_size
        self.chunk_padding = DEFAULT_PADDING
        self.representation_config = representation
        self.sdf_input_scale = a["sdf_input_scale"]
        self.sparse_backend = a["sparse_backend"]
        settings = TransformerSettings.from_model_args(a)
        self.encoder = SparseSDFEncoder(settings, self.latent_channels, a["sdf_channels"])
        self.decoder = SparseSDFDecoder(settings, self.latent_channels, a["sdf_channels"])
        self.quantizer = VectorQuantizer(
            a["num_embeddings"],
            self.latent_channels,
            init=a["codebook_init"],
            update=a["codebook_update"],
            ema_decay=a["codebook_ema_decay"],
            dead_code_threshold=a["dead_code_threshold"],
        )
        self._backend_device: torch.device | None = None
        if self.sparse_backend != "auto":
            set_sparse_backend(self, resolve_backend(self.sparse_backend))
        self.use_fp16 = False
        if a["use_fp16"]:
            self.convert_to_fp16()

    # -- precision, backend, training stage --------------------------------------------------------------
    def convert_to_fp16(self) -> None:
        """Torso weights (down/up blocks, transformer) to float16; norms, input/output layers and codebook
        stay float32."""
        for part in (*self.encoder.torso(), *self.decoder.torso()):
            convert_linear_and_conv(part, torch.float16)
        self.encoder.dtype = self.decoder.dtype = torch.float16
        self.use_fp16 = True

    def convert_to_fp32(self) -> None:
        for part in (*self.encoder.torso(), *self.decoder.torso()):
            convert_linear_and_conv(part, torch.float32)
        self.encoder.dtype = self.decoder.dtype = torch.float32
        self.use_fp16 = False

    def _select_backend(self, device: torch.device) -> None:
        """Resolve ``sparse_backend="auto"`` for the device the data is on (once per device)."""
        if self.sparse_backend == "auto" and device != self._backend_device:
            set_sparse_backend(self, resolve_backend("auto", device))
            self._backend_device = device

    def freeze_for_stage(self, stage: int, stage1_mode: str = "codebook") -> None:
        """Stage 1 ``codebook``: encoder and decoder frozen, only the codebook trains. Stage 1
        ``autoencoder``: encoder and decoder train with the quantizer bypassed, the codebook is frozen (it is
        fitted afterwards, see ``VectorQuantizer.fit``). Stage 2: everything trains.

        With ``codebook_update="ema"`` the codebook never takes gradients (EMA updates it in forward).
        """
        if stage not in (1, 2):
            raise ValueError(f"training_stage={stage}; use 1 (codebook only) or 2 (joint)")
        if stage1_mode not in ("codebook", "autoencoder"):
            raise ValueError(f"stage1_mode={stage1_mode!r}; use codebook or autoencoder")
        autoencoder = stage == 1 and stage1_mode == "autoencoder"
        for part in (self.encoder, self.decoder):
            part.requires_grad_(stage == 2 or autoencoder)
        self.quantizer.embedding.weight.requires_grad_(self.quantizer.trains_by_gradient and not autoencoder)

    # -- encode / decode ---------------------------------------------------------------------------------
    def _input_tensor(self, batch: Mapping[str, Any] | SparseTensor) -> SparseTensor:
        if isinstance(batch, SparseTensor):
            x = batch
        else:
            for key in ("coords", "feats"):
                if key not in batch:
                    raise ValueError(f"batch lacks '{key}' (expected the collate output: coords, feats, ...)")
            feats = batch["feats"]
            if feats.ndim == 1:
                feats = feats.unsqueeze(1)
            size = UPSAMPLE_FACTOR * self.resolution
            if "resolution" in batch and int(batch["resolution"]) != size:
                raise ValueError(
                    f"the batch is at resolution {int(batch['resolution'])} but the model's latent "
                    f"resolution {self.resolution} decodes to {size}; set models.vqvae.args.resolution to "
                    f"{int(batch['resolution']) // UPSAMPLE_FACTOR}"
                )
            x = SparseTensor(
                batch["coords"],
                feats.float(),
                batch_size=int(batch.get("batch_size", int(batch["coords"][:, 0].max()) + 1)),
                spatial_shape=(size, size, size),
            )
        if self.sdf_input_scale != 1.0:
            x = x.replace(x.feats * self.sdf_input_scale)
        return x

    def continuous_latent(self, batch: Mapping[str, Any] | SparseTensor) -> SparseTensor:
        """The encoder's output before quantization: [M, latent_channels] float32 at the latent resolution."""
        x = self._input_tensor(batch)
        self._select_backend(x.device)
        h = self.encoder(x)
        return h.replace(h.feats[:, : self.latent_channels].float())

    def _quantize(self, batch: Mapping[str, Any] | SparseTensor, bypass: bool = False
                  ) -> tuple[SparseTensor, QuantizerOutput]:
        h = self.continuous_latent(batch)
        if bypass:
            zero, nan = h.feats.new_zeros(()), h.feats.new_full((), math.nan)
            indices = torch.zeros(h.num_voxels, dtype=torch.long, device=h.device)
            return h, QuantizerOutput(h.feats, indices, zero, zero, nan, nan, 0)
        q = self.quantizer(h.feats)
        return h.replace(q.quantized), q

    def encode(self, batch: Mapping[str, Any] | SparseTensor) -> tuple[SparseTensor, torch.Tensor]:
        """(quantized latent [M, latent] at the latent resolution, code indices [M])."""
        latent, q = self._quantize(batch)
        return latent, q.indices

    def latent_from_indices(self, coords: torch.Tensor, indices: torch.Tensor, batch_size: int | None = None
                            ) -> SparseTensor:
        """Latent SparseTensor from token coords [M, 4] (latent grid) and code indices [M]."""
        if coords.shape[0] != indices.shape[0]:
            raise ValueError(f"{coords.shape[0]} coords but {indices.shape[0]} indices")
        feats = self.quantizer.lookup(indices.to(coords.device))
        res = self.resolution
        return SparseTensor(
            coords, feats, batch_size=batch_size, spatial_shape=(res, res, res), scale=UPSAMPLE_FACTOR
        )

    def decode(self, latent: SparseTensor, chunked: bool | None = None) -> SparseTensor:
        """Decode quantized latents (build them from indices with ``latent_from_indices``).

        ``chunked``: None follows ``chunk_size`` (> 1 chunks); False forces one pass; True with chunk_size 1
        is one chunk. In training mode a chunked decode returns one random non-empty chunk only; in eval mode
        all chunks, stitched (row order: grouped by chunk, then sorted by batch).
        """
        self._select_backend(latent.device)
        h = self.decoder.features(latent)
        use_chunks = self.chunk_size > 1 if chunked is None else chunked
        if not use_chunks:
            return self.decoder.head(h)
        if self.training:
            plan = pick_training_chunk(h.coords, self.resolution, self.chunk_size, self.chunk_padding)
            return self._decode_chunk(h, plan.halo_rows, plan.chunk_id)
        parts = [
            self._decode_chunk(h, plan.halo_rows, plan.chunk_id)
            for plan in plan_chunks(h.coords, self.resolution, self.chunk_size, self.chunk_padding)
        ]
        coords = torch.cat([p.coords for p in parts])
        feats = torch.cat([p.feats for p in parts])
        size = UPSAMPLE_FACTOR * self.resolution
        return SparseTensor.from_unsorted(
            coords, feats, batch_size=latent.batch_size, spatial_shape=(size, size, size)
        )

    def _decode_chunk(self, h: SparseTensor, rows: torch.Tensor, chunk_id: int) -> SparseTensor:
        sub = SparseTensor(
            h.coords[rows], h.feats[rows], batch_size=h.batch_size, spatial_shape=h.spatial_shape,
            scale=h.scale,
        )
        out = self.decoder.head(sub)
        keep = owned_output_mask(out.coords, chunk_id, self.resolution, self.chunk_size)
        return SparseTensor(
            out.coords[keep], out.feats[keep], batch_size=out.batch_size, spatial_shape=out.spatial_shape,
            scale=out.scale,
        )

    # -- training forward --------------------------------------------------------------------------------
    def forward(self, batch: Mapping[str, Any], loss_type: str = "l1", recon_weighting: str = "uniform",
                uniform_mix: float = 0.0,
                bypass_quantizer: bool = False) -> dict[str, Any]:
        """Encode, quantize, decode and compare with ``batch['targets']`` (matched by coordinates).

        ``bypass_quantizer``: decode the continuous latent (autoencoder warm-up); the VQ losses are 0 and
        the code statistics NaN.
        """
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={loss_type!r}; use one of {LOSS_TYPES}")
        for key in ("latent_coords", "targets"):
            if key not in batch:
                raise ValueError(f"batch lacks '{key}' (needed to supervise the decoder)")
        latent, q = self._quantize(batch, bypass=bypass_quantizer)
        latent_coords = batch["latent_coords"].to(latent.device)
        if latent_coords.shape[0] != latent.num_voxels:
            raise ValueError(
                f"the encoder produced {latent.num_voxels} latent voxels but the batch has "
                f"{latent_coords.shape[0]} latent_coords; the input coords must be the band voxels whose "
                "coords // 8 are latent_coords"
            )
        coordinate_rows(latent.coords, latent_coords, "encoder latent coords vs batch latent_coords")
        recon = self.decode(latent)
        target = gather_targets(recon.coords, latent_coords, batch["targets"]).float()
        pred = recon.feats[:, 0].float()
        return {
            "recon": recon,
            "target": target,
            "recon_loss": reconstruction_loss(pred, target, loss_type, recon_weighting, uniform_mix),
            "codebook_loss": q.codebook_loss,
            "commitment_loss": q.commitment_loss,
            "indices": q.indices,
            "usage": q.usage,
            "perplexity": q.perplexity,
            "num_points": int(batch["coords"].shape[0]),
            "num_latent": latent.num_voxels,
            "num_decoded": recon.num_voxels,
            "num_restarted_codes": q.num_restarted,
        }


def model_defaults() -> dict[str, Any]:
    """What a config file that leaves a model key out gets: the config schema's defaults, the model's only
    defaults."""
    return ModelConfig().to_dict()["args"]


def model_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """Every model argument: ``args`` over the schema's defaults. An unknown key is refused with the closest
    known one (a typo must not silently build the default model)."""
    defaults = model_defaults()
    unknown = sorted(set(args) - set(defaults))
    if unknown:
        hints = {k: difflib.get_close_matches(k, defaults, n=1) for k in unknown}
        listed = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
        raise TypeError(f"SparseSDFVQVAE: unknown argument(s) {listed}; the arguments are the keys of "
                        "models.vqvae.args (docs/CONFIG.md)")
    resolved = {**defaults, **args}
    if resolved["sdf_channels"] is not None:
        resolved["sdf_channels"] = list(resolved["sdf_channels"])
    return resolved


__all__ = [
    "LOSS_TYPES",
    "RECON_WEIGHTINGS",
    "SparseSDFVQVAE",
    "coordinate_rows",
    "gather_targets",
    "model_args",
    "model_defaults",
    "reconstruction_loss",
]
