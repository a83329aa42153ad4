"""Vector quantizer: assignment, statistics, straight-through gradient, k-means, EMA, dead-code restarts."""

from __future__ import annotations

import math

import pytest
import torch

from ctvq.models.quantizer import VectorQuantizer, code_statistics, kmeans_codebook, nearest_code


def quantizer(num_embeddings: int, dim: int, **kwargs) -> VectorQuantizer:
    """The plainest quantizer (random init, loss updates, no restarts) unless a test asks otherwise."""
    plain = dict(init="random", update="loss", ema_decay=0.99, dead_code_threshold=0.0)
    return VectorQuantizer(num_embeddings, dim, **{**plain, **kwargs})


def clustered(n_per: int, centres: torch.Tensor, spread: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    parts = [c + spread * torch.randn(n_per, centres.shape[1], generator=gen) for c in centres]
    return torch.cat(parts)


def test_nearest_code_in_chunks_equals_brute_force_argmin():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(1000, 8, generator=gen)
    codes = torch.randn(37, 8, generator=gen)
    brute = torch.cdist(z, codes).argmin(dim=1)
    chunked = nearest_code(z, codes, budget=37 * 7)  # 7 rows per chunk: many chunks, a ragged last one
    assert torch.equal(chunked, brute)


def test_usage_and_perplexity_of_known_assignments():
    # 8 codes; the batch uses codes 0 and 1 equally: usage 2/8, perplexity exactly 2
    counts, usage, perplexity = code_statistics(torch.tensor([0, 1, 0, 1]), 8)
    assert counts.tolist() == [2, 2, 0, 0, 0, 0, 0, 0]
    assert float(usage) == pytest.approx(0.25)
    assert float(perplexity) == pytest.approx(2.0)
    _, usage_all, perplexity_all = code_statistics(torch.arange(8).repeat(3), 8)
    assert float(usage_all) == pytest.approx(1.0)
    assert float(perplexity_all) == pytest.approx(8.0)
    _, _, perplexity_skew = code_statistics(torch.tensor([0, 0, 0, 1]), 8)
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert float(perplexity_skew) == pytest.approx(expected)


def test_straight_through_passes_identity_gradient_and_losses_match_definitions():
    torch.manual_seed(0)
    vq = quantizer(16, 4)
    z = torch.randn(50, 4, requires_grad=True)
    out = vq(z)
    codes = vq.codebook[out.indices]
    assert torch.allclose(out.quantized, codes)
    weights = torch.randn(50, 4)
    (out.quantized * weights).sum().backward()
    assert torch.allclose(z.grad, weights)
    expected = float(((codes - z) ** 2).mean().detach())
    assert float(out.codebook_loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(out.commitment_loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_codebook_loss_trains_codebook_and_commitment_loss_trains_encoder_only():
    torch.manual_seed(0)
    vq = quantizer(16, 4)
    z = torch.randn(50, 4, requires_grad=True)
    vq(z).codebook_loss.backward()
    assert z.grad is None or float(z.grad.abs().sum()) == 0.0
    assert float(vq.codebook.grad.abs().sum()) > 0.0
    vq.zero_grad()
    z2 = torch.randn(50, 4, requires_grad=True)
    vq(z2).commitment_loss.backward()
    assert float(z2.grad.abs().sum()) > 0.0
    assert vq.codebook.grad is None or float(vq.codebook.grad.abs().sum()) == 0.0


def test_kmeans_init_lowers_quantisation_error_on_clustered_data():
    torch.manual_seed(0)
    centres = 4.0 * torch.randn(16, 4, generator=torch.Generator().manual_seed(3))
    data = clustered(64, centres, 0.1)
    errors = {}
    for init in ("random", "kmeans"):
        torch.manual_seed(1)
        vq = quantizer(16, 4, init=init)
        assert bool(vq.initialised) == (init == "random")
        vq.train()
        vq(data)  # first training batch: k-means runs here when init="kmeans"
        assert bool(vq.initialised)
        vq.eval()
        errors[init] = float(vq(data).commitment_loss)
    assert errors["kmeans"] < 0.1 * errors["random"]
    assert errors["kmeans"] < 0.05  # close to the 0.1² spread: every cluster got its own code


def test_kmeans_codebook_handles_fewer_vectors_than_codes():
    z = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    codes = kmeans_codebook(z, 5, iters=3, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (5, 2)
    assert {tuple(c) for c in codes.tolist()} == {tuple(p) for p in z.tolist()}


def test_ema_update_moves_codes_toward_their_cluster_means():
    centres = torch.tensor([[5.0, 0.0], [-5.0, 0.0]])
    data = clustered(200, centres, 0.05)
    vq = quantizer(2, 2, update="ema", ema_decay=0.8)
    assert not vq.codebook.requires_grad  # EMA mode: the optimizer never touches the codebook
    vq.embedding.weight.data = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    vq.train()
    distance_before = (vq.codebook - centres).norm(dim=1)
    for _ in range(30):
        vq(data)
    distance_after = (vq.codebook - centres).norm(dim=1)
    assert bool((distance_after < 0.1 * distance_before).all())
    assert torch.allclose(vq.codebook, data.reshape(2, 200, 2).mean(dim=1), atol=0.05)


def test_dead_codes_are_restarted_from_current_encoder_outputs():
    torch.manual_seed(0)
    data = clustered(100, torch.tensor([[10.0, 10.0], [-10.0, 10.0]]), 0.1)
    vq = quantizer(8, 2, dead_code_threshold=1.0)
    vq.embedding.weight.data = torch.zeros(8, 2)
    vq.embedding.weight.data[0] = torch.tensor([10.0, 10.0])  # takes the first cluster
    vq.train()
    out = vq(data)  # code 1 (first of the equal zero codes) takes the second cluster; 2..7 stay unused
    assert out.num_restarted == 6
    restarted = vq.codebook[2:].detach()
    is_output = (restarted[:, None, :] == data[None, :, :]).all(dim=2).any(dim=1)
    assert bool(is_output.all())  # each restarted code is one of the current encoder outputs
    vq.eval()
    assert float(code_statistics(vq(data).indices, 8)[1]) > 1 / 8


def test_dead_code_threshold_zero_never_restarts():
    data = torch.ones(20, 2)
    vq = quantizer(8, 2, dead_code_threshold=0.0)
    before = vq.codebook.detach().clone()
    vq.train()
    assert vq(data).num_restarted == 0
    assert torch.equal(vq.codebook.detach(), before)


def test_state_dict_layout_does_not_depend_on_options():
    plain = quantizer(8, 2)
    fancy = quantizer(8, 2, init="kmeans", update="ema", dead_code_threshold=2.0)
    def layout(m: VectorQuantizer) -> dict[str, torch.Size]:
        return {k: v.shape for k, v in m.state_dict().items()}

    assert layout(plain) == layout(fancy)
    fancy.train()
    fancy(torch.randn(40, 2))
    restored = quantizer(8, 2, init="kmeans")
    restored.load_state_dict(fancy.state_dict())
    assert bool(restored.initialised)  # a loaded k-means codebook is not re-initialised
    restored.train()
    before = restored.codebook.detach().clone()
    restored(torch.randn(40, 2) + 100.0)
    assert torch.equal(restored.codebook.detach(), before)


@pytest.mark.parametrize(
    "kwargs, word",
    [({"init": "uniform"}, "codebook_init"), ({"update": "adam"}, "codebook_update"),
     ({"ema_decay": 1.0}, "codebook_ema_decay"), ({"dead_code_threshold": -1.0}, "dead_code_threshold")],
)
def test_bad_options_are_rejected_with_the_option_name(kwargs, word):
    with pytest.raises(ValueError, match=word):
        quantizer(8, 2, **kwargs)


def test_lookup_rejects_out_of_range_indices():
    vq = quantizer(8, 2)
    assert vq.lookup(torch.tensor([0, 7])).shape == (2, 2)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        vq.lookup(torch.tensor([8]))


def test_assignment_stays_float32_under_autocast():
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(500, 8, generator=gen)
    vq = quantizer(256, 8).eval()
    vq.embedding.weight.data = z[:256] + 1e-3 * torch.randn(256, 8, generator=gen)  # near-ties everywhere
    expected = torch.cdist(z.double(), vq.codebook.detach().double()).argmin(dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z)
    assert out.quantized.dtype == torch.float32
    assert torch.equal(out.indices, expected)
