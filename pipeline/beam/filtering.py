"""``ndop filter``: a CSV or Parquet file in, the same file without the patients who may not leave, out.

The Beam pipeline (:func:`build_pipeline`): the input file is read as Arrow record batches (Parquet row groups,
CSV blocks read with every column as text, so values leave exactly as they came), each batch goes through
:class:`transforms.apply_opt_outs.ApplyOptOuts` against the Consent ledger, and the kept rows of each batch
are written as one Arrow part under a temporary folder beside the output. The launcher then joins the parts in
input order into the output (CSV or Parquet), writes the manifest and appends one ``disclosure`` line to the
audit log. Nothing carries the output's name until it is whole; a local output is 0600.

Before anything runs, fail closed (one line, exit 2): no ledger, a ledger describing another FHIR store than
``--fhir-url``/``FHIR_URL``, a ledger last checked by NDOP longer ago than ``--max-age`` (default the staleness
setting, 21 days), an unknown or expired ``--purpose``.
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, time, timezone
from pathlib import Path
from typing import Any, Iterator

import apache_beam as beam
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.lifecycle import audit
from pipeline.core.errors import InputError
from pipeline.core.files import PRIVATE, atomic_writer, private_dir
from pipeline.core.nhs import redact
from pipeline.core.clock import isoformat, utcnow
from pipeline.lifecycle.state import WorkDir
from transforms import apply_opt_outs as apply
from transforms.apply_opt_outs import ApplyOptOuts, LedgerRefused, LedgerSource
from transforms.ledger_join import ledger_files
from pipeline.ledger import versions as ledgers
from pipeline.beam.graph import pipeline_options
from pipeline.ledger.history import history_folder

_LOGGER = logging.getLogger(__name__)

DEFAULT_COLUMN = "nhs_number"
FORMATS = ("auto", "csv", "parquet")
CSV_BLOCK = 8 << 20  # bytes of CSV a batch: about 200,000 rows of a narrow file
COUNTS_FILE = "counts.json"


def file_format(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    name = path.lower()
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise InputError(f"{path}: unknown file format (use .csv or .parquet, or --format)")


def parse_moment(text: str, option: str, end_of_day: bool) -> datetime:
    """``YYYY-MM-DD`` (the day's end or start, UTC) or an ISO 8601 date-time; anything else is one line."""
    try:
        if len(text) == 10:
            day = datetime.strptime(text, "%Y-%m-%d").date()
            return datetime.combine(day, time(23, 59, 59) if end_of_day else time(0), timezone.utc)
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f"{option}={text!r} is not a date (YYYY-MM-DD) or an ISO 8601 date-time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


# -- reading and writing batches -----------------------------------------------------------------------------


def _csv_names(handle: Any) -> list[str]:
    reader = pacsv.open_csv(handle, read_options=pacsv.ReadOptions(block_size=1 << 16))
    return list(reader.schema.names)


def iter_batches(path: str, fmt: str) -> Iterator[pa.RecordBatch]:
    """The file's rows as record batches (CSV: every column as text, blanks as empty strings)."""
    if fmt == "parquet":
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            parquet = pq.ParquetFile(handle)
            for group in range(parquet.num_row_groups):
                yield from parquet.read_row_group(group).to_batches()
        return
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        names = _csv_names(handle)
    convert = pacsv.ConvertOptions(column_types={name: pa.string() for name in names}, strings_can_be_null=False)
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        reader = pacsv.open_csv(handle, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK),
                                convert_options=convert)
        yield from reader


class PlanRowGroupsFn(beam.DoFn):
    """A Parquet path -> ``(row group, path)``: small elements, spread before any row is read."""

    def process(self, path: str) -> Iterator[tuple[int, str]]:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            for group in range(pq.ParquetFile(handle).num_row_groups):
                yield group, path


class ReadRowGroupFn(beam.DoFn):
    """``(row group, path)`` -> ``(row group, Table)``, read where it is processed."""

    def process(self, element: tuple[int, str]) -> Iterator[tuple[int, pa.Table]]:
        group, path = element
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            yield group, pq.ParquetFile(handle).read_row_group(group)


