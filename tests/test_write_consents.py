"""WriteConsents: real Consents written to the real FHIR server and read back by search; the fault cases
against a scripted stub (the real server cannot fail on demand)."""
from __future__ import annotations

import logging
import time
import uuid
from typing import Any
from urllib.parse import urlencode

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from fhir.resources.R4B.consent import Consent

from pipeline.core import nhs
from pipeline.fhir.config import FhirClientConfig
from pipeline.fhir.search import search_total
from pipeline.fhir.sessions import open_session
from tests.fixtures.http_stub import Reply, StubServer
from tests.helpers import summarise
from tests.helpers import consent_id
from transforms.build_consent import IDENTIFIER_SYSTEM, build_consent
from pipeline.fhir.answers import answer_problem, read_entries
from transforms.write_consents import WriteConsents, build_bundle

CHECKED_AT = "2024-11-26T10:00:00Z"


def make_consent(number: str, status: str = "active") -> dict[str, Any]:
    """The Consent the pipeline makes (transforms/build_consent.py), so WriteConsents is tested with it."""
    return build_consent(number, status, CHECKED_AT, consent_id=consent_id(number))


def numbers(count: int, seed: int) -> list[str]:
    return nhs.synthetic_numbers(count, seed=seed).to_pylist()


def run(consents: list[dict], config: FhirClientConfig, integrity: list[int] | None = None, **kwargs: Any):
    """Run WriteConsents; return (per-bundle results, dead letters, ndop counters)."""
    collected: dict[str, list] = {}
    pipeline = test_pipeline.TestPipeline(runner="FnApiRunner")
    source = pipeline | "Consents" >> beam.Create(consents)
    errors = pipeline | "IntegrityErrors" >> beam.Create(integrity) if integrity is not None else None
    result = source | WriteConsents(config, integrity_errors=errors, **kwargs)
    _collect(result.main, "main", collected)
    _collect(result[WriteConsents.DEAD_LETTER], "dead", collected)
    outcome = pipeline.run()
    outcome.wait_until_finish()
    counters = {
        c.key.metric.name: c.committed
        for c in outcome.metrics().query(MetricsFilter().with_namespace("ndop"))["counters"]
    }
    return collected.get("main", []), collected.get("dead", []), counters


_SINK: dict[str, list] = {}


def _collect(pcoll, name: str, into: dict[str, list]) -> None:
    """Gather a PCollection's elements in this process (FnApiRunner runs in-process)."""
    key = f"{name}-{uuid.uuid4()}"
    _SINK[key] = into.setdefault(name, [])
    pcoll | f"Collect{name.title()}" >> beam.Map(_append, key)


def _append(element: Any, key: str) -> None:
    # A named module function pickles by reference, so it reaches this module's _SINK.
    _SINK[key].append(element)


def _count(base_url: str, number: str) -> int:
    with open_session(FhirClientConfig(base_url)) as session:
        return search_total(session, base_url, "Consent", {"identifier": f"{IDENTIFIER_SYSTEM}|{consent_id(number)}"})


def _read(base_url: str, number: str) -> list[dict]:
    # by the Consent's own identifier: HAPI refuses the patient:identifier modifier (docs/fhir-stores.md)
    with open_session(FhirClientConfig(base_url)) as session:
        bundle = session.get(f"{base_url}/Consent", params={"identifier": f"{IDENTIFIER_SYSTEM}|{consent_id(number)}"}).json()
    return [e["resource"] for e in bundle.get("entry", [])]


# --- pure parts -----------------------------------------------------------------------------------------


def test_factory_consent_is_valid_r4() -> None:
    Consent.model_validate(make_consent(numbers(1, 1)[0]))


def test_bundle_entries_are_idempotent_puts() -> None:
    consent = make_consent("9990000018")
    by_id = build_bundle([consent], "batch", "id")["entry"][0]
    assert by_id["request"] == {"method": "PUT", "url": f"Consent/{consent['id']}"}
    conditional = build_bundle([consent], "transaction", "conditional")
    assert conditional["type"] == "transaction"
    entry = conditional["entry"][0]
    assert entry["request"]["url"] == (
        "Consent?" + urlencode({"identifier": f"{IDENTIFIER_SYSTEM}|{consent_id('9990000018')}"})
    )
    assert "id" not in entry["resource"]


