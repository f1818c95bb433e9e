"""Properties of the reply parser (transforms/read_inputs.ParseReplyFn, over pipeline/datfile.parse) and the join's
rule (transforms/join.classify): whatever bytes come back from MESH, either the numbers read are exactly the reply's
number lines and all of them were asked for, or there is an integrity error (and nothing is written); and the
reply never means "everyone opted out" unless it is truly empty (zero bytes, or blank lines only)."""
from __future__ import annotations

import os
import re

import numpy as np
import pyarrow as pa
from apache_beam import pvalue
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.request import datfile
from pipeline.core import nhs
from transforms import shards
from transforms.join import classify
from transforms.read_inputs import ParseReplyFn

NUMBERS = nhs.synthetic_numbers(12, seed=4242).to_pylist()
ASKED, STRANGERS = NUMBERS[:8], NUMBERS[8:]
WRONG_CHECK = [n[:9] + str((int(n[9]) + 1) % 10) for n in NUMBERS[:2]]
_BLANK = b" \t\r\n\x0b\x0c"

_PROPERTY = settings(max_examples=int(os.environ.get("NDOP_HYPOTHESIS_EXAMPLES", 150)), deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])

_line = st.one_of(
    st.sampled_from(ASKED).map(lambda n: n + ","),
    st.sampled_from(ASKED),
    st.sampled_from(STRANGERS + WRONG_CHECK).map(lambda n: n + ","),
    st.sampled_from(["", " ", "\t", "NHS_NUMBER,", "nhs number", '"NHS Number",', "Service Unavailable",
                     "Internal error, retry later", "ERROR,", datfile.INVALID_NUMBERS_REPLY, "<html>", "12345,",
                     "9990000018,,", " " + ASKED[0] + ","]),
    st.binary(max_size=6).map(lambda b: b.decode("latin-1")),
)
_reply = st.tuples(st.lists(_line, max_size=10), st.sampled_from(["\r\n", "\n"]), st.booleans()).map(
    lambda t: (t[1].join(t[0]) + (t[1] if t[2] and t[0] else "")).encode("latin-1"))


def parse_reply(path: str, block_bytes: int) -> tuple[list[str], list[str]]:
    """(numbers read, integrity error reasons) from the reply parser's DoFn, outside a pipeline."""
    numbers: list[str] = []
    errors: list[str] = []
    for output in ParseReplyFn(shards=3, block_bytes=block_bytes).process(path):
        if isinstance(output, pvalue.TaggedOutput):
            errors.append(output.value["reason"])
        else:
            numbers += shards.to_strings(shards.from_bytes([output[1]]))
    return numbers, errors


def number_lines(data: bytes) -> list[str]:
    """The oracle: what a reply's number lines say, read by hand (``NNNNNNNNNN`` or ``NNNNNNNNNN,``)."""
    found = []
    for line in data.split(b"\n"):
        match = re.fullmatch(rb"([0-9]{10}),?[ \t\r\x0b\x0c]*", line)
        if match:
            found.append(match.group(1).decode())
    return found


def truly_empty(data: bytes) -> bool:
    return all(byte in _BLANK for byte in data)


@_PROPERTY
@given(data=st.one_of(_reply, st.binary(max_size=40)), block_bytes=st.sampled_from([1, 7, 13, 64, datfile.BLOCK_BYTES]))
def test_numbers_are_the_replys_and_asked_for_or_there_is_an_integrity_error(tmp_path_factory, data,
                                                                            block_bytes) -> None:
    path = tmp_path_factory.mktemp("reply") / "reply.dat"
    path.write_bytes(data)
    numbers, errors = parse_reply(str(path), block_bytes)
    asked = shards.to_int64(pa.array(ASKED, pa.string()))
    outcome = classify(asked, np.asarray(shards.to_int64(pa.array(numbers, pa.string())), dtype=np.int64))
    integrity_error = bool(errors) or len(outcome.reply_only) > 0
    if not integrity_error:
        assert sorted(numbers) == sorted(number_lines(data))  # exactly the number lines (sharded: any order)
        assert set(numbers) <= set(ASKED)
        assert all(nhs.is_valid(n) for n in numbers)
        if len(outcome.opted_out) == len(ASKED):  # "everyone opted out"
            assert truly_empty(data), data
    assert all(not any(n in reason for n in NUMBERS + WRONG_CHECK) for reason in errors)  # reasons name lines only


@_PROPERTY
@given(header=st.sampled_from(["NHS_NUMBER,", "nhs number", "Service Unavailable", "ERROR,", "<html>"]),
       blanks=st.integers(0, 3), ending=st.sampled_from(["\r\n", "\n"]))
def test_a_reply_with_no_number_is_everyone_opted_out_only_when_blank(tmp_path_factory, header, blanks,
                                                                     ending) -> None:
    path = tmp_path_factory.mktemp("reply") / "reply.dat"
    path.write_bytes((ending * blanks).encode())
    assert parse_reply(str(path), datfile.BLOCK_BYTES) == ([], [])  # truly empty: valid, everyone opted out
    path.write_bytes((header + ending + ending * blanks).encode())
    numbers, errors = parse_reply(str(path), datfile.BLOCK_BYTES)
    assert numbers == [] and len(errors) == 1 and errors[0].startswith(f"{path}:1: ")
