"""Believe no peer, on the FHIR side (issue 19 item 1): a write counts only when the store's answer says so, entry by
entry. A fault-injecting proxy (tests/fixtures/fhir_proxy.py) sits in front of the real FHIR server."""
from __future__ import annotations

import pytest

from pipeline import nhs
from pipeline.fhir_client import FhirClientConfig
from pipeline.state import REPLIED
from tests.fixtures.fhir_proxy import FaultProxy
from tests.helpers import summarise
from tests.test_run import ndop_run
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
