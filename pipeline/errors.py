"""Errors the CLI turns into one line on stderr and an exit status."""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_WAITING = 3
EXIT_BUSY = 4  # another ndop command holds the work dir (pipeline.state.WorkDirBusy)


class NdopError(Exception):
    """A failure worth one clear line to the user; ``exit_code`` is what the process returns."""

    exit_code = EXIT_FAILED


class InputError(NdopError):
    """Bad input or configuration: the user must fix something before a re-run can help."""

    exit_code = EXIT_BAD_INPUT


def at(path: object, line: int | None = None) -> str:
    """``file`` or ``file:line``, the prefix every input error starts with."""
    return f"{path}:{line}" if line is not None else str(path)
