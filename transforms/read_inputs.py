"""Read the request manifest and the NDOP reply as sharded blocks of NHS numbers.

Both read through Beam's ``FileSystems`` (``gs://`` as well as local paths) and emit
``(shard, int64 bytes)`` elements (see :mod:`transforms.shards`), ready for the join.

A reply line that is not a valid ``NHSNUMBER,`` is an *integrity error*: the reply is corrupt or
not ours, so every status derived from it is suspect. Such lines leave on the
:attr:`ReadReply.INTEGRITY_ERRORS` output with their line number and reason (never their text).
Only a header naming the NHS number is tolerated, and a reply with such a header and no number is an
integrity error too: no numbers means "everyone opted out", which only a truly empty reply may say.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam import pvalue
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline.request import datfile
from pipeline.core import nhs
from pipeline.request.datfile import iter_line_blocks
from pipeline.core.errors import at
from transforms import shards as shardlib
from transforms.vocabulary import METRICS_NAMESPACE, integrity_error

_LOGGER = logging.getLogger(__name__)

MANIFEST_COLUMN = "nhs_number"
PATIENT_ID_COLUMN = "patient_id"  # optional manifest column: the FHIR Patient id of each number
BLOCK_BYTES = datfile.BLOCK_BYTES
REASON_INVALID_NOTICE = "NDOP rejected the request: " + datfile.INVALID_NUMBERS_REPLY


def manifest_numbers(table: pa.Table, source: str, column: str = MANIFEST_COLUMN) -> np.ndarray:
    """The manifest block's numbers as int64; a manifest that is not all valid numbers is refused.

    The request step wrote only valid numbers, so anything else means the file was damaged or is
    not a manifest: fail rather than write Consents for a guessed cohort.
    """
    if column not in table.column_names:
        raise ValueError(f"{source}: manifest has no column {column!r}")
    values = table.column(column).cast(pa.string())
    values = values.combine_chunks() if values.num_chunks else pa.array([], pa.string())
    if len(values) == 0:
        return np.zeros(0, dtype=shardlib.DTYPE)
    if values.null_count or not pc.all(pc.match_substring_regex(values, pattern="^[0-9]{10}$")).as_py():
        raise ValueError(f"{source}: manifest holds a value that is not a 10-digit NHS number")
    if not nhs.check_digits_ok(values).all():
        raise ValueError(f"{source}: manifest holds an NHS number with an invalid check digit")
    return shardlib.to_int64(values)


class ShardManifestFn(beam.DoFn):
    """One manifest block (a Parquet row group) into ``(shard, int64 bytes)`` elements."""

    def __init__(self, source: str, shards: int, column: str = MANIFEST_COLUMN) -> None:
        self._source = source
        self._shards = shards
        self._column = column
        self._rows = Metrics.counter(METRICS_NAMESPACE, "manifest_rows")

    def process(self, table: pa.Table) -> Iterator[tuple[int, bytes]]:
        numbers = manifest_numbers(table, self._source, self._column)
        self._rows.inc(len(numbers))
        yield from shardlib.split_by_shard(numbers, self._shards)


class ReadManifest(beam.PTransform):
    """The request's ``manifest.parquet`` as ``(shard, int64 bytes)``; splits by row group."""

    def __init__(self, path: str, shards: int, column: str = MANIFEST_COLUMN) -> None:
        super().__init__()
        self._path = path
        self._shards = shards
        self._column = column

    def expand(self, pbegin: pvalue.PBegin) -> pvalue.PCollection:
        # validate=False: building the graph must not read the input (with validate=True Beam matches the
        # gs:// path at construction, which without bucket access stalls ~2 min in credential retries);
        # pipeline.beam.graph.check_inputs has already said, in one line, whether the file exists.
        return (
            pbegin
            | "ReadParquet" >> beam.io.ReadFromParquetBatched(self._path, columns=[self._column], validate=False)
            | "ShardManifest" >> beam.ParDo(ShardManifestFn(self._path, self._shards, self._column))
        )


def known_patient_ids(table: pa.Table) -> pa.Table:
    """``{nhs_number: int64, patient_id: string}`` for each manifest row whose Patient id is known."""
    ids = pc.fill_null(table.column(PATIENT_ID_COLUMN).combine_chunks().cast(pa.string()), "")
    known = pc.not_equal(ids, "")
    numbers = nhs.to_int64(pc.filter(table.column(MANIFEST_COLUMN).combine_chunks().cast(pa.string()), known))
    return pa.table({MANIFEST_COLUMN: pa.array(numbers, pa.int64()), PATIENT_ID_COLUMN: pc.filter(ids, known)})


