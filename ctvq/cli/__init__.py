"""The ``ctvq`` command line: one argparse subcommand per pipeline step, listed in a lazy registry.

The registry names each command's arguments, work and expected errors as ``"module:attribute"`` and only
the dispatched command's module is imported: ``ctvq window`` or ``ctvq --help`` must not pay seconds and
hundreds of MB for torch, which only the model commands need. This is the CLI layer: it imports the library,
never the other way round. Expected failures (bad scans, bad files, bad settings) print
``ctvq <cmd>: error: <file>: <reason>`` (a line per problem), and so do operating-system errors (a full disk,
a read-only folder: ``ctvq.atomic.describe_os_error``) and running out of memory; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

EXIT_BAD_INPUT = 2


@dataclass(frozen=True)
class Command:
    """``configure`` adds the arguments, ``run`` does the work and returns the exit code; both, and each of
    ``expected_errors`` (an exception class or a tuple of them), are ``"module:attribute"`` references, so
    listing a command in ``ctvq --help`` imports nothing."""

    name: str
    help: str
    configure: str
    run: str
    expected_errors: tuple[str, ...] = ()


BASE_EXPECTED_ERRORS: tuple[str, ...] = (
    "ctvq.ct.errors:CTInputError", "ctvq.ct.sample:SampleFormatError", "ctvq.atomic:FileSystemError",
    "ctvq.device:DeviceError", "builtins:FileExistsError")
"""Failures of the user's input whatever the command (resolved on dispatch, like the commands)."""

_CT = "ctvq.cli.preprocess"
_EVAL = "ctvq.cli.eval"
_EVAL_ERRORS = (f"{_EVAL}:EXPECTED_ERRORS",)

COMMANDS: dict[str, Command] = {}


def register_command(command: Command) -> None:
    if command.name in COMMANDS:
        raise ValueError(f"ctvq command {command.name!r} is registered twice")
    COMMANDS[command.name] = command


for _command in (
    Command("phantom", "write a synthetic chest CT (HU) as a scan file or DICOM series",
            f"{_CT}:configure_phantom", f"{_CT}:phantom_command"),
    Command("discover", "list the cases a scan folder holds (scan files, DICOM series at any depth) and "
            "what is skipped and why", f"{_CT}:configure_discover", f"{_CT}:discover_command"),
    Command("window", "read a scan, resample it into the resolution^3 cube and apply an HU window",
            f"{_CT}:configure_window", f"{_CT}:window_command"),
    Command("sdf", "narrow-band signed distance to the window's iso-surface",
            f"{_CT}:configure_sdf", f"{_CT}:sdf_command"),
    Command("index", "sort the band by latent cell and write the training sample",
            f"{_CT}:configure_index", f"{_CT}:index_command"),
    Command("manifest", "one CSV row per training sample, with counts and filter status",
            f"{_CT}:configure_manifest", f"{_CT}:manifest_command"),
    Command("demo", "phantom cases -> window -> sdf -> index -> manifests and preview PNGs",
            f"{_CT}:configure_demo", f"{_CT}:demo_command"),
    Command("validate-config", "check ctvq JSON configs against the configuration reference",
            "ctvq.cli.config:configure_validate", "ctvq.cli.config:run_validate",
            expected_errors=("ctvq.config:ConfigError",)),
    Command("inspect-weights", "print what a checkpoint holds and which model config matches it",
            "ctvq.cli.config:configure_inspect", "ctvq.cli.config:run_inspect",
            expected_errors=("ctvq.models.pretrained:PretrainedWeightsError",)),
    Command("train", "train the sparse SDF VQ-VAE (stage 1: codebook, stage 2: joint)",
            "ctvq.cli.train:add_arguments", "ctvq.cli.train:run",
            expected_errors=("ctvq.cli.train:EXPECTED_ERRORS",)),
    Command("plan", "predict a training step's peak memory on a manifest, and the config patch that fits",
            "ctvq.cli.plan:configure_plan", "ctvq.cli.plan:run_plan",
            expected_errors=("ctvq.cli.plan:EXPECTED_ERRORS",)),
    Command("eval", "metrics, figures and meshes of a checkpoint on preprocessed cases",
            f"{_EVAL}:add_eval_arguments", f"{_EVAL}:run_eval", expected_errors=_EVAL_ERRORS),
    Command("encode", "a CT scan or sample -> token grid (latent coords + code indices)",
            f"{_EVAL}:add_encode_arguments", f"{_EVAL}:run_encode", expected_errors=_EVAL_ERRORS),
    Command("decode", "a token grid -> reconstructed surface mesh (PLY) and sparse SDF",
            f"{_EVAL}:add_decode_arguments", f"{_EVAL}:run_decode", expected_errors=_EVAL_ERRORS),
):
    register_command(_command)


def resolve(reference: str) -> Any:
    """The object a ``"module:attribute"`` reference names, importing its module now."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _errors(references: Sequence[str]) -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = []
    for reference in references:
        found = resolve(reference)
        errors.extend(found if isinstance(found, tuple) else (found,))
    return tuple(errors)


def package_version() -> str:
    """The installed distribution's version; the package's own when it runs from a bare source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ctvq")
    except PackageNotFoundError:
        import ctvq

        return getattr(ctvq, "__version__", "unknown")


class _VersionAction(argparse.Action):
    """``--version`` that looks the version up only when asked (importlib.metadata costs startup time)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog} {package_version()}")
        parser.exit()


def _dispatched_name(argv: Sequence[str]) -> str | None:
    """The subcommand argparse will pick: the first positional token (no top-level option takes a value)."""
    return next((token for token in argv if not token.startswith("-")), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """Every command is listed; only the one ``argv`` dispatches to gets its arguments (and its imports).

    Without ``argv`` every command is configured (importing all of them): for tools that want the full parser.
    """
    parser = argparse.ArgumentParser(prog="ctvq", description="CT scans to a sparse-voxel VQ-VAE tokenizer.")
    parser.add_argument("--version", action=_VersionAction, help="print the ctvq version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = None if argv is None else _dispatched_name(argv)
    for command in COMMANDS.values():
        sub_parser = sub.add_parser(command.name, help=command.help, description=command.help)
        if argv is None or command.name == chosen:
            configure: Callable[[argparse.ArgumentParser], None] = resolve(command.configure)
            configure(sub_parser)
    return parser


def _is_system_error(exc: BaseException) -> bool:
    """An OSError the operating system raised (it carries an errno), not one of ctvq's own messages."""
    return isinstance(exc, OSError) and exc.errno is not None


def _os_error_line(exc: BaseException) -> str:
    from ctvq.atomic import describe_os_error

    assert isinstance(exc, OSError)
    return describe_os_error(exc, action="use")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    command = COMMANDS[args.command]
    run: Callable[[argparse.Namespace], int] = resolve(command.run)
    expected = _errors(BASE_EXPECTED_ERRORS + command.expected_errors)
    try:
        return run(args)
    except expected as exc:
        # The whole message: a config with several mistakes lists one per line after its headline.
        message = _os_error_line(exc) if _is_system_error(exc) else str(exc) or type(exc).__name__
    except OSError as exc:
        if not _is_system_error(exc):
            raise
        message = _os_error_line(exc)
    except MemoryError:
        message = ("out of memory: this machine cannot hold what was asked; use a smaller resolution, "
                   "batch or chunk size, or a machine with more memory")
    print(f"ctvq {command.name}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
