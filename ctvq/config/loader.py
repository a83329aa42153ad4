"""Load, validate and resolve a training config (JSON, sections ``models`` / ``dataset`` / ``trainer``).

All problems of a file are collected and raised together as one :class:`ConfigError`; no work starts on a
config with any problem. Accepted spellings beyond the strict schema, kept for compatibility with the
reference and TRELLIS configs:
- the dataset class name as ``dataset.name`` or ``dataset.args.name`` (an error if both are given and differ);
- ``trainer.args.lr`` as a shorthand for ``trainer.args.optimizer.args.lr`` (an error if both differ);
- ``lr_scheduler: null`` or ``{"name": null}`` for a constant learning rate; ``grad_clip`` as a number.
A top-level ``description`` string (ctvq extra) documents a config file for humans.
"""

from __future__ import annotations

import copy
import json
import math
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ctvq.config.errors import ConfigError, Problem, Problems, show
from ctvq.config.fields import POSITIVE, check_value, field_names, parse_fields, unknown_key
from ctvq.config.rules import cross_checks
from ctvq.config.schema import (
    CTVQConfig,
    DatasetConfig,
    GradClipConfig,
    ModelConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainerConfig,
)
from ctvq.ct.sample import LATENT_STRIDE

_MISSING: Any = object()
_WRAPPER = ("name", "args")
DEFAULT_BATCH_SPLIT = 2
_STAGE_SCHEDULER = {1: "CosineAnnealingLR", 2: "ExponentialLR"}


def _accepted_keys() -> dict[str, tuple[str, ...]]:
    """Every section path and the keys it accepts."""

    def args_of(cls: type) -> tuple[str, ...]:
        return tuple(n for n in field_names(cls) if n != "name")

    nested = ("optimizer", "lr_scheduler", "grad_clip")
    return {
        "<top>": ("models", "dataset", "trainer", "description"),
        "models": ("vqvae",),
        "models.vqvae": _WRAPPER,
        "models.vqvae.args": args_of(ModelConfig),
        "dataset": _WRAPPER,
        "dataset.args": field_names(DatasetConfig),
        "trainer": _WRAPPER,
        "trainer.args": (*(n for n in args_of(TrainerConfig) if n not in nested), *nested, "lr"),
        "trainer.args.optimizer": _WRAPPER,
        "trainer.args.optimizer.args": args_of(OptimizerConfig),
        "trainer.args.lr_scheduler": _WRAPPER,
        "trainer.args.lr_scheduler.args": args_of(SchedulerConfig),
        "trainer.args.grad_clip": _WRAPPER,
        "trainer.args.grad_clip.args": args_of(GradClipConfig),
    }


ACCEPTED_KEYS: Mapping[str, tuple[str, ...]] = _accepted_keys()


def _homes() -> dict[str, tuple[str, ...]]:
    """Key -> the sections where it is valid (``name``/``args`` are everywhere and give no hint)."""
    homes: dict[str, list[str]] = {}
    for section, keys in ACCEPTED_KEYS.items():
        for key in keys:
            if key not in _WRAPPER and section != "<top>":
                homes.setdefault(key, []).append(section)
    return {k: tuple(v) for k, v in homes.items()}


KEY_HOMES: Mapping[str, tuple[str, ...]] = _homes()


def _object(value: Any, path: str, problems: Problems, what: str) -> dict[str, Any] | None:
    """``value`` if it is a JSON object (unknown keys of section ``path`` are reported), else None."""
    if value is _MISSING:
        return {}
    if not isinstance(value, dict):
        problems.add(path, f"expected an object {what}, got {show(value)}")
        return None
    accepted = ACCEPTED_KEYS[path]
    for key in value:
        if key not in accepted:
            unknown_key(key, path, accepted, problems, KEY_HOMES)
    return value


def _name(section: Mapping[str, Any], cls: type, path: str, problems: Problems, default: Any) -> Any:
    """The component name of a {name, args} section, or None when it is invalid (already reported)."""
    raw = section.get("name", default)
    ok, value = check_value(raw, typing.get_type_hints(cls)["name"], None, f"{path}.name", problems)
    return value if ok else None