def patient_ids_for(numbers: np.ndarray, blocks: Sequence[bytes]) -> list[str | None]:
    """The Patient id of each of ``numbers`` (None where unknown) from a shard's :class:`ReadPatientIds` blocks;
    a number the manifest lists twice takes the id of its first known row."""
    tables = [pa.ipc.open_stream(pa.py_buffer(block)).read_all() for block in blocks]
    if not tables or not len(numbers):
        return [None] * len(numbers)
    table = pa.concat_tables(tables)
    known = table.column(MANIFEST_COLUMN).to_numpy()
    order = np.argsort(known, kind="stable")
    known = known[order]
    first = np.concatenate([[True], known[1:] != known[:-1]]) if len(known) else np.zeros(0, bool)
    known, order = known[first], order[first]
    pos = np.minimum(np.searchsorted(known, numbers), len(known) - 1)
    found = known[pos] == numbers
    ids = table.column(PATIENT_ID_COLUMN).combine_chunks().take(pa.array(order[pos])).to_pylist()
    return [value if hit else None for value, hit in zip(ids, found.tolist())]


class ShardPatientIdsFn(beam.DoFn):
    """One manifest block's known Patient ids as ``(shard, Arrow IPC bytes)`` (the join's fourth input)."""

    def __init__(self, shards: int) -> None:
        self._shards = shards

    def process(self, table: pa.Table) -> Iterator[tuple[int, bytes]]:
        yield from shardlib.split_table_by_shard(known_patient_ids(table), self._shards)


class ReadPatientIds(beam.PTransform):
    """The manifest's optional ``patient_id`` column as ``(shard, Arrow IPC bytes)`` blocks of
    ``{nhs_number, patient_id}``, joined beside the manifest, reply and ledger (:class:`JoinWithLedger`) so each
    worker holds only its shard's ids, never the whole cohort's. Used only with ``--patient_ids``."""

    def __init__(self, path: str, shards: int) -> None:
        super().__init__()
        self._path = path
        self._shards = shards

    def expand(self, pbegin: pvalue.PBegin) -> pvalue.PCollection:
        return (
            pbegin
            | "ReadParquet" >> beam.io.ReadFromParquetBatched(
                self._path, columns=[MANIFEST_COLUMN, PATIENT_ID_COLUMN], validate=False)
            | "ShardPatientIds" >> beam.ParDo(ShardPatientIdsFn(self._shards))
        )


class ParseReplyFn(beam.DoFn):
    """Read and parse one reply file in newline-aligned blocks with :func:`pipeline.request.datfile.parse`."""

    INTEGRITY_ERRORS = "integrity_errors"

    def __init__(self, shards: int, block_bytes: int = BLOCK_BYTES) -> None:
        self._shards = shards
        self._block_bytes = block_bytes
        self._rows = Metrics.counter(METRICS_NAMESPACE, "reply_rows")
        self._blank = Metrics.counter(METRICS_NAMESPACE, "reply_blank_lines")
        self._header = Metrics.counter(METRICS_NAMESPACE, "reply_header_lines")
        self._bad = Metrics.counter(METRICS_NAMESPACE, "reply_bad_lines")
        self._errors = Metrics.counter(METRICS_NAMESPACE, "integrity_errors")

    def process(self, path: str) -> Iterator[Any]:
        numbers_seen = header_lines = 0
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            for first_line, block in iter_line_blocks(handle, self._block_bytes):
                parsed = datfile.parse(block, first_line=first_line, header_allowed=True)
                self._blank.inc(parsed.blank_lines)
                self._header.inc(parsed.header_lines)
                header_lines += parsed.header_lines
                numbers_seen += len(parsed.numbers)
                for line, reason in parsed.bad_lines:
                    if reason == datfile.INVALID_NUMBERS_REPLY:
                        reason = REASON_INVALID_NOTICE
                    self._bad.inc()
                    self._errors.inc()
                    yield pvalue.TaggedOutput(self.INTEGRITY_ERRORS, integrity_error(f"{at(path, line)}: {reason}"))
                numbers = shardlib.to_int64(parsed.numbers)
                self._rows.inc(len(numbers))
                yield from shardlib.split_by_shard(numbers, self._shards)
        if header_lines and not numbers_seen:
            # Zero numbers reads as "everyone opted out": only a truly empty reply may say that.
            self._errors.inc()
            reason = f"{at(path, 1)}: {datfile.REASON_HEADER_ONLY}"
            yield pvalue.TaggedOutput(self.INTEGRITY_ERRORS, integrity_error(reason))


class ReadReply(beam.PTransform):
    """The NDOP reply as ``(shard, int64 bytes)`` (main output ``numbers``) plus integrity errors.

    The reply is read by one worker, sequentially: at 12 bytes a line even all of England is
    about 720 MB, seconds of parsing, and line numbers stay exact.
    """

    INTEGRITY_ERRORS = ParseReplyFn.INTEGRITY_ERRORS

    def __init__(self, path: str, shards: int, block_bytes: int = BLOCK_BYTES) -> None:
        super().__init__()
        self._path = path
        self._shards = shards
        self._block_bytes = block_bytes

    def expand(self, pbegin: pvalue.PBegin) -> pvalue.DoOutputsTuple:
        return (
            pbegin
            | "ReplyPath" >> beam.Create([self._path])
            | "ParseReply" >> beam.ParDo(ParseReplyFn(self._shards, self._block_bytes)).with_outputs(
                self.INTEGRITY_ERRORS, main="numbers"
            )
        )
