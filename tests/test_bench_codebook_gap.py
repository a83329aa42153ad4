"""bench/codebook_gap.py: the IoU through the tokens is what ctvq eval measures, and a codebook holding the
encoder's exact outputs loses nothing where a random one loses something."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from data_helpers import bench_module, sample_from_distance, spheres_distance

from ctvq.eval.evaluate import evaluate_case
from ctvq.eval.loading import LoadedModel
from ctvq.eval.tokens import sample_batch
from ctvq.models.vqvae import SparseSDFVQVAE


def _loaded() -> LoadedModel:
    torch.manual_seed(0)
    model = SparseSDFVQVAE(resolution=8, model_channels=32, latent_channels=4, num_blocks=1,
                           num_embeddings=512, num_head_channels=16, window_size=2, sparse_backend="torch")
    for layer in (model.encoder.out_layer, model.decoder.out_layer):  # a non-trivial reconstruction
        torch.nn.init.normal_(layer.weight, std=0.5)
    return LoadedModel(model.eval(), Path("<untrained>"), None, None)


def test_tokens_match_eval_and_an_exact_codebook_loses_nothing() -> None:
    gap = bench_module("codebook_gap")
    loaded = _loaded()
    sample = sample_from_distance(spheres_distance(64, [(30.5, 32.2, 31.7, 10.0)]), case_id="sphere")
    random_codes = gap.codebook_gap(loaded, sample)
    assert random_codes["tokens_occupancy_iou"] == pytest.approx(evaluate_case(loaded, sample)
                                                                 .metrics["occupancy_iou"])
    assert random_codes["tokens_sdf_mae_vox"] != pytest.approx(random_codes["continuous_sdf_mae_vox"])
    with torch.no_grad():
        latent = loaded.model.continuous_latent(sample_batch(sample)).feats
        assert latent.shape[0] <= loaded.num_embeddings
        loaded.model.quantizer.embedding.weight[: latent.shape[0]] = latent
    exact = gap.codebook_gap(loaded, sample)
    assert exact["iou_lost_to_codebook"] == 0.0
    assert exact["tokens_sdf_mae_vox"] == pytest.approx(exact["continuous_sdf_mae_vox"], abs=1e-6)
    assert exact["continuous_occupancy_iou"] == pytest.approx(random_codes["continuous_occupancy_iou"])
