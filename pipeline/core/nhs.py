"""NHS number handling: the one place that normalises, validates, masks and fakes them.

Scalar checks use the ``nhs-number`` package's Modulus 11 checksum. Cohorts run to tens of
millions of numbers, so :func:`validate_array` applies the same rule column-wise with pyarrow and
numpy; ``tests/test_nhs.py`` holds the two to agreement.
"""
from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from nhs_number import calculate_checksum

LENGTH = 10
_WEIGHTS = np.arange(10, 1, -1, dtype=np.int64)  # 10..2 for the first nine digits

# Reasons written to rejects.csv, one per failed rule.
REASON_BLANK = "blank"
REASON_LENGTH = "not 10 digits"
REASON_CHARACTERS = "contains characters other than digits, spaces and hyphens"
REASON_CHECK_DIGIT = "invalid check digit (Modulus 11)"

NHS_NUMBER_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"

_NUMBER_LIKE = re.compile(r"\d[\d -]{8,}\d")  # ten digits or more, as typed (spaces, hyphens) or not


def normalise(value: str) -> str:
    """Strip the surrounding blanks and the spaces/hyphens people type inside a number."""
    return value.strip().replace(" ", "").replace("-", "")


def invalid_reason(value: str) -> str | None:
    """Why ``value`` (already normalised) is not a valid NHS number, or None when it is."""
    if not value.isascii() or not value.isdigit():
        return REASON_CHARACTERS
    if len(value) != LENGTH:
        return REASON_LENGTH
    if calculate_checksum(value[:9]) != int(value[9]):
        return REASON_CHECK_DIGIT
    return None


def is_valid(value: str) -> bool:
    """True for a normalised 10-digit number whose Modulus 11 check digit is right."""
    return invalid_reason(value) is None


def mask(value: str) -> str:
    """What logs may show of a number: all but the last four characters hidden."""
    text = str(value)
    return "*" * max(len(text) - 4, 0) + text[-4:]


def redact(text: str) -> str:
    """Mask anything that looks like an NHS number in text we did not write (a library's error, a
    server's reply) before it reaches a log, an error message or a record."""
    return _NUMBER_LIKE.sub(lambda m: mask(normalise(m.group())), text)


def normalise_array(values: pa.Array) -> pa.Array:
    """Column-wise :func:`normalise`; nulls become empty strings."""
    values = pc.fill_null(values.cast(pa.string()), "")
    values = pc.utf8_trim_whitespace(values)
    return pc.replace_substring_regex(values, pattern="[ -]", replacement="")


def _digits_matrix(values: pa.Array) -> np.ndarray:
    """An (n, 10) uint8 matrix of digits from a string array whose values are all 10 ASCII digits.

    A zero-copy view where the array allows it: national cohorts hold tens of millions of numbers.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if len(values) == 0:
        return np.zeros((0, LENGTH), dtype=np.uint8)
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int32)[values.offset : values.offset + len(values) + 1]
    data = np.frombuffer(values.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.reshape(-1, LENGTH) - np.uint8(ord("0"))


def _check_digit(digits: np.ndarray) -> np.ndarray:
    """Modulus 11 check digit of each row's first nine digits (10 means no valid number exists)."""
    total = np.zeros(len(digits), dtype=np.int32)
    for column, weight in enumerate(_WEIGHTS):
        total += digits[:, column].astype(np.int32) * int(weight)
    check = 11 - total % 11
    check[check == 11] = 0
    return check


def check_digits_ok(values: pa.Array) -> np.ndarray:
    """Boolean mask: Modulus 11 holds, for an array of strings that are all 10 digits."""
    digits = _digits_matrix(values)
    return _check_digit(digits) == digits[:, 9]  # a computed 10 never equals a digit: invalid, as the rule says


def _strings(digits: np.ndarray) -> pa.Array:
    """A string array over an (n, 10) matrix of digit values, built from buffers in one copy."""
    count = len(digits)
    data = pa.py_buffer((digits.astype(np.uint8, copy=False) + np.uint8(ord("0"))).tobytes())
    offsets = pa.py_buffer((np.arange(count + 1, dtype=np.int32) * LENGTH).tobytes())
    return pa.Array.from_buffers(pa.string(), count, [None, offsets, data])


