"""``ndop status``: one row per request from the work dir alone (no MESH connection, no NHS numbers)."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pipeline.mesh.config import DEFAULT_OVERDUE_AFTER
from pipeline.core.clock import parse_time, utcnow
from pipeline.lifecycle.state import FAILED, IN_FLIGHT, REJECTED, REPLIED, SEND_UNKNOWN, RequestRecord, WorkDir


@dataclass
class StatusRow:
    request_id: str
    state: str
    sent: int | None
    replied: int | None
    age: timedelta
    since: timedelta  # in this state for
    overdue: bool
    note: str = ""


def status_rows(work_dir: WorkDir, overdue_after: timedelta = DEFAULT_OVERDUE_AFTER,
                now: datetime | None = None, records: list[RequestRecord] | None = None) -> list[StatusRow]:
    """One row per request (of ``records``, default every request): no MESH connection, no NHS numbers."""
    now = now or utcnow()
    rows = []
    for record in work_dir.all() if records is None else records:
        state = record["state"]
        history = record.get("history") or [{"at": record["created_at"]}]
        since = now - parse_time(history[-1]["at"])
        waiting_since = record.get("sent_at") or record.get("send_unknown_since")
        waited = now - parse_time(waiting_since) if waiting_since else None
        overdue = state in IN_FLIGHT and waited is not None and waited > overdue_after
        note = ""
        if state == REJECTED:
            note = (record.get("rejection") or {}).get("reason", "")
        elif state == FAILED:
            failure = record.get("failure") or {}
            note = f"MESH {failure.get('code', '')} {failure.get('description', '')}".strip()
        elif state == SEND_UNKNOWN:
            note = "send outcome unknown; waiting for notice or reply"
        elif state == REPLIED:
            note = "reply downloaded; waiting for ndop process"
        if overdue:
            note = (f"OVERDUE: no reply after {age_text(waited or timedelta(0))}"
                    + (f"; {note}" if note else ""))
        rows.append(StatusRow(
            request_id=record["request_id"], state=state, sent=(record.get("counts") or {}).get("sent"),
            replied=record.get("reply_lines"), age=now - parse_time(record["created_at"]), since=since,
            overdue=overdue, note=note,
        ))
    return rows


def format_status(rows: list[StatusRow], root: Path | None = None) -> list[str]:
    """The table ``ndop status`` prints; with no rows, a line saying which work dir ``root`` holds none."""
    if not rows:
        if root is None:
            return ["no requests"]
        if not root.is_dir():
            return [f"no requests: no work dir at {root.resolve()} (--work-dir or NDOP_WORK_DIR)"]
        return [f"no requests in {root.resolve()}"]
    header = ("REQUEST", "STATE", "SENT", "REPLY", "AGE", "IN STATE", "NOTE")
    table = [header] + [
        (r.request_id, r.state, "-" if r.sent is None else str(r.sent), "-" if r.replied is None else str(r.replied),
         age_text(r.age), age_text(r.since), r.note)
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in table]


def age_text(delta: timedelta) -> str:
    """A short age: 45s, 3m05s, 2h10m, 4d03h."""
    seconds = int(max(delta.total_seconds(), 0))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def status_document(rows: list[StatusRow], ledger: dict[str, Any] | None,
                    damaged: list[str] | None = None) -> dict[str, Any]:
    """``ndop status --json``: the requests, the damaged records skipped, and the ledger summary
    (pipeline/ledger/staleness.py) as one document."""
    return {
        "damaged": damaged or [],
        "requests": [{
            "request_id": r.request_id, "state": r.state, "sent": r.sent, "replied": r.replied,
            "age_seconds": int(r.age.total_seconds()), "in_state_seconds": int(r.since.total_seconds()),
            "overdue": r.overdue, "note": r.note,
        } for r in rows],
        "ledger": ledger,
    }
