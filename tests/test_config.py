"""Config schema: defaults equal the configuration reference, round trips, shipped configs, torch wiring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ctvq.config import (
    ConfigError,
    CTVQConfig,
    config_from_dict,
    load_config,
    resolve_path,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "vqvae"
STAGE1 = {"trainer": {"args": {"training_stage": 1}}}
STAGE2 = {"trainer": {"args": {"training_stage": 2, "pretrained_vae_path": "ckpt.pt"}}}

# Written by hand from the configuration reference, not the schema: (attribute, stage-1, stage-2 default).
REFERENCE_DEFAULTS = [
    ("model.resolution", 64, 64),
    ("model.model_channels", 512, 512),
    ("model.latent_channels", 16, 16),
    ("model.num_blocks", 8, 8),
    ("model.num_embeddings", 8192, 8192),
    ("model.num_heads", None, None),
    ("model.num_head_channels", 64, 64),
    ("model.mlp_ratio", 4.0, 4.0),
    ("model.attn_mode", "swin", "swin"),
    ("model.window_size", 8, 8),
    ("model.pe_mode", "ape", "ape"),
    ("model.use_fp16", False, False),
    ("model.use_checkpoint", False, False),
    ("model.chunk_size", 1, 1),
    ("model.qk_rms_norm", False, False),
    ("model.representation_config", None, None),
    ("dataset.name", "CTWindowSparseSDF", "CTWindowSparseSDF"),
    ("dataset.resolution", 512, 512),
    ("dataset.window_type", "lung", "lung"),
    ("dataset.min_points", 100, 100),
    ("dataset.max_points", 100_000, 500_000),
    ("dataset.cache_data", False, False),
    ("dataset.precompute_sparse", True, True),
    ("trainer.pretrained_vae_path", None, "ckpt.pt"),
    ("trainer.max_steps", 100_000, 200_000),
    ("trainer.max_epoch", None, None),
    ("trainer.batch_size_per_gpu", 2, 1),
    ("trainer.num_workers", 30, 30),
    ("trainer.loss_type", "l1", "l1_l2"),
    ("trainer.lambda_vq", 1.0, 1.0),
    ("trainer.lambda_commitment", 0.25, 0.25),
    ("trainer.fp16_mode", "inflat_all", "inflat_all"),
    ("trainer.fp16_scale_growth", 0.001, 0.001),
    ("trainer.ema_rate", (0.9999,), (0.9999,)),
    ("trainer.i_print", 1000, 1000),
    ("trainer.i_log", 500, 500),
    ("trainer.i_sample", 10_000, 10_000),
    ("trainer.i_save", 10_000, 10_000),
    ("trainer.i_ddpcheck", 10_000, 10_000),
    ("trainer.disable_snapshot", False, False),
    ("trainer.optimizer.name", "AdamW", "AdamW"),
    ("trainer.optimizer.lr", 5e-3, 1e-4),
    ("trainer.optimizer.weight_decay", 0.0, 0.0),
    ("trainer.lr_scheduler.name", "CosineAnnealingLR", "ExponentialLR"),
    ("trainer.grad_clip.name", "AdaptiveGradClipper", "AdaptiveGradClipper"),
    ("trainer.grad_clip.max_norm", 1.0, 1.0),
    ("trainer.grad_clip.clip_percentile", 95, 95),
    # ctvq extras (the and the lead's defaults)
    ("model.sdf_input_scale", 1.0, 1.0),
    # codebook defaults chosen from bench/train.py's codebook-health measurement (kmeans + EMA + restarts)
    ("model.codebook_init", "kmeans", "kmeans"),
    ("model.codebook_update", "ema", "ema"),
    ("model.codebook_ema_decay", 0.99, 0.99),
    ("model.dead_code_threshold", 0.1, 0.1),
    ("model.sparse_backend", "auto", "auto"),
    ("dataset.window_width", None, None),
    ("dataset.window_level", None, None),
    ("dataset.band", 3.0, 3.0),
    ("dataset.iso_value", 0.5, 0.5),
    ("dataset.seed", 0, 0),
    ("trainer.seed", 0, 0),
]


def _get(cfg: CTVQConfig, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize(
    ("path", "stage1", "stage2"), REFERENCE_DEFAULTS, ids=[r[0] for r in REFERENCE_DEFAULTS]
)
def test_defaults_equal_the_reference_for_both_stages(path, stage1, stage2):
    assert _get(config_from_dict(STAGE1), path) == stage1
    assert _get(config_from_dict(STAGE2), path) == stage2


def test_scheduler_defaults_follow_the_stage():
    s1 = config_from_dict(STAGE1).trainer.lr_scheduler
    s2 = config_from_dict(STAGE2).trainer.lr_scheduler
    assert s1.kwargs() == {"T_max": 100_000, "eta_min": 5e-5}
    assert s2.kwargs() == {"gamma": 0.999}


def test_batch_split_default_is_two_but_never_contradicts_the_batch():
    assert config_from_dict(STAGE1).trainer.batch_split == 2  # reference default, batch 2
    assert config_from_dict(STAGE2).trainer.batch_split == 1  # stage-2 batch 1: 2 would not divide it
    stage2_batch4 = json.loads(json.dumps(STAGE2))
    stage2_batch4["trainer"]["args"]["batch_size_per_gpu"] = 4
    assert config_from_dict(stage2_batch4).trainer.batch_split == 2


def test_int_is_accepted_where_a_float_is_expected():
    cfg = config_from_dict({"models": {"vqvae": {"args": {"mlp_ratio": 2}}}, **STAGE1})
    assert cfg.model.mlp_ratio == 2.0 and isinstance(cfg.model.mlp_ratio, float)


def test_num_heads_resolve_from_head_channels_or_explicit_value():
    assert config_from_dict(STAGE1).model.heads == 8
    cfg = config_from_dict({"models": {"vqvae": {"args": {"num_heads": 4}}}, **STAGE1})
    assert cfg.model.heads == 4


def test_windows_resolve_to_width_and_level():
    assert config_from_dict(STAGE1).dataset.window() == (1500.0, -600.0)
    custom = {
        "dataset": {"args": {"window_type": "custom", "window_width": 700, "window_level": 40}},
        **STAGE1,
    }
    assert config_from_dict(custom).dataset.window() == (700.0, 40.0)


def test_trainer_lr_is_a_shorthand_for_optimizer_lr():
    cfg = config_from_dict({"trainer": {"args": {"training_stage": 1, "lr": 1e-3}}})
    assert cfg.trainer.optimizer.lr == 1e-3
    both = {"trainer": {"args": {"training_stage": 1, "lr": 1e-3, "optimizer": {"args": {"lr": 1e-3}}}}}
    assert config_from_dict(both).trainer.optimizer.lr == 1e-3


def test_dataset_name_is_accepted_in_either_place():
    outer = config_from_dict({"dataset": {"name": "SparseSDF"}, **STAGE1})
    inner = config_from_dict({"dataset": {"args": {"name": "SparseSDF"}}, **STAGE1})
    assert outer.dataset.name == inner.dataset.name == "SparseSDF"


def test_scheduler_and_clipper_can_be_switched_off_or_simplified():
    args = {"training_stage": 1, "lr_scheduler": None, "grad_clip": 0.5}
    cfg = config_from_dict({"trainer": {"args": args}})
    assert cfg.trainer.lr_scheduler is None
    assert cfg.trainer.grad_clip.name == "norm" and cfg.trainer.grad_clip.max_norm == 0.5
    off = config_from_dict({"trainer": {"args": {"training_stage": 1, "grad_clip": None}}})
    assert off.trainer.grad_clip is None
    named_null = {"trainer": {"args": {"training_stage": 1, "lr_scheduler": {"name": None}}}}
    assert config_from_dict(named_null).trainer.lr_scheduler is None


def test_optimizer_and_scheduler_args_are_per_component():
    args = {
        "training_stage": 1,
        "optimizer": {"name": "SGD", "args": {"lr": 0.1, "momentum": 0.9, "nesterov": True}},
        "lr_scheduler": {"name": "StepLR", "args": {"step_size": 10}},
    }
    trainer = config_from_dict({"trainer": {"args": args}}).trainer
    assert trainer.optimizer.kwargs() == {"lr": 0.1, "weight_decay": 0.0, "momentum": 0.9, "nesterov": True}
    assert trainer.lr_scheduler.kwargs() == {"step_size": 10, "gamma": 0.1}


def test_use_fp16_without_fp16_mode_is_allowed():
    d = {
        "models": {"vqvae": {"args": {"use_fp16": True}}},
        "trainer": {"args": {"training_stage": 1, "fp16_mode": None}},
    }
    cfg = config_from_dict(d)
    assert cfg.model.use_fp16 and cfg.trainer.fp16_mode is None


def _round_trip_cases() -> list[dict]:
    return [
        STAGE1,
        STAGE2,
        {"trainer": {"args": {"training_stage": 1, "lr_scheduler": None, "grad_clip": 2.0, "ema_rate": []}}},
        {
            "dataset": {"args": {"window_type": "custom", "window_width": 500, "window_level": 10}},
            "models": {"vqvae": {"args": {"representation_config": None, "num_heads": 16}}},
            "trainer": {
                "args": {"training_stage": 1, "optimizer": {"name": "SGD", "args": {"momentum": 0.5}}}
            },
        },
    ]


@pytest.mark.parametrize("case", _round_trip_cases())
def test_to_dict_round_trips_through_json(case):
    cfg = config_from_dict(case)
    text = json.dumps(cfg.to_dict())
    again = config_from_dict(json.loads(text))
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


def test_shipped_configs_include_the_four_scenarios_and_the_tiny_pair():
    names = {p.stem for p in CONFIG_DIR.glob("*.json")}
    assert {"stage1", "stage2", "stage2_lowmem", "hires_1024", "tiny_stage1", "tiny_stage2"} <= names


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_config_validates_and_round_trips(path):
    cfg = load_config(path)
    assert cfg.origin == str(path)
    assert config_from_dict(cfg.to_dict()) == cfg
    assert cfg.dataset.resolution == 8 * cfg.model.resolution
    if cfg.stage == 2:
        assert cfg.trainer.pretrained_vae_path


def test_scenario_configs_keep_the_reference_values():
    s1, s2 = load_config(CONFIG_DIR / "stage1.json"), load_config(CONFIG_DIR / "stage2.json")
    low, hires = load_config(CONFIG_DIR / "stage2_lowmem.json"), load_config(CONFIG_DIR / "hires_1024.json")
    assert (s1.stage, s1.trainer.loss_type, s1.trainer.optimizer.lr) == (1, "l1", 5e-3)
    assert s1.trainer.lr_scheduler.kwargs() == {"T_max": 100_000, "eta_min": 5e-5}
    assert (s2.stage, s2.model.use_checkpoint, s2.trainer.optimizer.lr) == (2, True, 1e-4)
    assert s2.trainer.lr_scheduler.kwargs() == {"gamma": 0.999}
    assert (low.model.model_channels, low.model.num_blocks, low.model.chunk_size) == (256, 4, 4)
    assert (low.dataset.max_points, low.trainer.batch_split) == (50_000, 4)
    assert (hires.model.resolution, hires.model.chunk_size, hires.dataset.resolution) == (128, 8, 1024)
    assert (hires.dataset.max_points, hires.trainer.batch_split) == (200_000, 8)


def test_tiny_configs_are_cpu_sized():
    for name in ("tiny_stage1", "tiny_stage2"):
        cfg = load_config(CONFIG_DIR / f"{name}.json")
        assert cfg.dataset.resolution in (64, 128)
        assert 32 <= cfg.model.model_channels <= 64 and cfg.model.num_blocks <= 2
        assert cfg.trainer.num_workers == 0 and cfg.trainer.fp16_mode is None
        assert cfg.trainer.max_steps <= 1000 and cfg.trainer.batch_size_per_gpu == 2


def test_resolved_optimizer_and_scheduler_build_real_torch_objects():
    trainer = load_config(CONFIG_DIR / "stage1.json").trainer
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = getattr(torch.optim, trainer.optimizer.name)(params, **trainer.optimizer.kwargs())
    scheduler = getattr(torch.optim.lr_scheduler, trainer.lr_scheduler.name)(
        optimizer, **trainer.lr_scheduler.kwargs()
    )
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] < 5e-3


def test_relative_paths_resolve_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg_file = tmp_path / "sub" / "c.json"
    assert resolve_path(cfg_file, "w/vae.pth") == tmp_path / "w" / "vae.pth"
    assert resolve_path(cfg_file, None) is None
    assert resolve_path(cfg_file, str(tmp_path / "abs.pt")) == tmp_path / "abs.pt"
    with pytest.raises(ConfigError) as err:
        resolve_path(cfg_file, "w/vae.pth", must_exist=True)
    assert str(cfg_file) in str(err.value) and "trainer.args.pretrained_vae_path" in str(err.value)


def test_reference_scenario_one_snippet_validates_as_written():
    snippet = """{
        "models": {"vqvae": {"args": {"resolution": 64, "model_channels": 512, "latent_channels": 16,
                                      "num_blocks": 8, "use_checkpoint": false, "chunk_size": 1}}},
        "trainer": {"args": {"training_stage": 1, "batch_size_per_gpu": 2, "batch_split": 2,
                             "loss_type": "l1", "lr": 5e-3,
                             "lr_scheduler": {"name": "CosineAnnealingLR",
                                              "args": {"T_max": 100000, "eta_min": 5e-5}}}}
    }"""
    cfg = config_from_dict(json.loads(snippet))
    assert cfg.trainer.optimizer.lr == 5e-3 and cfg.trainer.lr_scheduler.T_max == 100_000


def test_the_configuration_reference_is_generated_from_the_schema_and_up_to_date() -> None:
    """docs/CONFIG.md is `python -m ctvq.config.reference` of this schema; every key says what it does."""
    import dataclasses

    from ctvq.config.reference import SECTIONS, reference_markdown

    root = Path(__file__).resolve().parents[1]
    assert (root / "docs" / "CONFIG.md").read_text(encoding="utf-8") == reference_markdown(), (
        "docs/CONFIG.md is stale: run `python -m ctvq.config.reference > docs/CONFIG.md`")
    for path, cls in SECTIONS:
        for field in dataclasses.fields(cls):
            assert field.metadata.get("doc"), f"{path}.{field.name} has no doc in its spec()"
            assert f"| `{field.name}` |" in reference_markdown()
