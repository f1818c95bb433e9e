"""The bulk first load wired into the process run (pipeline/beam/bulk_load.py, transforms/write_ndjson.py).

When a first load is large and ``--bulk_import hapi`` is given, the run writes NDJSON in place of PUTs and the real
HAPI imports it; the run's written counts, and so the ledger's promotion, come from HAPI's own job report. A proxy in
front of HAPI that makes the report say one Consent fewer proves the report is read, not believed blindly.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from apache_beam.testing.util import assert_that, equal_to

from pipeline.beam import bulk_load
from pipeline.beam.graph import run
from pipeline.beam.options import BulkOptions, NdopOptions
from pipeline.core import nhs
from pipeline.core.errors import InputError
from pipeline.fhir.bulk_import import GoogleImport, ServeFolder
from pipeline.request import datfile
from tests.beam_util import local_pipeline
from tests.fixtures.fhir_proxy import FaultProxy
from tests.fixtures.http_stub import Reply, Seen, StubServer
from pipeline.ledger import versions as ledger_dirs
from pipeline.lifecycle.state import PROCESSED
from tests.helpers import cli, consent_id
from tests.test_process_pipeline import _replied_request
from transforms.build_consent import build_consent
from transforms.provenance import ProvenanceSettings
from transforms.write_ndjson import WriteNdjson

T1 = "2024-11-26T10:15:00Z"


def _numbers(count: int, seed: int) -> list[str]:
    return nhs.synthetic_numbers(count, seed=seed).to_pylist()


def _inputs(folder: Path, numbers: list[str], opted_out: set[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    pq.write_table(pa.table({"nhs_number": pa.array(numbers, pa.string())}), folder / "manifest.parquet")
    reply = [n for n in numbers if n not in opted_out]
    (folder / "reply.dat").write_bytes(datfile.encode(pa.array(reply, pa.string()), "crlf"))


def _options(folder: Path, *extra: str) -> tuple[NdopOptions, BulkOptions]:
    options = beam.options.pipeline_options.PipelineOptions([
        f"--manifest={folder / 'manifest.parquet'}", f"--output_dir={folder}", *extra])
    return options.view_as(NdopOptions), options.view_as(BulkOptions)


def test_bulk_only_for_a_large_first_load_and_refused_where_it_cannot_work(tmp_path):
    _inputs(tmp_path, _numbers(50, seed=9901), set())
    assert bulk_load.plan(*_options(tmp_path), first_load=True) is None  # not asked for
    assert bulk_load.plan(*_options(tmp_path, "--bulk_import=hapi", "--bulk_min_patients=10"),
                          first_load=False) is None  # a ledger in force: only the changes, PUT
    assert bulk_load.plan(*_options(tmp_path, "--bulk_import=hapi", "--bulk_min_patients=51"),
                          first_load=True) is None  # a cohort under the threshold
    load = bulk_load.plan(*_options(tmp_path, "--bulk_import=hapi", "--bulk_min_patients=50"), first_load=True)
    assert load is not None and load.folder == str(tmp_path / "bulk") and load.store == "hapi"
    with pytest.raises(InputError, match="--upsert id"):
        bulk_load.plan(*_options(tmp_path, "--bulk_import=hapi", "--bulk_min_patients=1", "--upsert=conditional"),
                       first_load=True)
    with pytest.raises(InputError, match="local folder"):
        bulk_load.plan(*_options(tmp_path, "--bulk_import=hapi", "--bulk_min_patients=1", "--bulk_dir=gs://b/x"),
                       first_load=True)


def _consents(numbers: list[str]) -> list[dict]:
    return [build_consent(n, "active" if i % 3 == 0 else "inactive", T1, consent_id=consent_id(n))
            for i, n in enumerate(numbers)]


def _lines(folder: Path, kind: str) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob(f"{kind}-*.ndjson"))
            for line in path.read_text().splitlines()]


def test_ndjson_holds_every_consent_and_a_provenance_per_batch(tmp_path):
    consents = _consents(_numbers(23, seed=9902))
    settings = ProvenanceSettings(organisation="X26ABC1", request_id="REQ-1", checked_at=T1)
    with local_pipeline() as p:
        files = (p | beam.Create(consents) | WriteNdjson(str(tmp_path), batch_size=10, provenance=settings))
        assert_that(files | beam.Map(lambda path: os.path.basename(path).split("-")[0]) | beam.Distinct(),
                    equal_to(["Consent", "Provenance"]))
    assert sorted(_lines(tmp_path, "Consent"), key=lambda c: c["id"]) == sorted(consents, key=lambda c: c["id"])
    provenances = _lines(tmp_path, "Provenance")
    targets = [t["reference"] for p in provenances for t in p["target"]]
    assert len(provenances) == 3 and sorted(targets) == sorted(f"Consent/{c['id']}" for c in consents)


def test_ndjson_gate_writes_nothing_when_the_reply_had_integrity_errors(tmp_path):
    with local_pipeline() as p:
        errors = p | "Errors" >> beam.Create([2])
        p | beam.Create(_consents(_numbers(5, seed=9903))) | WriteNdjson(str(tmp_path), 10, integrity_errors=errors)
    assert _lines(tmp_path, "Consent") == []


def test_the_files_are_served_only_by_name_under_a_secret_path(tmp_path):
    (tmp_path / "Consent-00000-of-00001.ndjson").write_text('{"resourceType":"Consent"}\n')
    (tmp_path / "notes.txt").write_text("not served")
    with ServeFolder(tmp_path) as served:
        url = served.url("Consent-00000-of-00001.ndjson")
        auth = tuple(served.credential.split(":", 1))
        answer = requests.get(url, auth=auth, timeout=10)
        assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/fhir+ndjson"
        assert answer.text == '{"resourceType":"Consent"}\n'
        assert requests.get(url, timeout=10).status_code == 401  # no credential
        assert requests.get(url, auth=("ndop-sync", "guess"), timeout=10).status_code == 401
        root = url.rsplit("/", 2)[0]
        for other in (f"{root}/", f"{root}/Consent-00000-of-00001.ndjson", url.rsplit("/", 1)[0] + "/",
                      url.rsplit("/", 1)[0] + "/notes.txt"):
            assert requests.get(other, auth=auth, timeout=10).status_code == 404, other


def _run(folder: Path, fhir_url: str, *extra: str) -> dict:
    return run(["--runner=FnApiRunner", f"--manifest={folder / 'manifest.parquet'}",
                f"--reply={folder / 'reply.dat'}", f"--checked_at={T1}", f"--output_dir={folder}",
                f"--fhir_url={fhir_url}", "--fhir_auth=none", "--batch_size=40", "--shards=2",
                "--provenance_org=X26ABC1", "--request_id=REQ-BULK", f"--ledger_out={folder / 'ledger'}",
                "--bulk_import=hapi", "--bulk_min_patients=50", *extra])


@pytest.mark.hapi
def test_a_first_load_in_bulk_is_counted_from_hapis_report(tmp_path, work_dir, hapi_server):
    numbers = _numbers(90, seed=9904)
    opted_out = set(numbers[::4])
    rid = "X26ABC1-241126-0090"
    _replied_request(work_dir, rid, numbers, [n for n in numbers if n not in opted_out])
    done = cli("process", "--work-dir", str(work_dir.root), "--request-id", rid, "--fhir-url", hapi_server,
               "--no-ack", "--bulk-import", "hapi", "--bulk-min-patients", "50", "--batch_size=40", "--shards=2")
    assert done.returncode == 0, done.stderr
    summary = json.loads((work_dir.request_dir(rid) / "summary.json").read_text())
    c, load = summary["counts"], summary["bulk_import"]
    assert (c["created"], c["written"], c["to_write"], c["bundles_posted"]) == (90, 90, 90, 0)
    assert (load["consents_staged"], load["consents_stored"], load["provenances_stored"]) == (90, 90, 3)
    assert c["provenances"] == 3 and c["provenances_failed"] == 0
    assert work_dir.load(rid)["state"] == PROCESSED
    assert ledger_dirs.current(work_dir) is not None  # promoted: every Consent stored
    assert not (work_dir.request_dir(rid) / "bulk").exists()  # the NDJSON (NHS numbers) is gone
    for number in numbers[:3] + numbers[-2:]:
        stored = requests.get(f"{hapi_server}/Consent/{consent_id(number)}", timeout=30).json()
        assert stored["status"] == ("active" if number in opted_out else "inactive")
        found = requests.get(f"{hapi_server}/Provenance", params={"target": f"Consent/{consent_id(number)}"},
                             timeout=30).json()
        assert found.get("total", len(found.get("entry", []))) == 1
    assert cli("report", "--work-dir", str(work_dir.root), "--request-id", rid).returncode == 0
    assert ("Loaded in bulk by the store's own import (hapi): 90 of 90 Consents and 3 of 3 Provenance stored"
            in (work_dir.request_dir(rid) / "report.md").read_text())

    # Believe no peer: HAPI's finished-job report, altered in flight to say one Consent fewer, fails the run.
    numbers = _numbers(90, seed=9905)
    _inputs(tmp_path / "short", numbers, set())
    with FaultProxy(hapi_server) as proxy:
        proxy.rewrite = lambda method, path, body: body.replace(b"_AS_CREATE: 90", b"_AS_CREATE: 89")
        summary = _run(tmp_path / "short", proxy.url)
    assert not summary["ok"]
    assert "89 stored of 90" in summary["problems"][0], summary["problems"]
    assert summary["counts"]["written"] == 89 and summary["bulk_import"].get("provenances_stored") is None
    assert not (tmp_path / "short" / "ledger" / "ledger.json").exists()  # not promoted
    assert not (tmp_path / "short" / "bulk").exists()
    assert stat.S_IMODE((tmp_path / "short").stat().st_mode) == 0o700


STORE = "projects/p/locations/europe-west2/datasets/d/fhirStores/s"


def test_google_bulk_needs_cloud_storage_and_a_cloud_healthcare_store(tmp_path):
    _inputs(tmp_path, _numbers(10, seed=9906), set())
    google = ("--bulk_import=google", "--bulk_min_patients=1")
    with pytest.raises(InputError, match="gs://"):
        bulk_load.plan(*_options(tmp_path, *google), first_load=True,
                       fhir_url=f"https://healthcare.googleapis.com/v1/{STORE}/fhir")
    with pytest.raises(InputError, match="Cloud Healthcare FHIR base URL"):
        bulk_load.plan(*_options(tmp_path, *google, "--bulk_dir=gs://b/ndop/bulk"), first_load=True,
                       fhir_url="https://fhir.example.nhs.uk/R4")
    load = bulk_load.plan(*_options(tmp_path, *google, "--bulk_dir=gs://b/ndop/bulk"), first_load=True,
                          fhir_url=f"https://healthcare.googleapis.com/v1/{STORE}/fhir")
    assert load is not None and (load.store, load.folder) == ("google", "gs://b/ndop/bulk")


def test_google_import_is_started_and_its_operation_read_to_the_end():
    """Offline: a loopback stand-in for the Cloud Healthcare API (the request and operation shapes of its REST
    reference); the import counts only when the finished operation's counter says every resource succeeded."""
    operation = "projects/p/locations/europe-west2/datasets/d/operations/42"

    def api(index: int, seen: Seen) -> Reply:
        if seen.method == "POST":
            return Reply(200, {"name": operation})
        if index < 3:
            return Reply(200, {"name": operation, "metadata": {"counter": {"success": "4"}}})
        return Reply(200, {"name": operation, "done": True, "metadata": {"counter": {"success": str(success)}}})

    for success, problem in ((10, None), (9, "imported 9 of 10")):
        with StubServer(api) as stub, requests.Session() as session:
            root = stub.url.removesuffix("/fhir")
            job = GoogleImport(session, f"{root}/{STORE}/fhir", poll_seconds=0.01)
            result = job.wait(job.start("gs://b/ndop/bulk/Consent-*.ndjson"), "gs://b/ndop/bulk/Consent-*", 10)
        posted = stub.seen[0]
        assert (posted.method, posted.path) == ("POST", f"/{STORE}:import")
        assert posted.json() == {"contentStructure": "RESOURCE",
                                 "gcsSource": {"uri": "gs://b/ndop/bulk/Consent-*.ndjson"}}
        assert {(s.method, s.path) for s in stub.seen[1:]} == {("GET", f"/{operation}")} and len(stub.seen) == 4
        assert result.total == success and (result.problem is None if problem is None else problem in result.problem)


def test_a_reply_with_integrity_errors_imports_nothing_and_leaves_no_files(tmp_path, fhir_server):
    numbers = _numbers(60, seed=9907)
    _inputs(tmp_path, numbers[:55], set())
    reply = (tmp_path / "reply.dat").read_bytes()
    (tmp_path / "reply.dat").write_bytes(reply + datfile.encode(pa.array(numbers[55:], pa.string()), "crlf"))
    summary = _run(tmp_path, fhir_server)  # five numbers NDOP was never asked about: the reply is suspect
    assert not summary["ok"] and summary["problems"][0].startswith("5 integrity errors")
    assert summary["counts"]["written"] == 0 and summary["counts"]["staged"] == 0 and "bulk_import" not in summary
    assert not (tmp_path / "bulk").exists() and not (tmp_path / "ledger" / "ledger.json").exists()