def test_read_entries_parses_status_text_and_outcome() -> None:
    answer = {"entry": [
        {"response": {"status": "201 Created"}},
        {"response": {"status": "400 Bad Request", "outcome": {"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "structure", "diagnostics": "Consent.status missing"}]}}},
    ]}
    assert read_entries(answer, 2) == [(201, ""), (400, "Consent.status missing")]


FULL = {"resourceType": "Bundle", "type": "batch-response", "entry": [{"response": {"status": "200 OK"}}] * 2}


@pytest.mark.parametrize("status, body, words", [
    (200, FULL, None),
    (202, None, "HTTP 202 is not a batch-response"),
    (204, None, "HTTP 204"),
    (201, FULL, "HTTP 201"),
    (200, None, "not a FHIR Bundle"),
    (200, {**FULL, "type": "transaction-response"}, "not batch-response"),
    (200, {**FULL, "entry": FULL["entry"][:1]}, "1 entries for 2 sent"),
    (200, {**FULL, "entry": [{"response": {"status": "200 OK"}}, {"response": {}}]}, "entry 2"),
])
def test_only_a_full_batch_response_says_what_was_stored(status, body, words) -> None:
    problem = answer_problem(status, body, "batch", 2)
    assert problem is None if words is None else words in (problem or "")


# --- against the real server -----------------------------------------------------------------------------


@pytest.mark.parametrize("bundle_type, upsert, seed", [
    ("batch", "id", 101),
    ("transaction", "conditional", 102),
    ("batch", "conditional", 103),
    ("transaction", "id", 104),
])
def test_writes_consents_and_a_rerun_duplicates_nothing(fhir_store: str, bundle_type, upsert, seed) -> None:
    fhir_server = fhir_store
    nums = numbers(12, seed)
    consents = [make_consent(n) for n in nums]
    config = FhirClientConfig(fhir_server)

    main, dead, counters = run(consents, config, batch_size=5, bundle_type=bundle_type, upsert=upsert)
    assert dead == []
    assert summarise(main) == {"created": 12, "updated": 0, "failed": 0, "refused": 0}
    assert sorted(r["created"] for r in main) == [2, 5, 5]  # three bundles of at most five
    assert counters["consents_created"] == 12 and counters["bundles_posted"] == 3

    stored = _read(fhir_server, nums[0])
    assert len(stored) == 1
    assert stored[0]["status"] == "active" and stored[0]["provision"]["type"] == "deny"
    if upsert == "id":
        assert stored[0]["id"] == consents[0]["id"]

    # Same request again, one Consent withdrawn meanwhile: updates only, still one Consent each.
    consents[1] = make_consent(nums[1], status="inactive")
    main, dead, counters = run(consents, config, batch_size=5, bundle_type=bundle_type, upsert=upsert)
    assert summarise(main) == {"created": 0, "updated": 12, "failed": 0, "refused": 0}
    assert counters["consents_updated"] == 12
    assert all(_count(fhir_server, n) == 1 for n in nums)
    assert _read(fhir_server, nums[1])[0]["status"] == "inactive"


def test_write_with_assert_that(fhir_server: str) -> None:
    nums = numbers(3, 114)
    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
        result = p | beam.Create([make_consent(n) for n in nums]) | WriteConsents(FhirClientConfig(fhir_server))
        assert_that(result.main, equal_to([{"created": 3, "updated": 0, "failed": 0, "refused": 0}]))
        assert_that(result[WriteConsents.DEAD_LETTER], equal_to([]), label="NoDeadLetters")
    assert [_count(fhir_server, n) for n in nums] == [1, 1, 1]


def test_integrity_errors_stop_every_write(fhir_server: str, caplog: pytest.LogCaptureFixture) -> None:
    nums = numbers(7, 105)
    with caplog.at_level(logging.ERROR):
        main, dead, counters = run([make_consent(n) for n in nums], FhirClientConfig(fhir_server),
                                   integrity=[2], batch_size=5)
    assert summarise(main) == {"created": 0, "updated": 0, "failed": 0, "refused": 7}
    assert counters["consents_refused"] == 7 and counters.get("bundles_posted", 0) == 0
    assert all(_count(fhir_server, n) == 0 for n in nums)
    assert "2 integrity errors" in caplog.text


def test_zero_integrity_errors_lets_the_write_through(fhir_server: str) -> None:
    nums = numbers(3, 106)
    main, dead, _ = run([make_consent(n) for n in nums], FhirClientConfig(fhir_server), integrity=[0])
    assert summarise(main)["created"] == 3
    assert all(_count(fhir_server, n) == 1 for n in nums)


# What each real server answers for an entry it refuses: sekmet 400, HAPI 422 (its validator).
REFUSED = {"sekmet": 400, "hapi": 422}


def test_invalid_consent_in_a_batch_is_the_only_dead_letter(fhir_store: str, fhir_store_kind: str, caplog) -> None:
    fhir_server = fhir_store
    nums = numbers(4, 107 + (fhir_store_kind == "hapi") * 1000)
    consents = [make_consent(n) for n in nums]
    del consents[2]["status"]  # the real server refuses it
    with caplog.at_level(logging.ERROR):
        main, dead, counters = run(consents, FhirClientConfig(fhir_server), batch_size=10)
    assert summarise(main) == {"created": 3, "updated": 0, "failed": 1, "refused": 0}
    assert [(d["nhs_number"], d["consent_id"], d["status"]) for d in dead] == [
        (nums[2], consents[2]["id"], REFUSED[fhir_store_kind])]
    assert "status" in dead[0]["reason"] and dead[0]["at"].endswith("Z")
    if fhir_store_kind == "hapi":  # the OperationOutcome names the element: the dead letter says where
        assert "(at Consent" in dead[0]["reason"]
    assert counters["consents_failed"] == 1
    assert nums[2] not in caplog.text and nhs.mask(nums[2]) in caplog.text


def test_transaction_refused_whole_is_retried_as_a_batch(fhir_store: str, fhir_store_kind: str) -> None:
    fhir_server = fhir_store
    nums = numbers(4, 108 + (fhir_store_kind == "hapi") * 1000)
    consents = [make_consent(n) for n in nums]
    # rolls back the whole transaction on the real server (HAPI drops unknown elements, so: no status)
    if fhir_store_kind == "hapi":
        del consents[1]["status"]
    else:
        consents[1]["bogus"] = True
    main, dead, counters = run(consents, FhirClientConfig(fhir_server), bundle_type="transaction")
    assert summarise(main) == {"created": 3, "updated": 0, "failed": 1, "refused": 0}
    assert [d["nhs_number"] for d in dead] == [nums[1]]
    assert ("status" if fhir_store_kind == "hapi" else "bogus") in dead[0]["reason"]
    assert counters["bundles_posted"] == 2
    assert [_count(fhir_server, n) for n in nums] == [1, 0, 1, 1]


# --- faults, against a scripted stub ------------------------------------------------------------------------


def _all_ok(seen) -> Reply:
    entries = seen.json()["entry"]
    return Reply(200, {"resourceType": "Bundle", "type": "batch-response",
                       "entry": [{"response": {"status": "201 Created"}} for _ in entries]})


def test_429_with_retry_after_then_success() -> None:
    script = lambda i, seen: Reply(429, None, {"Retry-After": "1"}) if i == 0 else _all_ok(seen)  # noqa: E731
    with StubServer(script) as stub:
        started = time.monotonic()
        main, dead, _ = run([make_consent(n) for n in numbers(3, 109)], FhirClientConfig(stub.url, backoff=0.01))
        elapsed = time.monotonic() - started
    assert summarise(main)["created"] == 3 and dead == []
    assert len(stub.seen) == 2 and elapsed >= 1.0
    assert stub.seen[0].body == stub.seen[1].body  # the same bundle, re-sent


def test_persistent_500_dead_letters_every_entry_with_status_and_text() -> None:
    outcome = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "fatal", "code": "exception", "diagnostics": "database is locked"}]}
    nums = numbers(3, 110)
    with StubServer(lambda i, seen: Reply(500, outcome)) as stub:
        main, dead, counters = run([make_consent(n) for n in nums], FhirClientConfig(stub.url, max_retries=2, backoff=0.01))
    assert len(stub.seen) == 3  # first try + 2 retries, no extra loop on top
    assert sorted(d["nhs_number"] for d in dead) == sorted(nums)
    assert {(d["status"], d["reason"]) for d in dead} == {(500, "database is locked")}
    assert counters["consents_failed"] == 3


