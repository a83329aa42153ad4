"""SparseSDFVQVAE on real collated batches of small analytic samples (32³ inputs, 4³ latent grid)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_helpers import sample_from_distance, spheres_distance

from ctvq.data.collate import collate_sparse
from ctvq.data.datasets import sample_to_item
from ctvq.models import SparseSDFVQVAE
from ctvq.models.encoder import group_count
from ctvq.models.vqvae import coordinate_rows, gather_targets, reconstruction_loss
from ctvq.sparse import SparseGroupNorm

SPHERES = [[(15.0, 16.0, 14.0, 7.0)], [(17.0, 13.0, 18.0, 5.5)]]
BAND = 3.0


def batch_and_distances() -> tuple[dict, list[np.ndarray]]:
    dists = [spheres_distance(32, s) for s in SPHERES]
    items = []
    for i, d in enumerate(dists):
        sample = sample_from_distance(d, case_id=f"s{i}", band=BAND)
        items.append(sample_to_item(sample, num_points_full=sample.num_points))
    return collate_sparse(items), dists


def tiny_model(**overrides) -> SparseSDFVQVAE:
    torch.manual_seed(0)
    kwargs = dict(resolution=4, model_channels=32, latent_channels=4, num_blocks=1, num_embeddings=16,
                  num_head_channels=16, window_size=2, codebook_init="random", codebook_update="loss",
                  dead_code_threshold=0.0)
    model = SparseSDFVQVAE(**{**kwargs, **overrides})
    # Direct3D-S2 zero-initialises both output layers; give them values so gradients reach every layer.
    for layer in (model.encoder.out_layer, model.decoder.out_layer):
        torch.nn.init.normal_(layer.weight, std=0.5)
    return model


@pytest.fixture(scope="module")
def batch():
    return batch_and_distances()


def test_decoded_voxels_are_matched_to_their_targets_by_coordinate(batch):
    data, dists = batch
    out = tiny_model()(data, loss_type="l1")
    recon, target = out["recon"], out["target"]
    m = data["latent_coords"].shape[0]
    assert recon.num_voxels == 512 * m == out["num_decoded"] and out["num_latent"] == m
    c = recon.coords.long().numpy()
    # independent oracle: the sample's sdf is clip(distance / band) in the band and the sign outside it
    expected = np.array([np.clip(dists[b][x, y, z] / BAND, -1, 1) for b, x, y, z in c], dtype=np.float32)
    assert np.allclose(target.numpy(), expected, atol=1e-6)
    assert out["num_points"] == data["coords"].shape[0]
    l1 = float((recon.feats[:, 0] - target).abs().mean().detach())
    assert float(out["recon_loss"].detach()) == pytest.approx(l1, rel=1e-5)


def test_encoder_latent_coords_equal_the_batch_latent_coords(batch):
    data, _ = batch
    latent, indices = tiny_model().encode(data)
    assert latent.num_voxels == data["latent_coords"].shape[0] == indices.shape[0]
    rows = coordinate_rows(latent.coords, data["latent_coords"])
    assert torch.equal(torch.sort(rows).values, torch.arange(latent.num_voxels))
    assert latent.num_channels == 4 and int(indices.max()) < 16


def test_batch_whose_latent_coords_disagree_is_refused(batch):
    data, _ = batch
    shifted = dict(data)
    shifted["latent_coords"] = data["latent_coords"].clone()
    shifted["latent_coords"][0, 1] = 3 - shifted["latent_coords"][0, 1]
    with pytest.raises(ValueError, match="encoder latent coords vs batch latent_coords"):
        tiny_model()(shifted)


def test_batch_at_another_resolution_is_refused_naming_the_setting(batch):
    data, _ = batch
    with pytest.raises(ValueError, match="set models.vqvae.args.resolution to 4"):
        tiny_model(resolution=8).encode(data)


def test_stage_one_freezing_leaves_only_the_codebook_with_gradients(batch):
    data, _ = batch
    model = tiny_model()
    model.freeze_for_stage(1)
    out = model(data)
    (out["recon_loss"] + out["codebook_loss"] + 0.25 * out["commitment_loss"]).backward()
    params = model.named_parameters()
    with_grad = {n for n, p in params if p.grad is not None and bool(p.grad.abs().sum() > 0)}
    assert with_grad == {"quantizer.embedding.weight"}
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["quantizer.embedding.weight"]


def test_stage_two_straight_through_passes_reconstruction_gradients_to_the_encoder(batch):
    data, _ = batch
    model = tiny_model()
    model.freeze_for_stage(1)
    model.freeze_for_stage(2)
    model(data)["recon_loss"].backward()  # no commitment term: the gradient can only come through the codes
    for name in ("encoder.input_layer1.weight", "encoder.downsample.0.out_layers.0.conv.kernel",
                 "encoder.blocks.0.attn.to_qkv.weight", "encoder.out_layer.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    assert model.quantizer.codebook.grad is None  # codes get no reconstruction gradient (straight-through)


def test_decode_from_indices_equals_decode_of_encoded_latent(batch):
    data, _ = batch
    model = tiny_model().eval()
    with torch.no_grad():
        latent, indices = model.encode(data)
        rebuilt = model.latent_from_indices(latent.coords, indices, batch_size=latent.batch_size)
        assert torch.equal(rebuilt.feats, latent.feats)
        direct = model.decode(latent)
        from_tokens = model.decode(rebuilt)
    assert torch.equal(direct.coords, from_tokens.coords)
    assert torch.allclose(direct.feats, from_tokens.feats)
    assert float(direct.feats.abs().max()) <= 1.0


def test_gradient_checkpointing_gives_the_same_gradients(batch):
    data, _ = batch
    grads = []
    for flag in (False, True):
        model = tiny_model(use_checkpoint=flag)
        model(data)["recon_loss"].backward()
        grads.append(model.encoder.downsample[1].out_layers[3].conv.kernel.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_fp16_torso_is_half_norms_stay_float32_and_forward_runs_on_cpu(batch):
    data, _ = batch
    reference = tiny_model().eval()
    model = tiny_model(use_fp16=True).eval()
    assert model.encoder.blocks[0].attn.to_qkv.weight.dtype == torch.float16
    assert model.encoder.downsample[0].out_layers[0].conv.kernel.dtype == torch.float16
    assert model.decoder.upsample[2].out_layers[0].conv.kernel.dtype == torch.float16
    norms = [m for m in model.modules() if isinstance(m, SparseGroupNorm)]
    assert norms and all(n.weight.dtype == torch.float32 for n in norms)
    assert model.quantizer.codebook.dtype == torch.float32
    with torch.no_grad():
        half = model.decode(model.encode(data)[0])
        full = reference.decode(reference.encode(data)[0])
    assert half.feats.dtype == torch.float32 and bool(torch.isfinite(half.feats).all())
    assert float((half.feats - full.feats).abs().max()) < 0.05
    model.convert_to_fp32()
    assert model.encoder.blocks[0].attn.to_qkv.weight.dtype == torch.float32


def test_sdf_input_scale_multiplies_the_input():
    data, _ = batch_and_distances()
    plain = tiny_model()
    scaled = tiny_model(sdf_input_scale=2.0)
    doubled = dict(data)
    doubled["feats"] = data["feats"] * 2.0
    with torch.no_grad():
        a, _ = plain.encode(doubled)
        b, _ = scaled.encode(data)
    assert torch.allclose(a.feats, b.feats)


def test_loss_types_follow_their_definitions():
    pred, target = torch.tensor([0.0, 1.0, -1.0]), torch.tensor([0.5, 0.0, -1.0])
    l1, mse = (0.5 + 1.0) / 3, (0.25 + 1.0) / 3
    assert float(reconstruction_loss(pred, target, "l1")) == pytest.approx(l1)
    assert float(reconstruction_loss(pred, target, "mse")) == pytest.approx(mse)
    assert float(reconstruction_loss(pred, target, "l1_l2")) == pytest.approx(0.5 * l1 + 0.5 * mse)
    with pytest.raises(ValueError, match="loss_type='huber'"):
        reconstruction_loss(pred, target, "huber")


def test_gather_targets_reads_the_child_of_the_matching_latent_row():
    latent = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 2]], dtype=torch.int32)
    targets = torch.arange(2 * 512, dtype=torch.float32).reshape(2, 8, 8, 8)
    decoded = torch.tensor([[1, 3, 4, 21], [0, 9, 2, 7]], dtype=torch.int32)
    assert gather_targets(decoded, latent, targets).tolist() == [512 + 3 * 64 + 4 * 8 + 5, 1 * 64 + 2 * 8 + 7]
    with pytest.raises(ValueError, match="1 of 1 voxels have no matching row"):
        gather_targets(torch.tensor([[0, 0, 0, 0]], dtype=torch.int32), latent, targets)


def test_group_count_and_model_channel_checks():
    assert [group_count(c) for c in (2, 4, 32, 48, 64, 512)] == [2, 4, 32, 24, 32, 32]
    with pytest.raises(ValueError, match="model_channels=40 must be a positive multiple of 16"):
        SparseSDFVQVAE(model_channels=40)
    with pytest.raises(ValueError, match="not divisible by num_head_channels"):
        SparseSDFVQVAE(model_channels=48, num_head_channels=32, latent_channels=4, num_blocks=1)
    model = tiny_model(representation_config={"kind": "sdf"})
    assert model.representation_config == {"kind": "sdf"} and model.config["representation_config"] == {
        "kind": "sdf"}
    with pytest.raises(ValueError, match="representation_config must be a dict or null"):
        tiny_model(representation_config="sdf")


def test_sdf_channels_set_the_widths_of_the_full_half_and_quarter_resolution_blocks(batch):
    data, _ = batch
    default = tiny_model()
    assert default.decoder.out_layer.weight.shape == (1, 2)  # model_channels 32 / 16
    wide = tiny_model(sdf_channels=[8, 12, 16])
    enc, dec = wide.encoder, wide.decoder
    assert enc.input_layer1.weight.shape == (8, 1)
    assert [(b.channels, b.out_channels) for b in enc.downsample] == [(8, 12), (12, 16), (16, 32)]
    assert [(b.channels, b.out_channels) for b in dec.upsample] == [(32, 16), (16, 12), (12, 8)]
    assert dec.out_layer.weight.shape == (1, 8)
    out = wide(data, loss_type="l1")
    assert out["recon"].num_voxels == 512 * data["latent_coords"].shape[0]
    for bad in ([8, 12], [8, 0, 16], [8, 12.5, 16]):
        with pytest.raises(ValueError, match="sdf_channels=.* must be 3 positive ints"):
            tiny_model(sdf_channels=bad)


def test_constructor_defaults_are_the_config_schema_defaults_and_typos_are_refused():
    from ctvq.config.schema import ModelConfig

    model = SparseSDFVQVAE(resolution=4, model_channels=32, latent_channels=4, num_blocks=1,
                           num_embeddings=16, num_head_channels=16, window_size=2)
    schema = ModelConfig()
    assert model.quantizer.init_mode == schema.codebook_init == "kmeans"
    assert model.quantizer.update_mode == schema.codebook_update == "ema"
    assert model.quantizer.dead_code_threshold == schema.dead_code_threshold
    assert model.config["attention_backend"] == "sdpa" and model.config["sdf_channels"] is None
    with pytest.raises(TypeError, match="'num_block' \\(did you mean 'num_blocks'\\?\\)"):
        SparseSDFVQVAE(num_block=2)


def test_an_attention_backend_whose_package_is_missing_is_refused_when_the_model_is_built():
    import importlib.util

    missing = [b for b, module in (("xformers", "xformers"), ("flash_attn", "flash_attn"))
               if importlib.util.find_spec(module) is None]
    if not missing:
        pytest.skip("flash-attn and xformers are both installed")
    with pytest.raises(ImportError, match=f"attention backend '{missing[0]}' needs the"):
        tiny_model(attention_backend=missing[0])


def test_balanced_weighting_gives_each_target_group_an_equal_share():
    from ctvq.models.vqvae import voxel_weights

    # deep inside x2, band inside x1, band outside x2, far outside x5
    target = torch.tensor([-1.0, -1.0, -0.5, 0.2, 0.3, 1.0, 1.0, 1.0, 1.0, 1.0])
    w = voxel_weights(target, "balanced")
    groups = [w[:2].sum(), w[2:3].sum(), w[3:5].sum(), w[5:].sum()]
    assert torch.allclose(torch.stack(groups), torch.full((4,), 0.25))
    band = voxel_weights(target, "band")
    assert float(band[2:5].sum()) == pytest.approx(0.5) and float(band.sum()) == pytest.approx(1.0)
    assert voxel_weights(target, "uniform") is None
    assert voxel_weights(torch.ones(5), "balanced") is None  # one group only: the plain mean


def test_balanced_loss_is_not_fitted_by_outside_everywhere():
    from ctvq.models.vqvae import reconstruction_loss

    # 2 % inside, like bone: the best constant prediction under the plain mean is "+1 everywhere" (no
    # surface, tanh saturated); under balanced it sits between the signs, where tanh still has a gradient
    target = torch.ones(1000)
    target[:20] = -1.0
    constants = torch.linspace(-1, 1, 41)

    def best(weighting):
        losses = [reconstruction_loss(torch.full((1000,), float(c)), target, "l1_l2", weighting)
                  for c in constants]
        return float(constants[int(torch.stack(losses).argmin())])

    assert best("uniform") == 1.0
    assert abs(best("balanced")) < 0.25


def test_uniform_mix_moves_the_weights_from_the_scheme_to_the_plain_mean():
    from ctvq.models.vqvae import reconstruction_loss, voxel_weights

    target = torch.tensor([-1.0, -0.5, 0.2, 0.3, 1.0, 1.0, 1.0, 1.0])
    pred = torch.linspace(-0.9, 0.9, 8)
    balanced = voxel_weights(target, "balanced")
    half = voxel_weights(target, "balanced", uniform_mix=0.5)
    assert torch.allclose(half, 0.5 * balanced + 0.5 / 8) and float(half.sum()) == pytest.approx(1.0)
    plain = reconstruction_loss(pred, target, "l1_l2", "uniform")
    assert float(reconstruction_loss(pred, target, "l1_l2", "balanced", uniform_mix=1.0)) == pytest.approx(
        float(plain))
    assert float(reconstruction_loss(pred, target, "l1_l2", "balanced")) != pytest.approx(float(plain))
