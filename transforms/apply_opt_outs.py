"""Apply the opt-outs: keep only the records that may leave the exchange for a purpose beyond individual care.

:class:`ApplyOptOuts` is the composite another team's Beam pipeline imports: any PCollection in, a function giving
each element's NHS number, and tagged outputs out::

    result = records | ApplyOptOuts(lambda r: r["nhs"], source=LedgerSource("gs://bucket/ledger/current"))
    kept, counts, invalid = result[ApplyOptOuts.KEPT], result[ApplyOptOuts.COUNTS], result[ApplyOptOuts.INVALID]

- :attr:`ApplyOptOuts.KEPT` (main): the elements that may be disclosed;
- :attr:`ApplyOptOuts.COUNTS`: ``(reason, count)`` per reason (:data:`REASONS`), summed per window;
- :attr:`ApplyOptOuts.INVALID`: ``{"element", "reason"}`` for a missing or invalid number when
  ``invalid="dead_letter"`` (default ``"remove"``: removed and counted). Never silently kept.

The rule (:func:`decide`, pure numpy, no Beam) over the status held for each number (:class:`OptOutIndex`):

- opted out: removed (``opted_out``), unless the purpose is exempt (``kept_exempt``);
- not opted out, confirmed by NDOP within the limit: kept;
- never checked (``unknown``) or last confirmed longer ago than the limit (``stale``): removed, unless
  ``unknown="keep"``: keeping it could disclose an opted-out patient;
- not a valid NHS number, or none at all (``invalid``): removed or dead-lettered.

``as_of`` evaluates the status held at a past moment: a row whose status started after it (``status_since``)
says nothing about that moment unless the ledger's history (:mod:`pipeline.ledger.history`) does, so such a
patient counts as ``unknown`` there.

The source of truth is the Consent ledger (:class:`LedgerSource`, Parquet through ``FileSystems``) or the FHIR
store (:class:`FhirSource`, Consents read in pages). Each worker loads the index once per source version into
memory (about 17 bytes a patient: 170 MB for 10M) and caches it; the side input carries only the version
(:class:`SourceVersion`), so a refresh moves a few bytes, not the ledger. In batch the version is resolved once;
on an unbounded PCollection (``refresh_seconds``) a ``PeriodicImpulse`` resolves it again on a schedule
(Beam's slowly-changing side input pattern) and each element sees the latest one.

Elements may be records (one NHS number each) or, where millions flow, Arrow ``RecordBatch``\\ es
(:class:`ApplyOptOutsToBatches`, a column name instead of a function): then each output element is the
batch's kept rows, and the rule runs column-wise.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam import pvalue
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms import window
from apache_beam.transforms.periodicsequence import PeriodicImpulse
from apache_beam.utils.timestamp import Timestamp

from pipeline.core import nhs
from transforms.vocabulary import IDENTIFIER_SYSTEM, METRICS_NAMESPACE
from transforms.ledger_join import _status_codes
from transforms.ledger_join import ledger_files
from transforms.ledger_join import SCHEMA
from pipeline.fhir.config import FhirClientConfig
from pipeline.fhir.search import iter_search
from pipeline.fhir.sessions import open_session

_LOGGER = logging.getLogger(__name__)

KEPT = "kept"
KEPT_EXEMPT = "kept_exempt"
OPTED_OUT_REASON = "opted_out"
UNKNOWN = "unknown"
STALE = "stale"
INVALID = "invalid"
REASONS = (KEPT, KEPT_EXEMPT, OPTED_OUT_REASON, UNKNOWN, STALE, INVALID)
REMOVED_REASONS = (OPTED_OUT_REASON, UNKNOWN, STALE, INVALID)

UNKNOWN_CHOICES = ("drop", "keep")
INVALID_CHOICES = ("remove", "dead_letter")
DEFAULT_MAX_AGE_DAYS = 21.0  # pipeline.ledger.staleness.DEFAULT_STALE_DAYS: the CLI passes the staleness setting
DAY = 86_400

_LEDGER_COLUMNS = ["nhs_number", "status", "status_since", "checked_at"]


# -- the index: who holds which status, since when ---------------------------------------------------------


@dataclass(frozen=True)
class OptOutIndex:
    """Every checked patient, sorted by number: status (1 = opted out), since when, last NDOP confirmation.

    ``history`` (optional, sorted by number then time) holds earlier ``(number, status, since)`` rows, so
    :func:`decide` with ``as_of`` can say what was held at a past moment.
    """

    numbers: np.ndarray  # int64, sorted, unique
    opted_out: np.ndarray  # int8
    since: np.ndarray  # int64 epoch seconds
    checked_at: np.ndarray  # int64 epoch seconds
    history: pa.Table | None = None

    @classmethod
    def from_table(cls, table: pa.Table, history: pa.Table | None = None) -> "OptOutIndex":
        """From ledger rows (``nhs_number``, ``status``, ``status_since``, ``checked_at``; any order)."""

        numbers = table.column("nhs_number").to_numpy() if table.num_rows else np.zeros(0, np.int64)
        order = sort_order(numbers)
        numbers = numbers[order].astype(np.int64, copy=False)
        if len(numbers) > 1 and bool((numbers[1:] == numbers[:-1]).any()):
            raise ValueError("the ledger holds a patient more than once")
        if not table.num_rows:
            empty = np.zeros(0, np.int64)
            return cls(empty, np.zeros(0, np.int8), empty, empty, history)
        return cls(
            numbers=numbers,
            opted_out=_status_codes(table.column("status"))[order],
            since=_epoch(table.column("status_since"))[order],
            checked_at=_epoch(table.column("checked_at"))[order],
            history=history,
        )

    def __len__(self) -> int:
        return len(self.numbers)

    def oldest_check(self) -> int | None:
        return int(self.checked_at.min()) if len(self.checked_at) else None


def sort_order(numbers: np.ndarray) -> np.ndarray:
    """``np.argsort(numbers)`` for non-negative int64 NHS numbers (below 2**34), about twice as fast: each number
    and its position packed into one uint64 and sorted in place (numpy sorts plain integers much faster than it
    argsorts them). Equal numbers keep their order."""
    count = len(numbers)
    bits = max(1, (count - 1).bit_length())
    if count < 2 or bits > 29 or int(numbers.max()) >= 1 << (64 - bits) or int(numbers.min()) < 0:
        return np.argsort(numbers, kind="stable")
    packed = numbers.astype(np.uint64) << np.uint64(bits)
    packed |= np.arange(count, dtype=np.uint64)
    packed.sort()
    return (packed & np.uint64((1 << bits) - 1)).astype(np.int64)


def _epoch(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return pc.cast(column, pa.timestamp("s", tz="UTC")).cast(pa.int64()).to_numpy(zero_copy_only=False)


@dataclass(frozen=True)
class Rule:
    """How :func:`decide` treats what the index cannot vouch for, and for which moment."""

    unknown: str = "drop"  # keep | drop: a number the ledger never checked, or checked too long ago
    exempt: bool = False  # the purpose may keep opted-out patients (an exemption in the purposes file)
    max_age_days: float | None = DEFAULT_MAX_AGE_DAYS  # a status last confirmed longer ago counts as stale
    as_of: int | None = None  # epoch seconds: evaluate the status held then (None: now)

    def __post_init__(self) -> None:
        if self.unknown not in UNKNOWN_CHOICES:
            raise ValueError(f"unknown must be one of {', '.join(UNKNOWN_CHOICES)}, not {self.unknown!r}")


def _lookup(index: OptOutIndex, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(found, row)`` for each number: whether the index holds it, and where."""
    if not len(index.numbers):
        return np.zeros(len(numbers), bool), np.zeros(len(numbers), np.int64)
    order = sort_order(np.maximum(numbers, 0))  # sorted queries walk the index in order: cache-friendly
    pos = np.empty(len(numbers), np.int64)
    pos[order] = np.searchsorted(index.numbers, numbers[order])
    row = np.minimum(pos, len(index.numbers) - 1)
    return index.numbers[row] == numbers, row


