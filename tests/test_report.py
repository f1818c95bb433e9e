"""The run report's change counts and its rendering."""
from __future__ import annotations

import json
import re

from pipeline.ops.report import build_report, render_markdown
from pipeline.lifecycle.state import WorkDir


def test_changes_come_from_the_summary_not_earlier_requests(tmp_path) -> None:
    work_dir = WorkDir(tmp_path / "work")
    folder = work_dir.ensure().request_dir("R1")
    folder.mkdir()
    changes = {"to_write": 7, "new_patients": 2, "newly_opted_out": 1, "opt_out_withdrawn": 3, "refreshed": 1,
               "unchanged": 90, "left_cohort": 4}
    (folder / "summary.json").write_text(json.dumps({"ok": True, "counts": {"written": 7}, "changes": changes}))
    # no manifest, no reply, no earlier request: the figures are the pipeline's own counters
    report = build_report(work_dir, {"request_id": "R1", "state": "acknowledged", "files": {}})
    assert report["changes"] == changes
    assert "| 7 | 2 | 1 | 3 | 1 | 90 | 4 |" in render_markdown(report)


def test_markdown_has_the_figures_and_no_numbers() -> None:
    report = {
        "request_id": "X26ABC1-241126-0002", "state": "acknowledged", "created_at": "2026-11-24T10:00:00Z",
        "cohort": {"read": 10, "invalid": 1, "duplicates": 2, "sent": 7},
        "results": {"replied": 5, "opted_out": 2, "not_opted_out": 5, "written": 7, "failed": 0, "integrity_errors": 0},
        "changes": {"to_write": 3, "newly_opted_out": 1, "opt_out_withdrawn": 0, "refreshed": 0,
                    "new_patients": 2, "left_cohort": 1, "unchanged": 4},
        "stage_seconds": {"request": 0.1, "process": 3.0},
    }
    text = render_markdown(report)
    assert "| 10 | 1 | 2 | 7 |" in text and "| 3 | 2 | 1 | 0 | 0 | 4 | 1 |" in text and "| process | 3.0 |" in text
    assert not re.search(r"\d{10}", text)


def test_the_request_page_shows_the_ledgers_unchanged_count_and_its_changes() -> None:
    """Issue 22 item 7: a run that left 10,000 Consents unchanged showed "unchanged 0" (report.json keeps the
    count under changes) and never drew its Changes section."""
    from pipeline.ops.report_html import render_request

    report = {"request_id": "X26ABC1-041226-0009", "state": "acknowledged", "cohort": {"sent": 10_000},
              "results": {"replied": 9_500, "opted_out": 500, "not_opted_out": 9_500, "written": 0},
              "changes": {"to_write": 0, "new_patients": 0, "newly_opted_out": 0, "opt_out_withdrawn": 0,
                          "refreshed": 0, "unchanged": 10_000, "left_cohort": 0, "superseded": 0}}
    text = render_request(report, [])
    assert "<td>unchanged</td><td>10,000</td>" in text and "<td>written</td><td>0</td>" in text
    assert "<h2>Changes (counted by the Consent ledger)</h2>" in text and "<td>new patients</td><td>0</td>" in text
