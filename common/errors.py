"""Exit codes and the user-facing error type: a message printed as one line and a non-zero exit."""

from __future__ import annotations

EXIT_USAGE = 2  # a bad command line
EXIT_INPUT = 3  # a bad file, field or tensor
EXIT_INTERRUPT = 130


class CliError(Exception):
    """A user-facing error: printed as one line, exits non-zero."""

    def __init__(self, msg: str, code: int = EXIT_INPUT):
        super().__init__(msg)
        self.code = code
