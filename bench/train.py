"""Benchmark: training step rate, data-loading share of step time and peak memory for a training config.

Runs the real trainer's steps (stage 1 from the config, then stage 2 from that model's weights) on phantom
data at 64³ (made with ``ctvq demo`` unless --data is given) and writes JSON. With --codebook-health it also
trains stage 1 once per codebook option set and reports codebook usage and perplexity.

    .venv/bin/python bench/train.py [--config configs/vqvae/tiny_stage1.json] [--steps 20] [--threads 2]
        [--codebook-health --health-steps 40] [--output bench/results/train.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rss import peak_rss_mb  # bench/ is the script's folder, so its siblings import by name

from ctvq.config import CTVQConfig, load_config
from ctvq.train.checkpoint import atomic_torch_save, model_payload
from ctvq.train.trainer import RunOptions, Trainer

HEALTH_VARIANTS: dict[str, dict[str, Any]] = {
    "random_init+loss_update": {"codebook_init": "random", "codebook_update": "loss"},
    "kmeans_init+loss_update": {"codebook_init": "kmeans", "codebook_update": "loss"},
    "random_init+ema_update": {"codebook_init": "random", "codebook_update": "ema"},
    "kmeans_init+ema_update": {"codebook_init": "kmeans", "codebook_update": "ema"},
    "random_init+loss_update+restart_1.0": {"codebook_init": "random", "codebook_update": "loss",
                                            "dead_code_threshold": 1.0},
    "random_init+ema_update+restart_0.5": {"codebook_init": "random", "codebook_update": "ema",
                                           "dead_code_threshold": 0.5},
    "kmeans_init+ema_update+restart_0.1": {"codebook_init": "kmeans", "codebook_update": "ema",
                                           "dead_code_threshold": 0.1},
    "kmeans_init+ema_update+restart_1.0": {"codebook_init": "kmeans", "codebook_update": "ema",
                                           "dead_code_threshold": 1.0},
}


def with_changes(cfg: CTVQConfig, trainer: dict[str, Any] | None = None,
                 model: dict[str, Any] | None = None) -> CTVQConfig:
    return dataclasses.replace(
        cfg,
        trainer=dataclasses.replace(cfg.trainer, **(trainer or {})),
        model=dataclasses.replace(cfg.model, **(model or {})),
    )


def time_steps(trainer: Trainer, steps: int, warmup: int) -> dict[str, Any]:
    """Run ``warmup + steps`` training steps; time the data fetch and the whole step separately."""
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    iterator = iter(trainer.loader)
    data_s = step_s = 0.0
    logs: dict[str, float] = {}
    for i in range(warmup + steps):
        tic = time.perf_counter()
        try:
            micro = next(iterator)
        except StopIteration:
            iterator = iter(trainer.loader)
            micro = next(iterator)
        toc = time.perf_counter()
        logs, _ = trainer.train_step(micro)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        if i >= warmup:
            data_s += toc - tic
            step_s += time.perf_counter() - tic
    out = {
        "steps_timed": steps,
        "steps_per_s": steps / step_s,
        "seconds_per_step": step_s / steps,
        "data_loading_share": data_s / step_s,
        "last_loss": logs.get("loss"),
        "peak_rss_mb": peak_rss_mb(),
    }
    if trainer.device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(trainer.device) / 2**20
    return out


def make_data(folder: Path, cases: int) -> Path:
    from ctvq.ct.demo import run_demo

    run_demo(folder, cases, 64, ["lung"])
    return folder / "lung" / "manifest.csv"


def next_batch(trainer: Trainer, iterator: Any) -> tuple[list[dict[str, Any]], Any]:
    try:
        return next(iterator), iterator
    except StopIteration:
        iterator = iter(trainer.loader)
        return next(iterator), iterator


def trained_encoder_file(stage2: Trainer, steps: int, path: Path) -> Path:
    """Train ``stage2`` for ``steps`` more steps and write its encoder + decoder WITHOUT the codebook, in the
    Direct3D-S2 layout: a stand-in for pretrained weights. A freshly initialised encoder cannot be used to
    judge the codebook: its zero-initialised output layer maps every voxel to the same latent."""
    iterator = iter(stage2.loader)
    for _ in range(steps):
        micro, iterator = next_batch(stage2, iterator)
        stage2.train_step(micro)
    state = {k: v for k, v in stage2.model_state().items() if not k.startswith("quantizer.")}
    atomic_torch_save({"vae": state}, path)
    return path


def codebook_health(cfg: CTVQConfig, data: Path, work: Path, steps: int, encoder: Path) -> dict[str, Any]:
    """Stage 1 from ``encoder`` with each codebook option set; usage/perplexity over the last quarter."""
    results = {}
    for name, model_changes in HEALTH_VARIANTS.items():
        run_cfg = with_changes(cfg, {"max_steps": steps, "ema_rate": (), "pretrained_vae_path": str(encoder)},
                               model_changes)
        options = RunOptions(work / f"health_{name}", data, resume="never", tensorboard=False)
        trainer = Trainer(run_cfg, options)
        iterator = iter(trainer.loader)
        history = []
        for _ in range(steps):
            micro, iterator = next_batch(trainer, iterator)
            logs, _ = trainer.train_step(micro)
            history.append(logs)
        tail = history[-max(1, steps // 4):]
        results[name] = {
            "model_options": model_changes,
            "usage_first_step": history[0]["usage"],
            "usage_last_quarter": sum(h["usage"] for h in tail) / len(tail),
            "perplexity_last_quarter": sum(h["perplexity"] for h in tail) / len(tail),
            "codebook_loss_first": history[0]["codebook_loss"],
            "codebook_loss_last_quarter": sum(h["codebook_loss"] for h in tail) / len(tail),
            "ema_usage_fraction": float((trainer.model.quantizer.usage_estimate() >= 1.0).float().mean()),
        }
        print(name, json.dumps(results[name]), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/vqvae/tiny_stage1.json"))
    parser.add_argument("--data", type=Path, default=None,
                        help="manifest or sample folder (default: phantoms)")
    parser.add_argument("--cases", type=int, default=2, help="phantom cases to make when --data is not given")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--codebook-health", action="store_true")
    parser.add_argument("--health-steps", type=int, default=40)
    parser.add_argument("--encoder-steps", type=int, default=40,
                        help="extra stage-2 steps that train the encoder used by --codebook-health")
    parser.add_argument("--output", type=Path, default=Path("bench/results/train.json"))
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(args.config)
    if cfg.stage != 1:
        parser.error(f"--config {args.config}: give a stage-1 config; stage 2 is benchmarked from its model")
    with tempfile.TemporaryDirectory(prefix="ctvq_bench_train_") as tmp:
        work = Path(tmp)
        data = args.data if args.data is not None else make_data(work / "data", args.cases)
        from ctvq.train.distributed import DistInfo

        info = DistInfo(0, 1, 0, device)
        stage1 = Trainer(cfg, RunOptions(work / "stage1", data, resume="never", tensorboard=False), info)
        result: dict[str, Any] = {
            "config": str(args.config),
            "data": str(args.data) if args.data is not None
            else f"{args.cases} phantom cases at 64^3 (ctvq demo)",
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "batch_size_per_gpu": cfg.trainer.batch_size_per_gpu,
            "batch_split": cfg.trainer.batch_split,
            "max_points": cfg.dataset.max_points,
            "stage1": time_steps(stage1, args.steps, args.warmup),
        }
        s1_path = work / "stage1.pt"
        atomic_torch_save(model_payload(stage1.model_state(), stage1.model.config, 1, stage1.step), s1_path)
        cfg2 = with_changes(cfg, {"training_stage": 2, "pretrained_vae_path": str(s1_path)})
        stage2 = Trainer(cfg2, RunOptions(work / "stage2", data, resume="never", tensorboard=False), info)
        result["stage2"] = time_steps(stage2, args.steps, args.warmup)
        if args.codebook_health:
            encoder = trained_encoder_file(stage2, args.encoder_steps, work / "encoder.pt")
            result["codebook_health"] = {
                "steps": args.health_steps,
                "encoder": f"this benchmark's stage-2 model after "
                           f"{args.encoder_steps + args.steps + args.warmup} steps, codebook removed "
                           "(stand-in for Direct3D-S2 weights)",
                "variants": codebook_health(cfg, data, work, args.health_steps, encoder),
            }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "codebook_health"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
