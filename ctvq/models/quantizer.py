"""Vector quantizer of the VQ-VAE: nearest code, straight-through gradient, codebook statistics.

Dead codes and a poor initialisation are the usual reasons a VQ codebook collapses, so the known remedies are
options: k-means initialisation on the first batch, EMA codebook updates, and restarting codes whose usage
falls below a threshold. All state lives in registered buffers, so the state-dict layout (and therefore strict
checkpoint loading) does not depend on which options are on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

INIT_MODES = ("random", "kmeans")
UPDATE_MODES = ("loss", "ema")
_DISTANCE_BUDGET = 1 << 24  # distance-matrix elements per chunk (64 MB in float32)


@dataclass
class QuantizerOutput:
    """What one quantizer call produces; the trainer weights the two losses (lambda_vq, lambda_commitment)."""

    quantized: torch.Tensor  # [N, D] straight-through: forward = code, backward = identity to the input
    indices: torch.Tensor  # [N] int64
    codebook_loss: torch.Tensor  # ||sg(z) - q||^2 (mean); carries no gradient in "ema" mode
    commitment_loss: torch.Tensor  # ||z - sg(q)||^2 (mean)
    usage: torch.Tensor  # fraction of codes used by this batch
    perplexity: torch.Tensor  # exp(entropy) of this batch's code distribution
    num_restarted: int  # dead codes restarted during this call


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, budget: int = _DISTANCE_BUDGET) -> torch.Tensor:
    """Index of the nearest code (squared L2) for every row of ``z``.

    Rows are processed in chunks so that at most ``budget`` distances exist at once: 100k vectors against
    8192 codes would otherwise need a 3.3 GB matrix.
    """
    if z.ndim != 2 or codebook.ndim != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"nearest_code: z {tuple(z.shape)} and codebook {tuple(codebook.shape)} disagree")
    z = z.float()
    codebook = codebook.float()
    rows = max(1, budget // max(1, codebook.shape[0]))
    code_sq = (codebook * codebook).sum(dim=1)
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    for start in range(0, z.shape[0], rows):
        part = z[start : start + rows]
        # ||z||^2 is constant per row and does not change the argmin.
        dist_part = code_sq.unsqueeze(0) - 2.0 * (part @ codebook.t())
        out[start : start + rows] = dist_part.argmin(dim=1)
    return out


def code_statistics(
    indices: torch.Tensor, num_embeddings: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-code counts, fraction of codes used, and perplexity of one batch's assignments."""
    counts = torch.bincount(indices.reshape(-1), minlength=num_embeddings).float()
    total = counts.sum().clamp_min(1.0)
    probs = counts / total
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    usage = (counts > 0).float().mean()
    return counts, usage, torch.exp(entropy)