class ReadBatchesFn(beam.DoFn):
    """A file path -> ``(sequence, RecordBatch)``, numbered so the output keeps the input's order."""

    def __init__(self, fmt: str) -> None:
        self._fmt = fmt

    def process(self, path: str) -> Iterator[tuple[int, pa.RecordBatch]]:
        try:
            for seq, batch in enumerate(iter_batches(path, self._fmt)):
                yield seq, batch
        except pa.ArrowInvalid as err:  # a malformed row far into the file: one line, never the row's values
            raise InputError(f"{path}: cannot be read as {self._fmt}: {redact(str(err).splitlines()[0])}") from None


class WritePartFn(beam.DoFn):
    """``(sequence, kept RecordBatch)`` -> ``<parts>/part-<sequence>.arrow`` (a retry rewrites the same file)."""

    def __init__(self, parts: str) -> None:
        self._parts = parts

    def process(self, element: tuple[int, pa.RecordBatch | pa.Table]) -> Iterator[str]:
        seq, batch = element
        path = FileSystems.join(self._parts, f"part-{seq:08d}.arrow")
        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            with ipc.new_file(handle, batch.schema) as writer:
                writer.write(batch)
        yield path


class WriteCountsFn(beam.DoFn):
    def __init__(self, parts: str) -> None:
        self._parts = parts

    def process(self, counts: list[tuple[str, int]]) -> Iterator[str]:
        path = FileSystems.join(self._parts, COUNTS_FILE)
        with FileSystems.create(path, mime_type="application/json") as handle:
            handle.write(json.dumps(dict(counts)).encode())
        yield path


@dataclass(frozen=True)
class FilterSettings:
    input: str
    output: str
    column: str = DEFAULT_COLUMN
    fmt: str = "auto"
    unknown: str = "drop"
    max_age_days: float | None = apply.DEFAULT_MAX_AGE_DAYS
    fhir_base_url: str | None = None
    exempt: bool = False
    as_of: datetime | None = None


def build_pipeline(pipeline: beam.Pipeline, settings: FilterSettings, source: apply.Source, parts: str) -> None:
    """The filter as a Beam graph: read batches, apply the opt-outs, write the kept parts and the counts."""
    fmt = file_format(settings.input, settings.fmt)
    as_of = int(settings.as_of.timestamp()) if settings.as_of else None
    path = pipeline | "InputPath" >> beam.Create([settings.input])
    if fmt == "parquet":  # each worker reads the row groups it processes
        batches = (path
                   | "PlanRowGroups" >> beam.ParDo(PlanRowGroupsFn())
                   | "SpreadRowGroups" >> beam.Reshuffle()
                   | "ReadRowGroups" >> beam.ParDo(ReadRowGroupFn()))
    else:  # a CSV is read in order by one worker, its blocks spread
        batches = (path
                   | "ReadBatches" >> beam.ParDo(ReadBatchesFn(fmt))
                   | "SpreadBatches" >> beam.Reshuffle())
    result = (
        batches
        | "ApplyOptOuts" >> ApplyOptOuts(column=settings.column, source=source, unknown=settings.unknown,
                                         max_age_days=settings.max_age_days, fhir_base_url=settings.fhir_base_url,
                                         exempt=settings.exempt, as_of=as_of)
    )
    _ = result[ApplyOptOuts.KEPT] | "WriteParts" >> beam.ParDo(WritePartFn(parts))
    _ = (result[ApplyOptOuts.COUNTS]
         | "AllCounts" >> beam.combiners.ToList()
         | "WriteCounts" >> beam.ParDo(WriteCountsFn(parts)))


def _parts_folder(output: str) -> str:
    if "://" in output:
        head, _, name = output.rpartition("/")
        return f"{head}/.{name}.parts-{uuid.uuid4().hex[:8]}"
    target = Path(output)
    folder = target.parent / f".{target.name}.parts-{uuid.uuid4().hex[:8]}"
    private_dir(folder)
    return str(folder)


