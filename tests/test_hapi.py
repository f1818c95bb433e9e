"""What HAPI FHIR (the second real server, ``dev/hapi``) checks that sekmet does not, and Consents that
point at the Patient. Every test here is marked ``hapi`` (``./run_tests.sh -m hapi``)."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from pipeline.request import datfile
from pipeline.core import nhs
from pipeline.fhir.config import FhirClientConfig
from pipeline.beam.graph import run as run_process
from tests.test_write_consents import make_consent, run as run_write
from tests.helpers import consent_id
from transforms.build_consent import build_consent
from tests.helpers import summarise

pytestmark = pytest.mark.hapi
SYSTEM = nhs.NHS_NUMBER_SYSTEM
FHIR_JSON = {"Content-Type": "application/fhir+json"}


def _numbers(count: int, seed: int) -> list[str]:
    return nhs.synthetic_numbers(count, seed=seed).to_pylist()


def test_hapis_validator_refuses_ppc_1_and_the_dead_letter_names_the_element(hapi_server: str) -> None:
    nums = _numbers(3, 7301)
    consents = [make_consent(n) for n in nums]
    del consents[1]["policy"]  # R4 ppc-1: a policy or a policyRule is required (sekmet accepts this)
    main, dead, _ = run_write(consents, FhirClientConfig(hapi_server), bundle_type="batch")
    assert summarise(main) == {"created": 2, "updated": 0, "failed": 1, "refused": 0}
    [letter] = dead
    assert letter["nhs_number"] == nums[1] and letter["status"] == 422
    assert "ppc-1" in letter["reason"] and "(at Consent)" in letter["reason"]


def test_the_pipelines_consents_pass_hapis_validator_and_an_unchanged_put_keeps_the_version(
        hapi_server: str) -> None:
    number = _numbers(1, 7302)[0]
    patient = requests.put(f"{hapi_server}/Patient/hapi-v-1", headers=FHIR_JSON, timeout=30, json={
        "resourceType": "Patient", "id": "hapi-v-1", "identifier": [{"system": SYSTEM, "value": number}]})
    assert patient.status_code == 201, patient.text
    for consent in (build_consent(number, "active", "2024-11-26T10:15:00Z", consent_id=consent_id(number)),
                    build_consent(number, "inactive", "2024-11-26T10:15:00Z", patient_id="hapi-v-1", consent_id=consent_id(number))):
        answer = requests.put(f"{hapi_server}/Consent/{consent['id']}", json=consent, headers=FHIR_JSON, timeout=30)
        assert answer.status_code in (200, 201), answer.text
    again = requests.put(f"{hapi_server}/Consent/{consent['id']}", json=consent, headers=FHIR_JSON, timeout=30)
    assert again.status_code == 200 and again.json()["meta"]["versionId"] == "2"  # HAPI: no new version


def test_a_reference_to_a_patient_the_store_lacks_is_refused(hapi_server: str) -> None:
    number = _numbers(1, 7303)[0]
    consent = build_consent(number, "active", "2024-11-26T10:15:00Z", patient_id="no-such-patient", consent_id=consent_id(number))
    main, dead, _ = run_write([consent], FhirClientConfig(hapi_server))
    assert summarise(main)["failed"] == 1
    assert dead[0]["status"] in (400, 404, 422) and "no-such-patient" in dead[0]["reason"]


def test_file_cohort_patient_ids_make_consents_that_reference_the_patient(tmp_path, hapi_server: str) -> None:
    numbers = _numbers(6, 7304)
    ids = [f"hapi-file-{i}" if i % 2 == 0 else "" for i in range(len(numbers))]  # half known
    for number, pid in zip(numbers, ids):
        if pid:
            answer = requests.put(f"{hapi_server}/Patient/{pid}", headers=FHIR_JSON, timeout=30, json={
                "resourceType": "Patient", "id": pid, "identifier": [{"system": SYSTEM, "value": number}]})
            assert answer.status_code in (200, 201), answer.text
    pq.write_table(pa.table({"nhs_number": numbers, "patient_id": ids}), tmp_path / "manifest.parquet")
    (tmp_path / "reply.dat").write_bytes(datfile.encode(pa.array(numbers[3:], pa.string()), "crlf"))
    summary = run_process([
        "--runner=FnApiRunner", f"--manifest={tmp_path / 'manifest.parquet'}", f"--reply={tmp_path / 'reply.dat'}",
        "--checked_at=2024-11-26T10:15:00Z", f"--output_dir={tmp_path}", f"--fhir_url={hapi_server}",
        "--fhir_auth=none", "--patient_ids", "--shards=2", "--provenance_org=X26ABC1",
    ])
    assert summary["ok"] and summary["counts"]["created"] == 6, summary
    for number, pid in zip(numbers, ids):
        stored = requests.get(f"{hapi_server}/Consent/{consent_id(number)}", timeout=30).json()
        identifier = {"system": SYSTEM, "value": number}
        assert stored["patient"] == ({"reference": f"Patient/{pid}", "identifier": identifier} if pid
                                     else {"identifier": identifier})
        assert stored["status"] == ("inactive" if number in numbers[3:] else "active")
        if pid:
            found = requests.get(f"{hapi_server}/Consent", params={"patient": f"Patient/{pid}"}, timeout=30).json()
            assert [e["resource"]["id"] for e in found.get("entry", [])] == [consent_id(number)]
            chained = requests.get(f"{hapi_server}/Consent", params={"patient.identifier": f"{SYSTEM}|{number}"},
                                   timeout=30).json()
            assert [e["resource"]["id"] for e in chained.get("entry", [])] == [consent_id(number)]
