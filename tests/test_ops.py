"""What operators look at: run log, HTML pages (in headless Chromium), metrics file, JSON logs, progress.

The end-to-end test runs ``ndop run`` against the real mesh-sandbox (playing NDOP) and FHIR server.
"""
from __future__ import annotations

import pytest

import io
import json
import logging
import os
import py_compile
import re
import shutil
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from pipeline.core import logs
from pipeline.core import nhs
from pipeline.ops.metrics import build_registry, write_metrics
from pipeline.beam.progress import Reporter, advance_writes, follow_job, poll_sleeper, tracking_writes
from pipeline.ops.runlog import append_run, read_runs, run_entry, typical_wait
from pipeline.lifecycle.state import WorkDir
from tests.browser import Browser
from tests.test_run import ndop_run

ROOT = Path(__file__).resolve().parents[1]


def samples(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text file, parsed by prometheus_client's own parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(path.read_text()) for s in family.samples}


def assert_renders_offline(browser: Browser, page: Path, shot: Path, min_charts: int) -> str:
    browser.connections.clear()
    dom = browser.dom(page)
    assert len(re.findall(r"<svg\b", dom)) >= min_charts, "charts missing from the rendered page"
    assert re.search(r"<path\b", dom), "the charts have no drawing in them"
    assert 'name="viewport"' in dom
    browser.screenshot(page, shot)
    assert shot.stat().st_size > 10_000  # a page with charts on it, not a blank one
    assert browser.page_requests() == [], f"{page.name} asked the network for {browser.page_requests()}"
    return dom


@pytest.mark.slow  # stage 2 of the test command (run_tests.sh --all)
def test_runs_leave_a_run_log_pages_and_metrics_with_the_right_counts(tmp_path, work_dir, mesh, fhir_server) -> None:
    numbers = nhs.synthetic_numbers(40, seed=9701).to_pylist()
    cohort = tmp_path / "cohort.txt"
    cohort.write_text("\n".join(numbers) + "\n")
    opted = tmp_path / "opted-out.txt"
    opted.write_text("\n".join(numbers[:6]) + "\n")
    mesh.plugin(opted_out_file=str(opted))
    metrics = tmp_path / "textfile" / "ndop.prom"
    env = {**mesh.env(), "FHIR_URL": fhir_server, "NDOP_METRICS_FILE": str(metrics), "NDOP_LOG_FORMAT": "json",
           "NDOP_PROGRESS_SECONDS": "0"}

    first = ndop_run(work_dir, env, "--cohort", str(cohort))
    assert first.returncode == 0, first.stderr
    assert "[write] 40/40 Consents written (100%)" in first.stderr
    json_lines = [json.loads(line) for line in first.stderr.splitlines()]  # every stderr line: one JSON object
    assert json_lines and all({"time", "level", "logger", "message"} <= set(e) for e in json_lines)
    assert any(e["logger"] == "ndop.progress" and e["message"].startswith("[request] ") for e in json_lines)
    after_first = samples(metrics)
    assert after_first[("ndop_last_run_exit_status", ())] == 0
    assert after_first[("ndop_cohort_size", ())] == 40
    assert after_first[("ndop_opted_out", ())] == 6
    assert after_first[("ndop_written", ())] == 40
    assert after_first[("ndop_failed", ())] == 0 and after_first[("ndop_dead_letters", ())] == 0
    assert after_first[("ndop_requests", (("state", "acknowledged"),))] == 1
    assert after_first[("ndop_last_success_timestamp_seconds", ())] == after_first[("ndop_last_run_end_timestamp_seconds", ())]
    assert after_first[("ndop_stage_duration_seconds", (("stage", "process"),))] > 0

    # A second request NDOP has not answered yet (exit 3: a success for the scheduler), then rejects (exit 1).
    mesh.plugin(mode="silent")
    second = ndop_run(work_dir, env, "--cohort", str(cohort), "--new-request", "--wait", "1", "--interval", "0.4",
                      "--log-format", "text")
    assert second.returncode == 3, second.stderr
    assert re.search(r"\[poll\] waited \d+s of 1s; next poll in \d+s; NDOP usually answers in \d+s", second.stderr)
    after_waiting = samples(metrics)
    assert after_waiting[("ndop_last_run_exit_status", ())] == 3
    assert after_waiting[("ndop_last_success_timestamp_seconds", ())] == after_waiting[("ndop_last_run_end_timestamp_seconds", ())]
    assert after_waiting[("ndop_last_done_timestamp_seconds", ())] == after_first[("ndop_last_run_end_timestamp_seconds", ())]
    waiting = work_dir.all()[1]
    with mesh.client("X26HC065") as ndop:
        ndop.send_message("X26ABC1", b"The file contains one or more invalid NHS Numbers\r\n",
                          workflow_id="SPINE_NTT_UPHOLDING", local_id=waiting["local_id"], subject=waiting["subject"])
    third = ndop_run(work_dir, env, "--wait", "0")
    assert third.returncode == 1, third.stderr
    after_failed = samples(metrics)
    assert after_failed[("ndop_last_run_exit_status", ())] == 1
    assert after_failed[("ndop_last_run_end_timestamp_seconds", ())] >= after_waiting[("ndop_last_run_end_timestamp_seconds", ())]
    assert after_failed[("ndop_last_success_timestamp_seconds", ())] == after_waiting[("ndop_last_success_timestamp_seconds", ())]
    assert after_failed[("ndop_requests", (("state", "rejected"),))] == 1
    assert after_failed[("ndop_requests", (("state", "acknowledged"),))] == 1
    assert after_failed[("ndop_written", ())] == 40  # the figures of the latest request that was processed

    runs = read_runs(work_dir)
    assert [(r["outcome"], r["exit_status"]) for r in runs] == [("done", 0), ("waiting", 3), ("failed", 1)]
    first_id, second_id = runs[0]["request_id"], runs[1]["request_id"]
    assert runs[2]["request_id"] == second_id and second_id in runs[2]["message"] and "rejected" in runs[2]["message"]
    assert runs[0]["results"]["opted_out"] == 6 and runs[0]["cohort"]["sent"] == 40

    index = work_dir.root / "index.html"
    pages = [index, work_dir.request_dir(first_id) / "report.html", work_dir.request_dir(second_id) / "report.html"]
    index_text = index.read_text()
    assert index_text.index(second_id) < index_text.index(first_id)  # newest first
    outputs = [p.read_text() for p in pages] + [metrics.read_text(), (work_dir.root / "runs.jsonl").read_text(),
                                                 first.stdout, first.stderr, second.stdout, second.stderr,
                                                 third.stdout, third.stderr]
    for text in outputs:
        assert not any(n in text for n in numbers)
    assert oct((work_dir.root / "runs.jsonl").stat().st_mode & 0o777) == "0o600"

    browser = Browser(tmp_path / "chromium")
    try:
        shots = tmp_path / "screenshots"
        shots.mkdir()
        dom = assert_renders_offline(browser, index, shots / "index.png", min_charts=5)
        assert first_id in dom and second_id in dom
        dom = assert_renders_offline(browser, pages[1], shots / "report.png", min_charts=2)
        assert "Results" in dom and "acknowledged" in dom
    finally:
        browser.close()

    # `ndop report` regenerates every page; --request-id just one (and the index)
    for page in pages:
        page.unlink()
    regenerated = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "report", "--work-dir", str(work_dir.root), "--request-id", first_id],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert regenerated.returncode == 0, regenerated.stderr
    assert pages[0].exists() and pages[1].exists() and not pages[2].exists()
    assert pages[1].read_text().count("<svg") >= 2


