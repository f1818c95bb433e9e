"""The run log: ``WORK/runs.jsonl``, one JSON line per ``ndop run`` (times, exit status, counts).

What the HTML pages chart across runs and what the metrics file is computed from. A line holds counts,
times, states and request ids only: never an NHS number (the message is passed through
:func:`pipeline.core.nhs.redact` as well, since it may quote a library's text).

Written, with the pages and the metrics file, by pipeline/ops/outputs.py (``recorded``) after every run.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
from pathlib import Path
from typing import Any

from pipeline.core import nhs
from pipeline.core.errors import EXIT_FAILED, EXIT_OK, EXIT_WAITING
from pipeline.core.files import PRIVATE, fsync_dir
from pipeline.ops.report import REPORT_JSON, outcome_counts
from pipeline.lifecycle.state import WorkDir

_LOGGER = logging.getLogger(__name__)

RUNS_FILE = "runs.jsonl"
EXIT_INTERRUPTED = 130
OUTCOMES = {EXIT_OK: "done", EXIT_WAITING: "waiting", EXIT_FAILED: "failed", 2: "bad input",
            EXIT_INTERRUPTED: "interrupted"}


def runs_path(work_dir: WorkDir) -> Path:
    return work_dir.root / RUNS_FILE


def read_runs(work_dir: WorkDir) -> list[dict[str, Any]]:
    """Every run so far, oldest first; a torn last line (a crash mid-append) is skipped."""
    path = runs_path(work_dir)
    if not path.exists():
        return []
    runs = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                runs.append(entry)
    return runs


def append_run(work_dir: WorkDir, entry: dict[str, Any]) -> None:
    """Append one line durably (O_APPEND, fsync); the file is the owner's only."""
    work_dir.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = runs_path(work_dir)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE)
    try:
        os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(work_dir.root)


def dead_letter_count(results: dict[str, Any]) -> int:
    """Patients sent to the dead-letter file: failed or refused Consents and reply integrity errors."""
    return sum(int(results.get(k) or 0) for k in ("failed", "refused", "integrity_errors"))


def run_entry(exit_code: int, request_id: str | None, message: str, report: dict[str, Any] | None,
              started_at: str, ended_at: str, seconds: float) -> dict[str, Any]:
    report = report or {}
    results = outcome_counts(report)
    return {
        "started_at": started_at,
        "ended_at": ended_at,
        "seconds": round(seconds, 2),
        "exit_status": exit_code,
        "outcome": OUTCOMES.get(exit_code, "failed"),
        "request_id": request_id,
        "state": report.get("state"),
        "message": _redact_keeping(message, request_id),
        "cohort": dict(report.get("cohort") or {}),
        "results": results,
        "changes": {k: v for k, v in (report.get("changes") or {}).items() if k != "previous_request_id"},
        "stage_seconds": dict(report.get("stage_seconds") or {}),
        "dead_letters": dead_letter_count(results),
        "stale": _stale(report),
        "verified": dict(report.get("verified") or {}),
    }


def _redact_keeping(text: str, request_id: str | None) -> str:
    """:func:`nhs.redact`, leaving our own request id readable (mailbox, date, counter: no NHS number)."""
    if not request_id:
        return nhs.redact(text)
    return request_id.join(nhs.redact(part) for part in text.split(request_id))


def _stale(report: dict[str, Any]) -> int | None:
    """Stale patients, when the report carries a Consent ledger's figures (optional: older reports do not):
    ``report["ledger"]["stale"]`` (last confirmed by NDOP more than --stale-days ago, pipeline/ledger/staleness.py),
    else the ledger's ``refreshed`` count (Consents rewritten because they had grown stale)."""
    ledger = report.get("ledger")
    if isinstance(ledger, dict):
        for key in ("stale", "stale_patients"):
            if isinstance(ledger.get(key), int):
                return ledger[key]
    refreshed = (report.get("changes") or {}).get("refreshed")
    if isinstance(refreshed, int):
        return refreshed
    value = report.get("stale_patients")
    return value if isinstance(value, int) else None


def typical_wait(runs: list[dict[str, Any]]) -> float | None:
    """How long NDOP usually takes to answer: the median ``wait_for_ndop`` of earlier requests."""
    waits = {r["request_id"]: r["stage_seconds"]["wait_for_ndop"] for r in runs
             if r.get("request_id") and isinstance((r.get("stage_seconds") or {}).get("wait_for_ndop"), (int, float))}
    return statistics.median(waits.values()) if waits else None


def load_report(work_dir: WorkDir, request_id: str | None) -> dict[str, Any] | None:
    if not request_id:
        return None
    path = work_dir.request_dir(request_id) / REPORT_JSON
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
