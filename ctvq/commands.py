"""Subcommands beyond preprocessing: config validation and checkpoint inspection (more register as they land).

Kept apart from ``ctvq/cli.py`` so the CLI core stays a small registry and each package owns its commands.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ctvq.cli import Command, register_command
from ctvq.config import ConfigError, load_config
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