def test_the_browser_check_sees_a_page_that_asks_the_network(tmp_path) -> None:
    """The control for the no-network assertion above: a page with remote images is caught."""
    page = tmp_path / "remote.html"
    page.write_text('<!DOCTYPE html><html><body><svg></svg><img src="http://cdn.example.org/a.png">'
                    '<img src="https://fonts.example.net/b.png"></body></html>')
    browser = Browser(tmp_path / "chromium")
    try:
        browser.dom(page)
        hosts = " ".join(browser.page_requests())
    finally:
        browser.close()
    assert "cdn.example.org" in hosts and "fonts.example.net" in hosts


def _entry(code: int, ended: str, **report) -> dict:
    return run_entry(code, "2026-12-01-001", "m", report or None, ended, ended, 1.0)


def test_metrics_keep_the_last_success_from_the_previous_file_and_skip_absent_figures(tmp_path) -> None:
    work_dir = WorkDir(tmp_path / "work")
    metrics = tmp_path / "ndop.prom"
    append_run(work_dir, _entry(0, "2026-12-01T06:00:00Z", results={"written": 3}))
    write_metrics(metrics, work_dir)
    success = samples(metrics)[("ndop_last_success_timestamp_seconds", ())]
    assert ("ndop_stale_patients", ()) not in samples(metrics)  # no ledger figures: no stale gauge
    (work_dir.root / "runs.jsonl").unlink()  # the run log lost (or rotated): the file still knows
    append_run(work_dir, _entry(1, "2026-12-02T06:00:00Z"))
    write_metrics(metrics, work_dir)
    after = samples(metrics)
    assert after[("ndop_last_run_exit_status", ())] == 1
    assert after[("ndop_last_success_timestamp_seconds", ())] == success
    append_run(work_dir, _entry(0, "2026-12-03T06:00:00Z", results={"written": 5}, ledger={"stale": 2}))
    assert "ndop_stale_patients 2.0" in __import__("prometheus_client").generate_latest(
        build_registry(work_dir)).decode()


