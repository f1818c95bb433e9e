"""The Prometheus metrics file (``--metrics-file`` / ``NDOP_METRICS_FILE``) for node_exporter's textfile collector.

Written after every run with ``prometheus_client.write_to_textfile`` (a temporary file renamed into place,
so the collector never reads half a file). Figures come from ``runs.jsonl`` and the work dir:

* ``ndop_last_run_exit_status``, ``ndop_last_run_end_timestamp_seconds``: the latest run, whatever it did;
* ``ndop_last_success_timestamp_seconds``: the latest run that ended 0 (done) or 3 (still waiting, which is
  normal), so a failed run leaves it where it was; kept from the previous file when the run log has none;
* ``ndop_last_done_timestamp_seconds``: the latest run that finished a request (exit 0);
* ``ndop_requests{state=...}``: requests in the work dir by state;
* from the latest run that processed a request: cohort size, opted out, written, unchanged, failed, dead
  letters, stale patients (only when that report carries a Consent ledger's counts), stage durations.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from pipeline.core.errors import EXIT_OK, EXIT_WAITING
from pipeline.ops.runlog import read_runs
from pipeline.core.clock import parse_time
from pipeline.lifecycle.state import STATES, WorkDir

ENV = "NDOP_METRICS_FILE"
SUCCESS = (EXIT_OK, EXIT_WAITING)
LAST_SUCCESS = "ndop_last_success_timestamp_seconds"


def metrics_file(cli_value: str | None) -> str | None:
    return cli_value or os.environ.get(ENV) or None


def _timestamp(text: str | None) -> float | None:
    return parse_time(text).timestamp() if text else None


def previous_value(path: str | os.PathLike[str], name: str) -> float | None:
    """A sample's value in an earlier metrics file (parsed with prometheus_client's own parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = Path(path).read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    return float(sample.value)
    except ValueError:
        return None
    return None


def build_registry(work_dir: WorkDir, previous_file: str | os.PathLike[str] | None = None) -> CollectorRegistry:
    runs = read_runs(work_dir)
    registry = CollectorRegistry()

    def gauge(name: str, doc: str, value: float | None, labels: dict[str, str] | None = None) -> None:
        if value is None:
            return
        g = Gauge(name, doc, list(labels or {}), registry=registry)
        (g.labels(**labels) if labels else g).set(value)

    last = runs[-1] if runs else None
    if last:
        gauge("ndop_last_run_exit_status",
              "Exit status of the latest ndop run (0 done, 3 waiting, 1 failed, 2 bad input)",
              last.get("exit_status"))
        gauge("ndop_last_run_end_timestamp_seconds", "When the latest ndop run ended (Unix time)",
              _timestamp(last.get("ended_at")))
        gauge("ndop_last_run_duration_seconds", "How long the latest ndop run took", last.get("seconds"))
    successes = [r for r in runs if r.get("exit_status") in SUCCESS]
    success = _timestamp(successes[-1]["ended_at"]) if successes else None
    if success is None and previous_file is not None:
        success = previous_value(previous_file, LAST_SUCCESS)
    gauge(LAST_SUCCESS, "When an ndop run last ended without error (exit 0 or 3; Unix time)", success)
    done = [r for r in runs if r.get("exit_status") == EXIT_OK]
    gauge("ndop_last_done_timestamp_seconds", "When an ndop run last finished a request (exit 0; Unix time)",
          _timestamp(done[-1]["ended_at"]) if done else None)

    by_state = {state: 0 for state in STATES}
    for record in work_dir.all():
        by_state[record.get("state", "unknown")] = by_state.get(record.get("state", "unknown"), 0) + 1
    requests = Gauge("ndop_requests", "Requests in the work dir by state", ["state"], registry=registry)
    for state, count in by_state.items():
        requests.labels(state=state).set(count)

    processed = [r for r in runs if r.get("results")]
    latest: dict[str, Any] = processed[-1] if processed else {}
    if latest:
        results, cohort = latest["results"], latest.get("cohort") or {}
        gauge("ndop_cohort_size", "Patients sent to NDOP in the latest processed request",
              cohort.get("sent", results.get("requested")))
        figures = {
            "opted_out": "Patients opted out", "written": "Consents written", "unchanged": "Consents left unchanged",
            "failed": "Consents that failed", "refused": "Consents refused (integrity errors)",
        }
        for key, doc in figures.items():
            gauge(f"ndop_{key}", f"{doc} in the latest processed request", results.get(key, 0))
        gauge("ndop_dead_letters", "Dead letters (failed, refused, integrity errors) in the latest processed request",
              latest.get("dead_letters", 0))
        gauge("ndop_stale_patients", "Patients whose Consent the ledger found stale in the latest processed request",
              latest.get("stale"))
        verified = latest.get("verified") or {}
        if verified:  # ndop run --verify-sample (pipeline/ledger/verify.py)
            gauge("ndop_verified_consents", "Consents read back from the store after the latest processed request",
                  verified.get("checked"))
            gauge("ndop_verify_mismatches", "Consents of that sample that differ from the ledger (drift)",
                  verified.get("mismatches"))
        stages = latest.get("stage_seconds") or {}
        if stages:
            stage = Gauge("ndop_stage_duration_seconds", "Seconds per stage of the latest processed request",
                          ["stage"], registry=registry)
            for name, seconds in stages.items():
                stage.labels(stage=name).set(seconds)
    return registry


def write_metrics(path: str | os.PathLike[str], work_dir: WorkDir) -> None:
    """Write the metrics file atomically (prometheus_client writes a temporary file and renames it)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(target), build_registry(work_dir, previous_file=target))
