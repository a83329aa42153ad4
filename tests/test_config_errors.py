"""Bad configs fail at load with every problem listed, each naming the file, the key path and the fix."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from ctvq.config import ConfigError, config_from_dict, load_config

ORIGIN = "configs/bad.json"


def _with(base_stage: int = 1, **sections) -> dict:
    """A minimal valid config of ``base_stage`` with ``sections`` (``models=...``) deep-merged in."""
    args = {"training_stage": base_stage}
    if base_stage == 2:
        args["pretrained_vae_path"] = "ckpt.pt"
    cfg: dict = {"models": {"vqvae": {"args": {}}}, "dataset": {"args": {}}, "trainer": {"args": args}}
    for name, value in sections.items():
        _merge(cfg[name], value)
    return cfg


def _merge(into: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def _model(**args) -> dict:
    return _with(models={"vqvae": {"args": args}})


def _dataset(**args) -> dict:
    return _with(dataset={"args": args})


def _trainer(stage: int = 1, **args) -> dict:
    return _with(stage, trainer={"args": args})


def _error(cfg: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config_from_dict(cfg, origin=ORIGIN)
    return info.value


def assert_problem(cfg: dict, path: str, *fragments: str) -> None:
    """The config fails with a problem at ``path`` whose line names the file and contains ``fragments``."""
    err = _error(cfg)
    lines = [line for line in str(err).splitlines() if f"{ORIGIN}: {path}: " in line]
    assert lines, f"no problem at {path} in:\n{err}"
    for fragment in fragments:
        assert any(fragment in line for line in lines), f"{fragment!r} not in {lines}"


def test_unknown_key_suggests_the_closest_name():
    assert_problem(_model(num_block=4), "models.vqvae.args.num_block", "did you mean 'num_blocks'")
    assert_problem(_trainer(max_step=10), "trainer.args.max_step", "did you mean 'max_steps'")


def test_unknown_key_without_close_match_lists_the_accepted_keys():
    assert_problem(_dataset(flavour=1), "dataset.args.flavour", "accepted keys:", "window_type")


def test_misplaced_chunk_size_points_to_the_model_args():
    assert_problem(_trainer(chunk_size=4), "trainer.args.chunk_size", "belongs in models.vqvae.args")


def test_misplaced_optimizer_arguments_point_to_their_section():
    cfg = _trainer(optimizer={"name": "AdamW", "lr": 1e-3})
    assert_problem(cfg, "trainer.args.optimizer.lr", "belongs in", "trainer.args.optimizer.args")
    assert_problem(_trainer(weight_decay=0.1), "trainer.args.weight_decay", "trainer.args.optimizer.args")
    cfg = _trainer(lr_scheduler={"name": "CosineAnnealingLR", "T_max": 5})
    assert_problem(cfg, "trainer.args.lr_scheduler.T_max", "trainer.args.lr_scheduler.args")
    assert_problem(_model(lr=1e-3), "models.vqvae.args.lr", "trainer.args")


def test_unknown_section_is_reported():
    assert_problem({**_with(), "optimizer": {}}, "optimizer", "belongs in trainer.args")
    assert_problem({**_with(), "model": {}}, "model", "did you mean 'models'")


def test_misnamed_section_reports_the_typo_and_no_follow_up_error():
    cfg = _with(dataset={"args": {"resolution": 64}})
    cfg["model"] = {"vqvae": {"args": {"resolution": 8}}}
    del cfg["models"]
    err = _error(cfg)
    assert [p.path for p in err.problems] == ["model"], str(err)


def test_model_settings_that_would_crash_training_are_refused_up_front():
    """Each of these passed validation and then crashed ``ctvq train`` with a traceback."""
    assert_problem(_model(model_channels=100, num_head_channels=4), "models.vqvae.args.model_channels",
                   "multiple of 16")
    assert_problem(_model(pe_mode="rope", model_channels=64, num_head_channels=4),
                   "models.vqvae.args.num_head_channels", "even number >= 6", "heads of 4")
    assert_problem(_model(pe_mode="rope", model_channels=64, num_heads=16),
                   "models.vqvae.args.num_heads", "heads of 4")
    assert_problem(_model(mlp_ratio=0.001, model_channels=64), "models.vqvae.args.mlp_ratio",
                   "without a hidden channel")
    assert_problem(_model(representation_config={"kind": "sdf"}), "models.vqvae.args.representation_config",
                   "must be null", "ignored")


def test_batch_split_above_the_batch_proposes_the_exact_fix():
    assert_problem(_trainer(batch_size_per_gpu=1, batch_split=4), "trainer.args.batch_split",
                   "set batch_size_per_gpu to 4 and keep batch_split 4")
    assert_problem(_trainer(batch_size_per_gpu=6, batch_split=4), "trainer.args.batch_split",
                   "does not divide", "batch_size_per_gpu 8")


def test_wrong_type_names_the_expected_type_and_the_value():
    assert_problem(
        _model(model_channels="512"), "models.vqvae.args.model_channels", "expected an integer", '"512"'
    )
    assert_problem(_trainer(ema_rate=0.999), "trainer.args.ema_rate", "expected a list of numbers")
    assert_problem(_dataset(cache_data="yes"), "dataset.args.cache_data", "expected true or false")
    assert_problem(_model(num_blocks=8.5), "models.vqvae.args.num_blocks", "expected an integer", "8.5")


def test_bool_is_not_accepted_as_an_integer():
    assert_problem(_model(num_blocks=True), "models.vqvae.args.num_blocks", "boolean is not a number")
    assert_problem(_trainer(training_stage=True), "trainer.args.training_stage", "one of 1, 2", "true")
    assert_problem(_model(mlp_ratio=False), "models.vqvae.args.mlp_ratio", "expected a number")


def test_invalid_enum_lists_the_accepted_values():
    assert_problem(_model(attn_mode="window"), "models.vqvae.args.attn_mode", '"swin"', '"full"', '"window"')
    assert_problem(_dataset(window_type="liver"), "dataset.args.window_type", '"soft_tissue"', '"custom"')
    assert_problem(_trainer(loss_type="l2"), "trainer.args.loss_type", '"l1_l2"')
    assert_problem(_trainer(fp16_mode="fp16"), "trainer.args.fp16_mode", '"amp"', '"inflat_all"', "null")
    assert_problem(_trainer(optimizer={"name": "Lion"}), "trainer.args.optimizer.name", '"AdamW"', '"SGD"')
    assert_problem(_model(sparse_backend="cuda"), "models.vqvae.args.sparse_backend", '"spconv"')
    assert_problem(_trainer(training_stage=3), "trainer.args.training_stage", "one of 1, 2")


@pytest.mark.parametrize(
    ("cfg", "path", "fragment"),
    [
        (_trainer(optimizer={"args": {"lr": 0}}), "trainer.args.optimizer.args.lr", "> 0"),
        (_dataset(max_points=-1), "dataset.args.max_points", ">= 1"),
        (_model(num_embeddings=0), "models.vqvae.args.num_embeddings", ">= 1"),
        (
            _trainer(grad_clip={"args": {"clip_percentile": 0}}),
            "trainer.args.grad_clip.args.clip_percentile",
            "(0, 100]",
        ),
        (
            _trainer(grad_clip={"args": {"clip_percentile": 101}}),
            "trainer.args.grad_clip.args.clip_percentile",
            "(0, 100]",
        ),
        (_trainer(grad_clip=-1.0), "trainer.args.grad_clip", "> 0"),
        (_trainer(ema_rate=[0.999, 1.0]), "trainer.args.ema_rate", "(0, 1)"),
        (_model(codebook_ema_decay=0.0), "models.vqvae.args.codebook_ema_decay", "(0, 1)"),
        (_model(dead_code_threshold=-0.5), "models.vqvae.args.dead_code_threshold", ">= 0"),
        (_dataset(band=0), "dataset.args.band", "> 0"),
        (_dataset(iso_value=1.0), "dataset.args.iso_value", "(0, 1)"),
        (
            _trainer(lr_scheduler={"name": "ExponentialLR", "args": {"gamma": 1.5}}),
            "trainer.args.lr_scheduler.args.gamma",
            "(0, 1]",
        ),
        (_trainer(lr_scheduler={"args": {"T_max": 0}}), "trainer.args.lr_scheduler.args.T_max", ">= 1"),
        (_model(window_size=0), "models.vqvae.args.window_size", ">= 1"),
        (_model(chunk_size=0), "models.vqvae.args.chunk_size", ">= 1"),
        (_trainer(num_workers=-1), "trainer.args.num_workers", ">= 0"),
        (_trainer(optimizer={"args": {"betas": [0.9]}}), "trainer.args.optimizer.args.betas", "two numbers"),
        (_trainer(pretrained_vae_path=""), "trainer.args.pretrained_vae_path", "must not be empty"),
        (_trainer(lambda_vq=float("nan")), "trainer.args.lambda_vq", "finite"),
    ],
)
def test_out_of_range_values_are_rejected(cfg, path, fragment):
    assert_problem(cfg, path, fragment)


@pytest.mark.parametrize("key", ["i_print", "i_log", "i_sample", "i_save", "i_ddpcheck"])
def test_intervals_must_be_at_least_one(key):
    assert_problem(_trainer(**{key: 0}), f"trainer.args.{key}", ">= 1")


def test_batch_split_must_divide_the_batch():
    cfg = _trainer(batch_size_per_gpu=3, batch_split=2)
    assert_problem(cfg, "trainer.args.batch_split", "does not divide batch_size_per_gpu 3")
    # The reference's scenario 3 as written (batch 1 split 4) splits points, which ctvq refuses.
    assert_problem(_trainer(2, batch_size_per_gpu=1, batch_split=4), "trainer.args.batch_split", "1")


def test_heads_must_divide_model_channels():
    assert_problem(_model(num_heads=7), "models.vqvae.args.num_heads", "does not divide model_channels 512")
    assert_problem(_model(num_head_channels=48), "models.vqvae.args.num_head_channels", "512")


def test_latent_resolution_times_eight_must_match_the_dataset():
    assert_problem(
        _model(resolution=32), "dataset.args.resolution", "8 x models.vqvae.args.resolution", "256"
    )
    assert_problem(_dataset(resolution=100), "dataset.args.resolution", "multiple of 8")
    assert_problem(_dataset(resolution=32), "dataset.args.resolution", ">= 64")


def test_chunk_size_must_divide_the_latent_resolution():
    assert_problem(
        _model(chunk_size=3), "models.vqvae.args.chunk_size", "does not divide the latent resolution 64"
    )


def test_min_points_cannot_exceed_max_points():
    assert_problem(_dataset(min_points=500, max_points=400), "dataset.args.min_points", "max_points 400")


def test_stage_two_requires_a_stage_one_checkpoint():
    cfg = {"trainer": {"args": {"training_stage": 2}}}
    assert_problem(
        cfg, "trainer.args.pretrained_vae_path", "required for training_stage 2", "stage-1 checkpoint"
    )


def test_training_stage_is_required():
    assert_problem({"trainer": {"args": {}}}, "trainer.args.training_stage", "required")
    assert_problem({}, "trainer.args.training_stage", "required")


def test_custom_window_needs_width_and_level_and_named_windows_refuse_them():
    assert_problem(_dataset(window_type="custom", window_level=40), "dataset.args.window_width", "required")
    assert_problem(
        _dataset(window_width=400), "dataset.args.window_width", 'only allowed with window_type "custom"'
    )


def test_arguments_of_another_scheduler_or_optimizer_are_errors():
    cfg = _trainer(lr_scheduler={"name": "CosineAnnealingLR", "args": {"gamma": 0.9}})
    assert_problem(
        cfg, "trainer.args.lr_scheduler.args.gamma", "ExponentialLR/StepLR", "not of CosineAnnealingLR"
    )
    cfg = _trainer(optimizer={"name": "SGD", "args": {"betas": [0.9, 0.99]}})
    assert_problem(cfg, "trainer.args.optimizer.args.betas", "Adam/AdamW", "not of SGD")
    cfg = _trainer(optimizer={"name": "AdamW", "args": {"momentum": 0.9}})
    assert_problem(cfg, "trainer.args.optimizer.args.momentum", "SGD")
    assert_problem(
        _trainer(lr_scheduler={"name": "StepLR"}), "trainer.args.lr_scheduler.args.step_size", "required"
    )
    cfg = _trainer(grad_clip={"name": "norm", "args": {"clip_percentile": 90}})
    assert_problem(cfg, "trainer.args.grad_clip.args.clip_percentile", "AdaptiveGradClipper")


def test_conflicting_duplicates_are_errors():
    cfg = _trainer(lr=1e-3, optimizer={"args": {"lr": 5e-4}})
    assert_problem(cfg, "trainer.args.lr", "disagrees with trainer.args.optimizer.args.lr")
    cfg = _with(dataset={"name": "SparseSDF", "args": {"name": "CTWindowSparseSDF"}})
    assert_problem(cfg, "dataset.args.name", "disagrees with dataset.name")


def test_other_cross_rules():
    cfg = _trainer(optimizer={"name": "SGD", "args": {"nesterov": True}})
    assert_problem(cfg, "trainer.args.optimizer.args.nesterov", "momentum > 0")
    cfg = _trainer(lr=1e-5)  # stage-1 cosine eta_min 5e-5 would raise the learning rate
    assert_problem(cfg, "trainer.args.lr_scheduler.args.eta_min", "above the learning rate")
    cfg = _trainer(lr_scheduler={"name": None, "args": {"gamma": 0.9}})
    assert_problem(cfg, "trainer.args.lr_scheduler.args", "name null")


def test_all_problems_are_reported_together_in_file_order():
    cfg = _with(
        models={"vqvae": {"args": {"num_block": 4, "attn_mode": "window"}}},
        dataset={"args": {"min_points": 10, "max_points": 5}},
        trainer={"args": {"chunk_size": 4, "batch_size_per_gpu": 3, "batch_split": 2}},
    )
    err = _error(cfg)
    paths = [p.path for p in err.problems]
    assert paths == [
        "models.vqvae.args.num_block",
        "models.vqvae.args.attn_mode",
        "dataset.args.min_points",
        "trainer.args.chunk_size",
        "trainer.args.batch_split",
    ]
    lines = str(err).splitlines()
    assert lines[0] == f"invalid config {ORIGIN} (5 problems):"
    assert all(line.startswith(f"  {ORIGIN}: ") for line in lines[1:])


def test_non_object_sections_are_errors():
    assert_problem({"trainer": {"args": {"training_stage": 1}}, "models": []}, "models", "expected an object")
    assert_problem({"trainer": {"args": {"training_stage": 1}}, "description": 3}, "description", "string")
    assert "expected an object" in str(_error([1, 2]))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.json"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_config_errors_name_the_file(tmp_path):
    path = _write(tmp_path, json.dumps(_trainer(max_steps=0)))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}: trainer.args.max_steps: 0 is invalid" in str(err.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"trainer": {"args": {"training_stage": 1,}}}', "invalid JSON"),
        (
            '{"trainer": {"args": {"training_stage": 1, "training_stage": 2}}}',
            "'training_stage' appears twice",
        ),
    ],
)
def test_broken_json_is_an_error_naming_the_file(tmp_path, text, fragment):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and fragment in str(err.value)


def test_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