def test_json_logs_one_object_a_line_with_tracebacks_redacted() -> None:
    stream = io.StringIO()
    logs.configure("json", verbose=True, stream=stream)  # INFO lines show under -v (quiet by default)
    try:
        log = logging.getLogger("ndop.test")
        log.info("request %s: %d sent", "2026-12-01-001", 40)
        try:
            raise ValueError("bad number 9990001234 in reply")
        except ValueError:
            log.exception("failed for %s", nhs.mask("9990001234"))
    finally:
        logs.configure("text")
    first, second = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert first["message"] == "request 2026-12-01-001: 40 sent" and first["level"] == "INFO"
    assert second["message"] == "failed for ******1234" and "ValueError" in second["exception"]
    assert "9990001234" not in stream.getvalue()


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_poll_progress_says_elapsed_next_poll_and_the_usual_ndop_time_at_most_every_few_seconds() -> None:
    clock, out = _Clock(), io.StringIO()
    reporter = Reporter("poll", total=60, stream=out, every=5, clock=clock, tty=False)
    sleeper = poll_sleeper(60, 20, typical=7200, reporter=reporter, sleep=clock.sleep)
    sleeper(20)
    sleeper(20)
    lines = out.getvalue().splitlines()
    assert lines[0] == "[poll] waited 0s of 1m 00s; next poll in 20s; NDOP usually answers in 2h 00m"
    assert 8 <= len(lines) <= 10  # 40 s of waiting, one line each 5 s
    assert "waited 35s of 1m 00s; next poll in 5s" in lines[-2]


def test_typical_wait_is_the_median_over_requests() -> None:
    runs = [{"request_id": f"r{i}", "stage_seconds": {"wait_for_ndop": w}} for i, w in enumerate((10, 300, 40))]
    assert typical_wait(runs) == 40 and typical_wait([]) is None


def test_write_progress_plain_lines_rate_and_eta_and_a_tqdm_bar_on_a_terminal() -> None:
    clock, out = _Clock(), io.StringIO()
    with tracking_writes(100, reporter=Reporter("write", total=100, stream=out, every=5, clock=clock, tty=False)):
        for _ in range(4):
            clock.sleep(5)
            advance_writes(25)
    advance_writes(10)  # nothing tracks after the block: a remote worker's calls do nothing
    lines = out.getvalue().splitlines()
    assert lines[0] == "[write] 25/100 Consents written (25%), 5/s, ETA 15s"
    assert lines[-1].startswith("[write] 100/100 Consents written (100%)")
    tty = io.StringIO()
    with tracking_writes(10, reporter=Reporter("write", total=10, stream=tty, every=0, tty=True)):
        advance_writes(5)
    assert "50%|" in tty.getvalue() and "5/10" in tty.getvalue()


def test_remote_job_progress_from_its_metrics() -> None:
    class Job:  # a runner's result: RUNNING twice, then DONE
        def __init__(self) -> None:
            self.states, self.state = ["RUNNING", "DONE"], "RUNNING"
            self.written = 0

        def wait_until_finish(self, duration: int) -> str:
            self.written += 50
            self.state = self.states.pop(0)
            return self.state

    clock, out = _Clock(), io.StringIO()
    follow_job(Job(), 100, lambda job: job.written, Reporter("write", total=100, stream=out, every=0, clock=clock,
                                                               tty=False))
    assert out.getvalue().splitlines()[-1].startswith("[write] 100/100 Consents written")


