"""The run report's change counts and its rendering."""
from __future__ import annotations

import re

import pyarrow as pa

from pipeline import nhs
from pipeline.report import Outcome, changes, render_markdown

N = nhs.synthetic_numbers(8, seed=9701).to_pylist()


def outcome(requested: list[str], opted_out: list[str]) -> Outcome:
    return Outcome(requested=pa.array(requested, pa.string()), opted_out=pa.array(opted_out, pa.string()))


def test_changes_count_each_kind_of_change() -> None:
    before = outcome(N[:6], [N[0], N[1]])  # N0, N1 opted out; N2..N5 not; N6, N7 not yet in the cohort
    now = outcome(N[1:8], [N[1], N[2], N[6]])  # N0 left; N2 newly out; N6 new and out; N7 new
    assert changes(now, before) == {
        "newly_opted_out": 1, "opt_out_withdrawn": 0, "new_patients": 2, "left_cohort": 1, "unchanged": 4,
    }
    assert changes(outcome(N[:2], []), outcome(N[:2], N[:2]))["opt_out_withdrawn"] == 2
    assert changes(now, None) == {"previous_request_id": None}


def test_markdown_has_the_figures_and_no_numbers() -> None:
    report = {
        "request_id": "X26ABC1-241126-0002", "state": "acknowledged", "created_at": "2026-11-24T10:00:00Z",
        "cohort": {"read": 10, "invalid": 1, "duplicates": 2, "sent": 7},
        "results": {"replied": 5, "opted_out": 2, "not_opted_out": 5, "written": 7, "failed": 0, "integrity_errors": 0},
        "changes": {"previous_request_id": "X26ABC1-241126-0001", "newly_opted_out": 1, "opt_out_withdrawn": 0,
                    "new_patients": 2, "left_cohort": 1, "unchanged": 4},
        "stage_seconds": {"request": 0.1, "process": 3.0},
    }
    text = render_markdown(report)
    assert "| 10 | 1 | 2 | 7 |" in text and "| 1 | 0 | 2 | 1 | 4 |" in text and "| process | 3.0 |" in text
    assert not re.search(r"\d{10}", text)
