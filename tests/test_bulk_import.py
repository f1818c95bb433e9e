"""Issue 24 item 4 (first part): a first load as NDJSON + the store's own import (pipeline/fhir/bulk_import.py).

HAPI's ``$import`` for real: Consents written as NDJSON, served from a loopback HTTP server, imported by the
real HAPI 8.8 (dev/hapi registers HAPI's BulkDataImportProvider), the job polled to its end and its own report
read; the Consents are then read back. Cloud Healthcare and Azure requests are checked offline.
"""
from __future__ import annotations

import json

import pytest
import requests

from pipeline.core import nhs
from pipeline.fhir.bulk_import import (ServeFolder, HapiImport, azure_import_parameters, google_import_complete,
                                  google_import_request, hapi_import_complete, write_ndjson)
from tests.helpers import consent_id
from transforms.build_consent import build_consent

T1 = "2024-11-26T10:15:00Z"


def _consents(count: int, seed: int) -> tuple[list[str], list[dict]]:
    numbers = nhs.synthetic_numbers(count, seed=seed).to_pylist()
    return numbers, [build_consent(n, "active" if i % 4 == 0 else "inactive", T1, consent_id=consent_id(n)) for i, n in enumerate(numbers)]


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


def _hapi_report(outcomes: dict[str, dict[str, int]]) -> str:
    """HAPI 8.8's finished-job answer, in the shape the real server gave (tests below)."""
    lines = ["Bulk Import Report", "-" * 42, "Storage Actions : 10 (0/sec)", "-" * 42]
    for source, counts in outcomes.items():
        lines += [f"Source: {source}", "  Outcomes:", *[f"    * {k}: {v}" for k, v in counts.items()]]
    diagnostics = json.dumps({"reportMsg": "\n".join(lines) + "\n"})
    return json.dumps({"resourceType": "OperationOutcome", "issue": [{"severity": "information",
                                                                       "diagnostics": diagnostics}]})


def test_hapi_report_must_account_for_every_resource():
    a, b = "http://127.0.0.1:1/a.ndjson", "http://127.0.0.1:1/b.ndjson"
    sent = {a: 6, b: 4}
    good = hapi_import_complete(_hapi_report({a: {"SUCCESSFUL_UPDATE_AS_CREATE": 5, "SUCCESSFUL_UPDATE": 1},
                                              b: {"SUCCESSFUL_UPDATE_AS_CREATE": 4}}), sent)
    assert good.problem is None and good.stored == sent
    short = hapi_import_complete(_hapi_report({a: {"SUCCESSFUL_UPDATE_AS_CREATE": 6}}), sent)
    assert "6 stored of 10" in (short.problem or "")
    failed = _hapi_report({a: {"SUCCESSFUL_UPDATE_AS_CREATE": 5, "FAILURE": 1}, b: {"SUCCESSFUL_UPDATE": 4}})
    assert "other than stored" in (hapi_import_complete(failed, sent).problem or "")
    assert hapi_import_complete("<html>gateway</html>", sent).problem
    assert hapi_import_complete(json.dumps({"resourceType": "OperationOutcome"}), sent).problem


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
        urls = [served.url("Consent-0.ndjson"), served.url("Consent-1.ndjson")]
        result = job.wait(job.start({"Consent": urls}, served.credential), {urls[0]: 70, urls[1]: 50})
    assert result.problem is None, result.report
    assert result.stored == {urls[0]: 70, urls[1]: 50}
    assert hapi_import_complete(result.report, {urls[0]: 70, urls[1]: 51}).problem  # one short would not count
    for index in (0, 1, 69, 70, 119):  # read back by id (HAPI has no patient:identifier search on Consent)
        stored = requests.get(f"{hapi_server}/Consent/{consent_id(numbers[index])}", timeout=30).json()
        assert (stored["status"], stored["patient"]["identifier"]["value"]) == (consents[index]["status"],
                                                                                 numbers[index])
