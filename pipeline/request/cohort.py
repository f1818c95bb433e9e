"""Reading a cohort (the NHS numbers to check) from text, CSV or Parquet, column-wise.

Every value comes back with the line (or row) it came from, so a reject can be traced to the
exact place in the user's file.

CSV is read with Python's ``csv`` module, as people make CSV: Excel's byte-order mark is dropped,
quoted fields may hold commas (also in the header) and newlines (a row's line is the line it starts
on), names are matched without the spaces around them, and bytes that are not UTF-8 are kept as
``\\xNN`` escapes, so they are rejected as values (with their line) and shown escaped in messages.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.core.errors import InputError, at, printable
from pipeline.core.nhs import redact
from pipeline.core.nhs import NHS_NUMBER_SYSTEM

if TYPE_CHECKING:
    from pipeline.fhir.config import FhirClientConfig

FORMATS = ("auto", "text", "csv", "parquet")
DEFAULT_COLUMN = "nhs_number"
_CSV_CHUNK = 1 << 20  # rows gathered as Python strings before they become one Arrow array
_BY_SUFFIX = {".txt": "text", ".text": "text", ".lst": "text", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


@dataclass
class Cohort:
    values: pa.Array  # raw values as strings
    lines: pa.Array  # 1-based source line (text, CSV) or row (Parquet) of each value
    format: str
    # the FHIR Patient id of each value, when known (--cohort fhir, or --patient-id-column); "" = unknown
    patient_ids: pa.Array | None = None


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    try:
        return _BY_SUFFIX[path.suffix.lower()]
    except KeyError:
        raise InputError(
            f"{path}: unknown cohort format {path.suffix or '(no extension)'!r}; "
            "use .txt, .csv or .parquet, or --format"
        ) from None


def read_cohort(path: str | os.PathLike[str], column: str = DEFAULT_COLUMN, fmt: str = "auto",
                patient_id_column: str | None = None) -> Cohort:
    """Read the cohort column as strings with their line numbers; raise InputError naming the file.

    ``patient_id_column`` (CSV or Parquet): each row's FHIR Patient id too, so its Consent can point at
    the Patient; an empty cell means unknown for that row.
    """
    source = Path(path)
    if patient_id_column:
        cohort = read_cohort(path, column, fmt)
        if cohort.format == "text":
            raise InputError(f"{source}: a text cohort has no columns; --patient-id-column needs CSV or Parquet")
        ids = read_cohort(path, patient_id_column, fmt).values
        cohort.patient_ids = pc.fill_null(ids, "")
        return cohort
    if not source.is_file():
        raise InputError(f"{source}: no such file" if not source.exists() else f"{source}: not a file")
    kind = detect_format(source, fmt)
    if not os.access(source, os.R_OK):
        raise InputError(f"{source}: cannot read file (permission denied)")
    try:
        if kind == "parquet":
            return _read_parquet(source, column)
        if kind == "csv":
            return _read_csv(source, column)
        return _read_text(source, column)
    except InputError:
        raise
    except (pa.ArrowException, OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{source}: cannot read as {kind}: {redact(printable(str(err).splitlines()[0]))}") from None


def _read_text(source: Path, column: str) -> Cohort:
    """One value a line, read by pyarrow (a UTF-8 byte-order mark is dropped; lines end in LF, CRLF or CR)."""
    if source.stat().st_size == 0:
        return Cohort(pa.array([], pa.string()), pa.array([], pa.int64()), "text")
    read = pacsv.ReadOptions(column_names=[column], block_size=64 << 20)
    parse = pacsv.ParseOptions(delimiter="\x1f", quote_char=False, escape_char=False, ignore_empty_lines=False)
    convert = pacsv.ConvertOptions(column_types={column: pa.string()}, strings_can_be_null=False)
    values = pacsv.read_csv(source, read_options=read, parse_options=parse, convert_options=convert).column(column)
    values = values.combine_chunks()
    return Cohort(values, pa.array(range(1, len(values) + 1), pa.int64()), "text")


def _shown(names: list[str]) -> str:
    """Header names for an error line: escaped, and masked (a file with no header shows a number here)."""
    return redact(printable(", ".join(names[:10]))) or "(empty)"


def _read_csv(source: Path, column: str) -> Cohort:
    """The ``column`` of a CSV file with a header line, each value with the line its row starts on."""
    values: list[pa.Array] = []
    lines: list[np.ndarray] = []
    for chunk_values, chunk_lines in _csv_chunks(source, column):
        values.append(pa.array(chunk_values, pa.string()))
        lines.append(np.asarray(chunk_lines, dtype=np.int64))
    if not values:
        return Cohort(pa.array([], pa.string()), pa.array([], pa.int64()), "csv")
    return Cohort(pa.concat_arrays(values), pa.array(np.concatenate(lines)), "csv")


def _csv_chunks(source: Path, column: str) -> Iterator[tuple[list[str], list[int]]]:
    with open(source, newline="", encoding="utf-8-sig", errors="backslashreplace") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:  # an empty file: no cohort, said by the request step
            return
        names = [name.strip() for name in header]
        if column.strip() not in names:
            raise InputError(f"{at(source, 1)}: no column {column!r} in the header "
                             f"(found: {_shown(names)}); use --column")
        index = names.index(column.strip())
        chunk_values: list[str] = []
        chunk_lines: list[int] = []
        start = reader.line_num + 1
        for row in reader:
            if not row:  # a blank line: a blank value, skipped by the request step
                chunk_values.append("")
            elif index < len(row):
                chunk_values.append(row[index])
            else:
                raise InputError(f"{at(source, start)}: {len(row)} field(s), no {column!r} value "
                                 f"(the header names {len(names)})")
            chunk_lines.append(start)
            start = reader.line_num + 1
            if len(chunk_values) >= _CSV_CHUNK:
                yield chunk_values, chunk_lines
                chunk_values, chunk_lines = [], []
        if chunk_values:
            yield chunk_values, chunk_lines


# Parquet column types a cohort column may have: text, or integers (NHS numbers have no leading zero).
def _usable_parquet_type(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)


def _read_parquet(source: Path, column: str) -> Cohort:
    schema = pq.read_schema(source)
    if column not in schema.names:
        raise InputError(f"{source}: no column {column!r} in the Parquet schema "
                         f"(found: {_shown(schema.names)}); use --column")
    kind = schema.field(column).type
    if not _usable_parquet_type(kind):
        raise InputError(f"{source}: column {column!r} is {printable(str(kind))}, not text or integers: "
                         "give a column with one NHS number a row")
    values = pq.read_table(source, columns=[column]).column(column).combine_chunks()
    values = values.cast(pa.string())  # an integer column is fine too: NHS numbers have no leading zero
    return Cohort(values, pa.array(range(1, len(values) + 1), pa.int64()), "parquet")


FHIR_COHORT = "fhir"


def read_fhir_cohort(config: "FhirClientConfig", page_size: int = 1000) -> Cohort:
    """Every Patient's NHS number from the FHIR store, so the exchange need not export a file.

    A paged search asking only for identifiers (``_elements=identifier``); a Patient without an NHS
    number identifier is skipped, one with several contributes each. "Lines" are 1-based positions in
    the search results, which is what a reject can point back to. Each Patient's id is kept beside its
    number: the Consent will reference ``Patient/<id>``.
    """
    from pipeline.fhir.search import iter_search  # deferred: loads requests only when used
    from pipeline.fhir.sessions import open_session  # deferred: loads requests only when used

    values: list[str] = []
    ids: list[str] = []
    with open_session(config) as session:
        for patient in iter_search(session, config.base_url, "Patient",
                                   {"_elements": "identifier", "_count": page_size}):
            for identifier in patient.get("identifier", []):
                if identifier.get("system") == NHS_NUMBER_SYSTEM and identifier.get("value") is not None:
                    values.append(str(identifier["value"]))
                    ids.append(str(patient.get("id") or ""))
    return Cohort(pa.array(values, pa.string()), pa.array(range(1, len(values) + 1), pa.int64()), FHIR_COHORT,
                  pa.array(ids, pa.string()))