def decide(index: OptOutIndex, numbers: np.ndarray, rule: Rule, now: int | None = None) -> np.ndarray:
    """The reason code (an index into :data:`REASONS`) for each int64 number; ``-1`` entries (no valid number)
    get :data:`INVALID`. The whole apply-opt-outs rule, without Beam."""
    moment = rule.as_of if rule.as_of is not None else int(now if now is not None else time.time())
    valid = numbers >= 0
    found, row = _lookup(index, numbers)
    found &= valid
    opted = np.zeros(len(numbers), bool)
    opted[found] = index.opted_out[row[found]] == 1
    known = found.copy()
    if rule.as_of is not None:  # a status that started after the moment says nothing about it
        started_after = np.zeros(len(numbers), bool)
        started_after[found] = index.since[row[found]] > moment
        if started_after.any():
            from_history = _status_from_history(index.history, numbers[started_after], moment)
            opted[started_after] = from_history == 1
            known[started_after] = from_history >= 0
    stale = np.zeros(len(numbers), bool)
    if rule.max_age_days is not None and rule.as_of is None:
        limit = moment - int(rule.max_age_days * DAY)
        stale[known] = index.checked_at[row[known]] < limit
    reason = np.full(len(numbers), REASONS.index(KEPT), np.int8)
    reason[~known] = REASONS.index(UNKNOWN)
    reason[known & stale] = REASONS.index(STALE)
    if rule.unknown == "keep":
        reason[~known | stale] = REASONS.index(KEPT)
    reason[known & opted] = REASONS.index(KEPT_EXEMPT if rule.exempt else OPTED_OUT_REASON)
    if rule.exempt:  # opt-outs do not apply: a number's status does not matter
        reason[valid & (reason != REASONS.index(KEPT_EXEMPT))] = REASONS.index(KEPT)
    reason[~valid] = REASONS.index(INVALID)
    return reason