def _stage(trainer_args: Mapping[str, Any]) -> int | None:
    raw = trainer_args.get("training_stage")
    return raw if type(raw) is int and raw in (1, 2) else None


def _model(top: Mapping[str, Any], stage: int | None, problems: Problems) -> dict[str, Any] | None:
    models = _object(top.get("models", _MISSING), "models", problems, '{"vqvae": {...}}')
    if models is None:
        return None
    vqvae = _object(models.get("vqvae", _MISSING), "models.vqvae", problems, "{name, args}")
    if vqvae is None:
        return None
    name = _name(vqvae, ModelConfig, "models.vqvae", problems, "SparseSDFVQVAE")
    args = _object(vqvae.get("args", _MISSING), "models.vqvae.args", problems, "of model arguments")
    if args is None or name is None:
        return None
    values, bad = parse_fields(ModelConfig, args, "models.vqvae.args", problems, stage=stage)
    values["name"] = name
    return None if bad else values


def _dataset(top: Mapping[str, Any], stage: int | None, problems: Problems) -> dict[str, Any] | None:
    dataset = _object(top.get("dataset", _MISSING), "dataset", problems, "{name, args}")
    if dataset is None:
        return None
    args = _object(dataset.get("args", _MISSING), "dataset.args", problems, "of dataset arguments")
    if args is None:
        return None
    outer = _name(dataset, DatasetConfig, "dataset", problems, _MISSING) if "name" in dataset else _MISSING
    inner = _name(args, DatasetConfig, "dataset.args", problems, _MISSING) if "name" in args else _MISSING
    name = next((n for n in (outer, inner) if n is not _MISSING), "CTWindowSparseSDF")
    if outer is not _MISSING and inner is not _MISSING and None not in (outer, inner) and outer != inner:
        problems.add(
            "dataset.args.name",
            f"{show(inner)} disagrees with dataset.name {show(outer)}: give the dataset class name once",
        )
        name = None
    values, bad = parse_fields(DatasetConfig, args, "dataset.args", problems, stage=stage)
    values["name"] = name
    return None if bad or name is None else values


def _optimizer(trainer_args: Mapping[str, Any], stage: int | None, problems: Problems) -> Any:
    path = "trainer.args.optimizer"
    section = _object(trainer_args.get("optimizer", _MISSING), path, problems, "{name, args}")
    if section is None:
        return None
    name = _name(section, OptimizerConfig, path, problems, "AdamW")
    args = _object(section.get("args", _MISSING), f"{path}.args", problems, "of optimizer arguments")
    if name is None or args is None:
        return None
    values, bad = parse_fields(OptimizerConfig, args, f"{path}.args", problems, stage=stage, name=name)
    if "lr" in trainer_args:
        ok, short = check_value(trainer_args["lr"], float, POSITIVE, "trainer.args.lr", problems)
        if not ok:
            return None
        if "lr" in args and "lr" in values and values["lr"] != short:
            problems.add(
                "trainer.args.lr",
                f"{show(trainer_args['lr'])} disagrees with {path}.args.lr {show(args['lr'])}: "
                "give the learning rate once (trainer.args.lr is a shorthand for optimizer.args.lr)",
            )
            return None
        values["lr"] = short
        bad.discard("lr")
    if bad:
        return None
    return OptimizerConfig(name=name, **values)


