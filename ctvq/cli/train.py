"""``ctvq train``: the command line of the trainer.

Multi-process: ``torchrun --nproc_per_node N -m ctvq train --config ... --data ... --output-dir ...``
(NCCL on GPUs, gloo on CPU). The config is loaded and validated before anything else happens.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from ctvq.atomic import FileSystemError
from ctvq.config import ConfigError, CTVQConfig, load_config, resolution_overrides
from ctvq.ct.sample import SampleFormatError
from ctvq.data.datasets import DatasetError
from ctvq.models import PretrainedWeightsError
from ctvq.train.checkpoint import CheckpointError
from ctvq.train.distributed import ReplicaMismatchError, setup, teardown
from ctvq.train.lock import RunLock, RunLockError
from ctvq.train.oom import TrainingOutOfMemory, is_out_of_memory, out_of_memory_error
from ctvq.train.stop import TrainingInterrupted
from ctvq.train.trainer import RunOptions, Trainer

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, CheckpointError, DatasetError, SampleFormatError, PretrainedWeightsError,
    ReplicaMismatchError, RunLockError, TrainingOutOfMemory,
)
"""Failures caused by the user's files or settings (reported without a traceback)."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True,
                        help="training config JSON (configs/vqvae/*.json)")
    parser.add_argument("--data", type=Path, required=True,
                        help="samples: a manifest CSV (`ctvq manifest`) or a folder of sample .npz files")
    parser.add_argument("--output-dir", type=Path, required=True,
                        help="run folder: config.json, command.txt, log.txt, metrics.csv, tensorboard/, "
                             "samples/, ckpts/ (final model: ckpts/final.pt)")
    parser.add_argument("--resume", default="auto",
                        help="auto: continue from the latest complete checkpoint in --output-dir (default); "
                             "never: start fresh (refused if the folder holds checkpoints); "
                             "or a checkpoint file")
    parser.add_argument("--allow-data-change", action="store_true",
                        help="resume although --data lists other training cases than the run folder's "
                             "data.json (refused by default: the checkpoints learned from other data)")
    parser.add_argument("--window", default=None,
                        help="override dataset.args.window_type (one config trains any window; the workflow "
                             "passes its window wildcard)")
    parser.add_argument("--band", type=float, default=None,
                        help="override dataset.args.band: the band (voxels) the samples were made with "
                             "(the workflow passes its `band`)")
    parser.add_argument("--resolution", type=_positive, default=None,
                        help="override dataset.args.resolution (the samples' cube side) and "
                             "models.vqvae.args.resolution (1/8 of it): one config trains at any resolution "
                             "(the workflow passes its window's `resolution`)")
    parser.add_argument("--pretrained-vae-path", default=None,
                        help="override trainer.args.pretrained_vae_path (stage 2: stage 1's ckpts/final.pt)")
    parser.add_argument("--max-steps", type=_positive, default=None,
                        help="override trainer.args.max_steps (recorded in the run's config.json)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--threads", type=_positive, default=None,
                        help="torch CPU threads (torch.set_num_threads)")
    parser.add_argument("--deterministic", action="store_true",
                        help="torch.use_deterministic_algorithms(True), for CUDA runs (an op without a "
                             "deterministic kernel then fails). CPU runs repeat bit for bit at the same "
                             "--threads without it")
    parser.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard events")


def _with_overrides(args: argparse.Namespace) -> CTVQConfig:
    """The config with the command-line overrides set before validation (cross-field rules see them)."""
    flags = {"dataset.args.window_type": args.window,
             "dataset.args.band": args.band,
             **(resolution_overrides(args.resolution) if args.resolution is not None else {}),
             "trainer.args.pretrained_vae_path": args.pretrained_vae_path,
             "trainer.args.max_steps": args.max_steps}
    return load_config(args.config, {k: v for k, v in flags.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise FileSystemError(f"{args.output_dir}: --output-dir names a file, not a folder; choose another")
    cfg = _with_overrides(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    info = setup(args.device)
    options = RunOptions(output_dir=args.output_dir, data=args.data, resume=args.resume,
                         allow_data_change=args.allow_data_change,
                         tensorboard=not args.no_tensorboard, argv=tuple(sys.argv))
    # rank 0 holds the run folder for the whole job (torchrun's other ranks are the same job)
    lock = RunLock(args.output_dir) if info.is_main else contextlib.nullcontext()
    try:
        with lock:
            if isinstance(lock, RunLock) and lock.took_over:
                print(f"ctvq train: {args.output_dir}: took over the run lock of a dead trainer "
                      f"({lock.took_over})", file=sys.stderr, flush=True)
            try:
                Trainer(cfg, options, info).run()
            except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
                if not is_out_of_memory(exc):
                    raise
                raise out_of_memory_error(exc, cfg, args.config, args.data, args.output_dir,
                                          info.device) from exc
    except TrainingInterrupted as stopped:
        print(f"ctvq train: {stopped}: checkpoint saved in {args.output_dir / 'ckpts'}; the same command "
              "resumes from it", file=sys.stderr, flush=True)
        return stopped.exit_code
    finally:
        teardown()
    return 0
