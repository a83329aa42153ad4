"""Config errors: every problem of a file is collected and reported together, one per line.

A user fixing a config should see all of its mistakes at once, each naming the file, the key path
(``trainer.args.lr_scheduler.args.T_max``), the bad value and what would be accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: where (dotted key path) and what (value, accepted values, fix)."""

    path: str
    message: str


class ConfigError(ValueError):
    """A config file (or dict) is not valid. ``problems`` lists every problem found, in file order."""

    def __init__(self, origin: str, problems: list[Problem] | tuple[Problem, ...]):
        self.origin = origin
        self.problems = tuple(problems)
        count = len(self.problems)
        head = f"invalid config {origin} ({count} problem{'s' if count != 1 else ''}):"
        lines = [f"  {origin}: {p.path}: {p.message}" for p in self.problems]
        super().__init__("\n".join([head, *lines]))


@dataclass
class Problems:
    """Collector used while loading: add problems as they are found, raise once at the end."""

    origin: str
    items: list[Problem] = field(default_factory=list)

    def add(self, path: str, message: str) -> None:
        self.items.append(Problem(path, message))

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(self.origin, self.items)

    def __len__(self) -> int:
        return len(self.items)


def show(value: Any, limit: int = 80) -> str:
    """Render a config value as the user wrote it in JSON (``true``, ``null``, ``"swin"``), shortened."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
