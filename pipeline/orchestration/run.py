"""``ndop run``: request -> send -> poll -> process -> acknowledge, as one resumable command.

What a data exchange puts on its scheduler. An unfinished request is always carried on before a new
one is built; the whole run holds the work dir's lock. Why a run killed anywhere is finished by the
next, exactly once: the crash and idempotency contract in pipeline/lifecycle/state.py.

Exit status: 0 done, 3 still waiting for NDOP, 1 failed (the report says what and where), 2 bad input,
4 another ndop command holds the work dir.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from pipeline.request.cohort import FHIR_COHORT, read_fhir_cohort
from pipeline.core.errors import EXIT_FAILED, EXIT_OK, EXIT_WAITING, InputError, NdopError
from pipeline.core.faults import fault_point
from pipeline.fhir.config import FhirClientConfig
from pipeline.mesh.config import MeshConfig
from pipeline.mesh.driver import MeshDriver
from pipeline.orchestration.plausibility import DEFAULT_MAX_SWING
from pipeline.ops.report import render_markdown, write_report
from pipeline.request.build import RequestSettings, build_request
from pipeline.core.clock import isoformat, utcnow
from pipeline.lifecycle.state import (
    ACKNOWLEDGED,
    CREATED,
    FAILED,
    FINAL,
    IN_FLIGHT,
    PROCESSED,
    REJECTED,
    REPLIED,
    SEND_UNKNOWN,
    RequestRecord,
    WorkDir,
)
from pipeline.core.logs import progress_line
from pipeline.beam.progress import poll_sleeper
from pipeline.ops.runlog import read_runs, typical_wait

_LOGGER = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass
class RunSettings:
    cohort: str | None
    request: RequestSettings
    wait: float = 0
    interval: float = 30
    new_request: bool = False
    fhir_url: str | None = None
    beam_args: Sequence[str] = ()
    stage_dir: str | None = None
    swing: float | None = DEFAULT_MAX_SWING  # the plausibility gate (orchestration/plausibility.py); None: accepted
    verify_sample: int = 0  # Consents read back after the run (pipeline/ledger/verify.py); the CLI's default is 100
    fhir_env_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    exit_code: int
    request_id: str | None
    message: str
    report: dict[str, Any] | None = None


def _stderr(line: str) -> None:

    progress_line(line)


class Runner:
    """Drives one request through every step, resuming from whatever state it was left in."""

    def __init__(self, work_dir: WorkDir, mesh: MeshConfig, settings: RunSettings,
                 progress: Progress = _stderr) -> None:
        self.work_dir = work_dir
        self.mesh = mesh
        self.settings = settings
        self.progress = progress
        self.current: str | None = None

    # -- stages -----------------------------------------------------------------------------------

    def _timed(self, request_id: str, stage: str, started: float) -> None:
        record = self.work_dir.load(request_id)
        stages = dict(record.get("stage_seconds", {}))
        stages[stage] = round(stages.get(stage, 0) + time.monotonic() - started, 2)
        self.work_dir.update(request_id, stage_seconds=stages)

    def unfinished(self) -> list[RequestRecord]:
        return [r for r in self.work_dir.all() if r.get("state") not in FINAL]

    def choose(self) -> RequestRecord:
        """The request this run drives: the oldest unfinished one, else a new one from the cohort."""
        waiting = self.unfinished()
        if waiting and not self.settings.new_request:
            record = waiting[0]
            self.progress(f"[request] carrying on {record['request_id']} (state {record['state']}); "
                          "no new request while one is unfinished (--new-request forces one)")
            return record
        if not self.settings.cohort:
            raise InputError("no unfinished request to carry on: give --cohort PATH (or --cohort fhir)")
        started = time.monotonic()
        if self.settings.cohort == FHIR_COHORT:
            config = FhirClientConfig.from_env(base_url=self.settings.fhir_url, **self.settings.fhir_env_overrides)
            self.progress(f"[request] reading every Patient's NHS number from {config.base_url}")
            source: Any = read_fhir_cohort(config)
        else:
            source = self.settings.cohort
        built = build_request(source, self.work_dir, self.settings.request)
        self._timed(built["request_id"], "request", started)
        c = built["counts"]
        self.progress(f"[request] {built['request_id']}: {c['read']} read, {c['invalid']} invalid, "
                      f"{c['duplicates']} duplicates, {c['sent']} to send")
        fault_point("after-request")
        return self.work_dir.load(built["request_id"])

    def run(self) -> RunResult:
        record = self.choose()
        rid = self.current = record["request_id"]
        with MeshDriver(self.mesh, self.work_dir) as driver:
            if record["state"] == CREATED:
                started = time.monotonic()
                for result in driver.send(request_id=rid):
                    self.progress(f"[send] {result.request_id}: {result.outcome} {result.detail}".rstrip())
                self._timed(rid, "send", started)
                fault_point("after-send")
            record = self.work_dir.load(rid)
            if record["state"] == CREATED:
                return self._finish(rid, EXIT_FAILED, f"request {rid} could not be sent; see the log above")
            if record["state"] == REPLIED:  # one look at the inbox first: is a second, different reply waiting?
                driver.poll()
                record = self.work_dir.load(rid)
            if record["state"] in IN_FLIGHT:
                started = time.monotonic()
                self.progress(f"[poll] waiting up to {self.settings.wait:.0f}s for NDOP's reply to {rid}")
                driver.poll(wait=self.settings.wait, interval=self.settings.interval, sleep=self._poll_sleep())
                self._timed(rid, "poll", started)
                record = self.work_dir.load(rid)
                self.progress(f"[poll] {rid}: {record['state']}")
                fault_point("after-download")
            state = record["state"]
            if state in IN_FLIGHT:
                why = " (the send's outcome is unknown; poll goes on looking)" if state == SEND_UNKNOWN else ""
                return self._finish(rid, EXIT_WAITING, f"request {rid} is still waiting for NDOP{why}")
            if state in (REJECTED, FAILED):
                reason = (record.get("rejection") or record.get("failure") or {})
                return self._finish(rid, EXIT_FAILED, f"request {rid} {state}: {_describe(reason)}")
            if state in (REPLIED, PROCESSED):
                self.progress(f"[process] {rid}: joining the reply and writing Consents")
                started = time.monotonic()
                # deferred on purpose: Beam loads only when there is work for it
                from pipeline.orchestration.process_request import process_request

                try:
                    process_request(self.work_dir, rid, self.settings.fhir_url, self.settings.beam_args,
                                    acknowledge=self._acknowledger(driver), stage_dir=self.settings.stage_dir,
                                    swing=self.settings.swing)
                finally:
                    self._timed(rid, "process", started)
            record = self.work_dir.load(rid)
        if record["state"] == ACKNOWLEDGED:
            drift = self._verify_sample(rid)
            if drift:
                return self._finish(rid, EXIT_FAILED, f"request {rid} done, but {drift} Consents of a sample differ "
                                                      "from the ledger (changed in the store directly): queued for "
                                                      "the next process step (ndop verify --repair writes them now)")
            return self._finish(rid, EXIT_OK, f"request {rid} done: Consents written, MESH reply acknowledged")
        return self._finish(rid, EXIT_FAILED, f"request {rid} ended in state {record['state']}")

    def _poll_sleep(self) -> Callable[[float], None]:
        """The poll loop's sleep, reporting the wait (elapsed, next poll, NDOP's usual time) on stderr."""

        return poll_sleeper(self.settings.wait, self.settings.interval, typical_wait(read_runs(self.work_dir)))

    def _verify_sample(self, request_id: str) -> int:
        """``--verify-sample N``: read N Consents back and compare them with the ledger (pipeline/ledger/verify.py); the
        counts go on the request's record (and so into its report); returns how many differ."""
        if not self.settings.verify_sample:
            return 0
        from pipeline.ledger.verify import verify  # deferred: loads apache_beam only when used

        started = time.monotonic()
        config = FhirClientConfig.from_env(base_url=self.settings.fhir_url, **self.settings.fhir_env_overrides)
        counts = verify(self.work_dir, config, sample=self.settings.verify_sample).counts()
        self.work_dir.update(request_id, verified={**counts, "at": isoformat(utcnow())})
        self._timed(request_id, "verify", started)
        self.progress(f"[verify] {counts['checked']} Consents read back: {counts['mismatches']} differ from the ledger")
        return counts["mismatches"]

    def _acknowledger(self, driver: MeshDriver) -> Callable[[str], RequestRecord]:
        def acknowledge(request_id: str) -> RequestRecord:
            fault_point("before-ack")
            self.progress(f"[acknowledge] {request_id}: Consents stored; acknowledging the MESH reply")
            return driver.acknowledge(request_id)

        return acknowledge

    def _finish(self, request_id: str, code: int, message: str) -> RunResult:
        record = self.work_dir.load(request_id)
        report = write_report(self.work_dir, record)
        return RunResult(code, request_id, message, report)


def _describe(reason: Any) -> str:
    if isinstance(reason, dict):
        return "; ".join(f"{k}: {v}" for k, v in reason.items() if v not in (None, ""))
    return str(reason)


def run(work_dir: WorkDir, mesh: MeshConfig, settings: RunSettings, progress: Progress = _stderr) -> RunResult:
    """One scheduled run. Failures of the process step come back as a result with exit 1 and a report."""
    runner = Runner(work_dir, mesh, settings, progress)
    try:
        with work_dir.lock():  # choose() and every step's decide-and-act: one run at a time (lifecycle/state.py)
            return runner.run()
    except InputError:
        raise
    except NdopError as err:
        if runner.current is None:
            raise
        return runner._finish(runner.current, EXIT_FAILED, str(err))


def print_report(result: RunResult, work_dir: WorkDir) -> None:
    """The report on stdout (for people and cron mail); the one-line outcome on stderr when it failed."""
    if result.report and result.request_id:
        print(render_markdown(result.report))
        print(f"report: {work_dir.request_dir(result.request_id) / 'report.md'}")
    if result.exit_code == EXIT_FAILED:
        print(f"ndop run: error: {result.message}", file=sys.stderr)
    else:
        print(f"ndop run: {result.message}")
