"""The .dat format both ways: what requests are written as, and how replies are read."""
from __future__ import annotations

from pipeline.request import datfile
from pipeline.core import nhs
from pipeline.mesh.inbox import HEAD_BYTES, is_invalid_numbers_reply

NUMBERS = nhs.synthetic_numbers(4, seed=5)


def test_encode_then_parse_round_trips_for_both_line_endings() -> None:
    for ending in ("crlf", "lf"):
        parsed = datfile.parse(datfile.encode(NUMBERS, ending))
        assert parsed.numbers.to_pylist() == NUMBERS.to_pylist()
        assert parsed.bad_lines == [] and parsed.blank_lines == 0


def test_empty_reply_is_valid_and_empty() -> None:
    parsed = datfile.parse(b"")
    assert len(parsed.numbers) == 0 and parsed.bad_lines == []


def test_header_only_at_the_top_blank_lines_anywhere_and_bad_lines_named() -> None:
    a, b, c, d = NUMBERS.to_pylist()
    wrong = a[:9] + str((int(a[9]) + 1) % 10)
    body = f"NHS_NUMBER,\r\n{a},\r\n\r\n{b}\r\n{wrong},\r\nNHS_NUMBER,\r\n{c},extra\r\n{d},".encode()
    parsed = datfile.parse(body)
    assert parsed.numbers.to_pylist() == [a, b, d]
    assert parsed.header_lines == 1 and parsed.blank_lines == 1
    assert parsed.bad_lines == [
        (5, nhs.REASON_CHECK_DIGIT), (6, "not an NHSNUMBER, line"), (7, "not an NHSNUMBER, line"),
    ]


def test_line_numbers_follow_first_line_and_headers_only_at_file_start() -> None:
    parsed = datfile.parse(b"NHS_NUMBER,\nrubbish\n", first_line=101)
    assert parsed.header_lines == 0
    assert parsed.bad_lines == [(101, "not an NHSNUMBER, line"), (102, "not an NHSNUMBER, line")]


def test_invalid_numbers_notice_is_recognised() -> None:
    # The recogniser the MESH driver uses (pipeline/mesh/inbox.py), on the head of a reply's body.
    assert is_invalid_numbers_reply((datfile.INVALID_NUMBERS_REPLY + "\r\n").encode())
    assert not is_invalid_numbers_reply(datfile.encode(NUMBERS)[:HEAD_BYTES])


def test_non_ascii_is_reported_with_its_line() -> None:
    parsed = datfile.parse(b"9434765919,\n\xff\xfe\n")
    assert parsed.bad_lines == [(2, "not ASCII text")]


def test_only_a_header_naming_the_nhs_number_is_tolerated() -> None:
    a = NUMBERS.to_pylist()[0]
    for header in ("NHS_NUMBER,", "nhs number", '"NHS Number",', "NHSNumber", "nhs_no,", '"NHS_NUMBER","FLAG"'):
        parsed = datfile.parse(f"{header}\r\n{a},\r\n".encode())
        assert (parsed.header_lines, parsed.bad_lines, parsed.numbers.to_pylist()) == (1, [], [a]), header
    for text in ("Service Unavailable", "Internal error, please retry later", "ERROR,", '"Gateway Timeout"',
                 "Number of records"):
        parsed = datfile.parse(f"{text}\r\n".encode())
        assert parsed.header_lines == 0 and parsed.bad_lines == [(1, "not an NHSNUMBER, line")], text


def test_blank_lines_only_is_an_empty_reply() -> None:
    parsed = datfile.parse(b"\r\n\r\n  \r\n")
    assert len(parsed.numbers) == 0 and parsed.bad_lines == [] and parsed.header_lines == 0


def test_a_line_of_control_characters_is_not_blank() -> None:
    """Found by tests/test_reply_properties.py: Arrow's whitespace trim ate \\x1c, so this read as an empty reply."""
    for body in (b"\x1c", b"\x1f\r\n", b"\x1d\x1e\n"):
        parsed = datfile.parse(body)
        assert parsed.blank_lines == 0 and parsed.bad_lines == [(1, "not an NHSNUMBER, line")], body