def _scheduler(trainer_args: Mapping[str, Any], stage: int | None, problems: Problems) -> Any:
    """SchedulerConfig, None for "no scheduler", or _MISSING when invalid/unresolvable."""
    path = "trainer.args.lr_scheduler"
    raw = trainer_args.get("lr_scheduler", _MISSING)
    if raw is None:
        return None
    section = _object(raw, path, problems, "{name, args} or null")
    if section is None:
        return _MISSING
    default_name = _STAGE_SCHEDULER.get(stage, _MISSING)
    if "name" in section and section["name"] is None:
        if section.get("args"):
            problems.add(f"{path}.args", "given with lr_scheduler name null (no scheduler): remove args")
        return None
    if "name" not in section and default_name is _MISSING:
        return _MISSING  # stage invalid: its own error is reported
    name = _name(section, SchedulerConfig, path, problems, default_name)
    args = _object(section.get("args", _MISSING), f"{path}.args", problems, "of scheduler arguments")
    if name is None or args is None:
        return _MISSING
    values, bad = parse_fields(SchedulerConfig, args, f"{path}.args", problems, stage=stage, name=name)
    return _MISSING if bad else SchedulerConfig(name=name, **values)


def _grad_clip(trainer_args: Mapping[str, Any], problems: Problems) -> Any:
    """GradClipConfig, None for "no clipping", or _MISSING when invalid."""
    path = "trainer.args.grad_clip"
    raw = trainer_args.get("grad_clip", _MISSING)
    if raw is None:
        return None
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        ok, value = check_value(raw, float, POSITIVE, path, problems)
        return GradClipConfig(name="norm", max_norm=value, clip_percentile=None) if ok else _MISSING
    what = "{name: AdaptiveGradClipper, args: {max_norm, clip_percentile}}, a number (norm clip) or null"
    section = _object(raw, path, problems, what)
    if section is None:
        return _MISSING
    name = _name(section, GradClipConfig, path, problems, "AdaptiveGradClipper")
    args = _object(section.get("args", _MISSING), f"{path}.args", problems, "of clipper arguments")
    if name is None or args is None:
        return _MISSING
    values, bad = parse_fields(GradClipConfig, args, f"{path}.args", problems, stage=None, name=name)
    return _MISSING if bad else GradClipConfig(name=name, **values)


def _trainer(top: Mapping[str, Any], problems: Problems) -> tuple[dict[str, Any] | None, int | None]:
    trainer = _object(top.get("trainer", _MISSING), "trainer", problems, "{name, args}")
    if trainer is None:
        return None, None
    name = _name(trainer, TrainerConfig, "trainer", problems, "VQVAETrainer")
    args = _object(trainer.get("args", _MISSING), "trainer.args", problems, "of trainer arguments")
    if args is None:
        return None, None
    stage = _stage(args)
    values, bad = parse_fields(TrainerConfig, args, "trainer.args", problems, stage=stage)
    if "batch_split" not in args and "batch_size_per_gpu" in values:
        # The reference's defaults (batch_split 2, stage-2 batch_size_per_gpu 1) contradict each other: the
        # default is 2 capped to a divisor of the batch; an explicit batch_split must divide it.
        values["batch_split"] = math.gcd(DEFAULT_BATCH_SPLIT, values["batch_size_per_gpu"])
    optimizer = _optimizer(args, stage, problems)
    scheduler = _scheduler(args, stage, problems)
    clip = _grad_clip(args, problems)
    if bad or name is None or optimizer is None or scheduler is _MISSING or clip is _MISSING:
        return None, stage
    values.update(name=name, optimizer=optimizer, lr_scheduler=scheduler, grad_clip=clip)
    return values, stage


