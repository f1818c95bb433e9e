"""The run report: what a person reading the scheduler's output wants to know about one request.

Written as ``report.json`` (for machines) and ``report.md`` (for people) in the request folder,
and printed at the end of ``ndop run``. It carries counts only: never an NHS number.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import datfile
from pipeline.files import write_bytes, write_json
from pipeline.state import ACKNOWLEDGED, PROCESSED, REPLIED, SEND_UNKNOWN, SENT, WorkDir, parse_time

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


@dataclass
class Outcome:
    """Who was asked about, and who of them opted out, for one answered request."""

    requested: pa.Array
    opted_out: pa.Array

    @property
    def not_opted_out(self) -> pa.Array:
        return pc.filter(self.requested, pc.invert(pc.is_in(self.requested, value_set=self.opted_out)))


def read_reply_numbers(path: Path) -> pa.Array:
    """Every number in a reply ``.dat``, read in newline-aligned blocks so memory stays flat."""
    with open(path, "rb") as handle:
        chunks = [datfile.parse(block, first_line=line).numbers for line, block in datfile.iter_line_blocks(handle)]
    return pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())


def outcome(work_dir: WorkDir, record: Mapping[str, Any]) -> Outcome:
    folder = work_dir.request_dir(record["request_id"])
    requested = pq.read_table(folder / record["files"]["manifest"]).column("nhs_number").combine_chunks()
    replied = read_reply_numbers(folder / record["files"].get("reply", "reply.dat"))
    opted_out = pc.filter(requested, pc.invert(pc.is_in(requested, value_set=replied)))
    return Outcome(requested=requested, opted_out=opted_out)


def previous_processed(work_dir: WorkDir, record: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The latest request before this one whose Consents were all written (the baseline for changes)."""
    earlier = [
        r for r in work_dir.all()
        if r["request_id"] != record["request_id"] and r.get("state") in (PROCESSED, ACKNOWLEDGED)
        and r.get("created_at", "") <= record.get("created_at", "")
    ]
    return earlier[-1] if earlier else None


def changes(now: Outcome, before: Outcome | None) -> dict[str, Any]:
    """Status changes patient by patient, counted: the figures an opt-out register is watched by."""
    if before is None:
        return {"previous_request_id": None}
    was_out = pc.is_in(now.requested, value_set=before.opted_out)
    was_in = pc.is_in(now.requested, value_set=before.not_opted_out)
    is_out = pc.is_in(now.requested, value_set=now.opted_out)
    count = lambda mask: pc.sum(mask).as_py() or 0  # noqa: E731
    return {
        "newly_opted_out": count(pc.and_(is_out, was_in)),
        "opt_out_withdrawn": count(pc.and_(pc.invert(is_out), was_out)),
        "new_patients": count(pc.invert(pc.or_(was_out, was_in))),
        "left_cohort": len(before.requested) - count(pc.or_(was_out, was_in)),
        "unchanged": count(pc.or_(pc.and_(is_out, was_out), pc.and_(pc.invert(is_out), was_in))),
    }


STAGES = ("request", "send", "wait_for_ndop", "poll", "process")


def _stage_seconds(record: Mapping[str, Any]) -> dict[str, float]:
    stages = dict(record.get("stage_seconds", {}))
    history = record.get("history", [])
    if history and "wait_for_ndop" not in stages:
        times = {h["state"]: parse_time(h["at"]) for h in history}
        sent = times.get(SENT) or times.get(SEND_UNKNOWN)
        if sent and REPLIED in times:
            stages["wait_for_ndop"] = round((times[REPLIED] - sent).total_seconds(), 1)
    return {name: stages[name] for name in sorted(stages, key=lambda n: (STAGES + (n,)).index(n))}


