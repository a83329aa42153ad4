"""The import graph: the library never imports the command line, and no two packages import each other.

Read from the source (every ``import`` and ``from ... import`` anywhere in a module, including the lazy ones
inside functions), so a cycle fails here before it shows up as a slow or fragile import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

PACKAGE = Path(__file__).resolve().parents[1] / "ctvq"


def _is_cli(module: str) -> bool:
    """The command line on top: the ``ctvq.cli`` package and ``python -m ctvq``."""
    return module in ("ctvq.cli", "ctvq.__main__") or module.startswith("ctvq.cli.")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name == "ctvq" or name.startswith("ctvq.")}


def _unit(module: str) -> str:
    """The node of the package graph: ``ctvq.<subpackage>`` or a top-level module."""
    return ".".join(module.split(".")[:2])


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        graph[_module_name(path)] = _imports(path)
    return graph


def test_no_library_module_imports_the_command_line() -> None:
    offenders = {module: sorted(i for i in imports if _is_cli(i))
                 for module, imports in import_graph().items() if not _is_cli(module)}
    assert {m: i for m, i in offenders.items() if i} == {}


def test_argparse_lives_in_the_cli_package_only() -> None:
    """Every command's arguments are declared under ``ctvq/cli/``; the library exposes functions."""
    users = sorted(_module_name(p) for p in PACKAGE.rglob("*.py")
                   if "import argparse" in p.read_text(encoding="utf-8"))
    assert users and all(_is_cli(m) for m in users), users


def test_no_two_packages_import_each_other() -> None:
    units: dict[str, set[str]] = {}
    for module, imports in import_graph().items():
        if _is_cli(module) or module == "ctvq":
            continue
        units.setdefault(_unit(module), set()).update(_unit(i) for i in imports if _unit(i) != _unit(module))
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(units.get(node, set())):
            if nxt in path:
                cycles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt in units:
                visit(nxt, [*path, nxt])

    for start in sorted(units):
        visit(start, [start])
    assert cycles == [], "package import cycles:\n" + "\n".join(sorted(set(cycles))[:20])


def test_the_workflow_schema_lists_no_window_names_of_its_own() -> None:
    """The workflow checks window names against ctvq's registry; a second list in its schema would drift."""
    from ctvq.ct.windows import WINDOWS

    text = (PACKAGE.parent / "workflow" / "schemas" / "pipeline.schema.yaml").read_text(encoding="utf-8")
    schema = yaml.safe_load(text)
    enums = []

    def collect(node: object) -> None:
        if isinstance(node, dict):
            if "enum" in node and set(node["enum"]) & set(WINDOWS):
                enums.append(node["enum"])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(schema)
    assert enums == []