def test_read_timeout_is_retried() -> None:
    script = lambda i, seen: Reply(200, _all_ok(seen).body, delay=1.5 if i == 0 else 0)  # noqa: E731
    with StubServer(script) as stub:
        main, dead, _ = run([make_consent(n) for n in numbers(2, 111)],
                            FhirClientConfig(stub.url, timeout=0.5, backoff=0.01))
    assert summarise(main)["created"] == 2 and dead == []
    assert len(stub.seen) == 2


def test_timeouts_to_the_end_dead_letter_with_status_0() -> None:
    with StubServer(lambda i, seen: Reply(200, _all_ok(seen).body, delay=1.0)) as stub:
        main, dead, _ = run([make_consent(n) for n in numbers(2, 112)],
                            FhirClientConfig(stub.url, timeout=0.3, max_retries=1, backoff=0.01))
    assert [d["status"] for d in dead] == [0, 0]
    assert "no answer from the FHIR server" in dead[0]["reason"]


def test_partial_batch_failure_dead_letters_only_the_failed_entries_and_retries_503_entries() -> None:
    nums = numbers(4, 113)
    invalid = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invariant", "details": {"text": "Consent.dateTime is in the future"}}]}

    def script(index: int, seen) -> Reply:
        entries = seen.json()["entry"]
        responses = []
        for entry in entries:
            number = entry["resource"]["patient"]["identifier"]["value"]
            if number == nums[1]:
                responses.append({"response": {"status": "422 Unprocessable Entity", "outcome": invalid}})
            elif number == nums[3] and index == 0:
                responses.append({"response": {"status": "503 Service Unavailable"}})
            else:
                responses.append({"response": {"status": "200 OK"}})
        return Reply(200, {"resourceType": "Bundle", "type": "batch-response", "entry": responses})

    with StubServer(script) as stub:
        main, dead, counters = run([make_consent(n) for n in nums], FhirClientConfig(stub.url, backoff=0.01))
    assert summarise(main) == {"created": 0, "updated": 3, "failed": 1, "refused": 0}
    assert [(d["nhs_number"], d["status"], d["reason"]) for d in dead] == [
        (nums[1], 422, "Consent.dateTime is in the future")]
    # The second post holds only the entry that answered 503.
    assert [e["resource"]["patient"]["identifier"]["value"] for e in stub.seen[1].json()["entry"]] == [nums[3]]
    assert counters["bundles_posted"] == 2
