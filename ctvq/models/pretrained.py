"""Strict loading of pretrained weights: Direct3D-S2 sparse SDF VAE files and ctvq's own checkpoints.

Accepted files: ``{'vae': state_dict, 'config': {'params': {...}}}`` (Direct3D-S2's layout; ctvq writes the
same wrapper, see `checkpoint_payload`) or a raw state dict. Loading is all-or-nothing: missing,
unexpected and mis-shaped tensors and disagreeing architecture parameters are counted (the first few named) in
one `PretrainedWeightsError`. The known failure this prevents: a ``num_blocks: 8`` model silently keeping
random blocks 4-7 because the file holds 4.

A Direct3D-S2 file has no codebook (it is a VAE): when a file holds no ``quantizer.*`` tensor at all, the
encoder and decoder are filled strictly and the quantizer keeps its own initialisation (random, or k-means
on the first training batch). A ctvq checkpoint holds the quantizer too and loads whole.

Conv kernels are stored in torchsparse layout ([27, in, out], index x + 3y + 9z; [in, out] for 1x1) and our
modules keep that layout for every backend, so no tensor is converted here.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

QUANTIZER_PREFIX = "quantizer."
# Checkpoint config parameter -> our model config key. Direct3D-S2 names first, then ctvq's own names.
_PARAM_TO_MODEL = {
    "resolution": "resolution",
    "embed_dim": "latent_channels",
    "model_channels_encoder": "model_channels",
    "model_channels_decoder": "model_channels",
    "num_blocks_encoder": "num_blocks",
    "num_blocks_decoder": "num_blocks",
    "model_channels": "model_channels",
    "latent_channels": "latent_channels",
    "num_blocks": "num_blocks",
    "num_embeddings": "num_embeddings",
    "mlp_ratio": "mlp_ratio",
}
_BLOCK_KEY = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.")
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "vqvae"


class PretrainedWeightsError(ValueError):
    """A weights file does not fit the model; the message names the file and every difference."""


@dataclass(frozen=True)
class LoadReport:
    path: str
    loaded_keys: int
    codebook_loaded: bool  # False for a Direct3D-S2 VAE file: the quantizer kept its initialisation
    source_dtypes: tuple[str, ...]


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive format
_PICKLE_MAGIC = b"\x80"  # the legacy format: a pickle (protocol 2+)


def load_torch_file(path: str | os.PathLike, error: type[Exception] = PretrainedWeightsError) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with one-line reasons for what goes wrong.

    torch's own messages mislead here: an empty file gives "()", random bytes "Weights only load failed",
    and a file with pickled code suggests retrying with ``weights_only=False``, which would run that code.
    ctvq never does: such a file is refused, naming what it holds.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: checkpoint file does not exist")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        raise error(f"{path}: empty file (0 bytes): an interrupted save or copy; save or copy it again")
    if not head.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):
        raise error(f"{path}: not a torch checkpoint (neither a torch archive nor a pickle: it starts with "
                    f"bytes {head.hex()}); is it the right file?")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol 4": the refusal below says more
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"(?i)unsupported (?:global: )?GLOBAL ([\w.]+)", str(exc))
        what = f"the Python object {found.group(1)}" if found else "pickled Python objects, not just tensors"
        raise error(f"{path}: holds {what}; ctvq reads weights only (tensors in dicts and lists) and never "
                    "runs code from a checkpoint: re-save the weights with torch.save(model.state_dict(), "
                    "path)") from exc
    except (RuntimeError, EOFError) as exc:
        if head.startswith(_ZIP_MAGIC) or isinstance(exc, EOFError):
            raise error(f"{path}: a damaged or truncated torch archive (an interrupted save or copy); "
                        "save or copy it again") from exc
        raise error(f"{path}: not a readable torch checkpoint ({str(exc).strip().splitlines()[0][:200]})"
                    ) from exc


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict, config or None) from a wrapped or raw checkpoint, read with ``weights_only=True``."""
    path = Path(path)
    payload = load_torch_file(path)
    if not isinstance(payload, Mapping):
        raise PretrainedWeightsError(f"{path}: expected a dict, got {type(payload).__name__}")
    config: dict[str, Any] | None = None
    if "vae" in payload:
        state = payload["vae"]
        raw_config = payload.get("config")
        if raw_config is not None and not isinstance(raw_config, Mapping):
            kind = type(raw_config).__name__
            raise PretrainedWeightsError(f"{path}: 'config' is a {kind}, expected a dict")
        config = dict(raw_config) if raw_config is not None else None
    else:
        state = payload
    if not isinstance(state, Mapping) or not state:
        raise PretrainedWeightsError(f"{path}: no state dict found (expected {{'vae': state_dict}} or raw)")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise PretrainedWeightsError(
            f"{path}: entries that are not tensors: {', '.join(map(str, bad[:10]))}"
            + (" ..." if len(bad) > 10 else "")
            + " (a training checkpoint with optimizer state? pass the model weights file)"
        )
    return dict(state), config


