"""Issue 24 item 4 (first part): a first load as NDJSON + the store's own import (pipeline/bulk_import.py).

HAPI's ``$import`` for real: Consents written as NDJSON, served from a loopback HTTP server, imported by the
real HAPI 8.8 (dev/hapi registers HAPI's BulkDataImportProvider), the job polled to its end and its own report
read; the Consents are then read back. Cloud Healthcare and Azure requests are checked offline.
"""
from __future__ import annotations

import json

import pytest
import requests

from pipeline import nhs
from pipeline.bulk_import import (ServeFolder, HapiImport, azure_import_parameters, google_import_complete,
                                  google_import_request, hapi_import_complete, write_ndjson)
from tests.helpers import consents_for_patient
from transforms.build_consent import build_consent, consent_id

T1 = "2024-11-26T10:15:00Z"


def _consents(count: int, seed: int) -> tuple[list[str], list[dict]]:
    numbers = nhs.synthetic_numbers(count, seed=seed).to_pylist()
    return numbers, [build_consent(n, "active" if i % 4 == 0 else "inactive", T1) for i, n in enumerate(numbers)]


def test_ndjson_goes_through_filesystems(mem_fs):
    _, consents = _consents(5, seed=9801)
    assert write_ndjson(consents, "mem://bucket/load/Consent.ndjson") == 5
    lines = mem_fs["mem://bucket/load/Consent.ndjson"][0].decode().splitlines()
    assert [json.loads(line) for line in lines] == consents


def test_ndjson_local_file_is_private(tmp_path):
    _, consents = _consents(2, seed=9802)
    path = tmp_path / "Consent.ndjson"
    write_ndjson(consents, str(path))
    assert path.stat().st_mode & 0o777 == 0o600


def test_hapi_report_must_account_for_every_resource():
    def report(succeeded: dict, failed: dict | None = None) -> str:
        body = {"resourceTypeToSucceededCount": succeeded, "resourceTypeToFailedCount": failed or {}}
        issue = {"severity": "information", "code": "informational", "diagnostics": f"Job done. {json.dumps(body)}"}
        return json.dumps({"resourceType": "OperationOutcome", "issue": [issue]})

    assert hapi_import_complete(report({"Consent": 10}), {"Consent": 10}).problem is None
    assert "9" in (hapi_import_complete(report({"Consent": 9}), {"Consent": 10}).problem or "")
    assert hapi_import_complete(report({"Consent": 10}, {"Consent": 1}), {"Consent": 10}).problem
    assert hapi_import_complete(report({}), {"Consent": 10}).problem
    assert hapi_import_complete("<html>gateway</html>", {"Consent": 10}).problem


def test_google_import_request_and_operation():
    url, body = google_import_request("projects/p/locations/europe-west2/datasets/d/fhirStores/s",
                                      "gs://b/ndop/load/*.ndjson")
    assert url == ("https://healthcare.googleapis.com/v1/projects/p/locations/europe-west2/datasets/d/"
                   "fhirStores/s:import")
    assert body == {"contentStructure": "RESOURCE", "gcsSource": {"uri": "gs://b/ndop/load/*.ndjson"}}
    with pytest.raises(ValueError):
        google_import_request("projects/p/locations/l/datasets/d/fhirStores/s", "/tmp/load")
    done = {"done": True, "metadata": {"counter": {"success": "10"}}}
    assert google_import_complete(done, 10) is None
    assert google_import_complete({**done, "metadata": {"counter": {"success": "9", "failure": "1"}}}, 10)
    assert google_import_complete({"done": False}, 10)
    assert google_import_complete({"done": True, "error": {"message": "denied"}}, 10)


def test_azure_import_parameters():
    body = azure_import_parameters({"Consent": ["https://acct.blob.core.windows.net/load/Consent.ndjson"]})
    params = {p["name"]: p for p in body["parameter"]}
    assert params["mode"]["valueString"] == "InitialLoad"
    assert params["inputFormat"]["valueString"] == "application/fhir+ndjson"
    assert params["input"]["part"][0] == {"name": "type", "valueString": "Consent"}


@pytest.mark.hapi
def test_hapi_imports_every_consent_and_says_so(tmp_path, hapi_server):
    numbers, consents = _consents(120, seed=9803)
    folder = tmp_path / "load"
    folder.mkdir()
    write_ndjson(consents[:70], str(folder / "Consent-0.ndjson"))
    write_ndjson(consents[70:], str(folder / "Consent-1.ndjson"))
    with ServeFolder(folder) as served, requests.Session() as session:
        job = HapiImport(session, hapi_server, poll_seconds=0.5, timeout=600)
        poll = job.start({"Consent": [served.url("Consent-0.ndjson"), served.url("Consent-1.ndjson")]})
        result = job.wait(poll, {"Consent": 120})
    assert result.problem is None, result.report
    assert result.stored == {"Consent": 120}
    assert hapi_import_complete(result.report, {"Consent": 121}).problem  # one short would not count
    for index in (0, 1, 69, 70, 119):
        stored = consents_for_patient(hapi_server, numbers[index])
        assert [(c["id"], c["status"]) for c in stored] == [(consent_id(numbers[index]), consents[index]["status"])]