def _open_output(path: str) -> Any:
    if "://" in path:
        return FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED)
    return atomic_writer(path, PRIVATE)


def join_parts(parts: str, output: str, fmt: str, schema: pa.Schema) -> int:
    """The parts, in input order, as one CSV or Parquet file at ``output``; returns the rows written."""
    found = sorted(m.path for m in FileSystems.match([FileSystems.join(parts, "part-*.arrow")])[0].metadata_list)
    rows = 0
    with _open_output(output) as handle:
        writer: Any = (pq.ParquetWriter(handle, schema, compression="zstd") if fmt == "parquet"
                       else pacsv.CSVWriter(handle, schema))
        try:
            for path in found:
                with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as part:
                    table = ipc.open_file(pa.BufferReader(part.read())).read_all()
                rows += table.num_rows
                writer.write_table(table.cast(schema) if not table.schema.equals(schema) else table)
        finally:
            writer.close()
    return rows


def _input_schema(path: str, fmt: str) -> pa.Schema:
    """The file's columns as the output will have them (Parquet: its own schema; CSV: every column as text)."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        if fmt == "parquet":
            return pq.ParquetFile(handle).schema_arrow
        return pa.schema([(name, pa.string()) for name in _csv_names(handle)])


def oldest_checked_at(folder: str) -> str | None:
    """The ledger's oldest ``checked_at`` (from the Parquet statistics; no number read)."""

    oldest = None
    for path in ledger_files(folder):
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            table = pq.read_table(handle, columns=["checked_at"])
        if table.num_rows:
            low = pa.compute.min(table.column("checked_at")).as_py()
            oldest = low if oldest is None or low < oldest else oldest
    return isoformat(oldest) if oldest is not None else None


def check_input(settings: FilterSettings) -> str:
    """The input's format; refuses (one line) a missing file, an unknown format or a missing column."""
    if not FileSystems.exists(settings.input):
        raise InputError(f"{settings.input}: no such file")
    fmt = file_format(settings.input, settings.fmt)
    try:
        names = _input_schema(settings.input, fmt).names
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"{settings.input}: cannot be read as {fmt} ({type(err).__name__})") from None
    if settings.column not in names:
        raise InputError(f"{settings.input}: no column {settings.column!r} (columns: {', '.join(names)})")
    if os.path.abspath(settings.input) == os.path.abspath(settings.output):
        raise InputError(f"{settings.output}: the output would overwrite the input")
    return fmt


def ledger_folder(work_dir: WorkDir, ledger: str | None) -> str:

    if ledger:
        return ledger
    found = ledgers.current(work_dir)
    if found is None:
        raise InputError(f"{work_dir.root}: no Consent ledger yet (run ndop run or ndop process first, "
                         "or give --ledger): nothing can be filtered without one")
    return str(found.resolve())