def checkpoint_params(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The architecture parameters a checkpoint's config declares (``config['params']`` or empty)."""
    if config is None:
        return {}
    params = config.get("params", {})
    if not isinstance(params, Mapping):
        kind = type(params).__name__
        raise PretrainedWeightsError(f"checkpoint config 'params' is a {kind}, expected a dict")
    return dict(params)


def config_differences(params: Mapping[str, Any], model_config: Mapping[str, Any]) -> list[str]:
    """Architecture parameters where the checkpoint's config and the model's config disagree."""
    out = []
    for name, ours in _PARAM_TO_MODEL.items():
        if name in params and ours in model_config and params[name] != model_config[ours]:
            out.append(f"checkpoint {name}={params[name]!r} but model {ours}={model_config[ours]!r}")
    return out


def state_differences(
    expected: Mapping[str, torch.Size], given: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mis-shaped) keys of ``given`` against ``expected`` shapes, each sorted."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k])}"
        for k in set(expected) & set(given)
        if tuple(given[k].shape) != tuple(expected[k])
    )
    return missing, unexpected, misshaped


_LISTED = 6  # entries shown per kind of mismatch: 82 mis-shaped tensors on one line cannot be read


def _listing(items: list[str], sep: str) -> str:
    shown = sep.join(items[:_LISTED])
    return shown + (f"{sep}... and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


def _format_error(path: str, config_diffs: list[str], missing: list[str], unexpected: list[str],
                  misshaped: list[str]) -> str:
    lines = [f"{path}: weights do not fit the model (strict loading)"]
    if config_diffs:
        lines.append(f"  config mismatches ({len(config_diffs)}): " + "; ".join(config_diffs))
    if missing:
        lines.append(f"  missing keys ({len(missing)}): " + _listing(missing, ", "))
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): " + _listing(unexpected, ", "))
    if misshaped:
        lines.append(f"  mis-shaped ({len(misshaped)}): " + _listing(misshaped, "; "))
    lines.append("  fix: set the model config (model_channels, latent_channels, num_blocks, ...) to the "
                 "checkpoint's; `ctvq inspect-weights FILE` shows what the file holds")
    return "\n".join(lines)


def load_pretrained(
    model: nn.Module, path: str | os.PathLike, model_config: Mapping[str, Any] | None = None
) -> LoadReport:
    """Fill ``model`` from ``path`` strictly; tensors are cast to the dtype of the parameter they fill.

    ``model_config`` defaults to ``model.config`` (the constructor arguments of `SparseSDFVQVAE`).
    """
    path_str = str(path)
    state, config = read_checkpoint(path)
    if model_config is None:
        model_config = getattr(model, "config", {})
    target = model.state_dict()
    has_codebook = any(k.startswith(QUANTIZER_PREFIX) for k in state)
    expected = {
        k: v.shape for k, v in target.items() if has_codebook or not k.startswith(QUANTIZER_PREFIX)
    }
    config_diffs = config_differences(checkpoint_params(config), model_config)
    missing, unexpected, misshaped = state_differences(expected, state)
    if config_diffs or missing or unexpected or misshaped:
        raise PretrainedWeightsError(_format_error(path_str, config_diffs, missing, unexpected, misshaped))
    cast = {k: state[k].to(dtype=target[k].dtype) for k in expected}
    result = model.load_state_dict(cast, strict=has_codebook)
    leftover = [k for k in result.missing_keys if has_codebook or not k.startswith(QUANTIZER_PREFIX)]
    if leftover or result.unexpected_keys:  # cannot happen after the checks above; guards future edits
        raise PretrainedWeightsError(
            _format_error(path_str, [], leftover, list(result.unexpected_keys), [])
        )
    dtypes = tuple(sorted({str(v.dtype).removeprefix("torch.") for v in state.values()}))
    return LoadReport(path_str, len(cast), has_codebook, dtypes)


