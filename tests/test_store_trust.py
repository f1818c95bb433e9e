"""Believe no peer, on the FHIR side (issue 19 item 1): a write counts only when the store's answer says so, entry by
entry. A fault-injecting proxy (tests/fixtures/fhir_proxy.py) sits in front of the real FHIR server."""
from __future__ import annotations

import json
import time
from datetime import datetime

import pyarrow.parquet as pq
import pytest

from pipeline.core import nhs
from pipeline.fhir.config import FhirClientConfig
from pipeline.lifecycle.state import ACKNOWLEDGED, REPLIED
from tests.fixtures.fhir_proxy import FaultProxy
from tests.helpers import cli, summarise
from tests.test_run import ndop_run, statuses
from tests.test_write_consents import make_consent, numbers, run


@pytest.mark.parametrize("fault, words", [
    ("202", "HTTP 202 is not a batch-response"),
    ("204", "HTTP 204 is not a batch-response"),
    ("201", "HTTP 201 is not a batch-response"),
    ("short", "batch-response has 5 entries for 6 sent"),
])
def test_an_answer_that_is_not_a_full_batch_response_counts_as_nothing_written(fhir_server: str, fault,
                                                                                words) -> None:
    consents = [make_consent(n) for n in numbers(6, 1900 + len(fault))]
    with FaultProxy(fhir_server, fault) as proxy:
        main, dead, counters = run(consents, FhirClientConfig(proxy.url, max_retries=1, backoff=0.01))
    assert summarise(main) == {"created": 0, "updated": 0, "failed": 6, "refused": 0}
    assert sorted(d["consent_id"] for d in dead) == sorted(c["id"] for c in consents)
    assert {d["status"] for d in dead} == {502} and all(words in d["reason"] for d in dead), dead[0]["reason"]
    assert proxy.bundle_posts == 2  # the bundle was retried once (max_retries=1), then dead-lettered
    assert counters["consents_failed"] == 6 and counters["consents_created"] == counters["consents_updated"] == 0


@pytest.mark.slow  # stage 2 of the test command (run_tests.sh --all)
def test_a_run_behind_a_gateway_answering_202_fails_and_acknowledges_nothing(tmp_path, work_dir, mesh,
                                                                             fhir_server) -> None:
    cohort = tmp_path / "cohort.txt"
    cohort.write_text("\n".join(nhs.synthetic_numbers(30, seed=1931).to_pylist()) + "\n")
    with FaultProxy(fhir_server, "202") as proxy:
        done = ndop_run(work_dir, {**mesh.env(), "FHIR_URL": proxy.url}, "--cohort", str(cohort))
    assert done.returncode == 1, done.stdout + done.stderr
    [record] = work_dir.all()
    assert record["state"] == REPLIED  # not processed, so the reply is not acknowledged
    assert len(mesh.inbox()) == 1
    assert proxy.bundle_posts >= 1


