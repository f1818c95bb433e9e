"""Retention: ``ndop purge`` deletes every file that holds NHS numbers from finished requests.

UK GDPR data minimisation: a request's ``.dat``, manifest, reply, rejects and dead letters are needed
until its Consents are stored and its reply acknowledged; after that only the ledger (``WORK/ledger/``,
one row per patient, what the next run compares with) still needs patient numbers. ``ndop purge`` keeps a
finished request's number-free records (:data:`KEEP`) and deletes everything else in its folder, and its
staged copies under ``--stage-dir``. What was removed is recorded in ``request.json`` (``purged_at`` and
``purged``: file names with their sizes and row counts, never a number).

Rules: only requests in a final state (acknowledged, rejected, failed) whose final state is older than
the retention period; never an unfinished request, never the ledger. The work dir's lock is held while
purging, so no run changes a request under it. Deleting is idempotent: a purge killed half-way is
finished by the next one (the record is written after the files are gone).

Leftovers (:func:`purge_leftovers`, issue 21), each with its own age rule, listed by ``--dry-run`` and each
removal one ``purge`` line in the audit log:

- ``requests/.building-*``, a request a killed ``ndop request`` was building: at any age. A build holds the
  work dir's lock from its first file to the rename, so under the lock such a folder belongs to no live run,
  and it never becomes a request.
- ``ledger/.pending-<id>/``, a ledger a run (or ``ndop verify``) wrote and never swapped in: at any age once its
  request is no longer waiting to be processed (processed or final, or no such request); every process run
  empties its own pending folder before writing, so nothing ever reads a stale one.
- a request that never finishes (created, sent, send-unknown or accepted): once its last state change is older
  than the MESH expiry (5 days: an unacknowledged message is deleted, in NDOP's inbox or ours) plus a grace
  period (``NDOP_UNFINISHED_GRACE_DAYS``, default 5: a request can wait 5 days in NDOP's inbox and its reply 5
  more in ours), it is marked failed (``expired``) and its number-holding files are removed. A ``replied``
  request is never expired: its answer is here and can still be used.
- ledger rows of patients who left the cohort: a row NDOP last confirmed before some later processed request
  (which did not hold the patient) is removed once that request is older than the retention period, by a new
  ledger version swapped in like a run's (the previous versions, which hold the rows, are removed too). A row
  is kept while a replied request older than the row waits to be processed, so an older answer never
  overwrites a newer one. A patient who comes back is a new patient: the Consent is written again (by id).
"""
from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pipeline.lifecycle import audit
from pipeline.core.errors import InputError
from pipeline.mesh.config import DEFAULT_OVERDUE_AFTER as MESH_EXPIRY
from pipeline.core.settings import days_setting
from pipeline.core.clock import isoformat, parse_time, utcnow
from pipeline.lifecycle.state import ACKNOWLEDGED, FAILED, FINAL, OPEN, PROCESSED, REPLIED, RequestRecord, WorkDir
from pipeline.ledger import versions as ledger_dirs

_LOGGER = logging.getLogger(__name__)

DEFAULT_RETENTION_DAYS = 30
RETENTION_ENV = "NDOP_RETENTION_DAYS"

# The files of a request folder that never hold an NHS number: what a purge keeps.
KEEP = frozenset({"request.json", "report.json", "report.md", "report.html", "summary.json"})


@dataclass
class PurgedRequest:
    request_id: str
    finished_at: str
    files: list[dict[str, Any]] = field(default_factory=list)
    staged: list[str] = field(default_factory=list)


def finished_at(record: Mapping[str, Any]) -> datetime | None:
    """When a final request reached its final state (the last history entry), else None."""
    if record.get("state") not in FINAL:
        return None
    history = record.get("history") or []
    when = history[-1]["at"] if history else record.get("created_at")
    return parse_time(when) if when else None


