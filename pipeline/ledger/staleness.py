"""Staleness: how old the opt-out status we hold for each patient is, from the Consent ledger.

NDOP guidance wants opt-outs re-checked regularly. The ledger in force (``WORK/ledger/current``,
:mod:`pipeline.ledger.versions`) holds, per patient, ``checked_at``: when NDOP last confirmed that patient's status.
:func:`ledger_summary` counts, without an NHS number: patients by status, those last confirmed more than
``stale_days`` ago (``--stale-days``, env ``NDOP_STALE_DAYS``, default 21), and those who have left the
cohort (in the ledger, but not asked about by the request that made it: their ``checked_at`` is older than
that request's). ``ndop status`` prints it, ``ndop status --json`` and the run report (``report["ledger"]``)
carry it.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.settings import days_setting
from pipeline.core.clock import isoformat, parse_time, utcnow
from pipeline.lifecycle.state import WorkDir
from transforms.vocabulary import NOT_OPTED_OUT, OPTED_OUT
from pipeline.ledger import versions as ledger

DEFAULT_STALE_DAYS = 21.0
STALE_ENV = "NDOP_STALE_DAYS"
_STATUS_NAMES = {OPTED_OUT: "opted_out", NOT_OPTED_OUT: "not_opted_out"}


def stale_days(value: float | None = None) -> float:
    """``value``, else ``NDOP_STALE_DAYS``, else 21; bad input is one line (exit 2)."""
    days = days_setting(value, STALE_ENV, DEFAULT_STALE_DAYS)
    assert days is not None  # it has a default
    return days


def _epoch(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    return pc.cast(column, pa.timestamp("s", tz="UTC")).cast(pa.int64())


def ledger_summary(work_dir: WorkDir, days: float, now: datetime | None = None) -> dict[str, Any] | None:
    """Counts over the ledger in force (None when there is none yet). Reads two columns, never numbers."""
    from transforms.ledger_join import ledger_files  # deferred: loads apache_beam only when used

    found = ledger.current(work_dir)
    if found is None:
        return None
    folder = str(found.resolve())
    meta = ledger.read_meta(folder)
    cutoff = int(((now or utcnow()) - timedelta(days=days)).timestamp())
    made_at = int(parse_time(meta["checked_at"]).timestamp()) if meta.get("checked_at") else None
    by_status: dict[str, int] = {name: 0 for name in _STATUS_NAMES.values()}
    patients = stale = left = 0
    oldest: int | None = None
    for path in ledger_files(folder):
        table = pq.read_table(path, columns=["status", "checked_at"])
        patients += table.num_rows
        if not table.num_rows:
            continue
        for status, count in zip(*_value_counts(table.column("status"))):
            name = _STATUS_NAMES.get(status, str(status))
            by_status[name] = by_status.get(name, 0) + count
        checked = _epoch(table.column("checked_at").combine_chunks())
        stale += int(pc.sum(pc.less(checked, cutoff)).as_py() or 0)
        if made_at is not None:
            left += int(pc.sum(pc.less(checked, made_at)).as_py() or 0)
        low = pc.min(checked).as_py()
        oldest = low if oldest is None or (low is not None and low < oldest) else oldest
    return {
        "patients": patients,
        "by_status": by_status,
        "stale_days": days,
        "stale": stale,
        "left_cohort": left,
        "oldest_checked_at": isoformat(datetime.fromtimestamp(oldest, utcnow().tzinfo)) if oldest is not None else None,
        "request_id": meta.get("request_id"),
        "checked_at": meta.get("checked_at"),
    }


def _value_counts(column: pa.ChunkedArray) -> tuple[list[str], list[int]]:
    counted = pc.value_counts(column.combine_chunks().cast(pa.string()))
    return counted.field("values").to_pylist(), counted.field("counts").to_pylist()


def format_summary(summary: dict[str, Any] | None) -> list[str]:
    if summary is None:
        return ["ledger: none yet (no request processed)"]
    statuses = ", ".join(f"{count} {name.replace('_', ' ')}" for name, count in summary["by_status"].items())
    return [
        f"ledger: {summary['patients']} patients ({statuses}); as of request {summary['request_id']} "
        f"(NDOP checked {summary['checked_at']})",
        f"ledger: {summary['stale']} stale (last confirmed by NDOP more than {summary['stale_days']:g} days ago; "
        f"oldest {summary['oldest_checked_at'] or '-'}), {summary['left_cohort']} left the cohort",
    ]