def build_report(work_dir: WorkDir, record: Mapping[str, Any]) -> dict[str, Any]:
    """Assemble the report of a processed (or failed) request from its record and summary."""
    folder = work_dir.request_dir(record["request_id"])
    summary_path = folder / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    counts = summary.get("counts", {})
    report: dict[str, Any] = {
        "request_id": record["request_id"],
        "state": record.get("state"),
        "created_at": record.get("created_at"),
        "sent_at": record.get("sent_at"),
        "checked_at": record.get("checked_at"),
        "cohort": record.get("counts", {}),
        "results": {
            k: counts[k]
            for k in ("requested", "replied", "opted_out", "not_opted_out", "written", "created", "updated",
                      "failed", "refused", "integrity_errors")
            if k in counts
        },
        "problems": summary.get("problems", []),
        "dead_letters": summary.get("dead_letters") if not summary.get("ok", True) else None,
        "stage_seconds": _stage_seconds(record),
    }
    # A reply with integrity errors is suspect: changes computed from it would be fiction.
    if (record.get("files", {}).get("reply") and (folder / record["files"]["reply"]).exists()
            and not counts.get("integrity_errors")):
        before_record = previous_processed(work_dir, record)
        before = outcome(work_dir, before_record) if before_record else None
        report["changes"] = changes(outcome(work_dir, record), before)
        report["changes"]["previous_request_id"] = before_record["request_id"] if before_record else None
    return report


def render_markdown(report: dict[str, Any]) -> str:
    cohort, results = report.get("cohort", {}), report.get("results", {})
    lines = [
        f"# NDOP run report: {report['request_id']}",
        "",
        f"- state: **{report.get('state')}**",
        f"- created: {report.get('created_at')}; sent: {report.get('sent_at') or '-'}; "
        f"NDOP answered: {report.get('checked_at') or '-'}",
        "",
        "## Cohort",
        "",
        "| read | invalid | duplicates | sent |",
        "|---:|---:|---:|---:|",
        f"| {cohort.get('read', '-')} | {cohort.get('invalid', '-')} | {cohort.get('duplicates', '-')} | "
        f"{cohort.get('sent', '-')} |",
    ]
    if results:
        lines += [
            "",
            "## Results",
            "",
            "| replied | opted out | not opted out | Consents written | status unchanged | failed | integrity errors |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {results.get('replied', '-')} | {results.get('opted_out', '-')} | {results.get('not_opted_out', '-')} "
            f"| {results.get('written', '-')} | {(report.get('changes') or {}).get('unchanged', '-')} "
            f"| {results.get('failed', '-')} | {results.get('integrity_errors', '-')} |",
        ]
    change = report.get("changes")
    if change:
        lines += ["", "## Changes since the previous processed request", ""]
        if change.get("previous_request_id") is None:
            lines.append("No earlier processed request: this is the baseline.")
        else:
            lines += [
                f"Compared with {change['previous_request_id']}:",
                "",
                "| newly opted out | opt-out withdrawn | new patients | left the cohort | status unchanged |",
                "|---:|---:|---:|---:|---:|",
                f"| {change['newly_opted_out']} | {change['opt_out_withdrawn']} | {change['new_patients']} | "
                f"{change['left_cohort']} | {change['unchanged']} |",
            ]
    if report.get("problems"):
        lines += ["", "## Problems", ""] + [f"- {problem}" for problem in report["problems"]]
    if report.get("dead_letters"):
        lines += ["", f"**Dead letters:** `{report['dead_letters']}`"]
    stages = report.get("stage_seconds") or {}
    if stages:
        lines += ["", "## Time per stage (seconds)", "", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {name} | {seconds} |" for name, seconds in stages.items()]
    return "\n".join(lines) + "\n"


def write_report(work_dir: WorkDir, record: Mapping[str, Any]) -> dict[str, Any]:
    report = build_report(work_dir, record)
    folder = work_dir.request_dir(record["request_id"])
    write_json(folder / REPORT_JSON, report)
    write_bytes(folder / REPORT_MD, render_markdown(report).encode())
    return report
