"""Two-stage training: what each stage trains, what stage 2 starts from, gradient accumulation."""

from __future__ import annotations

import pytest
import torch
from train_helpers import load, write_data, write_stage1_checkpoint

from ctvq.data import SparseCollate
from ctvq.models import SparseSDFVQVAE, checkpoint_payload
from ctvq.train.checkpoint import CheckpointError, final_path, load_file
from ctvq.train.trainer import RunOptions, Trainer

CODEBOOK = "quantizer.embedding.weight"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"), cases=4)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_stage1_changes_only_the_codebook(tmp_path, data):
    cfg = load(training_stage=1, max_steps=3, i_save=3)
    trainer = Trainer(cfg, RunOptions(tmp_path, data, tensorboard=False))
    assert [n for n, p in trainer.model.named_parameters() if p.requires_grad] == [CODEBOOK]
    before = _params(trainer.model)
    trainer.run()
    after = _params(trainer.model)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed == [CODEBOOK]


@pytest.mark.slow
def test_stage2_starts_from_exactly_the_stage1_model_and_trains_everything(tmp_path, data):
    options = RunOptions(tmp_path / "s1", data, tensorboard=False)
    stage1 = Trainer(load(training_stage=1, max_steps=2), options)
    stage1.run()
    final = final_path(tmp_path / "s1")
    saved = load_file(final)
    assert saved["ctvq"]["stage"] == 1 and saved["ctvq"]["step"] == 2
    stage2 = Trainer(load(training_stage=2, pretrained_vae_path=str(final), max_steps=2),
                     RunOptions(tmp_path / "s2", data, tensorboard=False))
    start = stage2.model.state_dict()
    assert set(start) == set(saved["vae"])
    for name, value in saved["vae"].items():
        assert torch.equal(start[name], value), name  # codebook and quantizer buffers included
    assert torch.equal(start[CODEBOOK], stage1.model.state_dict()[CODEBOOK])
    assert all(p.requires_grad for p in stage2.model.parameters())
    before = _params(stage2.model)
    stage2.run()
    after = _params(stage2.model)
    assert not torch.equal(before["encoder.input_layer.weight"], after["encoder.input_layer.weight"])
    assert not torch.equal(before["decoder.out_layer.weight"], after["decoder.out_layer.weight"])


def test_stage2_refuses_a_checkpoint_without_ctvq_stage1_block(tmp_path, data):
    model = SparseSDFVQVAE(**load().model.to_dict()["args"])
    raw = tmp_path / "vae.pt"
    torch.save(checkpoint_payload(model), raw)  # Direct3D-S2 layout: no stage record
    with pytest.raises(CheckpointError, match="pretrained_vae_path.*not written by a ctvq stage-1 run"):
        Trainer(load(training_stage=2, pretrained_vae_path=str(raw)), RunOptions(tmp_path / "r", data))
    assert not (tmp_path / "r").exists()


def test_stage1_refuses_a_ctvq_checkpoint_and_stage2_a_mismatched_one(tmp_path, data):
    ckpt = tmp_path / "s1.pt"
    write_stage1_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="stage 1 starts from"):
        Trainer(load(training_stage=1, pretrained_vae_path=str(ckpt)), RunOptions(tmp_path / "a", data))
    wider = load(training_stage=2, pretrained_vae_path=str(ckpt), model_args={"num_embeddings": 32})
    with pytest.raises(CheckpointError, match="num_embeddings"):
        Trainer(wider, RunOptions(tmp_path / "b", data))


@pytest.mark.slow
def test_batch_split_accumulation_equals_one_full_batch(tmp_path, data):
    """Same seed, same 3 samples of different sizes: batch_split 3 (one sample per micro-batch) vs 1."""
    # uniform: the plain mean is what accumulation reproduces exactly (balanced normalises per micro-batch)
    common = dict(training_stage=2, batch_size_per_gpu=3, grad_clip=None, ema_rate=[], lr_scheduler=None,
                  optimizer={"name": "SGD", "args": {"lr": 0.1}}, recon_weighting="uniform")
    ckpt = tmp_path / "s1.pt"
    write_stage1_checkpoint(ckpt)
    results = []
    for split in (1, 3):
        cfg = load(batch_split=split, pretrained_vae_path=str(ckpt), **common)
        trainer = Trainer(cfg, RunOptions(tmp_path / f"split{split}", data, tensorboard=False))
        items = [trainer.dataset[i] for i in (0, 1, 3)]
        micro = SparseCollate(split)(items)
        assert len(micro) == split
        before = _params(trainer.model)
        logs, _ = trainer.train_step(micro)  # the decoder output layer is zero-initialised: two steps
        trainer.train_step(micro)
        delta = {n: p.detach() - before[n] for n, p in trainer.model.named_parameters()}
        results.append((logs["loss"], delta))
    (loss_full, full), (loss_split, split) = results
    assert loss_split == pytest.approx(loss_full, rel=1e-5)
    moved = 0
    for name in full:
        scale = full[name].abs().max().item()
        assert torch.allclose(split[name], full[name], rtol=1e-3, atol=1e-5 * max(scale, 1e-3)), name
        moved += scale > 0
    assert moved > 10  # the comparison covers real updates of encoder, decoder and codebook


def test_stage1_autoencoder_mode_trains_encoder_and_decoder_then_fits_the_codebook(tmp_path, data):
    cfg = load(training_stage=1, max_steps=3, i_save=3, stage1_mode="autoencoder",
               model_args={"codebook_init": "random"})
    trainer = Trainer(cfg, RunOptions(tmp_path, data, tensorboard=False))
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert CODEBOOK not in trainable and any(n.startswith("encoder.") for n in trainable)
    assert any(n.startswith("decoder.") for n in trainable)
    before = _params(trainer.model)
    trainer.run()
    final = load_file(final_path(tmp_path))["vae"]
    assert not torch.equal(before["encoder.out_layer.weight"], final["encoder.out_layer.weight"])
    # The codebook is re-fitted on the trained encoder's outputs: every code sits among real latents.
    model = SparseSDFVQVAE(**cfg.model.to_dict()["args"])
    model.load_state_dict(final)
    model.eval()
    batch = SparseCollate(1)([trainer.dataset[i] for i in range(len(trainer.dataset))])[0]
    with torch.no_grad():
        z = model.continuous_latent(batch).feats
    codebook = final[CODEBOOK]
    assert not torch.equal(codebook, before[CODEBOOK])
    assert float(torch.cdist(codebook, z).min(dim=1).values.max()) < float(z.std()) * 3
    assert float(final["quantizer.num_updates"]) == 0 and bool(final["quantizer.initialised"])
    log = (tmp_path / "log.txt").read_text()
    assert "codebook fitted by k-means" in log and "quantizer bypassed" in log


def test_stage1_mode_is_refused_in_stage2_and_codebook_mode_without_weights_warns(tmp_path):
    from ctvq.config import ConfigError, config_warnings

    with pytest.raises(ConfigError, match="stage1_mode.*training_stage 1 only"):
        load(training_stage=2, pretrained_vae_path="x.pt", stage1_mode="autoencoder")
    warnings = config_warnings(load(training_stage=1, model_args={"codebook_update": "ema"}))
    assert any("random frozen encoder" in w for w in warnings)
    assert any("no trainable parameters" in w for w in warnings)
    assert config_warnings(load(training_stage=1, stage1_mode="autoencoder")) == []
