"""Reading a cohort (the NHS numbers to check) from text, CSV or Parquet, column-wise.

Every value comes back with the line (or row) it came from, so a reject can be traced to the
exact place in the user's file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.errors import InputError, at
from pipeline.nhs import redact

if TYPE_CHECKING:
    from pipeline.fhir_client import FhirClientConfig

FORMATS = ("auto", "text", "csv", "parquet")
DEFAULT_COLUMN = "nhs_number"
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
        return _read_delimited(source, column, header=(kind == "csv"))
    except InputError:
        raise
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, UnicodeDecodeError) as err:
        raise InputError(f"{source}: cannot read as {kind}: {redact(str(err).splitlines()[0])}") from None


def _read_delimited(source: Path, column: str, header: bool) -> Cohort:
    if source.stat().st_size == 0:
        return Cohort(pa.array([], pa.string()), pa.array([], pa.int64()), "csv" if header else "text")
    if header:
        read = pacsv.ReadOptions(block_size=64 << 20)
        parse = pacsv.ParseOptions(ignore_empty_lines=False, newlines_in_values=False)
        names = _header(source)
        if column not in names:
            shown = redact(", ".join(names[:10])) or "(empty)"  # a file with no header shows a number here
            raise InputError(f"{at(source, 1)}: no column {column!r} in the header (found: {shown}); use --column")
        convert = pacsv.ConvertOptions(include_columns=[column], column_types={column: pa.string()},
                                       strings_can_be_null=False, quoted_strings_can_be_null=False)
        table = pacsv.read_csv(source, read_options=read, parse_options=parse, convert_options=convert)
        first = 2
    else:
        read = pacsv.ReadOptions(column_names=[column], block_size=64 << 20)
        parse = pacsv.ParseOptions(delimiter="\x1f", quote_char=False, escape_char=False, ignore_empty_lines=False)
        convert = pacsv.ConvertOptions(column_types={column: pa.string()}, strings_can_be_null=False)
        table = pacsv.read_csv(source, read_options=read, parse_options=parse, convert_options=convert)
        first = 1
    values = table.column(column).combine_chunks()
    return Cohort(values, pa.array(range(first, first + len(values)), pa.int64()), "csv" if header else "text")


def _header(source: Path) -> list[str]:
    with open(source, newline="") as handle:
        line = handle.readline()
    return [name.strip().strip('"') for name in line.rstrip("\r\n").split(",")] if line.strip() else []


def _read_parquet(source: Path, column: str) -> Cohort:
    schema = pq.read_schema(source)
    if column not in schema.names:
        shown = redact(", ".join(schema.names[:10])) or "(none)"
        raise InputError(f"{source}: no column {column!r} in the Parquet schema (found: {shown}); use --column")
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
    from pipeline.fhir_client import iter_search, open_session
    from pipeline.nhs import NHS_NUMBER_SYSTEM

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