def config_from_dict(data: Any, origin: str = "<dict>") -> CTVQConfig:
    """Validate a parsed config and return it with every default resolved. Raises ConfigError listing every
    problem, each naming ``origin`` and the key path."""
    problems = Problems(origin)
    top = _object(data, "<top>", problems, "with models / dataset / trainer sections")
    if top is None:
        problems.raise_if_any()
    description = top.get("description", "")
    if not isinstance(description, str):
        problems.add("description", f"expected a string, got {show(description)}")
    trainer, stage = _trainer(top, problems)
    model = _model(top, stage, problems)
    dataset = _dataset(top, stage, problems)
    misnamed = [key for key in top if key not in ACCEPTED_KEYS["<top>"]]
    if not misnamed:
        # A misnamed section (``model`` for ``models``) leaves the real one at its defaults: rules reading
        # them would report follow-up errors of the typo, not mistakes of the user.
        cross_checks(model, dataset, trainer, problems)
    # Report in the file's order of sections (the trainer is read first because the stage sets defaults),
    # unknown top-level keys first.
    order = {key: (key in ACCEPTED_KEYS["<top>"], i) for i, key in enumerate(top)}
    problems.items.sort(key=lambda p: order.get(p.path.split(".")[0], (True, -1)))
    problems.raise_if_any()
    if model is None or dataset is None or trainer is None:
        raise RuntimeError(f"internal error: {origin} has an unresolved section but no problem was recorded")
    return CTVQConfig(
        model=ModelConfig(**model),
        dataset=DatasetConfig(**dataset),
        trainer=TrainerConfig(**trainer),
        description=description,
        origin=origin,
    )


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def load_config(path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> CTVQConfig:
    """Read and validate a JSON config file; every error names this file.

    ``overrides`` (dotted key -> value, e.g. from command-line flags) are set in the parsed file before it
    is validated, so a rule such as "stage 2 needs pretrained_vae_path" sees the value a flag gives.
    """
    origin = str(path)
    file = Path(path)
    if not file.is_file():
        reason = "is a directory, not a config file" if file.is_dir() else "does not exist"
        raise ConfigError(origin, [Problem("(file)", reason)])
    try:
        data = json.loads(file.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as exc:
        raise ConfigError(origin, [Problem("(file)", f"not UTF-8 text: {exc.reason}")]) from None
    except json.JSONDecodeError as exc:
        where = f"(line {exc.lineno}, column {exc.colno})"
        raise ConfigError(origin, [Problem(where, f"invalid JSON: {exc.msg}")]) from None
    except _DuplicateKey as exc:
        raise ConfigError(
            origin, [Problem("(json)", f"key {str(exc)!r} appears twice in one object: keep one")]
        ) from None
    if overrides:
        data = _overridden(data, overrides, origin)
        origin = f"{origin} (with command-line overrides of {', '.join(overrides)})"
    return config_from_dict(data, origin=origin)


def resolution_overrides(resolution: int) -> dict[str, int]:
    """The overrides that put a config at another data resolution (``ctvq train --resolution``).

    The samples decide both numbers: the dataset's cube side, and the model's latent grid, 1/8 of it. One
    model config then trains any window at the resolution the pipeline preprocessed it at, as ``--window``
    and ``--band`` do for the window and the band. A side that is not a multiple of 8 is refused by the
    config's own rule on ``dataset.args.resolution``.
    """
    return {"dataset.args.resolution": resolution,
            "models.vqvae.args.resolution": resolution // LATENT_STRIDE}


def _overridden(data: Any, overrides: Mapping[str, Any], origin: str) -> Any:
    if not isinstance(data, dict):
        return data  # config_from_dict reports the file's shape
    data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(origin, [Problem(key, f"expected an object (to set {dotted}), got "
                                                        f"{show(child)}")])
            node = child
        node[leaf] = value
    return data


def resolve_path(
    cfg_path: str | os.PathLike[str],
    value: str | None,
    *,
    key: str = "trainer.args.pretrained_vae_path",
    must_exist: bool = False,
) -> Path | None:
    """Where a path written in a config points: ``~`` expanded, relative paths taken from the CURRENT WORKING
    DIRECTORY (not the config file's folder), as in the reference's examples (``./vae_weights/...``), which
    assume runs from the project root. ``cfg_path`` and ``key`` only name the source in errors."""
    if value is None:
        return None
    resolved = Path(value).expanduser()
    resolved = resolved if resolved.is_absolute() else Path.cwd() / resolved
    if must_exist and not resolved.exists():
        raise ConfigError(
            str(cfg_path),
            [
                Problem(
                    key,
                    f"{show(value)} does not exist (looked for {resolved}; relative paths are taken "
                    "from the working directory)",
                )
            ],
        )
    return resolved