def to_int64(values: pa.Array) -> np.ndarray:
    """Valid 10-digit number strings as int64 keys (8 bytes each; sortable, hashable, joinable).

    Built column by column: a (n, 10) int64 matrix would cost 80 bytes a number for nothing.
    """
    digits = _digits_matrix(values)
    keys = np.zeros(len(digits), dtype=np.int64)
    for column in range(LENGTH):
        keys *= 10
        keys += digits[:, column]
    return keys


def unique_in_order(valid: pa.Array) -> pa.Array:
    """Distinct valid numbers in order of first appearance.

    Keys are the numbers as int64, not hashed strings: a hash set of ten million strings alone
    costs more memory than a national cohort's whole request step should.
    """
    return _strings(_digits_matrix(valid)[first_indices(valid)])


def first_indices(valid: pa.Array) -> np.ndarray:
    """Positions of each distinct valid number's first appearance, in order (what :func:`unique_in_order`
    keeps; a column beside the numbers, e.g. Patient ids, is taken at the same positions)."""
    _, first = np.unique(to_int64(valid), return_index=True)
    first.sort()
    return first


def validate_array(values: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Normalise a column of raw values and say why each one fails.

    Returns ``(normalised, reason)``: ``reason`` is null where the number is valid, and
    a blank entry gets :data:`REASON_BLANK`, which callers skip rather than reject.
    """
    normalised = normalise_array(values)
    lengths = pc.utf8_length(normalised)
    digits_only = pc.match_substring_regex(normalised, pattern="^[0-9]*$")
    ten = pc.and_(digits_only, pc.equal(lengths, LENGTH))
    reason = pc.if_else(
        pc.invert(digits_only),
        pa.scalar(REASON_CHARACTERS),
        pc.if_else(pc.equal(lengths, LENGTH), pa.scalar(None, pa.string()), pa.scalar(REASON_LENGTH)),
    )
    reason = pc.if_else(pc.equal(lengths, 0), pa.scalar(REASON_BLANK), reason)
    ten_np = ten.to_numpy(zero_copy_only=False)
    if ten_np.any():
        checked = check_digits_ok(pc.filter(normalised, ten))
        bad_check = np.zeros(len(normalised), dtype=bool)
        bad_check[np.flatnonzero(ten_np)[~checked]] = True
        reason = pc.if_else(pa.array(bad_check), pa.scalar(REASON_CHECK_DIGIT), reason)
    return normalised, reason


def synthetic_numbers(count: int, seed: int = 0, prefix: str = "999") -> pa.Array:
    """``count`` distinct valid NHS numbers in a synthetic range (default 999), never real ones.

    ``nhs_number.generate`` draws one number at a time from the whole 9xx range; tests and the
    local demo need many, reproducibly, inside 999. The 999 range holds about 909,000 valid
    numbers; larger benchmarks pass ``prefix="9"`` (9000000000-9999999999, never issued).
    """
    free_digits = 9 - len(prefix)
    capacity = (10**free_digits) * 10 // 11
    if count > capacity:
        raise ValueError(f"the {prefix} range holds about {capacity} valid numbers, not {count}")
    rng = np.random.default_rng(seed)
    found = np.zeros(0, dtype=np.int64)
    while len(found) < count:
        draw = rng.integers(0, 10**free_digits, size=int((count - len(found)) * 1.15) + 16)
        found = np.concatenate([found, draw])
        _, first = np.unique(found, return_index=True)
        found = found[np.sort(first)]  # distinct, in draw order
        digits = np.zeros((len(found), 9), dtype=np.int64)
        digits[:, : len(prefix)] = [int(c) for c in prefix]
        rest = found.copy()
        for i in range(8, len(prefix) - 1, -1):
            digits[:, i] = rest % 10
            rest //= 10
        check = _check_digit(digits)
        keep = check != 10
        found, digits, check = found[keep], digits[keep], check[keep]
    return _strings(np.concatenate([digits[:count], check[:count, None]], axis=1))