def _rows(path: Path) -> int | None:
    """Rows in a file (Parquet metadata, or lines of text); None when it cannot tell."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(path).metadata.num_rows)
        with open(path, "rb") as handle:
            return sum(1 for _ in handle)
    except (OSError, ValueError):
        return None


_TEN_DIGITS = re.compile(rb"(?<![0-9])[0-9]{10}(?![0-9])")


def _holds_numbers(path: Path) -> bool:
    """A ``.ctl`` is kept unless it holds something shaped like an NHS number."""
    return bool(_TEN_DIGITS.search(path.read_bytes()))


def _doomed(folder: Path) -> list[Path]:
    """Files to delete: everything but the number-free records (and a ``.ctl`` that holds no number)."""
    def keep(path: Path) -> bool:
        if path.parent != folder:
            return False
        return path.name in KEEP or (path.suffix == ".ctl" and not _holds_numbers(path))

    return sorted(p for p in folder.rglob("*") if p.is_file() and not keep(p))


UNFINISHED_GRACE_ENV = "NDOP_UNFINISHED_GRACE_DAYS"
DEFAULT_UNFINISHED_GRACE_DAYS = 5


def grace_days(value: float | None = None) -> float:
    """Days past the MESH expiry before an unfinished request's files go (``NDOP_UNFINISHED_GRACE_DAYS``, 5)."""
    days = days_setting(value, UNFINISHED_GRACE_ENV, DEFAULT_UNFINISHED_GRACE_DAYS)
    return DEFAULT_UNFINISHED_GRACE_DAYS if days is None else days


def retention_days(value: float | None) -> float | None:
    """The period to keep finished requests: ``value``, else ``NDOP_RETENTION_DAYS``, else None (no purge)."""
    return days_setting(value, RETENTION_ENV, None)


def purge(work_dir: WorkDir, older_than_days: float, *, dry_run: bool = False,
          stage_dir: str | None = None, now: datetime | None = None) -> list[PurgedRequest]:
    """Delete the number-holding files of every final request finished more than ``older_than_days`` ago."""
    cutoff = (now or utcnow()) - timedelta(days=older_than_days)
    purged = []
    with work_dir.lock():
        for record in work_dir.all():
            done = finished_at(record)
            if done is None or done > cutoff:
                continue
            folder = work_dir.request_dir(record["request_id"])
            item = PurgedRequest(record["request_id"], isoformat(done))
            for path in _doomed(folder):
                item.files.append(_file_info(path, folder))
                if not dry_run:
                    path.unlink()
            if stage_dir:
                item.staged = _purge_staged(stage_dir, record["request_id"], dry_run)
            if not item.files and not item.staged:
                continue
            if not dry_run:
                for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
                    if not any(sub.iterdir()):
                        sub.rmdir()
                earlier = list(record.get("purged") or [])
                work_dir.update(record["request_id"], expect=FINAL, purged_at=isoformat(now or utcnow()),
                                purged=earlier + item.files + [{"name": s, "staged": True} for s in item.staged])
                audit.append(work_dir.root, "purge", request_id=record["request_id"], state=record.get("state"),
                             removed=[f["name"] for f in item.files], staged=item.staged,
                             rows=sum(f["rows"] or 0 for f in item.files))
            purged.append(item)
    return purged


@dataclass
class Leftover:
    """Something a purge removes that is not a finished request's files (see the module docstring)."""

    kind: str  # building | pending | unfinished | left-cohort | history
    name: str  # the folder, relative to the work dir, or the request id
    rule: str  # the age rule that applies, for the listing
    files: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0  # ledger rows (left-cohort)


def _file_info(path: Path, base: Path) -> dict[str, Any]:
    """What a purge records of a file it removes: name, size and rows, never its content."""
    return {"name": str(path.relative_to(base)), "bytes": path.stat().st_size, "rows": _rows(path)}


def _describe(folder: Path) -> list[dict[str, Any]]:
    return [_file_info(p, folder) for p in sorted(folder.rglob("*")) if p.is_file()]


def _remove_folder(work_dir: WorkDir, item: Leftover, folder: Path, dry_run: bool) -> Leftover:
    if not dry_run:
        shutil.rmtree(folder)
        _audit_leftover(work_dir, item)
    return item


def _audit_leftover(work_dir: WorkDir, item: Leftover) -> None:
    where = {"request_id": item.name} if item.kind == "unfinished" else {"name": item.name}
    audit.append(work_dir.root, "purge", leftover=item.kind, **where, rule=item.rule,
                 removed=[f["name"] for f in item.files],
                 rows=item.rows or sum(f["rows"] or 0 for f in item.files))


def _buildings(work_dir: WorkDir, dry_run: bool) -> list[Leftover]:
    found = sorted(work_dir.requests.glob(".building-*")) if work_dir.requests.is_dir() else []
    return [_remove_folder(work_dir, Leftover("building", str(folder.relative_to(work_dir.root)),
                                              "a killed `ndop request`: any age", _describe(folder)),
                           folder, dry_run)
            for folder in found if folder.is_dir()]


