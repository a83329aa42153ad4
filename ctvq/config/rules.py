"""Cross-field rules: constraints that tie config fields together.

Each rule runs only when the fields it reads are valid (the section dicts are None otherwise), so one mistake
does not cascade into follow-up errors.
"""

from __future__ import annotations

from typing import Any

from ctvq.config.errors import Problems, show
from ctvq.config.schema import CTVQConfig, OptimizerConfig, SchedulerConfig
from ctvq.ct.sample import LATENT_STRIDE


def cross_checks(model: dict | None, dataset: dict | None, trainer: dict | None, problems: Problems) -> None:
    """Rules that tie fields together; each runs only when the fields it reads are valid."""
    if model is not None:
        heads_key = "num_heads" if model["num_heads"] is not None else "num_head_channels"
        channels = model["model_channels"]
        if channels % model[heads_key] != 0:
            problems.add(
                f"models.vqvae.args.{heads_key}",
                f"{model[heads_key]} does not divide model_channels {channels}",
            )
        else:
            head_dim = (model[heads_key] if heads_key == "num_head_channels"
                        else channels // model["num_heads"])
            if model["pe_mode"] == "rope" and (head_dim % 2 or head_dim < 6):
                problems.add(
                    f"models.vqvae.args.{heads_key}",
                    "pe_mode rope rotates channel pairs on 3 axes, so each head needs an even number >= 6 "
                    f"of channels; {show(model[heads_key])} gives heads of {head_dim}: use num_head_channels "
                    "32 or 64, or pe_mode ape",
                )
        if int(channels * model["mlp_ratio"]) < 1:
            problems.add(
                "models.vqvae.args.mlp_ratio",
                f"{show(model['mlp_ratio'])} x model_channels {channels} leaves the MLP without a hidden "
                "channel; use 4.0 (Direct3D-S2) or at least 1 / model_channels",
            )
        if model["resolution"] % model["chunk_size"] != 0:
            problems.add(
                "models.vqvae.args.chunk_size",
                f"{model['chunk_size']} does not divide the latent resolution {model['resolution']} "
                "(models.vqvae.args.resolution): pick a divisor such as 1, 2, 4 or 8",
            )
    if dataset is not None:
        res = dataset["resolution"]
        if res % LATENT_STRIDE != 0:
            problems.add("dataset.args.resolution", f"{res} is not a multiple of {LATENT_STRIDE}")
        elif model is not None and model["resolution"] * LATENT_STRIDE != res:
            problems.add(
                "dataset.args.resolution",
                f"{res} != 8 x models.vqvae.args.resolution ({model['resolution']}): set "
                f"dataset.args.resolution to {model['resolution'] * LATENT_STRIDE} or "
                f"models.vqvae.args.resolution to {res // LATENT_STRIDE}",
            )
        custom = dataset["window_type"] == "custom"
        for key in ("window_width", "window_level"):
            if custom and dataset[key] is None:
                problems.add(f"dataset.args.{key}", 'required when window_type is "custom" (in HU)')
            if not custom and dataset[key] is not None:
                problems.add(
                    f"dataset.args.{key}",
                    f'only allowed with window_type "custom"; window_type {show(dataset["window_type"])} '
                    'has a fixed window: remove it or set window_type to "custom"',
                )
        if dataset["min_points"] > dataset["max_points"]:
            problems.add(
                "dataset.args.min_points",
                f"{dataset['min_points']} is greater than max_points {dataset['max_points']}",
            )
    if trainer is not None:
        _trainer_cross_checks(trainer, problems)


def _trainer_cross_checks(trainer: dict[str, Any], problems: Problems) -> None:
    batch, split = trainer["batch_size_per_gpu"], trainer["batch_split"]
    if split > batch:
        problems.add(
            "trainer.args.batch_split",
            f"{split} is more than batch_size_per_gpu {batch}: batch_split divides each GPU's batch into "
            f"micro-batches, and {batch} sample(s) cannot make {split}. To accumulate gradients over {split} "
            f"micro-batches of {batch} sample(s) (the memory of {batch}), set batch_size_per_gpu to "
            f"{batch * split} and keep batch_split {split}",
        )
    elif batch % split != 0:
        problems.add(
            "trainer.args.batch_split",
            f"{split} does not divide batch_size_per_gpu {batch} (micro-batches split the samples evenly): "
            f"use a divisor of {batch}, or batch_size_per_gpu {batch // split * split + split}",
        )
    if trainer["training_stage"] == 2 and trainer["pretrained_vae_path"] is None:
        problems.add(
            "trainer.args.pretrained_vae_path",
            "required for training_stage 2: the stage-1 checkpoint to start from "
            "(e.g. outputs/<stage-1 run>/ckpts/final.pt)",
        )
    if trainer["training_stage"] == 2 and trainer["stage1_mode"] != "codebook":
        problems.add(
            "trainer.args.stage1_mode",
            f"{show(trainer['stage1_mode'])} applies to training_stage 1 only; remove it from this stage-2 "
            "config",
        )
    opt: OptimizerConfig = trainer["optimizer"]
    if opt.nesterov and not opt.momentum:
        problems.add("trainer.args.optimizer.args.nesterov", "true needs momentum > 0")
    sched: SchedulerConfig | None = trainer["lr_scheduler"]
    if sched is not None and sched.eta_min is not None and sched.eta_min > opt.lr:
        problems.add(
            "trainer.args.lr_scheduler.args.eta_min",
            f"{show(sched.eta_min)} is above the learning rate {show(opt.lr)}: the schedule would raise it",
        )


def config_warnings(config: CTVQConfig) -> list[str]:
    """Valid but probably unintended settings, one sentence each (printed by validate-config and train).

    Stage 1 in ``codebook`` mode freezes encoder and decoder: without Direct3D-S2 weights they are random,
    so the codebook learns to quantize latents that carry no learned shape information.
    ``autoencoder`` mode trains encoder and decoder with the quantizer bypassed, then fits the codebook by
    k-means on their outputs.
    """
    t, m = config.trainer, config.model
    if t.training_stage != 1 or t.stage1_mode != "codebook":
        return []
    out = []
    if t.pretrained_vae_path is None:
        out.append(
            "trainer.args: stage 1 with stage1_mode \"codebook\" and no pretrained_vae_path trains a "
            "codebook against a random frozen encoder (its latents mean nothing yet); set stage1_mode to "
            "\"autoencoder\" or give Direct3D-S2 weights"
        )
    if m.codebook_update == "ema":
        out.append(
            "trainer.args: stage 1 with codebook_update \"ema\" has no trainable parameters: optimizer, lr "
            "and lr_scheduler do nothing (the codebook follows EMA statistics)"
        )
    return out