def _status_from_history(history: pa.Table | None, numbers: np.ndarray, moment: int) -> np.ndarray:
    """The status (1 opted out, 0 not, -1 not known) each number held at ``moment``, from the change log."""
    held = np.full(len(numbers), -1, np.int8)
    if history is None or not history.num_rows or not len(numbers):
        return held
    since = _epoch(history.column("status_since"))
    upto = history.filter(pa.array(since <= moment))
    if not upto.num_rows:
        return held

    h_numbers = upto.column("nhs_number").to_numpy()
    h_since = _epoch(upto.column("status_since"))
    h_status = _status_codes(upto.column("status"))
    order = np.lexsort((h_since, h_numbers))  # by number, then time: the last of each number is what held
    h_numbers, h_status = h_numbers[order], h_status[order]
    last = np.ones(len(h_numbers), bool)
    last[:-1] = h_numbers[1:] != h_numbers[:-1]
    h_numbers, h_status = h_numbers[last], h_status[last]
    pos = np.searchsorted(h_numbers, numbers)
    row = np.minimum(pos, len(h_numbers) - 1)
    hit = h_numbers[row] == numbers
    held[hit] = h_status[row[hit]]
    return held


def number_of(value: Any) -> int:
    """One element's NHS number as int64, or ``-1`` when it is missing or not a valid NHS number."""
    if value is None:
        return -1
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        text = f"{int(value):010d}"
    elif isinstance(value, (str, bytes)):
        text = nhs.normalise(value.decode("ascii", "replace") if isinstance(value, bytes) else value)
    else:
        return -1
    return int(text) if nhs.is_valid(text) else -1


