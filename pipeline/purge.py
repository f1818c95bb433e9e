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
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Mapping

from pipeline import audit
from pipeline.settings import days_setting
from pipeline.state import FINAL, WorkDir, isoformat, parse_time, utcnow

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
                item.files.append({"name": str(path.relative_to(folder)), "bytes": path.stat().st_size,
                                   "rows": _rows(path)})
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


def _purge_staged(stage_dir: str, request_id: str, dry_run: bool) -> list[str]:
    """Delete everything under ``<stage_dir>/<request_id>/`` (inputs, dead letters, staged ledger copies)
    through Beam's FileSystems (local or gs://); returns the names relative to that folder."""
    from apache_beam.io.filesystems import FileSystems

    base = FileSystems.join(stage_dir, request_id)
    found = [m.path for result in FileSystems.match([FileSystems.join(base, "**")]) for m in result.metadata_list]
    if found and not dry_run:
        FileSystems.delete(found)
    return sorted(path[len(base):].lstrip("/") for path in found)


def format_purge(items: list[PurgedRequest], dry_run: bool) -> list[str]:
    verb = "would remove" if dry_run else "removed"
    if not items:
        return ["nothing to purge"]
    lines = []
    for item in items:
        names = ", ".join(f["name"] for f in item.files) or "no local files"
        staged = f"; staged: {', '.join(item.staged)}" if item.staged else ""
        lines.append(f"request {item.request_id} (finished {item.finished_at}): {verb} {names}{staged}")
    return lines
