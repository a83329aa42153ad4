"""Chunked decoding: chunk planning on coords, exact stitched evaluation decode, random non-empty chunk."""

from __future__ import annotations

import pytest
import torch

from ctvq.models import SparseSDFVQVAE
from ctvq.models.chunking import chunk_ids, owned_output_mask, pick_training_chunk, plan_chunks
from ctvq.sparse import SparseTensor

RES = 16  # latent grid; 4 chunks per axis -> chunks of 4 latent voxels, halo box 12 < 16: the halo matters


def random_latent_coords(seed: int, per_sample: int = 90, batch: int = 2, res: int = RES) -> torch.Tensor:
    """Unique latent voxels in a corner-heavy cloud (leaves some chunks empty), sorted by batch."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        xyz = (torch.rand(per_sample * 3, 3, generator=gen) ** 2 * res).long().clamp_max(res - 1)
        xyz = torch.unique(xyz, dim=0)[:per_sample]
        rows.append(torch.cat([torch.full((xyz.shape[0], 1), b), xyz], dim=1))
    return torch.cat(rows).to(torch.int32)


def blob_latent_coords() -> torch.Tensor:
    """Sample 0: a 4x4x2 slab across the chunk borders at 4 (8 chunks); sample 1: a 2x2x2 cube far away
    (chunk (3, 3, 3), whose halo excludes the slab). Small, because every chunk re-decodes its halo."""
    axis = torch.arange(4)
    slab = torch.cartesian_prod(axis + 2, axis + 2, torch.tensor([3, 4]))
    cube = torch.cartesian_prod(torch.tensor([12, 13]), torch.tensor([12, 13]), torch.tensor([12, 13]))
    rows = [torch.cat([torch.zeros(32, 1, dtype=torch.long), slab], 1),
            torch.cat([torch.ones(8, 1, dtype=torch.long), cube], 1)]
    return torch.cat(rows).to(torch.int32)


def small_model(chunk_size: int) -> SparseSDFVQVAE:
    torch.manual_seed(0)
    model = SparseSDFVQVAE(resolution=RES, model_channels=32, latent_channels=4, num_blocks=1,
                           num_embeddings=16, num_head_channels=16, window_size=4, chunk_size=chunk_size)
    torch.nn.init.normal_(model.decoder.out_layer.weight)  # zero-initialised like Direct3D-S2: make it bite
    torch.nn.init.normal_(model.decoder.out_layer.bias, std=0.1)
    for block in model.decoder.upsample:  # larger kernels than the default init: outputs vary visibly
        for conv in (block.act_layers[0], block.out_layers[0]):
            fan_in = conv.conv.kernel.shape[0] * conv.conv.kernel.shape[1]
            torch.nn.init.normal_(conv.conv.kernel, std=2.0 / fan_in**0.5)
    return model


def sorted_by_coords(x: SparseTensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = x.coords.long()
    key = ((c[:, 0] * 1024 + c[:, 1]) * 1024 + c[:, 2]) * 1024 + c[:, 3]
    order = torch.argsort(key)
    return c[order], x.feats[order]


def test_chunk_cores_partition_the_latent_rows_and_halos_contain_their_cores():
    coords = random_latent_coords(0)
    plans = plan_chunks(coords, RES, chunk_size=4, padding=2)
    cores = torch.cat([p.core_rows for p in plans])
    assert torch.equal(torch.sort(cores).values, torch.arange(coords.shape[0]))
    assert len(plans) < 64  # the skewed cloud leaves chunks empty; only non-empty ones are planned
    for plan in plans:
        assert bool(torch.isin(plan.core_rows, plan.halo_rows).all())
        xyz = coords[plan.halo_rows, 1:].long()
        cid = plan.chunk_id
        lo = torch.tensor([cid // 16, (cid // 4) % 4, cid % 4]) * 4
        assert bool(((xyz >= lo - 2) & (xyz < lo + 6)).all())  # core box grown by the padding, no more


def test_chunk_size_must_divide_the_latent_resolution():
    with pytest.raises(ValueError, match="chunk_size=3 does not divide the latent resolution 16"):
        chunk_ids(random_latent_coords(0), RES, 3)
    with pytest.raises(ValueError, match="chunk_size=3 must be >= 1 and divide resolution=16"):
        SparseSDFVQVAE(resolution=RES, model_channels=32, latent_channels=4, num_blocks=1, chunk_size=3)


def test_training_chunk_is_random_and_never_empty():
    coords = random_latent_coords(1)
    occupied = set(torch.unique(chunk_ids(coords, RES, 4)).tolist())
    picks = set()
    for seed in range(30):
        plan = pick_training_chunk(coords, RES, 4, generator=torch.Generator().manual_seed(seed))
        assert plan.chunk_id in occupied and plan.core_rows.numel() > 0
        picks.add(plan.chunk_id)
    assert len(picks) >= 5


def test_owned_output_mask_keeps_children_of_core_cells_only():
    out = torch.tensor([[0, 31, 0, 0], [0, 32, 0, 0], [1, 0, 63, 7]], dtype=torch.int32)
    # parents (3,0,0) -> chunk 0 ; (4,0,0) -> chunk 16 ; (0,7,0) -> chunk 4 (chunk extent 4)
    assert owned_output_mask(out, 0, RES, 4).tolist() == [True, False, False]
    assert owned_output_mask(out, 16, RES, 4).tolist() == [False, True, False]
    assert owned_output_mask(out, 4, RES, 4).tolist() == [False, False, True]


def test_chunked_evaluation_decode_equals_the_full_decode():
    model = small_model(chunk_size=4).eval()
    coords = blob_latent_coords()
    latent = SparseTensor(coords, torch.randn(coords.shape[0], 4), spatial_shape=(RES,) * 3)
    with torch.no_grad():
        full = model.decode(latent, chunked=False)
        chunked = model.decode(latent)
    assert chunked.num_voxels == full.num_voxels == 512 * coords.shape[0]
    full_c, full_f = sorted_by_coords(full)
    chunk_c, chunk_f = sorted_by_coords(chunked)
    assert torch.equal(full_c, chunk_c)
    assert torch.allclose(full_f, chunk_f, atol=1e-5)
    assert float(full_f.std()) > 0.05  # a non-trivial output, so equality means something
    model.chunk_padding = 0  # without the halo, voxels at chunk borders lose neighbours: results differ
    with torch.no_grad():
        _, no_halo_f = sorted_by_coords(model.decode(latent))
    assert float((no_halo_f - full_f).abs().max()) > 1e-3


def test_training_decode_returns_one_random_chunk_exactly():
    model = small_model(chunk_size=4).train()
    coords = blob_latent_coords()
    latent = SparseTensor(coords, torch.randn(coords.shape[0], 4), spatial_shape=(RES,) * 3)
    with torch.no_grad():
        full_c, full_f = sorted_by_coords(model.decode(latent, chunked=False))
    full_key = {tuple(c): i for i, c in enumerate(full_c.tolist())}
    chosen = set()
    for seed in range(4):
        torch.manual_seed(seed)
        with torch.no_grad():
            part = model.decode(latent)
        assert part.num_voxels > 0
        parents = part.coords.long().clone()
        parents[:, 1:] //= 8
        ids = torch.unique(chunk_ids(parents, RES, 4))
        assert ids.numel() == 1  # one chunk only
        chosen.add(int(ids[0]))
        rows = torch.tensor([full_key[tuple(c)] for c in part.coords.long().tolist()])
        assert torch.allclose(part.feats, full_f[rows], atol=1e-5)
        cells = (chunk_ids(coords, RES, 4) == ids[0]).sum()
        assert part.num_voxels == 512 * int(cells)  # every child of every core cell
    assert len(chosen) > 1