def _pendings(work_dir: WorkDir, records: dict[str, RequestRecord], dry_run: bool) -> list[Leftover]:

    base = ledger_dirs.root(work_dir)
    found = sorted(base.glob(".pending-*")) if base.is_dir() else []
    items = []
    for folder in found:
        record = records.get(folder.name.removeprefix(".pending-"))
        if record is not None and record.get("state") in (*OPEN, REPLIED):
            continue  # its request may still be processed (that run empties and rewrites it anyway)
        state = record.get("state") if record is not None else "no such request"
        items.append(_remove_folder(work_dir, Leftover(
            "pending", str(folder.relative_to(work_dir.root)), f"a ledger never swapped in ({state}): any age",
            _describe(folder)), folder, dry_run))
    return items


def _unfinished(work_dir: WorkDir, records: dict[str, RequestRecord], now: datetime, grace: float,
                dry_run: bool) -> list[Leftover]:
    cutoff = now - MESH_EXPIRY - timedelta(days=grace)
    days = (MESH_EXPIRY + timedelta(days=grace)).total_seconds() / 86_400
    items = []
    for rid, record in records.items():
        history = record.get("history") or []
        since = parse_time(history[-1]["at"] if history else record["created_at"])
        if record.get("state") not in OPEN or since > cutoff:
            continue
        folder = work_dir.request_dir(rid)
        doomed = _doomed(folder)
        item = Leftover("unfinished", rid, f"{record.get('state')} since {isoformat(since)}: no answer can come "
                                           f"{days:g} days on (MESH expiry + grace)",
                        [_file_info(p, folder) for p in doomed])
        items.append(item)
        if dry_run:
            continue
        for path in doomed:  # killed here: the next purge finds the request still old and unfinished
            path.unlink()
        work_dir.update(rid, state=FAILED, expect=record.get("state"), purged_at=isoformat(now),
                        purged=list(record.get("purged") or []) + item.files, failure={
                            "code": "expired", "at": isoformat(now),
                            "description": f"no answer from NDOP {days:g} days after {record.get('state')}; "
                                           "its files were purged"})
        _audit_leftover(work_dir, item)
    return items


def _left_rule(folder: Path, records: dict[str, RequestRecord], cutoff: datetime) -> Callable[[Any], Any] | None:
    """Which of a ledger part's rows are of patients who left the cohort before ``cutoff`` (see the docstring): a
    function of a table with ``checked_at`` giving a boolean array; None when no row can have left (no processed
    check yet, or the ledger's description cannot be read: the next run refuses it in one line)."""
    import numpy as np
    import pyarrow as pa

    from transforms.ledger_join import epoch_seconds  # deferred: loads apache_beam only when used

    try:
        meta = ledger_dirs.read_meta(str(folder))
    except InputError as err:  # the other leftovers (and the history) still go
        _LOGGER.warning("ledger rows of patients who left the cohort not purged: %s", err)
        return None
    checks = sorted({epoch_seconds(r["checked_at"]) for r in records.values()
                     if r.get("state") in (PROCESSED, ACKNOWLEDGED) and r.get("checked_at")}
                    | ({epoch_seconds(meta["checked_at"])} if meta.get("checked_at") else set()))
    if not checks:
        return None
    waiting = [epoch_seconds(r["checked_at"]) for r in records.values()
               if r.get("state") == REPLIED and r.get("checked_at")]
    check_times = np.array(checks, np.int64)
    limit = int(cutoff.timestamp())
    oldest_waiting = min(waiting) if waiting else None

    def left(table: Any) -> Any:
        """True for each row whose patient left more than the retention period ago."""
        checked = table.column("checked_at").cast(pa.timestamp("s", tz="UTC")).cast(pa.int64()).to_numpy()
        after = np.searchsorted(check_times, checked, side="right")  # the first check that did not hold them
        left_at = check_times[np.minimum(after, len(check_times) - 1)]
        gone = (after < len(check_times)) & (left_at < limit)
        if oldest_waiting is not None:
            gone &= checked <= oldest_waiting
        return gone

    return left