def checkpoint_payload(model: nn.Module) -> dict[str, Any]:
    """What ctvq writes for a model: the Direct3D-S2 wrapper with our constructor arguments as params."""
    return {
        "vae": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": {"name": type(model).__name__, "params": dict(getattr(model, "config", {}))},
    }


# -- inspection ------------------------------------------------------------------------------------------
def infer_model_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture read from tensor names and shapes (keys absent from the file are left out)."""
    out: dict[str, Any] = {}
    if "encoder.input_layer.weight" in state:
        out["model_channels"] = int(state["encoder.input_layer.weight"].shape[0])
    elif "decoder.input_layer.weight" in state:
        out["model_channels"] = int(state["decoder.input_layer.weight"].shape[0])
    if "decoder.input_layer.weight" in state:
        out["latent_channels"] = int(state["decoder.input_layer.weight"].shape[1])
    elif "encoder.out_layer.weight" in state:
        out["latent_channels"] = int(state["encoder.out_layer.weight"].shape[0]) // 2
    blocks: dict[str, set[int]] = {"encoder": set(), "decoder": set()}
    for key in state:
        match = _BLOCK_KEY.match(key)
        if match:
            blocks[match.group(1)].add(int(match.group(2)))
    for part, ids in blocks.items():
        if ids:
            out[f"num_blocks_{part}"] = max(ids) + 1
    if out.get("num_blocks_encoder") == out.get("num_blocks_decoder") and "num_blocks_encoder" in out:
        out["num_blocks"] = out["num_blocks_encoder"]
    mlp = state.get("encoder.blocks.0.mlp.mlp.0.weight")
    if mlp is not None and "model_channels" in out:
        out["mlp_ratio"] = float(mlp.shape[0]) / out["model_channels"]
    if "quantizer.embedding.weight" in state:
        out["num_embeddings"] = int(state["quantizer.embedding.weight"].shape[0])
    gamma = state.get("encoder.blocks.0.attn.q_rms_norm.gamma")
    if gamma is not None and gamma.ndim == 2:
        out.update(qk_rms_norm=True, num_heads=int(gamma.shape[0]), num_head_channels=None)
    return out


def layout_problems(state: Mapping[str, torch.Tensor], inferred: Mapping[str, Any]) -> list[str]:
    """What keeps ``state`` from loading strictly into the model of the inferred architecture (the
    defaults for what the file does not show): missing, unexpected and mis-shaped tensors. The model is
    built on the meta device, so a 1024-scale layout costs no memory."""
    from ctvq.models.vqvae import SparseSDFVQVAE

    args = {k: v for k, v in inferred.items() if k in _model_defaults()}
    if not args.get("qk_rms_norm"):  # no tensor shows the head split: one head builds any channel count
        args.update(num_heads=1, num_head_channels=None)
    if "num_blocks" not in args and "num_blocks_encoder" in inferred:
        return [f"encoder has {inferred.get('num_blocks_encoder')} blocks but decoder "
                f"{inferred.get('num_blocks_decoder')}: no ctvq model has that layout"]
    try:
        with torch.device("meta"):
            model = SparseSDFVQVAE(**args)
    except ValueError as exc:
        return [f"the inferred architecture cannot be built: {exc}"]
    has_codebook = any(k.startswith(QUANTIZER_PREFIX) for k in state)
    expected = {k: v.shape for k, v in model.state_dict().items()
                if has_codebook or not k.startswith(QUANTIZER_PREFIX)}
    missing, unexpected, misshaped = state_differences(expected, state)
    kinds = (("missing tensors", missing, ", "), ("unexpected tensors", unexpected, ", "),
             ("mis-shaped", misshaped, "; "))
    return [f"{what} ({len(items)}): {_listing(items, sep)}" for what, items, sep in kinds if items]


def _config_args(path: Path) -> dict[str, Any]:
    """The model arguments of a ctvq config file: ``models.vqvae.args``."""
    data = json.loads(path.read_text(encoding="utf-8"))
    try:
        args = data["models"]["vqvae"]["args"]
    except (KeyError, TypeError) as exc:
        raise PretrainedWeightsError(f"{path}: no models.vqvae.args in this config") from exc
    if not isinstance(args, dict):
        raise PretrainedWeightsError(f"{path}: models.vqvae.args is not an object")
    return args


def _model_defaults() -> dict[str, Any]:
    from ctvq.models.vqvae import model_defaults

    return model_defaults()


def matching_configs(inferred: Mapping[str, Any], config_dir: Path) -> list[tuple[str, list[str]]]:
    """(config file name, differences) for every ``*.json`` in ``config_dir``; no differences = a match."""
    defaults = _model_defaults()
    keys = ("model_channels", "latent_channels", "num_blocks", "mlp_ratio", "num_embeddings")
    rows = []
    for path in sorted(config_dir.glob("*.json")):
        args = {**defaults, **_config_args(path)}
        diffs = [
            f"{k}: file {inferred[k]!r} vs config {args.get(k)!r}"
            for k in keys
            if k in inferred and args.get(k) != inferred[k]
        ]
        if "num_blocks" not in inferred and "num_blocks_encoder" in inferred:
            diffs.append(
                f"num_blocks: file has {inferred['num_blocks_encoder']} encoder / "
                f"{inferred.get('num_blocks_decoder')} decoder blocks, the model needs equal counts"
            )
        rows.append((path.name, diffs))
    return rows


def inspect_weights(path: str | os.PathLike, config_dir: str | os.PathLike | None = None
                    ) -> tuple[str, list[str]]:
    """(a human-readable report: tensors, parameter count, dtypes, inferred architecture, layout check,
    matching configs; the layout problems, empty when the file loads strictly into the inferred model)."""
    state, config = read_checkpoint(path)
    config_dir = Path(config_dir) if config_dir is not None else DEFAULT_CONFIG_DIR
    numel = sum(int(v.numel()) for v in state.values())
    dtypes: dict[str, int] = {}
    for v in state.values():
        name = str(v.dtype).removeprefix("torch.")
        dtypes[name] = dtypes.get(name, 0) + 1
    groups: dict[str, int] = {}
    for k in state:
        groups[k.split(".")[0]] = groups.get(k.split(".")[0], 0) + 1
    inferred = infer_model_config(state)
    lines = [
        f"file: {path}",
        f"tensors: {len(state)}  ({', '.join(f'{g}: {n}' for g, n in sorted(groups.items()))})",
        f"parameters: {numel:,}",
        f"dtypes: {', '.join(f'{d} x{n}' for d, n in sorted(dtypes.items()))}",
        "codebook: "
        + ("yes" if "quantizer.embedding.weight" in state else "no (a VAE file: codebook keeps its init)"),
        "inferred model config: " + ", ".join(f"{k}={v}" for k, v in inferred.items()),
    ]
    params = checkpoint_params(config)
    if params:
        lines.append("file config params: " + ", ".join(f"{k}={v!r}" for k, v in sorted(params.items())))
    problems = layout_problems(state, inferred)
    lines.append("layout: " + ("complete (loads strictly into the inferred model)" if not problems else
                               "INCOMPLETE, loads into no model: " + "; ".join(problems)))
    if not config_dir.is_dir():
        lines.append(f"configs: {config_dir} does not exist; no config compared")
        return "\n".join(lines), problems
    rows = matching_configs(inferred, config_dir)
    matches = [name for name, diffs in rows if not diffs and not problems]
    lines.append(f"matching configs in {config_dir}: {', '.join(matches) if matches else 'none'}")
    for name, diffs in rows:
        if diffs:
            lines.append(f"  {name}: " + "; ".join(diffs))
    return "\n".join(lines), problems


__all__ = [
    "LoadReport",
    "PretrainedWeightsError",
    "checkpoint_params",
    "checkpoint_payload",
    "config_differences",
    "infer_model_config",
    "inspect_weights",
    "layout_problems",
    "load_pretrained",
    "load_torch_file",
    "matching_configs",
    "read_checkpoint",
    "state_differences",
]