def test_scheduler_examples_are_valid(tmp_path) -> None:
    examples = ROOT / "examples"
    analyze = shutil.which("systemd-analyze")
    if analyze:  # ExecStart must exist for verify: point it at this checkout's ndop
        for name in ("ndop.service", "ndop.timer"):
            text = (examples / name).read_text().replace("/srv/ndop/.venv/bin/ndop", str(ROOT / ".venv" / "bin" / "ndop"))
            (tmp_path / name).write_text(text)
        done = subprocess.run([analyze, "verify", str(tmp_path / "ndop.service"), str(tmp_path / "ndop.timer")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
    service = (examples / "ndop.service").read_text()
    assert "SuccessExitStatus=3" in service and "--metrics-file" not in service  # env, not a CLI secret/option
    [cron] = [line for line in (examples / "crontab").read_text().splitlines() if line and not line.startswith("#")]
    fields = cron.split(None, 5)
    assert len(fields) == 6 and all(re.fullmatch(r"[\d*/,-]+", f) for f in fields[:5]) and "ndop run" in fields[5]


def test_airflow_dag_retries_exit_3_and_fails_exit_1(tmp_path) -> None:
    """Airflow (about 80 s and 400 MB to install) is not in CI's setup: there the DAG is compiled only.
    With NDOP_AIRFLOW_PYTHON set to a Python that has Airflow, the DAG is imported and its task run."""
    dag = ROOT / "examples" / "airflow_ndop_dag.py"
    py_compile.compile(str(dag), cfile=str(tmp_path / "dag.pyc"), doraise=True)
    airflow_python = os.environ.get("NDOP_AIRFLOW_PYTHON")
    if not airflow_python:
        assert "EXIT_WAITING = 3" in dag.read_text() and "AirflowFailException" in dag.read_text()
        return
    fake = tmp_path / "ndop"
    fake.write_text('#!/bin/sh\nexit "${FAKE_EXIT:-0}"\n')
    fake.chmod(0o755)
    done = subprocess.run([airflow_python, str(ROOT / "tests" / "airflow_dag_check.py"), str(dag)],
                          env={**os.environ, "NDOP_BIN": str(fake), "AIRFLOW_HOME": str(tmp_path / "airflow")},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"dag_id": "ndop_sync", "tasks": ["ndop_run"], "outcomes": {"0": "ok", "3": "retry", "1": "fail"},
                     "retries": 48}


def test_an_unwritable_metrics_file_is_one_error_line_and_the_run_log_still_grows(tmp_path, capsys) -> None:
    from pipeline.ops.outputs import RunOutcome, after_run

    work_dir = WorkDir(tmp_path / "work")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    entry = after_run(work_dir, RunOutcome(3, None, "waiting"), "2026-12-01T06:00:00Z", 1.0,
                      metrics_file=str(blocker / "ndop.prom"))
    assert entry["exit_status"] == 3 and len(read_runs(work_dir)) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"ndop run: error: {blocker / 'ndop.prom'}: cannot write the metrics file")


def test_index_of_no_runs_and_of_a_bad_input_run_quoting_a_number() -> None:
    from pipeline.ops.report_html import render_index

    assert "0 run(s)" in render_index([])
    entry = run_entry(2, None, "cohort.txt:3: 9990001234 is not valid", None, "2026-12-01T06:00:00Z",
                      "2026-12-01T06:00:01Z", 1.0)
    page = render_index([entry])
    assert "bad input" in page and "******1234" in page and "9990001234" not in page and "<svg" in page


def _processed_run(ended_at: str, request_id: str, written: int, unchanged: int) -> dict:
    report = {"request_id": request_id, "state": "acknowledged", "cohort": {"read": 10_000, "sent": 10_000},
              "results": {"requested": 10_000, "replied": 9_500, "opted_out": 500, "not_opted_out": 9_500,
                          "written": written, "failed": 0, "refused": 0},
              "changes": {"to_write": written, "new_patients": written, "newly_opted_out": 0, "opt_out_withdrawn": 0,
                          "refreshed": 0, "unchanged": unchanged, "left_cohort": 0, "superseded": 0},
              "stage_seconds": {"request": 0.2, "send": 0.5, "wait_for_ndop": 2.0, "poll": 1.2, "process": 49.3}}
    return run_entry(0, request_id, f"request {request_id} done", report, ended_at, ended_at, 55.0) | {
        "report": report}


def test_pages_read_on_a_phone_and_a_laptop_with_the_numbers_of_the_run(tmp_path) -> None:
    """Issue 22 item 7: charts unreadable at phone width (390 px), the runs table clipped at 1280 px, two runs in
    one minute sharing an x label, and the request page's figures: read from the page as Chromium lays it out."""
    from pipeline.ops.report_html import render_index, render_request

    runs = [_processed_run(f"2026-11-{day:02d}T06:00:00Z", f"X26ABC1-{day:02d}1126-0001", 0, 10_000)
            for day in range(1, 29)]
    runs += [_processed_run("2026-12-04T05:12:40Z", "X26ABC1-041226-0001", 10_000, 0),
             _processed_run("2026-12-04T05:12:56Z", "X26ABC1-041226-0002", 0, 10_000)]
    index = tmp_path / "index.html"
    index.write_text(render_index([{k: v for k, v in r.items() if k != "report"} for r in runs]))
    same_minute = tmp_path / "two.html"
    same_minute.write_text(render_index([{k: v for k, v in r.items() if k != "report"} for r in runs[-2:]]))
    request = tmp_path / "report.html"
    request.write_text(render_request(runs[-1]["report"], []))

    browser = Browser(tmp_path / "chromium")
    try:
        for page in (index, request):
            phone = browser.measure(page, 390)
            assert phone["viewport"] == 390
            assert min(phone["chart_font_px"]) >= 9, f"{page.name}: chart text {min(phone['chart_font_px'])} px at 390"
            laptop = browser.measure(page, 1280)
            assert all(t["scroll"] <= t["client"] for t in laptop["tables"]), f"{page.name}: {laptop['tables']}"
        ticks = browser.measure(same_minute, 390)["ticks"]
        times = {t for chart in ticks for t in chart if re.search(r"\d\d:\d\d", t)}
        assert len(times) == 2, times  # one label per run, though both ended in the same minute

        dom = browser.dom(request)  # the figures as the browser shows them
        shown = dict(re.findall(r"<tr[^>]*><td>([a-z ()-]+)</td><td>([\d,]+)</td></tr>", dom))
        assert shown["written"] == "0" and shown["unchanged"] == "10,000" and shown["opted out"] == "500", shown
        assert "Changes (counted by the Consent ledger)" in dom and shown["unchanged (not written)"] == "10,000"
    finally:
        browser.close()


def test_a_run_says_each_thing_once_and_everything_under_v(tmp_path, work_dir, mesh, fhir_server) -> None:
    """Issue 22 item 7: every message was printed twice (an INFO log line and a ``[stage]`` line), and Beam warned
    about ``yield`` and ``return`` in ``WriteLedgerShardFn``. Quiet by default; every log line under ``-v``."""
    numbers = nhs.synthetic_numbers(30, seed=9702).to_pylist()
    cohort = tmp_path / "cohort.txt"
    cohort.write_text("\n".join(numbers) + "\n")
    mesh.plugin(opted_out_file=str(tmp_path / "none.txt"))
    (tmp_path / "none.txt").write_text("")
    env = {**mesh.env(), "FHIR_URL": fhir_server, "NDOP_PROGRESS_SECONDS": "0"}

    quiet = ndop_run(work_dir, env, "--cohort", str(cohort))
    assert quiet.returncode == 0, quiet.stderr
    lines = quiet.stderr.strip().splitlines()
    assert lines and all(line.startswith("[") for line in lines), quiet.stderr  # progress lines only
    # a rate changes, the message does not; a wait for NDOP is reported once a poll (NDOP_PROGRESS_SECONDS=0)
    said = [re.sub(r"\d+/s, ETA \S+", "", line) for line in lines if not line.startswith("[poll] waited ")]
    assert len(said) == len(set(said)), quiet.stderr
    assert "[write] 30/30 Consents written (100%)" in quiet.stderr and "yield and return" not in quiet.stderr

    loud = ndop_run(work_dir, env, "--cohort", str(cohort), "--new-request", "-v")
    assert loud.returncode == 0, loud.stderr
    assert re.search(r" INFO pipeline\.mesh\.sender: request \S+ sent to X26HC065", loud.stderr)
    assert " DEBUG " in loud.stderr and "yield and return" not in loud.stderr
