"""The reply plausibility gate: a reply that would move the cohort's opted-out share more than a set swing is not
believed until a person confirms it (``--accept-swing``).

A reply cut short in transit that nothing on the wire gave away (no Content-Length, a gzip stream cut at a line
break) reads as "everyone missing from it opted out". The opted-out share of a whole cohort moves by a fraction of a
percentage point a day, so against the ledger (the share the store holds) a large swing is the tell: more than
``--max-swing`` points and at least :data:`MIN_PATIENTS_MOVED` patients (fewer is ordinary churn in a small cohort),
or everyone opted out where fewer than half had. Without a ledger (a first load) there is nothing to compare.
"""
from __future__ import annotations

from typing import Any, Mapping

from pipeline.core.settings import Range, env_number

SWING_ENV = "NDOP_MAX_SWING"
DEFAULT_MAX_SWING = 2.0  # percentage points of the cohort
SWING = Range(0, 100, "percentage points")
MIN_PATIENTS_MOVED = 25  # a swing of fewer patients than this is ordinary churn in a small cohort, not a cut reply


def max_swing(value: float | None = None) -> float:
    """``value`` (``--max-swing``), else ``NDOP_MAX_SWING``, else 2 percentage points; each by the one rule."""
    if value is not None:
        return value
    found = env_number(SWING_ENV, DEFAULT_MAX_SWING, SWING)
    return DEFAULT_MAX_SWING if found is None else found


def swing_problem(ledger: Mapping[str, Any] | None, sent: int, reply_lines: int, allowed: float) -> str | None:
    """Why this reply is not plausible against ``ledger`` (pipeline.ledger.staleness.ledger_summary), or None.

    ``sent`` numbers were asked; the reply holds ``reply_lines`` of them (everyone else opted out).
    """
    if ledger is None or sent <= 0:
        return None
    by_status = ledger.get("by_status") or {}
    opted, not_opted = int(by_status.get("opted_out", 0)), int(by_status.get("not_opted_out", 0))
    if opted + not_opted == 0:
        return None
    before = 100.0 * opted / (opted + not_opted)
    now = 100.0 * max(sent - reply_lines, 0) / sent
    moved = abs(now - before) / 100.0 * sent
    everyone = reply_lines == 0 and sent > 1 and before < 50.0  # never "everyone opted out" for a cohort that had few
    if not everyone and (abs(now - before) <= allowed or moved < MIN_PATIENTS_MOVED):
        return None
    return (f"the reply would move the opted-out share from {before:.1f}% to {now:.1f}% of the cohort "
            f"({now - before:+.1f} points, about {moved:.0f} patients; at most {allowed:g} points allowed): a reply "
            f"cut short reads like this; if NDOP's answer is right, run again with --accept-swing")
