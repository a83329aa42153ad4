"""Trainer parts: clipping, precision (inflat_all loss scale), EMA, sampler, optimizers, checkpoint sets."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import load, write_data

from ctvq.train.checkpoint import atomic_torch_save, complete_steps, ema_path, misc_path, model_path
from ctvq.train.clip import AdaptiveGradClipper
from ctvq.train.ema import ParameterEMA
from ctvq.train.loader import EpochSampler
from ctvq.train.optim import OPTIMIZERS, SCHEDULERS, build_optimizer, build_scheduler
from ctvq.train.precision import INITIAL_LOG_SCALE, Precision
from ctvq.train.rundir import config_changes
from ctvq.train.trainer import RunOptions, Trainer


def _grad_param(value: float) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), value)
    return p


def test_adaptive_clipper_uses_max_norm_until_buffer_full_then_percentile():
    clipper = AdaptiveGradClipper(max_norm=10.0, clip_percentile=50, buffer_size=4)
    for norm in (1.0, 2.0, 3.0, 4.0):
        p = _grad_param(norm / 2.0)  # |g| over 4 elements of value v is 2v
        assert clipper([p]) == pytest.approx(norm)
        assert torch.allclose(p.grad, torch.full((4,), norm / 2.0))  # below max_norm: untouched
    assert clipper.threshold == pytest.approx(2.5)  # median of 1..4, below max_norm
    p = _grad_param(5.0)
    clipper([p])
    assert p.grad.norm().item() == pytest.approx(2.5, rel=1e-4)
    restored = AdaptiveGradClipper(max_norm=10.0, clip_percentile=50, buffer_size=4)
    restored.load_state_dict(clipper.state_dict())
    assert restored.threshold == clipper.threshold and restored.count == 5


def test_ema_follows_rate_per_copy():
    model = torch.nn.Linear(2, 1)
    ema = ParameterEMA(model, (0.5, 0.9))
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update([p for p in model.parameters()])
    w_half = ema.model_state(model, 0.5)["weight"]
    w_nine = ema.model_state(model, 0.9)["weight"]
    assert torch.allclose(w_half, start + 0.5)
    assert torch.allclose(w_nine, start + 0.1)


def test_epoch_sampler_resumes_mid_epoch_and_shards_ranks():
    full = EpochSampler(7, seed=3)
    full.set_epoch(2)
    order = list(full)
    full.set_epoch(2, start=4)
    assert list(full) == order[4:]
    shards = [EpochSampler(7, rank=r, world_size=2, seed=3) for r in range(2)]
    for s in shards:
        s.set_epoch(2)
    assert len(list(shards[0])) == len(list(shards[1])) == 4
    assert set(list(shards[0]) + list(shards[1])) == set(range(7))
    other = EpochSampler(7, seed=3)
    other.set_epoch(3)
    assert list(other) != order


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_builds_and_steps(name):
    p = torch.nn.Parameter(torch.ones(3))
    cfg = load(optimizer={"name": name, "args": {"lr": 0.1}}).trainer.optimizer
    opt = build_optimizer(cfg, [p])
    p.grad = torch.ones(3)
    opt.step()
    assert (p.detach() < 1).all()


@pytest.mark.parametrize("section", [
    {"name": "CosineAnnealingLR", "args": {"T_max": 10, "eta_min": 0.0}},
    {"name": "ExponentialLR", "args": {"gamma": 0.5}},
    {"name": "StepLR", "args": {"step_size": 1, "gamma": 0.5}},
])
def test_every_scheduler_lowers_the_rate_per_step(section):
    cfg = load(lr_scheduler=section).trainer.lr_scheduler
    assert cfg.name in SCHEDULERS
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    sched = build_scheduler(cfg, opt)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] < 1.0


def test_inflat_all_overflow_skips_step_and_lowers_scale_clean_steps_grow_it():
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))
    prec = Precision("inflat_all", [w], torch.device("cpu"), scale_growth=0.25)
    opt = torch.optim.SGD(prec.optimizer_params(), lr=0.5)
    assert prec.log_scale == INITIAL_LOG_SCALE and prec.master[0].dtype == torch.float32

    def step(inject: bool):
        prec.zero_grad()
        # gradients of 1e-8: below float16's smallest subnormal, kept alive only by the loss scale
        loss = (w.float() * torch.tensor([1.0, 2.0, 3.0])).sum() * 1e-8
        prec.backward(loss)
        if inject:
            w.grad[1] = float("inf")
        return prec.step(opt, None)

    bad = step(True)
    assert not bad.applied and prec.log_scale == INITIAL_LOG_SCALE - 1
    assert torch.equal(prec.master[0].detach(), torch.zeros(3))  # skipped: nothing moved
    good = step(False)
    assert good.applied and prec.log_scale == pytest.approx(INITIAL_LOG_SCALE - 1 + 0.25)
    # the unscaled gradient reached the fp32 master: 0 - 0.5 * 1e-8 * [1, 2, 3]
    expected = -0.5 * 1e-8 * np.array([1.0, 2.0, 3.0])
    assert np.allclose(prec.master[0].detach().numpy(), expected, rtol=1e-3, atol=0)
    assert w.dtype == torch.float16


def test_inflat_all_trainer_step_with_overflow_in_real_model(tmp_path):
    """The real model under inflat_all: torso fp16, masters fp32; an inf gradient skips the step."""
    data = write_data(tmp_path / "data", cases=2)
    cfg = load(training_stage=1, fp16_mode="inflat_all", fp16_scale_growth=0.5, grad_clip=None)
    trainer = Trainer(cfg, RunOptions(tmp_path / "run", data, tensorboard=False))
    assert any(p.dtype == torch.float16 for p in trainer.model.parameters())
    batch = next(iter(trainer.loader))
    codebook = trainer.model.quantizer.embedding.weight
    handle = codebook.register_hook(lambda g: g * math.inf)
    before = codebook.detach().clone()
    logs, _ = trainer.train_step(batch)
    assert logs["applied"] == 0.0 and trainer.precision.log_scale == INITIAL_LOG_SCALE - 1
    assert torch.equal(codebook.detach(), before)
    handle.remove()
    logs, _ = trainer.train_step(batch)
    assert logs["applied"] == 1.0 and trainer.precision.log_scale == INITIAL_LOG_SCALE - 0.5
    assert not torch.equal(codebook.detach(), before)


def test_complete_steps_ignores_sets_without_misc_or_ema(tmp_path: Path):
    d = tmp_path / "ckpts"
    for step in (2, 4, 6):
        atomic_torch_save({"x": 1}, model_path(d, step))
        if step != 6:
            atomic_torch_save({"x": 1}, misc_path(d, step))
        if step != 4:
            atomic_torch_save({"x": 1}, ema_path(d, step, 0.9))
    assert complete_steps(d, (0.9,)) == [2]
    assert complete_steps(d, ()) == [2, 4]


def test_config_changes_allow_length_and_intervals_only():
    old = load().to_dict()
    new = load(max_steps=99, i_print=7).to_dict()
    assert config_changes(old, new) == []
    other = load(lambda_vq=0.5).to_dict()
    assert config_changes(old, other) == ["trainer.args.lambda_vq: 1.0 -> 0.5"]


def test_max_epoch_caps_steps_and_num_workers_is_honoured(tmp_path):
    data = write_data(tmp_path / "data", cases=4)
    cfg = load(max_steps=50, max_epoch=3, batch_size_per_gpu=2, num_workers=2)
    trainer = Trainer(cfg, RunOptions(tmp_path / "run", data, tensorboard=False))
    assert trainer.steps_per_epoch == 2 and trainer.total_steps == 6
    assert trainer.loader.num_workers == 2
    micro = next(iter(trainer.loader))  # loaded by worker processes
    assert len(micro) == 1 and micro[0]["batch_size"] == 2


def test_amp_on_cpu_trains_with_bfloat16_autocast(tmp_path):
    data = write_data(tmp_path / "data", cases=2)
    trainer = Trainer(load(fp16_mode="amp"), RunOptions(tmp_path / "run", data, tensorboard=False))
    assert trainer.precision.scaler is None  # bfloat16 needs no loss scaling
    before = trainer.model.quantizer.embedding.weight.detach().clone()
    logs, _ = trainer.train_step(next(iter(trainer.loader)))
    assert logs["applied"] == 1.0 and math.isfinite(logs["loss"])
    assert not torch.equal(before, trainer.model.quantizer.embedding.weight.detach())


def test_stage1_with_ema_codebook_has_nothing_to_optimise_but_still_checkpoints(tmp_path):
    data = write_data(tmp_path / "data", cases=2)
    cfg = load(max_steps=2, i_save=2, model_args={"codebook_update": "ema"})
    trainer = Trainer(cfg, RunOptions(tmp_path / "run", data, tensorboard=False))
    assert trainer.optimizer is None
    before = trainer.model.quantizer.num_updates.clone()
    trainer.run()
    assert int(trainer.model.quantizer.num_updates) == int(before) + 2  # EMA statistics moved per step
    assert complete_steps(tmp_path / "run" / "ckpts", (0.9,)) == [2]
    again = Trainer(cfg, RunOptions(tmp_path / "run", data, tensorboard=False))
    assert again.step == 2 and again.resumed_from is not None
