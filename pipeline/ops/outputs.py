"""What a run leaves for the people who operate it: the ``runs.jsonl`` line, the HTML pages, the metrics file.

:func:`recorded` wraps a run: whatever way it ends (done, waiting, failed, bad input, interrupted) it appends the
line (pipeline/ops/runlog.py), regenerates the request's ``report.html`` and ``WORK/index.html``
(pipeline/ops/report_html.py), and writes the Prometheus metrics file when one is configured (pipeline/ops/metrics.py).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator

from pipeline.core import nhs
from pipeline.core.errors import EXIT_FAILED, NdopError
from pipeline.ops.metrics import write_metrics
from pipeline.ops.report_html import write_index, write_request_page
from pipeline.ops.runlog import EXIT_INTERRUPTED, append_run, load_report, run_entry
from pipeline.core.clock import isoformat, utcnow
from pipeline.lifecycle.state import WorkDir

_LOGGER = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    """What the wrapped run says about itself; whatever is left unset is read from the exception."""

    exit_code: int | None = None
    request_id: str | None = None
    message: str = ""
    report: dict[str, Any] | None = None


def after_run(work_dir: WorkDir, outcome: RunOutcome, started_at: str, seconds: float,
              metrics_file: str | None = None) -> dict[str, Any]:
    """Record the run, regenerate its pages, write the metrics file; returns the runs.jsonl line."""
    code = EXIT_FAILED if outcome.exit_code is None else outcome.exit_code
    report = outcome.report or load_report(work_dir, outcome.request_id)
    entry = run_entry(code, outcome.request_id, outcome.message, report, started_at, isoformat(utcnow()), seconds)
    append_run(work_dir, entry)
    try:
        if outcome.request_id and report:
            write_request_page(work_dir, outcome.request_id, report)
        write_index(work_dir)
    except Exception as err:  # pages are a view: a chart that fails must not turn a good run into a failed one
        _LOGGER.warning("could not write the HTML report: %s", nhs.redact(str(err)))
    if metrics_file:
        try:
            write_metrics(metrics_file, work_dir)
        except OSError as err:  # the run's own outcome (and exit status) stands; a stale file alerts by itself
            print(f"ndop run: error: {metrics_file}: cannot write the metrics file: {err.strerror or err}",
                  file=sys.stderr)
    return entry


@contextlib.contextmanager
def recorded(work_dir: WorkDir, metrics_file: str | None = None) -> Iterator[RunOutcome]:
    """Wrap a run: the caller fills the yielded :class:`RunOutcome`; an escaping error is recorded too."""
    outcome = RunOutcome()
    started_at, clock = isoformat(utcnow()), time.monotonic()
    try:
        yield outcome
    except NdopError as err:
        outcome.exit_code, outcome.message = err.exit_code, str(err)
        after_run(work_dir, outcome, started_at, time.monotonic() - clock, metrics_file)
        raise
    except KeyboardInterrupt:
        outcome.exit_code, outcome.message = EXIT_INTERRUPTED, "interrupted"
        after_run(work_dir, outcome, started_at, time.monotonic() - clock, metrics_file)
        raise
    except BaseException as err:
        outcome.exit_code, outcome.message = EXIT_FAILED, f"{type(err).__name__}: {err}"
        after_run(work_dir, outcome, started_at, time.monotonic() - clock, metrics_file)
        raise
    else:
        after_run(work_dir, outcome, started_at, time.monotonic() - clock, metrics_file)
