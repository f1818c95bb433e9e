"""The Consent ledger: what the store holds, so a run writes only what changed.

One row per patient ever checked (:data:`SCHEMA`): NHS number, status, when that status was first seen,
when NDOP last confirmed it (``checked_at``), the ``dateTime`` of the Consent as last written
(``written_at``), the Consent id and the request that last wrote it.

Per join shard, :func:`decide` (pure numpy, no Beam) takes the shard's classification
(:func:`transforms.join.classify`, the one opt-out rule) and the shard's previous ledger rows, and says
who is written:

- not in the ledger (new patient), or status changed: write;
- status unchanged but the Consent's refresh slot has passed since it was written: write (refresh);
- otherwise: no write (``unchanged``);
- in the ledger but not in this request (left the cohort): the row is kept untouched, never written;
- in the ledger with a newer answer than this one (``checked_at`` later: an older request processed after a newer
  one): the row is kept untouched, never written, and counted as ``superseded``. An older answer never overwrites
  a newer one.

Refresh slots: each patient has a deterministic day offset ``o`` in ``[0, N)`` (:func:`refresh_offset`,
a keyed splitmix64 hash of the NHS number); its slots are the UTC days ``d`` with ``(d - o) % N == 0``.
A Consent is refreshed when it was written before the patient's latest slot. So about cohort/N
Consents are refreshed on any day from the first day after a full load on, a second run on the same
day refreshes nobody twice, and no written ``dateTime`` lags the last check by ``N`` days or more.

In the pipeline (:class:`JoinWithLedger`) the previous ledger arrives per shard beside the manifest and reply
blocks, never as per-patient Python objects: a file whose rows are all one shard's (what the run before wrote,
with the same ``--shards``) as its path, read by the worker deciding that shard; any other file as Arrow record
batches serialised to ``bytes``. With ``ledger_out`` each shard's new ledger file is written as the shard is
decided. So the runner's buffers hold neither the old nor the new 10M-row ledger (issue 24: the 10M daily
decision's peak went from 2.6-2.9 GB to 1.3-1.4 GB, docs/benchmarks.md).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam import pvalue
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.fileio import EmptyMatchTreatment
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms import shards as shardlib
from transforms.consent_ids import IdKey, KeySource
from transforms.hooks import NO_HOOKS, WorkerHooks
from transforms.join import MANIFEST, REPLY, Classified, ClassifyShardFn
from transforms.read_inputs import patient_ids_for
from transforms.vocabulary import LEDGER_COUNTERS, METRICS_NAMESPACE, NOT_OPTED_OUT, OPTED_OUT

_LOGGER = logging.getLogger(__name__)

LEDGER = "ledger"
PATIENT_IDS = "patient_ids"  # the join's optional fourth input (transforms.read_inputs.ReadPatientIds)
DEFAULT_REFRESH_DAYS = 30
ROW_GROUP_ROWS = 262_144
DAY = 86_400
STATUS_CODES = (NOT_OPTED_OUT, OPTED_OUT)  # status code 0, 1 (the dictionary of the status column)
_TS = pa.timestamp("s", tz="UTC")
SCHEMA = pa.schema([
    ("nhs_number", pa.int64()),
    ("status", pa.dictionary(pa.int8(), pa.string())),
    ("status_since", _TS),  # when this status was first seen
    ("checked_at", _TS),  # when NDOP last confirmed it
    ("written_at", _TS),  # the dateTime of the Consent as last written to the store
    ("consent_id", pa.string()),
    ("request_id", pa.dictionary(pa.int32(), pa.string())),
])

COUNTERS = LEDGER_COUNTERS  # the ledger's counter names, defined once in transforms.vocabulary

_KEY = np.uint64(0x6E646F702D6C6467)  # "ndop-ldg": fixed, so a patient keeps its place in the window


def splitmix64(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser over uint64 (wrapping arithmetic): a fast, well-spread 64-bit hash."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def refresh_offset(numbers: np.ndarray, refresh_days: int) -> np.ndarray:
    """Each patient's day offset in the refresh window, from a keyed hash of the NHS number."""
    return (splitmix64(numbers.astype(np.uint64) ^ _KEY) % np.uint64(refresh_days)).astype(np.int64)


