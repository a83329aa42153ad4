"""The configuration reference, generated from the schema: every key, its type, default, check, whether it
changes peak memory, and what it does (the ``doc`` of its field spec).

``python -m ctvq.config.reference > docs/CONFIG.md`` writes it; a test keeps the committed file in sync, so
the reference cannot drift from what ``ctvq validate-config`` and ``ctvq train`` accept.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from ctvq.config import schema
from ctvq.config.errors import show
from ctvq.config.fields import REQUIRED, describe_type

SECTIONS: tuple[tuple[str, type], ...] = (
    ("models.vqvae.args", schema.ModelConfig),
    ("dataset.args", schema.DatasetConfig),
    ("trainer.args", schema.TrainerConfig),
    ("trainer.args.optimizer.args", schema.OptimizerConfig),
    ("trainer.args.lr_scheduler.args", schema.SchedulerConfig),
    ("trainer.args.grad_clip.args", schema.GradClipConfig),
)
_NESTED = {"optimizer": "trainer.args.optimizer", "lr_scheduler": "trainer.args.lr_scheduler",
           "grad_clip": "trainer.args.grad_clip"}


def _value(value: Any) -> str:
    if value is REQUIRED:
        return "required"
    return f"`{show(list(value) if isinstance(value, tuple) else value)}`"


def _default(field: dataclasses.Field) -> str:
    meta = field.metadata
    if meta.get("nested"):
        return f"see `{_NESTED[field.name]}.args`"
    if meta.get("stage") is not None:
        one, two = meta["stage"]
        return f"stage 1: {_value(one)}, stage 2: {_value(two)}"
    if meta.get("by_name") is not None:
        return "; ".join(f"{name}: {_value(v)}" for name, v in meta["by_name"].items()) + "; others: absent"
    if field.default is dataclasses.MISSING:
        return "required"
    return _value(field.default)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def section_table(cls: type) -> list[str]:
    """The Markdown rows of one config section."""
    hints = typing.get_type_hints(cls)
    rows = ["| key | accepts | default | memory | what it does |", "|---|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        meta = field.metadata
        accepts = describe_type(hints[field.name]) if not meta.get("nested") else "an object"
        if meta.get("check") is not None:
            accepts += f", {meta['check'].text}"
        rows.append(f"| `{field.name}` | {_cell(accepts)} | {_cell(_default(field))} | "
                    f"{'yes' if meta.get('memory') else ''} | {_cell(meta.get('doc', ''))} |")
    return rows


def reference_markdown() -> str:
    """The whole reference (docs/CONFIG.md)."""
    lines = [
        "# Training configuration reference",
        "",
        "Generated from `ctvq/config/schema.py` by `python -m ctvq.config.reference > docs/CONFIG.md`;",
        "do not edit by hand. A config is JSON with `models.vqvae`, `dataset` and `trainer`, each",
        "`{name, args}` (`configs/vqvae/` holds examples). `ctvq validate-config FILE` checks one against",
        "this: an unknown key, a wrong type or a value outside its range is an error naming the key.",
        "Defaults marked per stage follow `trainer.args.training_stage`; \"memory: yes\" marks the keys that",
        "change peak memory.",
    ]
    for path, cls in SECTIONS:
        summary = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        lines += ["", f"## `{path}`", "", summary, "", *section_table(cls)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
