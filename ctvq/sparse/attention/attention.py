"""Softmax attention restricted to groups of rows (variable-length windows).

The default backend packs groups into padded batches for ``torch.nn.functional.scaled_dot_product_attention``.
Groups are bucketed by length (powers of two) so padding at most doubles the work, and each bucket is run in
slices whose score tensor stays under ``max_score_elements``: memory is O(N * window), never O(N^2), for
windowed modes. flash-attn and xformers varlen kernels are optional fast paths, imported only when asked for.
"""

from __future__ import annotations

import importlib
from typing import Literal

import torch
import torch.nn.functional as F

from ctvq.choices import ATTENTION_BACKENDS

AttentionBackend = Literal["sdpa", "flash_attn", "xformers"]  # the values of ctvq.choices.ATTENTION_BACKENDS

# Score elements (slice x heads x L x L) per SDPA call: 2**25 float32 scores = 128 MiB.
DEFAULT_MAX_SCORE_ELEMENTS = 1 << 25


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: torch.Tensor) -> None:
    if q.ndim != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share the shape [N, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if groups.shape != (q.shape[0],):
        raise ValueError(f"groups must be [N] = [{q.shape[0]}], got {tuple(groups.shape)}")
    if groups.dtype.is_floating_point:
        raise ValueError(f"groups must be an integer tensor, got {groups.dtype}")


def _sdpa_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, order: torch.Tensor,
                  counts: torch.Tensor, max_score_elements: int) -> torch.Tensor:
    n, heads, _ = q.shape
    starts = torch.cumsum(counts, 0) - counts
    bucket = torch.ceil(torch.log2(counts.to(torch.float64))).to(torch.int64)
    rows_out: list[torch.Tensor] = []
    vals_out: list[torch.Tensor] = []
    for b in torch.unique(bucket).tolist():
        gidx = torch.nonzero(bucket == b).squeeze(1)
        g_counts, g_starts = counts[gidx], starts[gidx]
        bucket_len = int(g_counts.max().item())
        per_slice = max(1, max_score_elements // (heads * bucket_len * bucket_len))
        for s in range(0, gidx.numel(), per_slice):
            cnt = g_counts[s:s + per_slice]
            # pad to this slice's longest group: a lone group (e.g. a whole sample in full mode) gets no mask,
            # so SDPA can pick its fused kernel, which never holds the L x L scores
            ar = torch.arange(int(cnt.max().item()), device=q.device)
            valid = ar[None, :] < cnt[:, None]
            # padded slots repeat the group's first row: masked out as keys, dropped as queries
            pos = g_starts[s:s + per_slice, None] + torch.where(valid, ar[None, :], 0)
            rows = order[pos]
            qb, kb, vb = (t[rows].transpose(1, 2) for t in (q, k, v))  # [G, H, L, D]
            mask = None if bool(valid.all()) else valid[:, None, None, :]
            ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask).transpose(1, 2)  # [G, L, H, D]
            rows_out.append(rows[valid])
            vals_out.append(ob[valid])
    rows_all = torch.cat(rows_out)
    vals_all = torch.cat(vals_out)
    if rows_all.numel() != n:
        raise RuntimeError(f"grouped attention covered {rows_all.numel()} of {n} rows (internal error)")
    return vals_all[torch.argsort(rows_all)]


_BACKEND_PACKAGES = {"flash_attn": ("flash_attn", "flash-attn"), "xformers": ("xformers.ops", "xformers")}


def check_attention_backend(backend: str) -> None:
    """Refuse an unknown backend, or one whose package is missing, when the model is built rather than at
    its first forward pass (which may be an hour into a cluster job)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
    if backend in _BACKEND_PACKAGES:
        module, dist = _BACKEND_PACKAGES[backend]
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ImportError(f"attention backend {backend!r} needs the {dist} package (pip install {dist}); "
                              "use 'sdpa' (models.vqvae.args.attention_backend) otherwise") from err


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, order: torch.Tensor,
                counts: torch.Tensor) -> torch.Tensor:
    check_attention_backend("flash_attn")
    from flash_attn import flash_attn_varlen_func
    cu = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0)).to(torch.int32)
    max_len = int(counts.max().item())
    out = flash_attn_varlen_func(q[order], k[order], v[order], cu, cu, max_len, max_len)
    return out[torch.argsort(order)]


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, order: torch.Tensor,
              counts: torch.Tensor) -> torch.Tensor:
    check_attention_backend("xformers")
    from xformers.ops import fmha, memory_efficient_attention
    bias = fmha.BlockDiagonalMask.from_seqlens(counts.tolist())
    out = memory_efficient_attention(q[order][None], k[order][None], v[order][None], attn_bias=bias)[0]
    return out[torch.argsort(order)]


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    groups: torch.Tensor,
    backend: AttentionBackend = "sdpa",
    max_score_elements: int = DEFAULT_MAX_SCORE_ELEMENTS,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v computed only between rows with equal ``groups`` id.

    q, k, v: [N, H, D]; groups: [N] int (any values, e.g. from ``windows.attention_groups``).
    Returns [N, H, D] in the input row order.
    """
    _check_qkv(q, k, v, groups)
    if backend not in ATTENTION_BACKENDS:
        check_attention_backend(backend)
    if max_score_elements < 1:
        raise ValueError(f"max_score_elements must be >= 1, got {max_score_elements}")
    if q.shape[0] == 0:
        return q.clone()
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    if backend == "flash_attn":
        return _flash_attn(q, k, v, order, counts)
    if backend == "xformers":
        return _xformers(q, k, v, order, counts)
    return _sdpa_grouped(q, k, v, order, counts, max_score_elements)