def run_filter(work_dir: WorkDir, settings: FilterSettings, *, ledger: str | None = None,
               purpose: dict[str, Any] | None = None, beam_args: list[str] | None = None,
               manifest_path: str | None = None) -> dict[str, Any]:
    """Check everything, run the pipeline, join the parts, write the manifest and the audit line."""

    fmt = check_input(settings)
    folder = ledger_folder(work_dir, ledger)
    source = LedgerSource(folder, history=_history_for(work_dir, ledger))
    try:
        version = source.version()
    except (OSError, ValueError) as err:
        raise InputError(f"{folder}: cannot read the ledger's description ({type(err).__name__})") from None
    try:
        apply.check_version(version, fhir_base_url=settings.fhir_base_url, max_age_days=settings.max_age_days,
                            as_of=int(settings.as_of.timestamp()) if settings.as_of else None)
    except LedgerRefused as err:
        raise InputError(f"{folder}: {err}; {err.hint}") from None
    ledgers.check_ledger(folder, version.fhir_base_url or "", None)  # every part is the one ledger.json lists
    schema = _input_schema(settings.input, fmt)
    parts = _parts_folder(settings.output)
    started = utcnow()
    try:
        with beam.Pipeline(options=pipeline_options(beam_args or [])) as pipeline:
            build_pipeline(pipeline, settings, source, parts)
        counts = apply.read_json(FileSystems.join(parts, COUNTS_FILE))
        written = join_parts(parts, settings.output, fmt, schema)
    finally:
        _remove(parts)
    manifest = _manifest(settings, counts, written, version, folder, purpose, started)
    manifest_path = manifest_path or f"{settings.output}.manifest.json"
    with _open_output(manifest_path) as handle:
        handle.write((json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    audit.append(work_dir.root, "disclosure", **{k: v for k, v in manifest.items() if k != "reasons"})
    return manifest


def _history_for(work_dir: WorkDir, ledger: str | None) -> str | None:
    if ledger:
        return None

    folder = history_folder(work_dir)
    return str(folder) if folder.is_dir() else None


def _remove(parts: str) -> None:
    try:
        found = [m.path for m in FileSystems.match([FileSystems.join(parts, "*")])[0].metadata_list]
        if found:
            FileSystems.delete(found)
        if "://" not in parts:
            os.rmdir(parts)
    except OSError as err:
        _LOGGER.warning("could not remove the temporary parts %s: %s", parts, err)


def _manifest(settings: FilterSettings, counts: dict[str, int], written: int, version: apply.SourceVersion,
              folder: str, purpose: dict[str, Any] | None, started: datetime) -> dict[str, Any]:
    rows_in = sum(counts.values())
    kept = counts.get(apply.KEPT, 0) + counts.get(apply.KEPT_EXEMPT, 0)
    if kept != written:
        raise InputError(f"{settings.output}: {written} rows written but {kept} kept: the parts are incomplete")
    return {
        "input": settings.input,
        "output": settings.output,
        "column": settings.column,
        "rows_in": rows_in,
        "kept": kept,
        "kept_opted_out_by_exemption": counts.get(apply.KEPT_EXEMPT, 0),
        "removed_opted_out": counts.get(apply.OPTED_OUT_REASON, 0),
        "removed_unknown": counts.get(apply.UNKNOWN, 0) + counts.get(apply.STALE, 0),
        "removed_stale": counts.get(apply.STALE, 0),
        "removed_invalid": counts.get(apply.INVALID, 0),
        "unknown_policy": settings.unknown,
        "ledger": {
            "folder": folder,
            "version": version.details.get("request_id"),
            "checked_at": version.checked_at,
            "oldest_checked_at": oldest_checked_at(folder),
            "fhir_base_url": version.fhir_base_url,
            "rows": version.details.get("rows"),
        },
        "max_age_days": settings.max_age_days,
        "as_of": isoformat(settings.as_of) if settings.as_of else None,
        "purpose": purpose,
        "started_at": isoformat(started),
        "finished_at": isoformat(utcnow()),
    }


def removed_since(work_dir: WorkDir, since: datetime, output: str, *, ledger: str | None = None) -> int:
    """Write the NHS numbers (one a line) of every patient whose opt-out started after ``since`` and is still in
    force: recipients of a disclosure made then must delete them. Returns how many; the file is 0600."""
    folder = ledger_folder(work_dir, ledger)
    source = LedgerSource(folder)
    version = source.version()
    index = source.load(version)
    moment = int(since.timestamp())
    numbers = index.numbers[(index.opted_out == 1) & (index.since > moment)]
    body = "".join(f"{n:010d}\n" for n in numbers.tolist()).encode()
    with _open_output(output) as handle:
        handle.write(body)
    audit.append(work_dir.root, "removed_since", since=isoformat(since), output=output, patients=len(numbers),
                 ledger={"folder": folder, "version": version.details.get("request_id"),
                         "checked_at": version.checked_at})
    return len(numbers)
