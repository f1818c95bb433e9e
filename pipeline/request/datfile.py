"""The NDOP ``.dat`` format, both ways: ``9434765919,`` and a line ending per patient, no header.

Requests are written here; replies (the request minus everyone who opted out) are parsed here,
by the process pipeline and by the local NDOP stand-in alike.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import nhs

LINE_ENDINGS = {"crlf": b"\r\n", "lf": b"\n"}
BLOCK_BYTES = 8 << 20  # about 700,000 reply lines a block: memory stays flat on a national reply

# What POS sends back instead of data when any requested number fails Modulus 11.
INVALID_NUMBERS_REPLY = "The file contains one or more invalid NHS Numbers"

# Why a reply with a header and no number is refused: "no numbers" means "everyone opted out", so it may
# only ever come from a reply that is truly empty (zero bytes, or blank lines only).
REASON_HEADER_ONLY = "a header line and no NHS number: not an NDOP reply (only an empty reply means everyone opted out)"

_LINE = re.compile(r"^[0-9]{10},?$")
_BLANKS = " \t\r\x0b\x0c"
# The one header a reply may start with: one naming the NHS number column (``NHS_NUMBER,``, ``"NHS Number"``,
# ``nhs_no,``). Anything else that is not a number, such as a service's error text, is an integrity error.
_HEADER = re.compile(r'^"?nhs[ _-]?(number|no)"?\s*(,\s*"?[a-z _]*"?\s*)?$', re.IGNORECASE)


def encode(numbers: pa.Array, line_ending: str = "crlf") -> bytes:
    """The ``.dat`` body for valid, normalised 10-digit numbers."""
    ending = LINE_ENDINGS[line_ending]
    suffix = np.frombuffer(b"," + ending, dtype=np.uint8)
    digits = nhs._digits_matrix(numbers) + ord("0")
    rows = np.empty((len(numbers), nhs.LENGTH + len(suffix)), dtype=np.uint8)
    rows[:, : nhs.LENGTH] = digits
    rows[:, nhs.LENGTH :] = suffix
    return rows.tobytes()


@dataclass
class ParsedDat:
    """One block of a ``.dat`` file: its numbers, and the lines that are not ``NHSNUMBER,``."""

    numbers: pa.Array
    blank_lines: int = 0
    header_lines: int = 0
    bad_lines: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)
    lines: int = 0


def parse(data: bytes, first_line: int = 1, header_allowed: bool = True) -> ParsedDat:
    """Parse a block of whole lines; ``first_line`` is the file line number of its first line.

    A header line naming the NHS number (``NHS_NUMBER,``) is tolerated only at the top of the file
    (``header_allowed``); blank lines anywhere. Any other line that is not a valid ``NHSNUMBER,``
    is reported with its line number and why, never with the number itself.
    """
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as err:
        line = first_line + data[: err.start].count(b"\n")
        return ParsedDat(numbers=pa.array([], pa.string()), bad_lines=[(line, "not ASCII text")], lines=0)
    if text.endswith("\n"):
        text = text[:-1]
    if not text:
        return ParsedDat(numbers=pa.array([], pa.string()))
    split = pc.split_pattern(pa.array([text], pa.large_string()), pattern="\n")
    # Only ASCII blanks end a line: Arrow's *_whitespace also trims \x1c-\x1f, and a line of those is no blank line.
    lines = pc.utf8_rtrim(pc.list_flatten(split).cast(pa.string()), characters=_BLANKS)
    ok = pc.match_substring_regex(lines, pattern=_LINE.pattern)
    blank = pc.equal(pc.utf8_length(lines), 0)
    candidates = pc.utf8_slice_codeunits(pc.filter(lines, ok), 0, nhs.LENGTH)
    good = nhs.check_digits_ok(candidates)
    parsed = ParsedDat(
        numbers=pc.filter(candidates, pa.array(good)),
        blank_lines=pc.sum(blank).as_py() or 0,
        lines=len(lines),
    )
    ok_idx = np.flatnonzero(ok.to_numpy(zero_copy_only=False))
    for idx in ok_idx[~good]:
        parsed.bad_lines.append((first_line + int(idx), nhs.REASON_CHECK_DIGIT))
    other = np.flatnonzero(~(ok.to_numpy(zero_copy_only=False) | blank.to_numpy(zero_copy_only=False)))
    for idx in other:
        value = lines[int(idx)].as_py()
        if INVALID_NUMBERS_REPLY.lower() in value.lower():
            parsed.bad_lines.append((first_line + int(idx), INVALID_NUMBERS_REPLY))
        elif header_allowed and first_line == 1 and idx == 0 and _HEADER.match(value):
            parsed.header_lines += 1
        else:
            parsed.bad_lines.append((first_line + int(idx), "not an NHSNUMBER, line"))
    return parsed


def iter_line_blocks(handle: BinaryIO, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, bytes]]:
    """``(first line number, whole lines)`` blocks of a binary file, each cut after a newline, so
    :func:`parse` sees whole lines and exact line numbers without the file ever being in memory."""
    line = 1
    rest = b""
    while True:
        chunk = handle.read(block_bytes)
        if not chunk:
            break
        data = rest + chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            rest = data
            continue
        block, rest = data[:cut], data[cut:]
        yield line, block
        line += block.count(b"\n")
    if rest:
        yield line, rest
