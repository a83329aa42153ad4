"""Load a trained VQ-VAE for evaluation and tokens, with the data settings it was trained on.

The checkpoint (``ckpts/final.pt`` or any ``vqvae_*step*.pt`` from ``ctvq train``) holds the weights, the
model's constructor arguments and a ``ctvq`` block. The window, resolution, band and iso value it was trained
with live in the run folder's ``config.json`` (``<run>/ckpts/final.pt`` -> ``<run>/config.json``), or in a
config file given explicitly. Anything else (a Direct3D-S2 VAE without codebook, a training-state file, a
random ``.pt``) is refused with one line saying what it is and what to pass instead.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ctvq.config import ConfigError, load_config
from ctvq.ct.sample import LATENT_STRIDE
from ctvq.device import resolve_device
from ctvq.models.vqvae import SparseSDFVQVAE, model_defaults
from ctvq.train.checkpoint import CheckpointError, load_file

CODEBOOK_KEY = "quantizer.embedding.weight"
RUN_CONFIG_NAME = "config.json"


class EvalInputError(ValueError):
    """An input of eval/encode/decode does not fit: wrong kind of file, other window or codebook size."""


@dataclass(frozen=True)
class DataSettings:
    """How the model's inputs were made: the preprocessing to repeat for a raw scan, checks for samples."""

    window: str
    window_width: float
    window_level: float
    resolution: int
    band: float
    iso_value: float
    origin: str  # the config file these came from

    def check_sample(self, window: str, width: float, level: float, resolution: int, band: float,
                     what: str) -> None:
        """Raise EvalInputError naming ``what`` if a sample was made with other settings."""
        if window != self.window or not (np.isclose(width, self.window_width)
                                         and np.isclose(level, self.window_level)):
            raise EvalInputError(
                f"{what}: window {window!r} (W={width:g}, L={level:g}) but the checkpoint was trained on "
                f"{self.window!r} (W={self.window_width:g}, L={self.window_level:g}, from {self.origin}); "
                "preprocess the scan with the checkpoint's window"
            )
        if resolution != self.resolution:
            raise EvalInputError(f"{what}: resolution {resolution} but the checkpoint was trained at "
                                 f"{self.resolution} (from {self.origin})")
        if not np.isclose(band, self.band):
            raise EvalInputError(f"{what}: band {band:g} voxels but the checkpoint was trained with band "
                                 f"{self.band:g} (from {self.origin})")


@dataclass
class LoadedModel:
    model: SparseSDFVQVAE
    path: Path
    stage: int | None
    step: int | None

    @property
    def num_embeddings(self) -> int:
        return int(self.model.quantizer.embedding.weight.shape[0])

    @property
    def data_resolution(self) -> int:
        return LATENT_STRIDE * int(self.model.resolution)

    def decode_in_chunks(self, chunk_size: int) -> None:
        """Decode in ``chunk_size``^3 chunks from now on, whatever the training config said: each chunk is
        decoded with its halo, so the output is the same and only the memory (and time) changes."""
        resolution = int(self.model.resolution)
        if chunk_size < 1 or resolution % chunk_size:
            raise EvalInputError(f"--chunk-size {chunk_size}: must be >= 1 and divide the latent resolution "
                                 f"{resolution} of {self.path} (e.g. 1, 2, 4, 8)")
        self.model.chunk_size = chunk_size

    @property
    def codebook_sha256(self) -> str:
        """Identity of the code -> latent vector table: what a token index means under this checkpoint."""
        weight = self.model.quantizer.embedding.weight.detach().float().cpu().contiguous()
        return hashlib.sha256(weight.numpy().tobytes()).hexdigest()


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """The VQ-VAE of a ctvq checkpoint, strictly loaded, in eval mode."""
    device = resolve_device(device) if isinstance(device, str) else device
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{path}: checkpoint does not exist")
    try:
        payload = load_file(path)
    except CheckpointError as exc:
        raise EvalInputError(str(exc)) from exc
    if "vae" not in payload:
        if any(k in payload for k in ("optimizer", "scheduler", "rng")):
            what = "a training-state file (misc_step*.pt)"
        elif payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            what = "a raw state dict without model config"
        else:
            what = f"a dict with keys {sorted(map(str, payload))[:6]}"
        raise EvalInputError(f"{path}: {what}, not a ctvq model checkpoint; pass <run>/ckpts/final.pt "
                             "written by `ctvq train`")
    state, config, meta = payload["vae"], payload.get("config"), payload.get("ctvq")
    if not isinstance(state, Mapping) or CODEBOOK_KEY not in state:
        raise EvalInputError(f"{path}: no codebook ({CODEBOOK_KEY}) in the weights, e.g. a Direct3D-S2 VAE "
                             "file; tokens need a VQ-VAE trained by `ctvq train`")
    if not isinstance(meta, Mapping) or not isinstance(config, Mapping) or not isinstance(
            config.get("params"), Mapping):
        raise EvalInputError(f"{path}: not written by `ctvq train` (no 'ctvq' block or model params); "
                             "pass <run>/ckpts/final.pt")
    params = dict(config["params"])
    unknown = sorted(set(params) - set(model_defaults()))
    if unknown:
        raise EvalInputError(f"{path}: model params {unknown} unknown to this ctvq's SparseSDFVQVAE")
    params["sparse_backend"] = "auto"  # a checkpoint trained with spconv must still evaluate on CPU
    try:
        model = SparseSDFVQVAE(**params)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise EvalInputError(f"{path}: weights do not fit the model their config describes ({first})"
                             ) from exc
    model.to(device).eval()
    stage = meta.get("stage")
    step = meta.get("step")
    return LoadedModel(model, path, int(stage) if stage is not None else None,
                       int(step) if step is not None else None)


def run_config_path(ckpt: str | os.PathLike) -> Path:
    """Where ``ctvq train`` put the resolved config of the run a checkpoint belongs to."""
    ckpt = Path(ckpt)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "ckpts" else ckpt.parent
    return run_dir / RUN_CONFIG_NAME


def load_settings(ckpt: str | os.PathLike, config: str | os.PathLike | None = None) -> DataSettings:
    """Data settings from ``config`` or, when None, from the checkpoint's run folder."""
    path = Path(config) if config is not None else run_config_path(ckpt)
    if not path.is_file():
        hint = "" if config is not None else " (the run folder of the checkpoint has none)"
        raise EvalInputError(f"{path}: training config not found{hint}; pass --config with the config "
                             "the checkpoint was trained with")
    try:
        dataset = load_config(path).dataset
    except ConfigError as exc:
        raise EvalInputError(str(exc)) from exc  # every problem of the config, one per line
    width, level = dataset.window()
    return DataSettings(dataset.window_type, float(width), float(level), int(dataset.resolution),
                        float(dataset.band), float(dataset.iso_value), str(path))


def check_model_settings(loaded: LoadedModel, settings: DataSettings) -> None:
    """The config's data resolution must be what the model decodes (8 x its latent resolution)."""
    if settings.resolution != loaded.data_resolution:
        raise EvalInputError(
            f"{settings.origin}: dataset resolution {settings.resolution} but the checkpoint {loaded.path} "
            f"decodes {loaded.data_resolution}^3 (latent {loaded.model.resolution}); wrong config for it"
        )


__all__ = ["DataSettings", "EvalInputError", "LoadedModel", "check_model_settings",
           "load_model", "load_settings", "run_config_path"]
