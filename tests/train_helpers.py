"""Small, fast inputs for the trainer tests: sphere samples at 64³ and a tiny model config.

A step of this model on these samples takes ~0.1 s on one CPU thread, so the tests can afford real
training runs (subprocesses, kills, two-process DDP) in a few seconds each.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from data_helpers import sphere_sample, write_manifest

from ctvq.cli import main as cli_main
from ctvq.config import config_from_dict
from ctvq.data import save_sample
from ctvq.models import SparseSDFVQVAE
from ctvq.train.checkpoint import atomic_torch_save, model_payload

BASE: dict[str, Any] = {
    "models": {"vqvae": {"name": "SparseSDFVQVAE", "args": {
        "resolution": 8, "model_channels": 32, "latent_channels": 4, "num_blocks": 1, "num_embeddings": 16,
        "num_head_channels": 16, "attn_mode": "full", "sparse_backend": "torch",
        # the gradient-trained codebook: these tests pin down what the optimizer does to it
        "codebook_init": "random", "codebook_update": "loss", "dead_code_threshold": 0.0,
    }}},
    "dataset": {"name": "CTWindowSparseSDF", "args": {
        "resolution": 64, "window_type": "lung", "min_points": 100, "max_points": 3000, "cache_data": True,
        "band": 1.5,  # write_data's spheres
    }},
    "trainer": {"name": "VQVAETrainer", "args": {
        "training_stage": 1, "pretrained_vae_path": None, "max_steps": 4, "batch_size_per_gpu": 2,
        "batch_split": 1, "num_workers": 0, "fp16_mode": None, "ema_rate": [0.9], "i_print": 1, "i_log": 1,
        "i_sample": 1000, "i_save": 2, "i_ddpcheck": 1, "seed": 0,
        "optimizer": {"name": "AdamW", "args": {"lr": 1e-3}},
        "lr_scheduler": {"name": "CosineAnnealingLR", "args": {"T_max": 100, "eta_min": 1e-5}},
        "grad_clip": {"name": "AdaptiveGradClipper", "args": {"max_norm": 1.0, "clip_percentile": 95}},
    }},
}


def write_data(folder: Path, cases: int = 4) -> Path:
    """``cases`` sphere samples of growing radius (~650 to ~2000 points, 8 to 27 latent cells), manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(cases):
        sample = sphere_sample(f"c{i}", spheres=[(32 + i, 32 - i, 32, 4 + 1.2 * i)], band=1.5)
        path = folder / f"c{i}.npz"
        save_sample(sample, path)
        paths.append(path)
    return write_manifest(folder / "manifest.csv", paths)


def config_dict(**trainer: Any) -> dict[str, Any]:
    """The tiny config with ``trainer.args`` overrides (``model_args=`` overrides the model's)."""
    cfg = copy.deepcopy(BASE)
    cfg["models"]["vqvae"]["args"].update(trainer.pop("model_args", {}))
    cfg["trainer"]["args"].update(trainer)
    return cfg


def write_config(path: Path, **trainer: Any) -> Path:
    path.write_text(json.dumps(config_dict(**trainer), indent=1))
    return path


def load(**trainer: Any):
    return config_from_dict(config_dict(**trainer))


def write_stage1_checkpoint(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A stage-1 checkpoint in the trainer's format for the tiny model (random weights); returns its state."""
    torch.manual_seed(seed)
    args = load().model.to_dict()["args"]
    model = SparseSDFVQVAE(**args)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    atomic_torch_save(model_payload(state, model.config, stage=1, step=10), path)
    return state


def train_main(argv: list[str]) -> int:
    """``ctvq train ARGV`` in this process, through the real command line's error handling."""
    return cli_main(["train", *argv])
