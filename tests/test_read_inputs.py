"""ReadManifest and ReadReply: sharded int64 blocks, and reply lines that are integrity errors."""
from __future__ import annotations

import io

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that, equal_to

from pipeline.request import datfile
from pipeline.core import nhs
from tests.beam_util import local_pipeline
from transforms import shards
from transforms.read_inputs import ReadManifest, ReadReply, iter_line_blocks, manifest_numbers

def _numbers(count: int, seed: int = 1) -> list[str]:
    return nhs.synthetic_numbers(count, seed=seed).to_pylist()


def _unshard(element: tuple[int, bytes]) -> list[tuple[int, str]]:
    shard, payload = element
    return [(shard, n) for n in shards.to_strings(shards.from_bytes([payload]))]


def test_shards_are_stable_and_round_trip():
    numbers = _numbers(2000)
    ints = shards.to_int64(pa.array(numbers))
    assert shards.to_strings(ints) == numbers
    first = shards.shard_of(ints, 8)
    assert (first == shards.shard_of(ints, 8)).all() and set(first.tolist()) == set(range(8))
    pieces = list(shards.split_by_shard(ints, 8))
    assert sorted(n for _, b in pieces for n in shards.to_strings(shards.from_bytes([b]))) == sorted(numbers)
    assert shards.to_strings(shards.to_int64(pa.array(["0123456789"]))) == ["0123456789"]


def test_read_manifest_keys_every_number_by_its_shard(tmp_path):
    numbers = _numbers(300)
    path = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"nhs_number": numbers}), path, row_group_size=100)  # three blocks
    expected = [(int(shards.shard_of(shards.to_int64(pa.array([n])), 4)[0]), n) for n in numbers]
    with local_pipeline() as p:
        got = p | ReadManifest(str(path), shards=4) | beam.FlatMap(_unshard)
        assert_that(got, equal_to(expected))


def test_manifest_with_a_bad_value_is_refused():
    table = pa.table({"nhs_number": ["9990000018", "12345"]})
    with pytest.raises(ValueError, match="m.parquet: manifest holds a value that is not a 10-digit"):
        manifest_numbers(table, "m.parquet")
    with pytest.raises(ValueError, match="no column 'nhs_number'"):
        manifest_numbers(pa.table({"x": ["9990000018"]}), "m.parquet")
    bad_check = _numbers(1)[0][:9] + str((int(_numbers(1)[0][9]) + 1) % 10)
    with pytest.raises(ValueError, match="invalid check digit"):
        manifest_numbers(pa.table({"nhs_number": [bad_check]}), "m.parquet")


def test_line_blocks_end_on_newlines_and_count_lines():
    data = b"".join(f"{n},\r\n".encode() for n in _numbers(50)) + b"9990000018,"  # no final newline
    blocks = list(iter_line_blocks(io.BytesIO(data), block_bytes=64))
    assert b"".join(b for _, b in blocks) == data
    assert all(b.endswith(b"\n") for _, b in blocks[:-1])
    line = 1
    for first, block in blocks:
        assert first == line
        line += block.count(b"\n")


def test_read_reply_tolerates_header_and_blanks_and_reports_bad_lines(tmp_path):
    numbers = _numbers(40)
    good = datfile.encode(pa.array(numbers), "crlf")
    bad_check = numbers[0][:9] + str((int(numbers[0][9]) + 1) % 10)
    body = b"NHS_NUMBER,\r\n" + good[:130] + b"\r\n" + good[130:] + f"{bad_check},\r\nnot a number\r\n".encode()
    path = tmp_path / "reply.dat"
    path.write_bytes(body)
    with local_pipeline() as p:
        reply = p | ReadReply(str(path), shards=3, block_bytes=100)
        assert_that(reply.numbers | beam.FlatMap(_unshard) | beam.Map(lambda e: e[1]), equal_to(numbers),
                    label="AllNumbers")
        reasons = reply[ReadReply.INTEGRITY_ERRORS] | beam.Map(lambda e: (e["nhs_number"], e["reason"]))
        assert_that(reasons, equal_to([
            (None, f"{path}:43: {nhs.REASON_CHECK_DIGIT}"),
            (None, f"{path}:44: not an NHSNUMBER, line"),
        ]), label="BadLines")


def test_empty_reply_has_no_numbers_and_no_errors(tmp_path):
    path = tmp_path / "reply.dat"
    path.write_bytes(b"")
    with local_pipeline() as p:
        reply = p | ReadReply(str(path), shards=3)
        assert_that(reply.numbers, equal_to([]), label="NoNumbers")
        assert_that(reply[ReadReply.INTEGRITY_ERRORS], equal_to([]), label="NoErrors")


def test_invalid_numbers_notice_is_an_integrity_error(tmp_path):
    path = tmp_path / "reply.dat"
    path.write_bytes(datfile.INVALID_NUMBERS_REPLY.encode() + b"\r\n")
    with local_pipeline() as p:
        reply = p | ReadReply(str(path), shards=3)
        assert_that(reply[ReadReply.INTEGRITY_ERRORS] | beam.Map(lambda e: e["reason"]),
                    equal_to([f"{path}:1: NDOP rejected the request: {datfile.INVALID_NUMBERS_REPLY}"]))


@pytest.mark.parametrize("body", [b"NHS_NUMBER,\r\n", b"NHS_NUMBER,\r\n\r\n",
                                  b"Service temporarily unavailable, retry\r\n"])
def test_a_reply_that_is_not_data_is_an_integrity_error_never_everyone_opted_out(tmp_path, body):
    path = tmp_path / "reply.dat"
    path.write_bytes(body)
    with local_pipeline() as p:
        reply = p | ReadReply(str(path), shards=3)
        assert_that(reply.numbers, equal_to([]), label="NoNumbers")
        assert_that(reply[ReadReply.INTEGRITY_ERRORS] | beam.Map(lambda e: e["reason"]),
                    equal_to([f"{path}:1: " + (datfile.REASON_HEADER_ONLY if body.startswith(b"NHS")
                                               else "not an NHSNUMBER, line")]), label="OneError")


def test_blank_lines_only_reply_has_no_errors(tmp_path):
    path = tmp_path / "reply.dat"
    path.write_bytes(b"\r\n\r\n")
    with local_pipeline() as p:
        reply = p | ReadReply(str(path), shards=3)
        assert_that(reply[ReadReply.INTEGRITY_ERRORS], equal_to([]), label="NoErrors")