def test_an_older_request_processed_late_never_overwrites_a_newer_answer(tmp_path, work_dir, mesh,
                                                                         fhir_server) -> None:
    """Issue 19 item 3: request A is replied but not processed; B (``--new-request``) completes with a newer answer;
    the next run carries A on, and A's older statuses must not overwrite B's (Consents, ledger checked_at)."""
    numbers = nhs.synthetic_numbers(12, seed=1932).to_pylist()
    cohort = tmp_path / "cohort.txt"
    cohort.write_text("\n".join(numbers) + "\n")
    opted = tmp_path / "opted-out.txt"
    opted.write_text("\n".join(numbers[:4]) + "\n")  # A's answer: 0-3 opted out
    mesh.plugin(opted_out_file=str(opted))
    env = {**mesh.env(), "FHIR_URL": fhir_server}
    work = ["--work-dir", str(work_dir.root)]
    assert cli("request", "--cohort", str(cohort), "--mailbox", "X26ABC1", *work).returncode == 0
    assert cli("send", *work, env=env).returncode == 0
    assert cli("poll", "--wait", "20", "--interval", "0.2", *work, env=env).returncode == 0
    [a] = work_dir.all()
    assert a["state"] == REPLIED
    time.sleep(1.1)  # answers are compared to the second
    opted.write_text("\n".join(numbers[4:8]) + "\n")  # B's newer answer: 4-7 opted out
    b_run = ndop_run(work_dir, env, "--cohort", str(cohort), "--new-request")
    assert b_run.returncode == 0, b_run.stderr
    newest = {n: "active" if n in numbers[4:8] else "inactive" for n in numbers}
    assert statuses(fhir_server, numbers) == {n: [s] for n, s in newest.items()}

    a_run = ndop_run(work_dir, env, "--cohort", str(cohort))  # carries A on
    assert a_run.returncode == 0, a_run.stderr
    assert work_dir.load(a["request_id"])["state"] == ACKNOWLEDGED
    assert statuses(fhir_server, numbers) == {n: [s] for n, s in newest.items()}  # B's answer still stands
    report = json.loads((work_dir.request_dir(a["request_id"]) / "report.json").read_text())
    assert report["changes"]["superseded"] == 12 and report["changes"]["to_write"] == 0
    parts = sorted((work_dir.root / "ledger" / "current").glob("*.parquet"))
    ledger_rows = [row for part in parts for row in pq.read_table(part).to_pylist()]
    checked = {r["checked_at"] for r in ledger_rows}
    assert len(ledger_rows) == 12 and len(checked) == 1  # every row keeps B's (newer) checked_at
    assert checked.pop() > datetime.fromisoformat(a["checked_at"].replace("Z", "+00:00"))


@pytest.mark.slow  # stage 2 of the test command (run_tests.sh --all)
def test_a_consent_the_store_always_refuses_does_not_stop_ndop_checks(tmp_path, work_dir, mesh,
                                                                      fhir_server) -> None:
    """Issue 19 item 4: what was stored is promoted; the refused patient is in the retry set (left out of the
    ledger, so every later run writes it again), each run exits 1 while it is refused, and a newer request goes
    out on schedule."""
    numbers = nhs.synthetic_numbers(30, seed=1933).to_pylist()
    cohort = tmp_path / "cohort.txt"
    cohort.write_text("\n".join(numbers) + "\n")
    mesh.plugin(opted_out_file=str(tmp_path / "none.txt"))
    (tmp_path / "none.txt").write_text("")
    refused = numbers[7]
    with FaultProxy(fhir_server, f"invalid:{refused}") as proxy:
        env = {**mesh.env(), "FHIR_URL": proxy.url}
        for run in (1, 2):
            done = ndop_run(work_dir, env, "--cohort", str(cohort))
            assert done.returncode == 1, done.stdout + done.stderr
            assert "1 Consents refused by the FHIR store" in done.stderr and refused not in done.stderr
            records = work_dir.all()
            assert len(records) == run and records[-1]["state"] == ACKNOWLEDGED  # a new request each run
            assert statuses(fhir_server, numbers) == {n: [] if n == refused else ["inactive"] for n in numbers}
            dead = (work_dir.request_dir(records[-1]["request_id"]) / "dead_letters.jsonl").read_text()
            assert refused in dead and "status" in dead  # the server's reason
            report = json.loads((work_dir.request_dir(records[-1]["request_id"]) / "report.json").read_text())
            assert report["changes"]["to_write"] == (30 if run == 1 else 1)  # then only the retry set
        proxy.fault = None  # the store accepts it now
        fixed = ndop_run(work_dir, env, "--cohort", str(cohort))
    assert fixed.returncode == 0, fixed.stderr
    assert statuses(fhir_server, numbers) == {n: ["inactive"] for n in numbers}
    parts = sorted((work_dir.root / "ledger" / "current").glob("*.parquet"))
    assert sum(pq.read_table(p).num_rows for p in parts) == 30
