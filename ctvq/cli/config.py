"""The ``validate-config`` and ``inspect-weights`` subcommands; ``ctvq.cli`` imports this on their dispatch.

Validating a config needs no torch; only inspecting weights imports the models (inside its run function).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ctvq.config import ConfigError, config_warnings, load_config


def configure_validate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, nargs="+", help="ctvq JSON config file(s)")
    parser.add_argument("--resolved", action="store_true", help="print the fully resolved config")


def run_validate(args: argparse.Namespace) -> int:
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


def configure_inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="Direct3D-S2 VAE file or ctvq checkpoint")
    parser.add_argument("--config-dir", type=Path, default=None,
                        help="folder of model configs to match against (default: configs/vqvae)")


def run_inspect(args: argparse.Namespace) -> int:
    # torch: only when weights are inspected
    from ctvq.models.pretrained import PretrainedWeightsError, inspect_weights

    report, problems = inspect_weights(args.checkpoint, config_dir=args.config_dir)
    print(report, flush=True)
    if problems:
        raise PretrainedWeightsError(f"{args.checkpoint}: the tensors do not make a complete model ("
                                     f"{problems[0]}): a damaged or edited file")
    return 0

