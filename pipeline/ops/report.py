"""The run report: what a person reading the scheduler's output wants to know about one request.

Written as ``report.json`` (for machines) and ``report.md`` (for people) in the request folder,
and printed at the end of ``ndop run``. It carries counts only: never an NHS number.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from pipeline.core.files import write_bytes, write_json
from pipeline.core.clock import parse_time
from pipeline.lifecycle.state import IN_FLIGHT, REPLIED, SEND_UNKNOWN, SENT, WorkDir

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


STAGES = ("request", "send", "wait_for_ndop", "poll", "process", "verify")


def _stage_seconds(record: Mapping[str, Any]) -> dict[str, float]:
    stages = dict(record.get("stage_seconds", {}))
    history = record.get("history", [])
    if history and "wait_for_ndop" not in stages:
        times = {h["state"]: parse_time(h["at"]) for h in history}
        sent = times.get(SENT) or times.get(SEND_UNKNOWN)
        if sent and REPLIED in times:
            stages["wait_for_ndop"] = round((times[REPLIED] - sent).total_seconds(), 1)
    return {name: stages[name] for name in sorted(stages, key=lambda n: (STAGES + (n,)).index(n))}


def outcome_counts(report: Mapping[str, Any]) -> dict[str, Any]:
    """A report's results with the ledger's "unchanged (not written)" beside them (report.json keeps it under
    ``changes``), as the run log and the pages show them."""
    results = dict(report.get("results") or {})
    unchanged = (report.get("changes") or {}).get("unchanged")
    if results and "unchanged" not in results and isinstance(unchanged, int):
        results["unchanged"] = unchanged
    return results


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
        "problems": [*summary.get("problems", []), *[  # a reply the plausibility gate set aside, still waiting
            f"reply {r.get('message_id')} not used: {r.get('reason')}"
            for r in (record.get("refused_replies") or [])[-1:] if record.get("state") in IN_FLIGHT]],
        "dead_letters": summary.get("dead_letters") if not summary.get("ok", True) else None,
        "stage_seconds": _stage_seconds(record),
    }
    if summary.get("bulk_import"):  # a first load the store imported (pipeline/beam/bulk_load.py)
        report["bulk_import"] = summary["bulk_import"]
    if record.get("verified"):  # ndop run --verify-sample: Consents read back and compared with the ledger
        report["verified"] = record["verified"]
    # Counted by the pipeline's ledger join, not re-derived from earlier requests. A reply with integrity
    # errors is suspect: changes computed from it would be fiction.
    if summary.get("changes") and not counts.get("integrity_errors"):
        report["changes"] = summary["changes"]
    from pipeline.ledger.staleness import ledger_summary, stale_days  # deferred: loads numpy only when used

    ledger = ledger_summary(work_dir, stale_days())  # patients by status, stale, left the cohort
    if ledger is not None:
        report["ledger"] = ledger
    return report


CHANGE_LABELS = {  # the Consent ledger join's counts (report["changes"]), in the order every page shows them
    "to_write": "to write", "new_patients": "new patients", "newly_opted_out": "newly opted out",
    "opt_out_withdrawn": "opt-out withdrawn", "refreshed": "refreshed", "unchanged": "unchanged (not written)",
    "left_cohort": "left the cohort", "superseded": "superseded (a newer answer kept)",
}


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
    bulk = report.get("bulk_import")
    if bulk:
        lines += ["", f"Loaded in bulk by the store's own import ({bulk.get('store')}): "
                      f"{bulk.get('consents_stored', 0)} of {bulk.get('consents_staged', 0)} Consents and "
                      f"{bulk.get('provenances_stored', 0)} of {bulk.get('provenances_staged', 0)} Provenance stored, "
                      f"as its report says, in {bulk.get('seconds', '-')} s."]
    change = report.get("changes")
    if change:
        lines += [
            "", "## Changes (counted by the Consent ledger join)", "",
            "| " + " | ".join(CHANGE_LABELS.values()) + " |",
            "|" + "---:|" * len(CHANGE_LABELS),
            "| " + " | ".join(str(change.get(key, "-")) for key in CHANGE_LABELS) + " |",
        ]
    from pipeline.ledger.staleness import format_summary  # deferred: loads numpy only when used

    if report.get("ledger"):
        lines += ["", "## Ledger", ""]
        lines += [f"- {line.removeprefix('ledger: ')}" for line in format_summary(report["ledger"])]
    if report.get("verified"):
        v = report["verified"]
        lines += [f"- verified: {v['checked']} Consents read back from the store, {v['mismatches']} differ from the "
                  f"ledger ({v['missing']} missing, {v['status']} status, {v['dateTime']} dateTime; "
                  f"{v['queued']} queued for the next process step)"]
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
