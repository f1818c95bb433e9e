"""Issue 9 item 3 and issue 10's "one backoff rule": a FHIR store that stops answering fails the run in
seconds (connection refused, consecutive timeouts), a 429 or a single 5xx keeps its retries, and every
FHIR retry waits by ``pipeline.fhir.retry.backoff_seconds``."""
from __future__ import annotations

import logging
import subprocess
import time

import pytest
import requests
from urllib3.exceptions import ConnectTimeoutError

from dev.fhir_server import FhirServer
from dev.service import free_port
from pipeline.core import nhs
from pipeline.fhir import retry as fhir_retry
from pipeline.fhir.answers import FhirUnreachableError
from pipeline.fhir.config import FhirClientConfig
from pipeline.fhir.retry import backoff_seconds, make_retry
from pipeline.lifecycle.state import REPLIED
from tests.fixtures.http_stub import Reply, StubServer
from tests.helpers import REPO_ROOT, cli_command, cli_env
from tests.test_write_consents import _all_ok, make_consent, numbers, run, summarise


# --- the one backoff rule -------------------------------------------------------------------------------

def test_backoff_doubles_is_capped_and_jittered_between_half_and_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fhir_retry, "_jitter", lambda: 1.0)
    assert [backoff_seconds(n, 0.5) for n in range(0, 6)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert backoff_seconds(20, 0.5) == fhir_retry.BACKOFF_MAX and backoff_seconds(3, 0) == 0.0
    monkeypatch.setattr(fhir_retry, "_jitter", lambda: 0.0)
    assert [backoff_seconds(n, 0.5) for n in range(1, 4)] == [0.25, 0.5, 1.0]


def test_urllib3_retries_wait_by_the_same_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fhir_retry, "_jitter", lambda: 0.5)
    retry = make_retry(FhirClientConfig("http://127.0.0.1:1/fhir", backoff=0.4, connect_retries=3))
    for n in range(1, 4):
        retry = retry.increment(method="POST", url="/fhir", error=ConnectTimeoutError("x"))
        # urllib3's own rule waits 0 s before the first retry and adds no jitter
        assert retry.get_backoff_time() == pytest.approx(backoff_seconds(n, 0.4)) == pytest.approx(0.3 * 2 ** (n - 1))


def test_per_entry_retries_wait_by_the_same_rule(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setattr(fhir_retry, "_jitter", lambda: 0.0)
    nums = numbers(2, 201)

    def script(index: int, seen) -> Reply:
        status = "503 Service Unavailable" if index < 2 else "200 OK"
        return Reply(200, {"resourceType": "Bundle", "type": "batch-response",
                           "entry": [{"response": {"status": status}} for _ in seen.json()["entry"]]})

    with StubServer(script) as stub, caplog.at_level(logging.WARNING):
        main, dead, _ = run([make_consent(n) for n in nums], FhirClientConfig(stub.url, backoff=0.2))
    assert summarise(main)["updated"] == 2 and dead == []
    waits = [r.getMessage().rsplit(" in ", 1)[1] for r in caplog.records if "answered 429/5xx" in r.getMessage()]
    assert waits == ["0.1 s", "0.2 s"]  # backoff_seconds(1, 0.2) and (2, 0.2) with the jitter at its low end


# --- unreachable: stop writing, fail fast ---------------------------------------------------------------

def test_connection_refused_fails_the_write_in_seconds() -> None:
    base = f"http://127.0.0.1:{free_port()}/fhir"
    started = time.monotonic()
    with pytest.raises(Exception) as raised:
        run([make_consent(n) for n in numbers(40, 202)], FhirClientConfig(base, backoff=0.1), batch_size=4)
    elapsed = time.monotonic() - started
    assert "FhirUnreachableError" in repr(raised.value) or isinstance(raised.value, FhirUnreachableError)
    assert "is unreachable: connection refused" in str(raised.value)
    assert elapsed < 15  # 10 bundles x a 5-retry budget would be far longer; one bundle's 2 retries is ~0.3 s


def test_timeouts_on_consecutive_bundles_stop_the_writes() -> None:
    with StubServer(lambda i, seen: Reply(200, _all_ok(seen).body, delay=0.6)) as stub:
        with pytest.raises(Exception) as raised:
            run([make_consent(n) for n in numbers(6, 203)],
                FhirClientConfig(stub.url, timeout=0.2, connect_retries=1, backoff=0.01), batch_size=1)
        posted = len(stub.seen)
    assert "2 bundles in a row timed out" in str(raised.value)
    assert posted == 4  # two bundles, each tried twice: the other four bundles were never posted


def test_one_bundle_timing_out_then_answers_carries_on() -> None:
    script = lambda i, seen: Reply(200, _all_ok(seen).body, delay=0.6 if i < 2 else 0)  # noqa: E731
    with StubServer(script) as stub:
        main, dead, _ = run([make_consent(n) for n in numbers(3, 204)],
                            FhirClientConfig(stub.url, timeout=0.2, connect_retries=1, backoff=0.01), batch_size=1)
    assert summarise(main)["created"] == 2 and [d["status"] for d in dead] == [0]


def test_a_single_500_and_a_429_keep_retrying() -> None:
    script = lambda i, seen: (Reply(500) if i == 0 else Reply(429, None, {"Retry-After": "0"}) if i == 1  # noqa: E731
                              else _all_ok(seen))
    with StubServer(script) as stub:
        main, dead, _ = run([make_consent(n) for n in numbers(3, 205)], FhirClientConfig(stub.url, backoff=0.01))
    assert summarise(main)["created"] == 3 and dead == [] and len(stub.seen) == 3


# --- end to end: the FHIR server dies in the middle of `ndop run` ----------------------------------------

def _consent_count(base_url: str) -> int:
    try:
        return int(requests.get(f"{base_url}/Consent", params={"_summary": "count"}, timeout=5).json()["total"])
    except (requests.RequestException, ValueError, KeyError):
        return 0


def test_fhir_server_killed_mid_write_fails_the_run_fast_and_leaves_the_reply(tmp_path, work_dir, mesh) -> None:
    cohort = tmp_path / "cohort.txt"
    cohort.write_text("\n".join(nhs.synthetic_numbers(3000, seed=9701).to_pylist()) + "\n")
    with FhirServer(tmp_path / "fhir") as server:
        env = {**mesh.env(), "FHIR_URL": server.base_url}
        process = subprocess.Popen(
            cli_command("run", "--work-dir", str(work_dir.root), "--wait", "20", "--interval", "0.2",
                        "--runner=FnApiRunner", "--batch_size=25", "--cohort", str(cohort)),
            cwd=REPO_ROOT, env=cli_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while _consent_count(server.base_url) == 0 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before the writes began"
        server.stop()  # the FHIR store dies in the middle of the writes
        killed = time.monotonic()
    try:
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    took = time.monotonic() - killed
    assert process.returncode == 1, err
    assert took < 30, f"{took:.0f} s to fail"  # 120 bundles x ~15 s of retries each before the fix
    assert "FHIR server" in err.strip().splitlines()[-1] and "unreachable" in err.strip().splitlines()[-1]
    assert "Traceback" not in err  # an NdopError is one line, even from inside a Beam worker
    [record] = work_dir.all()
    assert record["state"] == REPLIED
    assert len(mesh.inbox()) == 1  # the reply is not acknowledged: the next run writes it all again