def numbers_of_column(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A column of NHS numbers (text or integers) as int64, ``-1`` where missing or invalid."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], pa.string())
    if pa.types.is_integer(column.type):
        column = pc.utf8_lpad(column.cast(pa.string()), 10, "0")  # a leading zero lost to an integer column
    column = column.cast(pa.string())
    if column.null_count == 0 and len(column):  # the common case, without regular expressions: 10 ASCII digits
        shaped = pc.and_(pc.equal(pc.binary_length(column), nhs.LENGTH), pc.ascii_is_decimal(column))
        if pc.all(shaped).as_py():
            return np.where(nhs.check_digits_ok(column), nhs.to_int64(column), -1)
    normalised, reason = nhs.validate_array(column)
    ok = pc.is_null(reason).to_numpy(zero_copy_only=False)
    out = np.full(len(column), -1, np.int64)
    if ok.any():
        out[ok] = nhs.to_int64(pc.filter(normalised, pa.array(ok)))
    return out


# -- sources: where the index comes from, and which version of it is in force ------------------------------


@dataclass(frozen=True)
class SourceVersion:
    """What the side input carries: which version of the source is in force (a few bytes, never the ledger).

    ``checked_at`` is when NDOP answered the request that made it; ``fhir_base_url`` the store it describes.
    """

    token: str
    fhir_base_url: str | None = None
    checked_at: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Source:
    """Where the index comes from. Subclasses are picklable descriptions; they open nothing until asked."""

    def version(self, tick: float | None = None) -> SourceVersion:
        """The version in force now (``tick``: the schedule's timestamp in streaming, else None)."""
        raise NotImplementedError

    def load(self, version: SourceVersion) -> OptOutIndex:
        raise NotImplementedError


class LedgerSource(Source):
    """A Consent ledger folder (``*.parquet`` + ``ledger.json``) on any ``FileSystems`` path.

    ``folder`` may be the work dir's ``ledger/current`` link: :meth:`version` reads ``ledger.json`` each time,
    so a refresh picks up a newly promoted ledger. ``history`` names the change-log folder (optional).
    """

    def __init__(self, folder: str, history: str | None = None) -> None:
        self.folder = folder
        self.history = history

    def _resolved(self) -> str:
        if "://" in self.folder:
            return self.folder
        import os

        return os.path.realpath(self.folder)

    def version(self, tick: float | None = None) -> SourceVersion:
        folder = self._resolved()
        meta = read_json(FileSystems.join(folder, "ledger.json"))
        token = json.dumps({"folder": folder, "request_id": meta.get("request_id"),
                            "sha256": meta.get("sha256"), "written_at": meta.get("written_at")}, sort_keys=True)
        return SourceVersion(token=token, fhir_base_url=meta.get("fhir_base_url"),
                             checked_at=meta.get("checked_at"),
                             details={"folder": folder, "request_id": meta.get("request_id"),
                                      "rows": meta.get("rows")})

    def load(self, version: SourceVersion) -> OptOutIndex:

        folder = version.details.get("folder") or self._resolved()
        tables = []
        for path in ledger_files(folder):
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                tables.append(pq.read_table(handle, columns=_LEDGER_COLUMNS))
        tables = [t for t in tables if t.num_rows]
        table = pa.concat_tables(tables, promote_options="permissive") if tables else _empty_rows()
        history = None
        if self.history:
            from transforms.ledger_join import read_history

            history = read_history(self.history)
        return OptOutIndex.from_table(table, history)


def _empty_rows() -> pa.Table:

    return SCHEMA.empty_table().select(_LEDGER_COLUMNS)


def read_json(path: str) -> dict[str, Any]:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        value = json.loads(handle.read())
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object")
    return value


class FhirSource(Source):
    """The FHIR store's NDOP Consents, read in pages (``Consent?category=...&_count=N``).

    ``status`` ``active`` is an opt-out in force; ``dateTime`` is when NDOP last confirmed it. There is no
    ``status_since`` in a Consent, so ``as_of`` earlier than a Consent's ``dateTime`` finds it ``unknown``.
    """

    def __init__(self, fhir_url: str, auth: str = "none", page_size: int = 1000) -> None:
        self.fhir_url = fhir_url.rstrip("/")
        self.auth = auth
        self.page_size = page_size

    def version(self, tick: float | None = None) -> SourceVersion:
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return SourceVersion(token=f"fhir {self.fhir_url} {now}", fhir_base_url=self.fhir_url, checked_at=None,
                             details={"read_at": now})

    def load(self, version: SourceVersion) -> OptOutIndex:

        numbers: list[int] = []
        status: list[str] = []
        checked: list[int] = []
        config = FhirClientConfig.from_env(base_url=self.fhir_url, auth=self.auth)
        with open_session(config) as session:
            for resource in iter_search(session, self.fhir_url, "Consent", {"_count": self.page_size}):
                row = consent_row(resource)
                if row is not None:
                    numbers.append(row[0])
                    status.append(row[1])
                    checked.append(row[2])
        table = pa.table({
            "nhs_number": pa.array(numbers, pa.int64()),
            "status": pa.array(status, pa.string()),
            "status_since": pa.array(checked, pa.int64()).cast(pa.timestamp("s", tz="UTC")),
            "checked_at": pa.array(checked, pa.int64()).cast(pa.timestamp("s", tz="UTC")),
        })
        return OptOutIndex.from_table(table)


def consent_row(resource: dict[str, Any]) -> tuple[int, str, int] | None:
    """``(NHS number, status, dateTime epoch)`` of one NDOP Consent, or None when it names no valid number
    or has no ``dateTime`` (then the patient stays unknown: removed by default)."""
    ours = any(isinstance(i, dict) and i.get("system") == IDENTIFIER_SYSTEM for i in resource.get("identifier") or [])
    if not ours:
        return None  # not an NDOP Consent this tool wrote
    patient = resource.get("patient") or {}
    identifier = patient.get("identifier") or {}
    if identifier.get("system") != nhs.NHS_NUMBER_SYSTEM:
        return None
    number = number_of(identifier.get("value"))
    moment = resource.get("dateTime")
    if number < 0 or not isinstance(moment, str):
        return None
    try:
        when = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return number, str(resource.get("status")), int(when.timestamp())


class _IndexCache:
    """One index per source version per worker process (shared by the DoFn instances of all threads)."""

    _lock = threading.Lock()
    _held: dict[str, tuple[str, OptOutIndex]] = {}  # source -> (version token, index)

    @classmethod
    def get(cls, source: Source, version: SourceVersion) -> OptOutIndex:
        key = f"{type(source).__name__} {vars(source)}"
        with cls._lock:
            held = cls._held.get(key)
            if held is not None and held[0] == version.token:
                return held[1]
            started = time.monotonic()
            index = source.load(version)
            cls._held[key] = (version.token, index)  # only the version in force: the old one is dropped
            _LOGGER.info("opt-out index loaded: %d patients in %.1f s", len(index), time.monotonic() - started)
            return index


# -- the DoFns and composites ------------------------------------------------------------------------------


class _ApplyFn(beam.DoFn):
    """Shared by the per-element and the per-batch DoFn: counters and the index of the version in force."""

    def __init__(self, source: Source, rule: Rule) -> None:
        self._source = source
        self._rule = rule
        self._counters = {r: Metrics.counter(METRICS_NAMESPACE, f"apply_{r}") for r in REASONS}

    def _index(self, version: SourceVersion) -> OptOutIndex:
        return _IndexCache.get(self._source, version)

    def _count(self, reasons: np.ndarray) -> Iterator[pvalue.TaggedOutput]:
        counts = np.bincount(reasons.astype(np.int64), minlength=len(REASONS))
        for code, count in enumerate(counts.tolist()):
            if count:
                self._counters[REASONS[code]].inc(count)
                yield pvalue.TaggedOutput(ApplyOptOuts.COUNTS, (REASONS[code], count))


class ApplyToElementsFn(_ApplyFn):
    """Per element (batched by ``BatchElements`` upstream): look the numbers up column-wise, emit the kept."""

    def __init__(self, source: Source, rule: Rule, nhs_number_fn: Callable[[Any], Any], invalid: str) -> None:
        super().__init__(source, rule)
        self._fn = nhs_number_fn
        self._invalid = invalid

    def process(self, batch: list[Any], version: SourceVersion) -> Iterator[Any]:
        index = self._index(version)
        numbers = np.fromiter((number_of(_safe(self._fn, e)) for e in batch), np.int64, len(batch))
        reasons = decide(index, numbers, self._rule)
        keep = np.isin(reasons, (REASONS.index(KEPT), REASONS.index(KEPT_EXEMPT)))
        for element, kept in zip(batch, keep.tolist()):
            if kept:
                yield element
        if self._invalid == "dead_letter":
            for i in np.flatnonzero(numbers < 0).tolist():
                yield pvalue.TaggedOutput(ApplyOptOuts.INVALID, {"element": batch[i], "reason": _why(self._fn,
                                                                                                     batch[i])})
        yield from self._count(reasons)


def _safe(fn: Callable[[Any], Any], element: Any) -> Any:
    try:
        return fn(element)
    except (KeyError, IndexError, AttributeError, TypeError, ValueError):
        return None  # no number: counted as invalid, never kept


def _why(fn: Callable[[Any], Any], element: Any) -> str:
    value = _safe(fn, element)
    if value is None:
        return "no NHS number"
    text = nhs.normalise(str(value))
    return nhs.invalid_reason(text) or "not an NHS number"


class ApplyToBatchesFn(_ApplyFn):
    """Per Arrow ``RecordBatch`` (or ``Table``, or ``(key, batch)``: the key is kept): the rule column-wise, the
    kept rows as one batch (none when no row is kept)."""

    def __init__(self, source: Source, rule: Rule, column: str, invalid: str) -> None:
        super().__init__(source, rule)
        self._column = column
        self._invalid = invalid

    def process(self, element: Any, version: SourceVersion) -> Iterator[Any]:
        key, batch = element if isinstance(element, tuple) else (None, element)

        def keyed(value: Any) -> Any:
            return value if key is None else (key, value)

        index = self._index(version)
        numbers = numbers_of_column(batch.column(self._column))
        reasons = decide(index, numbers, self._rule)
        keep = np.isin(reasons, (REASONS.index(KEPT), REASONS.index(KEPT_EXEMPT)))
        if keep.all():
            yield keyed(batch)
        elif keep.any():
            yield keyed(batch.filter(pa.array(keep)))
        if self._invalid == "dead_letter" and (numbers < 0).any():
            yield pvalue.TaggedOutput(ApplyOptOuts.INVALID, {"element": keyed(batch.filter(pa.array(numbers < 0))),
                                                              "reason": "missing or invalid NHS number"})
        yield from self._count(reasons)


def check_version(version: SourceVersion, *, fhir_base_url: str | None, max_age_days: float | None,
                  now: float | None = None, as_of: int | None = None) -> SourceVersion:
    """Fail closed: a ledger of another FHIR store, or older than the limit, stops the job (one line)."""
    if fhir_base_url and version.fhir_base_url and \
            version.fhir_base_url.rstrip("/") != fhir_base_url.rstrip("/"):
        raise LedgerRefused(f"the ledger describes FHIR server {version.fhir_base_url}, not {fhir_base_url}",
                            hint="--fhir-url must name the store the ledger describes")
    if max_age_days is not None and version.checked_at:
        made = datetime.fromisoformat(version.checked_at.replace("Z", "+00:00")).timestamp()
        moment = as_of if as_of is not None else (now if now is not None else time.time())
        age = (moment - made) / DAY
        if age > max_age_days:
            raise LedgerRefused(f"the ledger was last checked by NDOP {age:.1f} days before "
                                f"{'--as-of' if as_of is not None else 'now'} ({version.checked_at}), more than "
                                f"the limit of {max_age_days:g} days", hint="give --max-age DAYS to accept it")
    return version


class LedgerRefused(ValueError):
    """The source cannot vouch for the opt-outs (another store, too old): the job stops. ``hint``: the override."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class ResolveVersion(beam.DoFn):
    """Any input (an impulse, a tick) -> the source's version in force, checked (fail closed)."""

    def __init__(self, source: Source, fhir_base_url: str | None, max_age_days: float | None,
                 as_of: int | None) -> None:
        self._source = source
        self._fhir_base_url = fhir_base_url
        self._max_age_days = max_age_days
        self._as_of = as_of

    def process(self, tick: Any) -> Iterator[SourceVersion]:
        at = float(tick) if isinstance(tick, (int, float, Timestamp)) else None
        yield check_version(self._source.version(at), fhir_base_url=self._fhir_base_url,
                            max_age_days=self._max_age_days, as_of=self._as_of)


class ApplyOptOuts(beam.PTransform):
    """Remove the elements whose patient opted out (see the module docstring).

    ``source``: a :class:`Source` (a ledger folder string is taken as :class:`LedgerSource`).
    ``unknown``: ``drop`` (default) or ``keep`` a number the source never checked or checked too long ago.
    ``invalid``: ``remove`` (default: counted) or ``dead_letter`` (to :attr:`INVALID`) a missing/invalid number.
    ``max_age_days``: the ledger and each status must be confirmed within it (None: no limit).
    ``fhir_base_url``: when given, a ledger describing another store stops the job.
    ``exempt``: the purpose may keep opted-out patients (from the purposes file; see :mod:`pipeline.privacy.purposes`).
    ``as_of``: evaluate the status held at this moment (epoch seconds).
    ``refresh_seconds``: for an unbounded input, re-resolve the source this often (Beam's slowly-changing side
    input pattern: a ``PeriodicImpulse`` in fixed windows of that length; the input is windowed the same way,
    so each element sees the version of its window's tick, and the outputs are in those fixed windows).
    ``ticks``: the schedule as a PCollection of timestamps instead of ``PeriodicImpulse`` (Beam's Python
    direct runner cannot run ``PeriodicImpulse`` in streaming; tests give a ``TestStream`` there).
    ``batch_size``: elements looked up together (``BatchElements``), per-element API only.
    """

    KEPT = "kept"
    COUNTS = "counts"
    INVALID = "invalid"

    def __init__(self, nhs_number_fn: Callable[[Any], Any] | None = None, *, source: Source | str,
                 unknown: str = "drop", invalid: str = "remove", max_age_days: float | None = DEFAULT_MAX_AGE_DAYS,
                 fhir_base_url: str | None = None, exempt: bool = False, as_of: int | None = None,
                 refresh_seconds: float | None = None, ticks: pvalue.PCollection | None = None,
                 batch_size: int = 1000, column: str | None = None) -> None:
        super().__init__()
        if (nhs_number_fn is None) == (column is None):
            raise ValueError("give nhs_number_fn (per element) or column (per Arrow batch), not both")
        if invalid not in INVALID_CHOICES:
            raise ValueError(f"invalid must be one of {', '.join(INVALID_CHOICES)}, not {invalid!r}")
        self._source = LedgerSource(source) if isinstance(source, str) else source
        self._rule = Rule(unknown=unknown, exempt=exempt, max_age_days=max_age_days, as_of=as_of)
        self._fn = nhs_number_fn
        self._column = column
        self._invalid = invalid
        self._fhir_base_url = fhir_base_url
        self._refresh = refresh_seconds
        self._ticks = ticks
        if ticks is not None and refresh_seconds is None:
            raise ValueError("ticks need refresh_seconds (the window each tick's version serves)")
        self._batch_size = batch_size

    def _versions(self, pipeline: beam.Pipeline) -> pvalue.PCollection:
        resolve = ResolveVersion(self._source, self._fhir_base_url, self._rule.max_age_days, self._rule.as_of)
        if self._refresh is None:
            return pipeline | "Once" >> beam.Create([None]) | "ResolveSource" >> beam.ParDo(resolve)
        if self._ticks is not None:  # the schedule given (a TestStream in tests): timestamps, one a window
            ticks = self._ticks | "TickWindows" >> beam.WindowInto(window.FixedWindows(self._refresh))
        else:
            ticks = pipeline | "Every" >> PeriodicImpulse(fire_interval=self._refresh, apply_windowing=True)
        return ticks | "ResolveSourceAgain" >> beam.ParDo(resolve)

    def expand(self, pcoll: pvalue.PCollection) -> dict[str, pvalue.PCollection]:
        version = pvalue.AsSingleton(self._versions(pcoll.pipeline))
        if self._refresh is not None:  # each window sees the version resolved by its own tick
            pcoll = pcoll | "RefreshWindows" >> beam.WindowInto(window.FixedWindows(self._refresh))
        if self._column is not None:
            fn: beam.DoFn = ApplyToBatchesFn(self._source, self._rule, self._column, self._invalid)
            batches = pcoll
        else:
            assert self._fn is not None
            fn = ApplyToElementsFn(self._source, self._rule, self._fn, self._invalid)
            # Batches form within a bundle and window (also on an unbounded input): an element never waits.
            batches = pcoll | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self._batch_size)
        outputs = batches | "Apply" >> beam.ParDo(fn, version).with_outputs(self.COUNTS, self.INVALID,
                                                                             main=self.KEPT)
        counts = outputs[self.COUNTS] | "SumPerReason" >> beam.CombinePerKey(sum)
        return {self.KEPT: outputs[self.KEPT], self.COUNTS: counts, self.INVALID: outputs[self.INVALID]}
