"""Exit codes and the user-facing error type shared by every `dsv4` sub-command (defined in common/errors.py,
so the rank supervisor in ascend/ can map them without importing tools/)."""

from __future__ import annotations

import sys

from common.errors import EXIT_INPUT, EXIT_INTERRUPT, EXIT_USAGE, CliError

__all__ = ["EXIT_USAGE", "EXIT_INPUT", "EXIT_INTERRUPT", "CliError", "log"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
