"""The ``ctvq`` command line: one argparse subcommand per pipeline step, kept in a registry.

Other packages add commands with ``register_command``; a duplicate name is an error. Expected failures
(bad scans, bad files, bad settings) print ``ctvq <cmd>: error: <file>: <reason>`` (a line per problem);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ctvq.ct.errors import CTInputError
from ctvq.data.sample import SampleFormatError

EXIT_BAD_INPUT = 2


@dataclass(frozen=True)
class Command:
    """``configure`` adds the arguments; ``run`` does the work and returns the exit code."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    expected_errors: tuple[type[BaseException], ...] = field(default=())


COMMANDS: dict[str, Command] = {}
BASE_EXPECTED_ERRORS: tuple[type[BaseException], ...] = (CTInputError, SampleFormatError, FileExistsError)


def register_command(command: Command) -> None:
    if command.name in COMMANDS:
        raise ValueError(f"ctvq command {command.name!r} is registered twice")
    COMMANDS[command.name] = command


def build_parser() -> argparse.ArgumentParser:
    _load_builtin_commands()
    parser = argparse.ArgumentParser(prog="ctvq", description="CT scans to a sparse-voxel VQ-VAE tokenizer.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS.values():
        sub_parser = sub.add_parser(command.name, help=command.help, description=command.help)
        command.configure(sub_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = COMMANDS[args.command]
    try:
        return command.run(args)
    except BASE_EXPECTED_ERRORS + command.expected_errors as exc:
        # The whole message: a config with several mistakes lists one per line after its headline.
        message = str(exc) or type(exc).__name__
        print(f"ctvq {command.name}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _load_builtin_commands() -> None:
    """Import the modules that register commands (idempotent: registration happens once per import)."""
    from ctvq import commands  # noqa: F401
    from ctvq.ct import commands as ct_commands  # noqa: F401


if __name__ == "__main__":
    sys.exit(main())