def kmeans_codebook(
    z: torch.Tensor, num_codes: int, iters: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """k-means++ seeding followed by ``iters`` Lloyd iterations; returns [num_codes, D] float32.

    With fewer distinct vectors than codes the seeding repeats points (uniform choice once every point is
    already a centre); such duplicates end up unused and are what dead-code restarts are for.
    """
    z = z.detach().float()
    n = z.shape[0]
    if n == 0:
        raise ValueError("kmeans_codebook: no vectors to initialise the codebook from")
    device = z.device
    first = int(torch.randint(n, (1,), generator=generator, device="cpu"))
    centres = torch.empty(num_codes, z.shape[1], dtype=torch.float32, device=device)
    centres[0] = z[first]
    best = ((z - centres[0]) ** 2).sum(dim=1)
    for k in range(1, num_codes):
        total = best.sum()
        if float(total) > 0.0:
            probs = (best / total).cpu()
            pick = int(torch.multinomial(probs, 1, generator=generator))
        else:
            pick = int(torch.randint(n, (1,), generator=generator, device="cpu"))
        centres[k] = z[pick]
        best = torch.minimum(best, ((z - centres[k]) ** 2).sum(dim=1))
    for _ in range(iters):
        assign = nearest_code(z, centres)
        sums = torch.zeros_like(centres).index_add_(0, assign, z)
        counts = torch.bincount(assign, minlength=num_codes).float()
        used = counts > 0
        centres[used] = sums[used] / counts[used].unsqueeze(1)
    return centres


class VectorQuantizer(nn.Module):
    """Codebook ``embedding.weight`` [num_embeddings, dim] with nearest-code lookup.

    ``init``: "random" (N(0, 1), the scale of unit-variance latents) or "kmeans" (k-means++ plus
    ``kmeans_iters`` Lloyd steps on the first training batch; the ``initialised`` buffer records that it
    happened, so a loaded checkpoint is never re-initialised).
    ``update``: "loss" (the codebook learns from the codebook loss through the optimizer) or "ema" (cluster
    sizes and sums are exponential moving averages with Laplace smoothing; the codebook then has no
    gradient and the returned codebook loss is for logging only).
    ``dead_code_threshold``: a code whose EMA usage (assignments per training step, bias-corrected) falls
    below it is restarted from a random current encoder output; 0 disables restarts.
    """

    def __init__(
        self,
        num_embeddings: int,
        dim: int,
        *,
        init: str,
        update: str,
        ema_decay: float,
        dead_code_threshold: float,
        kmeans_iters: int = 10,
        kmeans_max_samples: int = 65536,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if num_embeddings < 1 or dim < 1:
            raise ValueError(f"VectorQuantizer: num_embeddings={num_embeddings} and dim={dim} must be >= 1")
        if init not in INIT_MODES:
            raise ValueError(f"VectorQuantizer: codebook_init={init!r}; use one of {INIT_MODES}")
        if update not in UPDATE_MODES:
            raise ValueError(f"VectorQuantizer: codebook_update={update!r}; use one of {UPDATE_MODES}")
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"VectorQuantizer: codebook_ema_decay={ema_decay} must lie in (0, 1)")
        if dead_code_threshold < 0.0:
            raise ValueError(f"VectorQuantizer: dead_code_threshold={dead_code_threshold} must be >= 0")
        self.num_embeddings = num_embeddings
        self.dim = dim
        self.init_mode = init
        self.update_mode = update
        self.ema_decay = ema_decay
        self.dead_code_threshold = dead_code_threshold
        self.kmeans_iters = kmeans_iters
        self.kmeans_max_samples = kmeans_max_samples
        self.eps = eps
        self.embedding = nn.Embedding(num_embeddings, dim)
        nn.init.normal_(self.embedding.weight, mean=0.0, std=1.0)
        self.embedding.weight.requires_grad_(update == "loss")
        self.register_buffer("initialised", torch.tensor(init == "random"))
        self.register_buffer("cluster_size", torch.zeros(num_embeddings))
        self.register_buffer("embed_sum", torch.zeros(num_embeddings, dim))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @property
    def codebook(self) -> torch.Tensor:
        return self.embedding.weight

    @property
    def trains_by_gradient(self) -> bool:
        return self.update_mode == "loss"

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for integer indices (any shape) -> [..., dim] float32."""
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_embeddings):
            raise ValueError(
                f"VectorQuantizer.lookup: indices must lie in [0, {self.num_embeddings}), got "
                f"[{int(indices.min())}, {int(indices.max())}]"
            )
        return F.embedding(indices.long(), self.embedding.weight)

    def usage_estimate(self) -> torch.Tensor:
        """Bias-corrected EMA of assignments per training step, per code."""
        steps = int(self.num_updates)
        if steps == 0:
            return self.cluster_size.clone()
        return self.cluster_size / (1.0 - self.ema_decay**steps)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"VectorQuantizer: expected [N, {self.dim}] inputs, got {tuple(z.shape)}")
        # Always float32, also under autocast: fp16 distances pick wrong codes.
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self._quantize(z.float())

    def _quantize(self, z: torch.Tensor) -> QuantizerOutput:
        if self.training and not bool(self.initialised):
            self._kmeans_init(z)
        indices = nearest_code(z.detach(), self.embedding.weight.detach())
        counts, usage, perplexity = code_statistics(indices, self.num_embeddings)
        restarted = 0
        if self.training:
            restarted = self._update_statistics(z.detach(), indices, counts)
        codes = F.embedding(indices, self.embedding.weight.float())
        codebook_loss = F.mse_loss(codes, z.detach())
        commitment_loss = F.mse_loss(z, codes.detach())
        # Forward value exactly the code (z - sg(z) is exactly 0); gradient: identity to z, none to the codes.
        quantized = codes.detach() + (z - z.detach())
        return QuantizerOutput(
            quantized, indices, codebook_loss, commitment_loss, usage, perplexity, restarted
        )

    @torch.no_grad()
    def _kmeans_init(self, z: torch.Tensor) -> None:
        sample = z.detach()
        if sample.shape[0] > self.kmeans_max_samples:
            sample = sample[torch.randperm(sample.shape[0], device=sample.device)[: self.kmeans_max_samples]]
        centres = kmeans_codebook(sample, self.num_embeddings, self.kmeans_iters)
        self.embedding.weight.data.copy_(centres.to(self.embedding.weight.dtype))
        _broadcast(self.embedding.weight.data)
        self.initialised.fill_(True)

    @torch.no_grad()
    def fit(self, z: torch.Tensor) -> None:
        """Re-fit the codebook by k-means on encoder outputs ``z`` [N, dim] and forget the usage statistics
        (used after an autoencoder warm-up: the codes then start where the latents are)."""
        self._kmeans_init(z)
        self.cluster_size.zero_()
        self.embed_sum.zero_()
        self.num_updates.zero_()

    @torch.no_grad()
    def _update_statistics(self, z: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> int:
        """EMA statistics (both modes), the EMA codebook update and dead-code restarts."""
        sums = torch.zeros(self.num_embeddings, self.dim, device=z.device).index_add_(0, indices, z)
        _all_reduce_sum(counts)
        _all_reduce_sum(sums)
        decay = self.ema_decay
        self.cluster_size.mul_(decay).add_(counts, alpha=1.0 - decay)
        self.embed_sum.mul_(decay).add_(sums, alpha=1.0 - decay)
        self.num_updates.add_(1)
        if self.update_mode == "ema":
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (total + self.num_embeddings * self.eps) * total
            seen = self.cluster_size > 0  # never-assigned codes keep their value instead of collapsing to 0
            new = self.embed_sum / smoothed.unsqueeze(1)
            self.embedding.weight.data[seen] = new[seen].to(self.embedding.weight.dtype)
        if self.dead_code_threshold <= 0.0:
            return 0
        dead = self.usage_estimate() < self.dead_code_threshold
        num_dead = int(dead.sum())
        if num_dead == 0 or z.shape[0] == 0:
            return 0
        picks = torch.randint(z.shape[0], (num_dead,), device=z.device)
        fresh = z[picks]
        self.embedding.weight.data[dead] = fresh.to(self.embedding.weight.dtype)
        _broadcast(self.embedding.weight.data)
        # A restarted code starts with usage at the threshold, so it has time to attract vectors.
        bias = 1.0 - decay ** int(self.num_updates)
        self.cluster_size[dead] = self.dead_code_threshold * bias
        self.embed_sum[dead] = self.embedding.weight.data[dead].float() * self.cluster_size[dead].unsqueeze(1)
        return num_dead


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(tensor: torch.Tensor) -> None:
    """Sum statistics over ranks so every rank takes the same EMA / dead-code decisions."""
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def _broadcast(tensor: torch.Tensor) -> None:
    """Rank 0's random choices (k-means, restarts) win, keeping codebooks identical across ranks."""
    if _distributed():
        dist.broadcast(tensor, src=0)


def ema_usage_fraction(quantizer: VectorQuantizer, threshold: float = 1.0) -> float:
    """Fraction of codes whose EMA usage is at least ``threshold`` assignments per step (for logging)."""
    return float((quantizer.usage_estimate() >= threshold).float().mean())


__all__ = [
    "QuantizerOutput",
    "VectorQuantizer",
    "code_statistics",
    "ema_usage_fraction",
    "kmeans_codebook",
    "nearest_code",
]
