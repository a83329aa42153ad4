"""Subcommands beyond preprocessing: config validation and checkpoint inspection (more register as they land).

Kept apart from ``ctvq/cli.py`` so the CLI core stays a small registry and each package owns its commands.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ctvq.cli import Command, register_command
from ctvq.config import ConfigError, config_warnings, load_config
from ctvq.models.pretrained import PretrainedWeightsError, inspect_weights


def _configure_validate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, nargs="+", help="ctvq JSON config file(s)")
    parser.add_argument("--resolved", action="store_true", help="print the fully resolved config")


def _run_validate(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.config:
        try:
            config = load_config(path)
        except ConfigError as exc:  # report every file, not just the first bad one
            print(exc, flush=True)
            failed += 1
            continue
        if args.resolved:
            print(json.dumps(config.to_dict(), indent=2))
        else:
            print(f"{path}: ok (training_stage {config.stage})")
        for warning in config_warnings(config):
            print(f"{path}: warning: {warning}", flush=True)
    return 2 if failed else 0


def _configure_inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="Direct3D-S2 VAE file or ctvq checkpoint")
    parser.add_argument("--config-dir", type=Path, default=None,
                        help="folder of model configs to match against (default: configs/vqvae)")


def _run_inspect(args: argparse.Namespace) -> int:
    print(inspect_weights(args.checkpoint, config_dir=args.config_dir))
    return 0


register_command(Command(
    "validate-config", "check ctvq JSON configs against the configuration reference",
    _configure_validate, _run_validate, expected_errors=(ConfigError,)))
register_command(Command(
    "inspect-weights", "print what a checkpoint holds and which model config matches it",
    _configure_inspect, _run_inspect, expected_errors=(PretrainedWeightsError,)))


def _register_model_commands() -> None:
    """Training and evaluation commands live with their packages; registered here for `ctvq --help`."""
    from ctvq.eval import command as eval_command
    from ctvq.train import command as train_command

    register_command(Command(
        "train", "train the sparse SDF VQ-VAE (stage 1: codebook, stage 2: joint)",
        train_command.add_arguments, train_command.run, expected_errors=train_command.EXPECTED_ERRORS))
    register_command(Command(
        "eval", "metrics, figures and meshes of a checkpoint on preprocessed cases",
        eval_command.add_eval_arguments, eval_command.run_eval, expected_errors=eval_command.EXPECTED_ERRORS))
    register_command(Command(
        "encode", "a CT scan or sample -> token grid (latent coords + code indices)",
        eval_command.add_encode_arguments, eval_command.run_encode,
        expected_errors=eval_command.EXPECTED_ERRORS))
    register_command(Command(
        "decode", "a token grid -> reconstructed surface mesh (PLY) and sparse SDF",
        eval_command.add_decode_arguments, eval_command.run_decode,
        expected_errors=eval_command.EXPECTED_ERRORS))


_register_model_commands()
