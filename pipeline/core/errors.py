"""Errors the CLI turns into one line on stderr and an exit status."""
from __future__ import annotations

import logging

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_WAITING = 3
EXIT_BUSY = 4  # another ndop command holds the work dir (pipeline.lifecycle.state.WorkDirBusy)


class NdopError(Exception):
    """A failure worth one clear line to the user; ``exit_code`` is what the process returns."""

    exit_code = EXIT_FAILED


class InputError(NdopError):
    """Bad input or configuration: the user must fix something before a re-run can help."""

    exit_code = EXIT_BAD_INPUT


def at(path: object, line: int | None = None) -> str:
    """``file`` or ``file:line``, the prefix every input error starts with."""
    return printable(f"{path}:{line}" if line is not None else str(path))


def printable(text: str) -> str:
    """``text`` safe for one terminal line: control characters, a byte-order mark, undecodable bytes (as
    ``surrogateescape`` left them) and other invisible characters written as Python escapes (``\\x00``,
    ``\\ufeff``, ``\\xff``), so what a user's file holds is shown, never acted on by the terminal."""
    if text.isprintable():
        return text
    out = []
    for char in text:
        if char.isprintable():
            out.append(char)
        elif 0xDC80 <= ord(char) <= 0xDCFF:  # a byte surrogateescape could not decode
            out.append(f"\\x{ord(char) - 0xDC00:02x}")
        else:
            out.append(char.encode("unicode_escape").decode("ascii"))
    return "".join(out)


class OneLineNdopErrors(logging.Filter):
    """Drop the traceback from log records about an :class:`NdopError` (Beam's runner logs a worker's error
    with its stack): such an error is one line by design, and the CLI prints it last. Any other exception
    keeps its traceback: that is a bug to see."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], NdopError):
            record.exc_info = None
            record.exc_text = None
        return True