def _ledger_leftovers(work_dir: WorkDir, records: dict[str, RequestRecord], cutoff: datetime,
                      dry_run: bool) -> list[Leftover]:
    """The current ledger, read once (each part's ``nhs_number`` and ``checked_at``), gives both ledger leftovers:
    the rows of patients who left the cohort, and the numbers still held once they go, which the history's
    compaction keeps a last status for (so a dry run lists what the purge removes)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from transforms.ledger_join import ledger_files  # deferred: loads apache_beam only when used

    found = ledger_dirs.current(work_dir)
    if found is None:
        return _history(work_dir, cutoff, pa.array([], pa.int64()), dry_run)
    folder = found.resolve()
    left = _left_rule(folder, records, cutoff)
    held, gone = [], 0
    try:
        for path in ledger_files(str(folder)):  # one part at a time: only the numbers still held are kept
            part = pq.read_table(path, columns=["nhs_number", "checked_at"] if left else ["nhs_number"])
            stays = ~left(part) if left else np.ones(part.num_rows, bool)
            gone += part.num_rows - int(stays.sum())
            held.append(part.column("nhs_number").filter(pa.array(stays)))
    except (OSError, ValueError, KeyError) as err:  # a damaged part: the next run refuses the ledger in one line
        _LOGGER.warning("ledger rows of patients who left the cohort and the ledger history not purged: the ledger "
                        "%s cannot be read (%s)", folder, type(err).__name__)
        return []
    items = []
    if gone and left is not None:
        item = Leftover("left-cohort", str(folder.relative_to(work_dir.root.resolve())),
                        f"patients who left the cohort before {isoformat(cutoff)} (the retention period)", rows=gone)
        if not dry_run:
            item.rows = ledger_dirs.rewrite_current(work_dir, f"purge-{utcnow():%Y%m%dT%H%M%S}",
                                                    lambda table: table.filter(pa.array(~left(table))),
                                                    keep_previous=False)
            _audit_leftover(work_dir, item)
        items.append(item)
    numbers = pa.chunked_array([c for h in held for c in h.chunks], pa.int64()).combine_chunks()
    return items + _history(work_dir, cutoff, numbers, dry_run)


def _history(work_dir: WorkDir, cutoff: datetime, in_ledger: Any, dry_run: bool) -> list[Leftover]:
    """The ledger history's rows older than the retention period (pipeline/ledger/history.py: ``compact``);
    ``in_ledger``: the numbers the ledger still holds."""
    from pipeline.ledger.history import compact, history_folder  # deferred: loads apache_beam only when used

    dropped, files = compact(work_dir, int(cutoff.timestamp()), in_ledger, dry_run=dry_run)
    if not dropped:
        return []
    item = Leftover("history", str(history_folder(work_dir).relative_to(work_dir.root)),
                    f"statuses that started before {isoformat(cutoff)} and were no longer held then "
                    "(the retention period)", [{"name": name, "bytes": 0, "rows": None} for name in files],
                    rows=dropped)
    if not dry_run:
        _audit_leftover(work_dir, item)
    return [item]


def purge_leftovers(work_dir: WorkDir, older_than_days: float, *, dry_run: bool = False,
                    now: datetime | None = None, grace: float | None = None) -> list[Leftover]:
    """Remove what no finished request accounts for (see the module docstring), under the work dir's lock."""
    now = now or utcnow()
    with work_dir.lock():
        records = {r["request_id"]: r for r in work_dir.all()}
        items = _buildings(work_dir, dry_run) + _pendings(work_dir, records, dry_run)
        items += _unfinished(work_dir, records, now, grace_days(grace), dry_run)
        items += _ledger_leftovers(work_dir, records, now - timedelta(days=older_than_days), dry_run)
    return items


def _purge_staged(stage_dir: str, request_id: str, dry_run: bool) -> list[str]:
    """Delete everything under ``<stage_dir>/<request_id>/`` (inputs, dead letters, staged ledger copies)
    through Beam's FileSystems (local or gs://); returns the names relative to that folder."""
    from apache_beam.io.filesystems import FileSystems

    base = FileSystems.join(stage_dir, request_id)
    found = [m.path for result in FileSystems.match([FileSystems.join(base, "**")]) for m in result.metadata_list]
    if found and not dry_run:
        FileSystems.delete(found)
    return sorted(path[len(base):].lstrip("/") for path in found)


def format_purge(items: list[PurgedRequest], dry_run: bool, leftovers: Sequence[Leftover] = ()) -> list[str]:
    verb = "would remove" if dry_run else "removed"
    if not items and not leftovers:
        return ["nothing to purge"]
    lines = []
    for left in leftovers:
        what = (f"{left.rows} {'history' if left.kind == 'history' else 'ledger'} rows"
                if left.kind in ("left-cohort", "history")
                else ", ".join(f["name"] for f in left.files) or "an empty folder")
        lines.append(f"{left.kind} {left.name} ({left.rule}): {verb} {what}")
    for item in items:
        names = ", ".join(f["name"] for f in item.files) or "no local files"
        staged = f"; staged: {', '.join(item.staged)}" if item.staged else ""
        lines.append(f"request {item.request_id} (finished {item.finished_at}): {verb} {names}{staged}")
    return lines