def refresh_due(numbers: np.ndarray, written_at: np.ndarray, now: int, refresh_days: int) -> np.ndarray:
    """Whether each Consent (written at ``written_at``, epoch seconds) is refreshed by a check at ``now``."""
    if refresh_days <= 0:
        return np.zeros(len(numbers), dtype=bool)
    today = now // DAY
    last_slot = today - (today - refresh_offset(numbers, refresh_days)) % refresh_days
    return written_at // DAY < last_slot


def epoch_seconds(moment: str) -> int:
    """An ISO 8601 date-time (``checked_at``) as whole epoch seconds."""
    parsed = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    return int(parsed.astimezone(timezone.utc).timestamp())


@dataclass(frozen=True)
class Decision:
    """One shard's outcome: who is written (sorted int64 by status), the counts, the new ledger rows."""

    write_opted_out: np.ndarray
    write_not_opted_out: np.ndarray
    counts: dict[str, int]
    ledger: pa.Table


def empty_ledger() -> pa.Table:
    return SCHEMA.empty_table()


def _status_codes(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The status column as int8 codes (1 = opted out), whatever dictionary order a file gave it."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(array.type, pa.DictionaryType):
        lookup = np.array([value == OPTED_OUT for value in array.dictionary.to_pylist()], dtype=np.int8)
        indices = array.indices.to_numpy(zero_copy_only=False)
        return lookup[indices] if len(lookup) else np.zeros(len(array), np.int8)
    opted_out = pc.fill_null(pc.equal(array.cast(pa.string()), OPTED_OUT), False)
    return opted_out.to_numpy(zero_copy_only=False).astype(np.int8)


def _seconds(column: pa.ChunkedArray) -> np.ndarray:
    return column.cast(pa.int64()).to_numpy()


def decide(classified: Classified, previous: pa.Table, checked_at: str, request_id: str, key: IdKey,
           refresh_days: int = DEFAULT_REFRESH_DAYS, full_refresh: bool = False) -> Decision:
    """Decide one shard: who is written, and the shard's new ledger rows (see the module docstring).

    ``previous`` holds the shard's earlier ledger rows (:data:`SCHEMA`, any order, unique numbers); a new
    patient's Consent id comes from ``key`` (the ledger keeps it from then on).
    """
    now = epoch_seconds(checked_at)
    numbers = np.concatenate([classified.opted_out, classified.not_opted_out])
    status = np.concatenate([np.ones(len(classified.opted_out), np.int8),
                             np.zeros(len(classified.not_opted_out), np.int8)])
    order = np.argsort(numbers, kind="stable")
    numbers, status = numbers[order], status[order]

    previous = previous.combine_chunks() if previous.num_rows else previous
    old_numbers = previous.column("nhs_number").to_numpy() if previous.num_rows else np.zeros(0, np.int64)
    old_order = np.argsort(old_numbers, kind="stable")
    old_sorted = old_numbers[old_order]
    if len(old_sorted) > 1 and bool((old_sorted[1:] == old_sorted[:-1]).any()):
        raise ValueError("the previous ledger holds a patient more than once (stale *.parquet in --ledger_in?)")
    pos = np.searchsorted(old_sorted, numbers)
    pos_clipped = np.minimum(pos, max(len(old_sorted) - 1, 0))
    if len(old_sorted):
        known = (pos < len(old_sorted)) & (old_sorted[pos_clipped] == numbers)
    else:
        known = np.zeros(len(numbers), bool)
    old_row = np.where(known, old_order[pos_clipped] if len(old_sorted) else 0, -1)  # row in previous, -1 if new

    old_status = _status_codes(previous.column("status")) if previous.num_rows else np.zeros(0, np.int8)
    old_since = _seconds(previous.column("status_since")) if previous.num_rows else np.zeros(0, np.int64)
    old_written = _seconds(previous.column("written_at")) if previous.num_rows else np.zeros(0, np.int64)
    old_checked = _seconds(previous.column("checked_at")) if previous.num_rows else np.zeros(0, np.int64)

    # Newest answer wins: a patient whose row holds a newer NDOP answer than this one is left exactly as it is
    # (no write, the row kept like a patient who left the cohort) and counted as superseded.
    superseded = np.zeros(len(numbers), bool)
    superseded[known] = old_checked[old_row[known]] > now
    if superseded.any():
        keep = ~superseded
        numbers, status, known, old_row = numbers[keep], status[keep], known[keep], old_row[keep]
    rows = old_row[known]
    changed = np.zeros(len(numbers), bool)
    changed[known] = old_status[rows] != status[known]
    new = ~known
    due = np.zeros(len(numbers), bool)
    same = known & ~changed
    due[same] = refresh_due(numbers[same], old_written[old_row[same]], now, refresh_days)
    write = np.ones(len(numbers), bool) if full_refresh else (new | changed | due)

    in_request = np.zeros(previous.num_rows, bool)
    in_request[rows] = True
    counts = {
        "to_write": int(write.sum()),
        "new_patients": int(new.sum()),
        "newly_opted_out": int((changed & (status == 1)).sum()),
        "opt_out_withdrawn": int((changed & (status == 0)).sum()),
        "refreshed": int((write & same).sum()),
        "unchanged": int((~write).sum()),
        "left_cohort": int((~in_request).sum()) - int(superseded.sum()),
        "superseded": int(superseded.sum()),
    }

    # The shard's new ledger: every requested patient (updated), then those who left (untouched).
    since = np.full(len(numbers), now, np.int64)
    keep_since = known & ~changed
    since[keep_since] = old_since[old_row[keep_since]]
    written_at = np.full(len(numbers), now, np.int64)
    written_at[~write] = old_written[old_row[~write]]
    ids: list[pa.Array] = []
    if previous.num_rows:
        ids.append(previous.column("consent_id").combine_chunks().take(pa.array(np.where(known, old_row, 0))))
    consent_id = key.consent_id
    fresh = pa.array([consent_id(n) for n in shardlib.to_strings(numbers[new])], pa.string())
    if previous.num_rows:
        consent_ids = _fill(ids[0], new, fresh)
    else:
        consent_ids = fresh
    if previous.num_rows:
        old_rid = previous.column("request_id").combine_chunks().cast(pa.string()).take(
            pa.array(np.where(known, old_row, 0)))
    else:
        old_rid = pa.nulls(len(numbers), pa.string())
    request_ids = pc.if_else(pa.array(write), pa.scalar(request_id, pa.string()), old_rid)
    current = pa.table({
        "nhs_number": pa.array(numbers, pa.int64()),
        "status": pa.DictionaryArray.from_arrays(pa.array(status, pa.int8()), pa.array(STATUS_CODES)),
        "status_since": pa.array(since, pa.int64()).cast(_TS),
        "checked_at": pa.array(np.full(len(numbers), now, np.int64)).cast(_TS),
        "written_at": pa.array(written_at, pa.int64()).cast(_TS),
        "consent_id": consent_ids,
        "request_id": request_ids.dictionary_encode(),
    }, schema=SCHEMA)
    left = previous.filter(pa.array(~in_request)) if previous.num_rows else empty_ledger()
    ledger = pa.concat_tables([current, _conform(left)]) if left.num_rows else current
    write_status = status[write]
    return Decision(
        write_opted_out=numbers[write][write_status == 1],
        write_not_opted_out=numbers[write][write_status == 0],
        counts=counts,
        ledger=ledger,
    )


def _fill(base: pa.Array, mask: np.ndarray, values: pa.Array) -> pa.Array:
    """``base`` with the rows where ``mask`` is set replaced, in order, by ``values``."""
    if not mask.any():
        return base
    merged = pa.concat_arrays([base, values])
    index = np.arange(len(base))
    index[mask] = len(base) + np.arange(int(mask.sum()))
    return merged.take(pa.array(index))


def _conform(table: pa.Table) -> pa.Table:
    """A table read from any ledger file in exactly :data:`SCHEMA` (dictionaries re-encoded)."""
    if table.schema.equals(SCHEMA):  # ours already: every reader decodes status by its dictionary
        return table
    columns = []
    for field in SCHEMA:
        column = table.column(field.name)
        if isinstance(field.type, pa.DictionaryType):
            if field.name == "status":
                codes = _status_codes(column)
                column = pa.DictionaryArray.from_arrays(pa.array(codes, pa.int8()), pa.array(STATUS_CODES))
            else:
                column = column.cast(pa.string()).combine_chunks().dictionary_encode()
                column = column.cast(field.type)
        else:
            column = column.cast(field.type)
        columns.append(column)
    return pa.table(columns, schema=SCHEMA)


# -- the table as Beam elements ---------------------------------------------------------------------------


_FILE_BLOCK = b"ndop-ledger-file\n"  # a block naming a ledger file whose rows are all one shard's (not Arrow IPC)


def file_block(path: str) -> bytes:
    """The block that stands for a whole ledger file holding one shard's rows: its path, read where it is decided."""
    return _FILE_BLOCK + path.encode("utf-8")


def read_ledger_file(path: str) -> pa.Table:
    """One ledger Parquet file's rows, in :data:`SCHEMA`."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return _conform(pq.read_table(handle, columns=SCHEMA.names))


def from_bytes(blocks: Sequence[bytes]) -> pa.Table:
    """A shard's ledger rows from its blocks: Arrow IPC streams, or :func:`file_block` names of whole files."""
    tables = [read_ledger_file(block[len(_FILE_BLOCK):].decode("utf-8")) if block.startswith(_FILE_BLOCK)
              else pa.ipc.open_stream(pa.py_buffer(block)).read_all() for block in blocks]
    tables = [_conform(t) for t in tables if t.num_rows]
    return pa.concat_tables(tables) if tables else empty_ledger()


def _one_shard(parquet: pq.ParquetFile, shards: int) -> int | None:
    """The shard every row of the file belongs to, or None when its rows span shards (or it has none).

    Reads only the ``nhs_number`` column, row group by row group, and stops at the first other shard."""
    shard = None
    for group in range(parquet.num_row_groups):
        keys = shardlib.shard_of(parquet.read_row_group(group, columns=["nhs_number"]).column("nhs_number")
                                 .to_numpy(), shards)
        if not len(keys):
            continue
        if shard is None:
            shard = int(keys[0])
        if bool((keys != shard).any()):
            return None
    return shard


class ReadLedgerFileFn(beam.DoFn):
    """One ledger Parquet file into ``(shard, block)``.

    A file whose rows are all one shard's (what :class:`WriteLedgerShards` writes, read again with the same
    ``--shards``) moves as one :func:`file_block`, its path: DecideShard reads it, so the runner never buffers a
    10M-row ledger. Any other file moves row group by row group as ``(shard, Arrow IPC bytes)``.
    """

    def __init__(self, shards: int) -> None:
        self._shards = shards

    def process(self, path: str) -> Iterator[tuple[int, bytes]]:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            parquet = pq.ParquetFile(handle)
            missing = set(SCHEMA.names) - set(parquet.schema_arrow.names)
            if missing:
                raise ValueError(f"{path}: not a ledger file (no column {', '.join(sorted(missing))})")
            shard = _one_shard(parquet, self._shards)
            if shard is not None:  # (no early ``return`` in a generator: apache/beam#22969)
                yield shard, file_block(path)
            else:
                for group in range(parquet.num_row_groups):
                    table = _conform(parquet.read_row_group(group, columns=SCHEMA.names))
                    yield from shardlib.split_table_by_shard(table, self._shards)


def ledger_files(folder: str) -> list[str]:
    """Every ``*.parquet`` in a ledger folder (any ``FileSystems`` path), sorted."""
    matched = FileSystems.match([FileSystems.join(folder, "*.parquet")])[0].metadata_list
    return sorted(m.path for m in matched)


class ReadLedger(beam.PTransform):
    """Every ``*.parquet`` in ``folder`` as ``(shard, Arrow IPC bytes)``; no folder: an empty ledger."""

    def __init__(self, folder: str | None, shards: int) -> None:
        super().__init__()
        self._folder = folder
        self._shards = shards

    def expand(self, pbegin: pvalue.PBegin) -> pvalue.PCollection:
        if not self._folder:
            paths = pbegin | "NoLedger" >> beam.Create([]).with_output_types(str)
        else:  # matched when the pipeline runs: building the graph reads nothing
            paths = (
                pbegin
                | "MatchLedgerFiles" >> fileio.MatchFiles(FileSystems.join(self._folder, "*.parquet"),
                                                          empty_match_treatment=EmptyMatchTreatment.ALLOW)
                | "LedgerPaths" >> beam.Map(_path_of)
            )
        return paths | "ReadLedgerFiles" >> beam.ParDo(ReadLedgerFileFn(self._shards))


def _path_of(metadata: Any) -> str:
    return str(metadata.path)


class DecideShardFn(ClassifyShardFn):
    """A ``(shard, {manifest, reply, ledger})`` group: classified (join.py's rule), then decided.

    Main output: ``(status, int64 array)`` batches of the Consents to write (what BuildConsent takes; with a
    :data:`PATIENT_IDS` input ``(status, int64 array, Patient ids)``), each at
    most ``chunk_size`` long (one FHIR bundle's worth), so a runner can spread one shard's writes over many
    workers after a ``Reshuffle`` (pipeline/beam/graph.py) and a retried work item rewrites one chunk, not a shard;
    :attr:`LEDGER`: the shard's new ledger rows as Arrow IPC bytes, or, with ``ledger_out``, written here to the
    shard's file in that folder and named by a :func:`file_block` (so the runner does not hold a 10M-row ledger
    until :class:`WriteLedgerShards` may keep it); :attr:`INTEGRITY_ERRORS` as join.py's.
    """

    LEDGER = LEDGER

    def __init__(self, checked_at: str, request_id: str, key: KeySource, refresh_days: int,
                 full_refresh: bool, chunk_size: int | None = None, hooks: WorkerHooks = NO_HOOKS,
                 ledger_out: str | None = None) -> None:
        super().__init__()
        self._hooks = hooks
        self._ledger_out = ledger_out
        self._key_source = key
        self._chunk_size = chunk_size
        self._checked_at = checked_at
        self._request_id = request_id
        self._refresh_days = refresh_days
        self._full_refresh = full_refresh
        self._ledger_counters = {key: Metrics.counter(METRICS_NAMESPACE, name) for key, name in COUNTERS.items()}

    def setup(self) -> None:
        self._key: IdKey = self._key_source.load()

    def process(self, element: tuple[int, dict[str, Any]]) -> Iterator[Any]:
        shard, grouped = element
        result = self.classify_group(grouped)
        yield from self.integrity_outputs(result)
        decision = decide(result, from_bytes(list(grouped[LEDGER])), self._checked_at, self._request_id,
                          self._key, self._refresh_days, self._full_refresh)
        for key, value in decision.counts.items():
            self._ledger_counters[key].inc(value)
        self._ledger_counters["ledger_rows"].inc(decision.ledger.num_rows)
        self._hooks.expecting(len(decision.write_opted_out) + len(decision.write_not_opted_out))
        id_blocks = list(grouped[PATIENT_IDS]) if PATIENT_IDS in grouped else None
        for status, numbers in ((OPTED_OUT, decision.write_opted_out), (NOT_OPTED_OUT, decision.write_not_opted_out)):
            ids = patient_ids_for(numbers, id_blocks) if id_blocks is not None else None
            start = 0
            for chunk in shardlib.chunks(numbers, self._chunk_size):
                yield (status, chunk) if ids is None else (status, chunk, ids[start : start + len(chunk)])
                start += len(chunk)
        if decision.ledger.num_rows and self._ledger_out:
            path = part_path(self._ledger_out, shard)
            write_ledger_file(path, decision.ledger)
            yield pvalue.TaggedOutput(self.LEDGER, (shard, file_block(path)))
        elif decision.ledger.num_rows:
            yield pvalue.TaggedOutput(self.LEDGER, (shard, shardlib.table_to_bytes(decision.ledger)))


class JoinWithLedger(beam.PTransform):
    """``{manifest, reply, ledger}`` shards (and optionally :data:`PATIENT_IDS`) -> Consents to write, new ledger
    rows, integrity errors.

    Outputs (``.with_outputs``): ``to_write`` (main), :attr:`LEDGER`, :attr:`INTEGRITY_ERRORS`.
    """

    LEDGER = LEDGER
    INTEGRITY_ERRORS = ClassifyShardFn.INTEGRITY_ERRORS

    def __init__(self, checked_at: str, request_id: str, key: KeySource, refresh_days: int = DEFAULT_REFRESH_DAYS,
                 full_refresh: bool = False, chunk_size: int | None = None, hooks: WorkerHooks = NO_HOOKS,
                 ledger_out: str | None = None) -> None:
        """``chunk_size``: the longest ``to_write`` array (None: one per status and shard). ``ledger_out``: the
        folder :class:`WriteLedgerShards` writes the new ledger to; each shard's file is then written as the shard
        is decided (and removed by WriteLedgerShards when the run has integrity errors)."""
        super().__init__()
        if refresh_days < 0:
            raise ValueError("refresh_days must be 0 or more")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        epoch_seconds(checked_at)
        self._fn = DecideShardFn(checked_at, request_id, key, refresh_days, full_refresh, chunk_size, hooks,
                                 ledger_out)

    def expand(self, inputs: dict[str, pvalue.PCollection]) -> pvalue.DoOutputsTuple:
        assert set(inputs) - {PATIENT_IDS} == {MANIFEST, REPLY, LEDGER}, sorted(inputs)
        return (
            inputs
            | "JoinManifestReplyLedger" >> beam.CoGroupByKey()
            | "DecideShard" >> beam.ParDo(self._fn).with_outputs(self.LEDGER, self.INTEGRITY_ERRORS, main="to_write")
        )


def part_path(folder: str, shard: int) -> str:
    """A shard's file in a new ledger folder."""
    return FileSystems.join(folder, f"part-{shard:05d}.parquet")


def write_ledger_file(path: str, table: pa.Table) -> None:
    """One shard's new ledger rows as a Parquet file (a retry rewrites the same file)."""
    with FileSystems.create(path, mime_type="application/octet-stream",
                            compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        pq.write_table(table, handle, row_group_size=ROW_GROUP_ROWS, compression="zstd")


class WriteLedgerShardFn(beam.DoFn):
    """One shard's new ledger rows into ``<folder>/part-<shard>.parquet`` (a retry rewrites the same file).

    A :func:`file_block` naming that very file (DecideShard wrote it) is kept as it is, or removed when the run has
    integrity errors."""

    def __init__(self, folder: str) -> None:
        self._folder = folder

    def process(self, element: tuple[int, bytes], integrity_errors: int = 0) -> Iterator[str]:
        # With integrity errors nothing was written to the store: no ledger either. (No early ``return`` in a
        # generator: Beam warns about ``yield`` beside ``return``, apache/beam#22969.)
        shard, block = element
        path = part_path(self._folder, shard)
        written = block == file_block(path)
        if integrity_errors and written and FileSystems.exists(path):
            FileSystems.delete([path])
        elif not integrity_errors:
            if not written:
                write_ledger_file(path, from_bytes([block]))
            yield path


class WriteLedgerShards(beam.PTransform):
    """The new ledger's ``(shard, block)`` elements (one per join shard, from :class:`JoinWithLedger`)
    into one ``*.parquet`` per shard under ``folder``; nothing when the run had integrity errors."""

    def __init__(self, folder: str, integrity_errors: pvalue.PCollection | None = None) -> None:
        super().__init__()
        self._folder = folder
        self._integrity_errors = integrity_errors

    def expand(self, blocks: pvalue.PCollection) -> pvalue.PCollection:
        side = {}
        if self._integrity_errors is not None:
            side["integrity_errors"] = pvalue.AsSingleton(self._integrity_errors)
        return blocks | "WriteLedgerFiles" >> beam.ParDo(WriteLedgerShardFn(self._folder), **side)


# -- the ledger's change log (pipeline/ledger/history.py writes it; ApplyOptOuts reads it for --as-of) -------------

HISTORY_COLUMNS = ["nhs_number", "status", "status_since"]


def read_history(folder: str) -> pa.Table | None:
    """Every change-log row (any order), or None when there is none."""
    files = sorted(Path(folder).glob("*.parquet"))  # a local folder: the work dir's
    tables = [pq.read_table(path, columns=HISTORY_COLUMNS) for path in files]
    tables = [t for t in tables if t.num_rows]
    return pa.concat_tables(tables, promote_options="permissive") if tables else None
