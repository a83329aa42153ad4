"""Field specs: each config dataclass field carries its default, its value check and its doc in metadata.

The dataclass annotations are the types (``int``, ``float | None``, ``Literal["l1", ...]``,
``tuple[float, ...]``); :func:`parse_fields` checks raw JSON values against them, applies the range checks and
fills defaults, so one declaration is the single source of truth for type, default and accepted values.

Defaults come in three kinds:
- a plain value (``spec(64)``);
- per training stage (``spec(stage=(100_000, 500_000))``), resolved from ``trainer.args.training_stage``;
- per component name (``spec(by_name={"ExponentialLR": 0.999, "StepLR": 0.1})``): the field then exists only
  for those names (optimizer and scheduler arguments) and is ``None`` for the others.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ctvq.config.errors import Problems, show

REQUIRED: Any = object()
"""Marker: the field has no default and must be given."""


@dataclass(frozen=True)
class Check:
    """A value rule with the text shown when it fails (``must be > 0``)."""

    ok: Callable[[Any], bool]
    text: str


def at_least(low: int) -> Check:
    return Check(lambda v: v >= low, f"must be >= {low}")


POSITIVE = Check(lambda v: v > 0, "must be > 0")
NON_NEGATIVE = Check(lambda v: v >= 0, "must be >= 0")
OPEN_UNIT = Check(lambda v: 0 < v < 1, "must lie in the open interval (0, 1)")
DECAY_FACTOR = Check(lambda v: 0 < v <= 1, "must lie in (0, 1]")
PERCENTILE = Check(lambda v: 0 < v <= 100, "must lie in (0, 100]")
NON_EMPTY = Check(lambda v: len(v) > 0, "must not be empty")


def each(check: Check) -> Check:
    """Apply ``check`` to every element of a list value."""
    return Check(lambda v: all(check.ok(x) for x in v), f"every element {check.text}")


def spec(
    default: Any = REQUIRED,
    *,
    stage: tuple[Any, Any] | None = None,
    by_name: Mapping[str, Any] | None = None,
    check: Check | None = None,
    nested: bool = False,
    doc: str = "",
    memory: bool = False,
) -> Any:
    """Declare a config field: its default (plain, per stage or per component name), its value check, what
    it does (``doc``, for the generated reference) and whether it changes peak memory (``memory``)."""
    meta = {"check": check, "stage": stage, "by_name": dict(by_name) if by_name else None, "nested": nested,
            "doc": doc, "memory": memory}
    if stage is not None or by_name is not None or default is REQUIRED:
        return dataclasses.field(metadata=meta)
    if isinstance(default, list | dict):
        raise TypeError("use a tuple (immutable) as the default of a list field")
    return dataclasses.field(default=default, metadata=meta)


def describe_type(tp: Any) -> str:
    """How a config type reads in messages and the reference: "an integer", "one of swin, full", ..."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(show(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(describe_type(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {describe_type(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "an object"}[
        origin or tp
    ]


class _Mismatch(Exception):
    """Internal: the value does not have the annotated type."""


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` (int -> float, list -> tuple) or raise _Mismatch."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin in (types.UnionType, typing.Union):
        for member in typing.get_args(tp):
            try:
                return _coerce(value, member)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        # `True == 1` in Python: compare types too, so `true` is not accepted as training_stage 1.
        if any(type(value) is type(a) and value == a for a in typing.get_args(tp)):
            return value
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _Mismatch
        return tuple(_coerce(v, typing.get_args(tp)[0]) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise _Mismatch
    raise TypeError(f"unsupported config annotation {tp!r}")


def _mismatch_message(value: Any, tp: Any) -> str:
    note = ""
    if isinstance(value, bool) and "true or false" not in describe_type(tp):
        note = " (a boolean is not a number)"
    elif isinstance(value, float) and not math.isfinite(value):
        note = " (not a finite number)"
    elif isinstance(value, float) and "an integer" in (kind := describe_type(tp)) and "a number" not in kind:
        note = " (write a whole number without a decimal point)"
    return f"expected {describe_type(tp)}, got {show(value)}{note}"


def check_value(value: Any, tp: Any, check: Check | None, path: str, problems: Problems) -> tuple[bool, Any]:
    """Type-check, convert and range-check one value. Returns (ok, converted value)."""
    try:
        converted = _coerce(value, tp)
    except _Mismatch:
        problems.add(path, _mismatch_message(value, tp))
        return False, None
    if check is not None and converted is not None and not check.ok(converted):
        problems.add(path, f"{show(value)} is invalid: {check.text}")
        return False, None
    return True, converted


def field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def unknown_key(
    key: str,
    path: str,
    accepted: Iterable[str],
    problems: Problems,
    elsewhere: Mapping[str, tuple[str, ...]],
) -> None:
    """Report an unknown key, with a hint: where it belongs if it is valid elsewhere, else a close match."""
    accepted = sorted(accepted)
    key_path = key if path == "<top>" else f"{path}.{key}"
    homes = [h for h in elsewhere.get(key, ()) if h != path]
    if homes:
        where = " or ".join(homes)
        problems.add(key_path, f"unknown key here: {key} belongs in {where}")
        return
    close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    problems.add(key_path, f"unknown key; {hint}accepted keys: {', '.join(accepted)}")


def parse_fields(
    cls: type,
    raw: Mapping[str, Any],
    path: str,
    problems: Problems,
    *,
    stage: int | None,
    name: str | None = None,
) -> tuple[dict[str, Any], set[str]]:
    """Check the keys of ``raw`` that are fields of ``cls`` and fill defaults.

    Returns (values of the valid fields, names of fields that could not be resolved). A field whose default
    depends on the stage stays unresolved when the stage itself is invalid, so no follow-up errors appear.
    Keys of ``raw`` that are not fields are left to the caller (it knows the hints).
    """
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    unresolved: set[str] = set()
    for f in dataclasses.fields(cls):
        # the component name is read by the caller, from the wrapper
        if f.name == "name" or f.metadata.get("nested"):
            continue
        key_path = f"{path}.{f.name}"
        by_name = f.metadata.get("by_name")
        if by_name is not None and name not in by_name:
            if f.name in raw:
                owners = sorted(n for n in by_name)
                problems.add(
                    key_path,
                    f"{f.name} is an argument of {'/'.join(owners)}, not of {name}",
                )
            values[f.name] = None
            continue
        if f.name in raw:
            ok, value = check_value(raw[f.name], hints[f.name], f.metadata.get("check"), key_path, problems)
            if ok:
                values[f.name] = value
            else:
                unresolved.add(f.name)
            continue
        default = _default(f, stage, name)
        if default is REQUIRED:
            if by_name is None and f.metadata.get("stage") is None:
                problems.add(key_path, f"required key is missing: expected {describe_type(hints[f.name])}")
            elif f.metadata.get("stage") is None:
                problems.add(key_path, f"required for {name}: expected {describe_type(hints[f.name])}")
            unresolved.add(f.name)
        else:
            values[f.name] = default
    return values, unresolved


def _default(f: dataclasses.Field, stage: int | None, name: str | None) -> Any:
    by_name = f.metadata.get("by_name")
    if by_name is not None:
        return by_name[name]
    staged = f.metadata.get("stage")
    if staged is not None:
        return REQUIRED if stage is None else staged[stage - 1]
    if f.default is not dataclasses.MISSING:
        return f.default
    return REQUIRED
