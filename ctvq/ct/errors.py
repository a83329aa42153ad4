"""Error and warning types of CT preprocessing: bad user input (file, scan, window), reported in one line."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class CTInputError(ValueError):
    """A scan or intermediate file cannot be used; the message starts with the file and says why."""


class CTInputWarning(UserWarning):
    """A scan is usable but suspicious (e.g. implausible voxel spacing); the message starts with the file."""


@contextmanager
def warnings_as_lines(prefix: str) -> Iterator[None]:
    """Print every CTInputWarning raised inside as the one line ``<prefix>: warning: <message>`` on stderr.

    Python's default format adds the emitting source file and line, which means nothing to a user of the
    command line; other warning categories keep that default.
    """
    with warnings.catch_warnings():
        default = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
            if issubclass(category, CTInputWarning):
                print(f"{prefix}: warning: {message}", file=sys.stderr, flush=True)
            else:
                default(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        warnings.simplefilter("always", CTInputWarning)
        yield
