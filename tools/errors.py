"""Exit codes and the user-facing error type shared by every `dsv4` sub-command."""

from __future__ import annotations

import sys

EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_INTERRUPT = 130


class CliError(Exception):
    """A user-facing error: printed as one line, exits non-zero."""

    def __init__(self, msg: str, code: int = EXIT_INPUT):
        super().__init__(msg)
        self.code = code


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
