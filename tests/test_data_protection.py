"""Issue 12 end to end against the real mesh-sandbox (playing NDOP) and the real FHIR server: three scheduled
runs with changes between them and a purge before the third; what is left holds no cohort number, the records
and reports remain, every Consent written is a Provenance target, and the audit log tells who ran what."""
from __future__ import annotations

import pytest

import json
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.lifecycle import audit
from pipeline.core import nhs
from pipeline.fhir.config import FhirClientConfig
from pipeline.fhir.search import iter_search
from pipeline.fhir.sessions import open_session
from pipeline.lifecycle.state import ACKNOWLEDGED, WorkDir
from tests.helpers import cli
from tests.test_run import ndop_run
from transforms.provenance import MESH_MESSAGE_SYSTEM, REQUEST_SYSTEM
from tests.helpers import consent_id


def _files_holding_numbers(root: Path, numbers: list[str]) -> list[str]:
    """Every file under ``root`` but ``ledger/`` that holds a cohort number (Parquet read, not grepped)."""
    wanted = [n.encode() for n in numbers]
    found = []
    for path in root.rglob("*"):
        if not path.is_file() or path.relative_to(root).parts[0] == "ledger":
            continue
        if path.suffix == ".parquet":
            data = json.dumps(pq.read_table(path).to_pylist(), default=str).encode()
        else:
            data = path.read_bytes()
        if any(n in data for n in wanted):
            found.append(str(path.relative_to(root)))
    return found


def _provenances(fhir: str, request_ids: set[str]) -> list[dict]:
    """Every Provenance naming one of ``request_ids`` (the session's server also holds other tests')."""
    def request_of(provenance: dict) -> str | None:
        return next((e["what"]["identifier"]["value"] for e in provenance.get("entity", [])
                     if e["what"]["identifier"]["system"] == REQUEST_SYSTEM), None)

    with open_session(FhirClientConfig.from_env(env={}, base_url=fhir, auth="none")) as session:
        return [p for p in iter_search(session, fhir, "Provenance", {"_count": "200"}) if request_of(p) in request_ids]


@pytest.mark.slow  # stage 2 of the test command (run_tests.sh --all)
def test_three_runs_with_a_purge_leave_no_number_and_every_consent_has_its_provenance(
        tmp_path, work_dir: WorkDir, mesh, fhir_server) -> None:
    numbers = nhs.synthetic_numbers(30, seed=9611).to_pylist()
    cohort = tmp_path / "cohort.txt"
    cohort.write_text("\n".join(numbers) + "\n")
    opted = tmp_path / "opted-out.txt"
    mesh.plugin(opted_out_file=str(opted))
    env = {**mesh.env(), "FHIR_URL": fhir_server}

    opted.write_text("\n".join(numbers[:6]) + "\n")
    assert (first := ndop_run(work_dir, env, "--cohort", str(cohort))).returncode == 0, first.stderr
    opted.write_text("\n".join(numbers[3:10]) + "\n")  # 0-2 withdraw, 6-9 opt out
    second = ndop_run(work_dir, env, "--cohort", str(cohort), "--bundle_type=transaction")
    assert second.returncode == 0, second.stderr

    purged = cli("purge", "--work-dir", str(work_dir.root), "--older-than", "0", env=env)
    assert purged.returncode == 0 and purged.stdout.count("removed") == 3, purged.stdout  # 2 requests, the history
    assert "history rows" in purged.stdout  # statuses no longer held, older than the retention period (0 days)

    opted.write_text("\n".join(numbers[5:12]) + "\n")  # 3-4 withdraw, 10-11 opt out, 28-29 leave the cohort
    cohort.write_text("\n".join(numbers[:28]) + "\n")
    # the third run purges at its end (NDOP_RETENTION_DAYS set)
    third = ndop_run(work_dir, {**env, "NDOP_RETENTION_DAYS": "0"}, "--cohort", str(cohort))
    assert third.returncode == 0, third.stderr
    assert "[purge] request" in third.stderr

    records = work_dir.all()
    assert [r["state"] for r in records] == [ACKNOWLEDGED] * 3 and all(r.get("purged_at") for r in records)
    for record in records:
        folder = work_dir.request_dir(record["request_id"])
        assert {"request.json", "report.json", "report.md", "summary.json"} <= {p.name for p in folder.iterdir()}
    assert _files_holding_numbers(work_dir.root, numbers) == []

    report = json.loads((work_dir.request_dir(records[2]["request_id"]) / "report.json").read_text())
    assert report["changes"]["newly_opted_out"] == 2 and report["changes"]["opt_out_withdrawn"] == 2
    assert report["changes"]["left_cohort"] == 2

    # Provenance: one target per Consent written, over the three runs; every patient's Consent named at least once
    written = sum(json.loads((work_dir.request_dir(r["request_id"]) / "summary.json").read_text())["counts"]["written"]
                  for r in records)
    # Request ids repeat across the tests' work dirs on the shared server: keep the Provenances over our Consents.
    ours = {f"Consent/{consent_id(n)}" for n in numbers}
    provenances = [p for p in _provenances(fhir_server, {r["request_id"] for r in records})
                   if {t["reference"] for t in p["target"]} <= ours]
    targets = [t["reference"] for p in provenances for t in p["target"]]
    assert len(targets) == written and written >= 30
    assert {f"Consent/{consent_id(n)}" for n in numbers} <= set(targets)
    replies = {r["reply_message_id"] for r in records}
    assert all({e["what"]["identifier"]["value"] for e in p["entity"]
                if e["what"]["identifier"]["system"] == MESH_MESSAGE_SYSTEM} <= replies for p in provenances)
    assert all(p["agent"][0]["who"]["identifier"]["value"] == records[0]["mailbox"] for p in provenances)
    assert not any(n in json.dumps(provenances) for n in numbers)

    # the audit log: a line per command run and per state change, no number
    text = audit.audit_path(work_dir.root).read_text()
    assert not any(n in text for n in numbers)
    events = list(audit.read_events(work_dir.root))
    runs = [e for e in events if e["event"] == "command" and e["command"] == "run"]
    assert [e["exit_status"] for e in runs] == [0, 0, 0] and all(e["fhir_url"] == fhir_server for e in runs)
    for record in records:
        moves = [(e["old_state"], e["new_state"]) for e in events
                 if e["event"] == "state" and e["request_id"] == record["request_id"]]
        assert moves[0] == (None, "created") and moves[-1] == ("processed", ACKNOWLEDGED)
    assert [e["command"] for e in events if e["event"] == "command"].count("purge") == 1

    # staleness: the ledger summary in the report, in ndop status, and as JSON
    assert report["ledger"]["patients"] == 30 and report["ledger"]["stale"] == 0
    assert report["ledger"]["by_status"] == {"opted_out": 7, "not_opted_out": 23}
    status = cli("status", "--work-dir", str(work_dir.root), "--json", "--stale-days", "0", env=env)
    assert status.returncode == 0, status.stderr
    document = json.loads(status.stdout)
    assert [r["request_id"] for r in document["requests"]] == [r["request_id"] for r in records]
    # the third run's purge (retention 0) removed the ledger rows of the 2 who left (issue 21 item 5)
    assert "[purge] left-cohort" in third.stderr and "removed 2 ledger rows" in third.stderr
    assert document["ledger"]["stale"] == 28 and document["ledger"]["left_cohort"] == 0
    text_status = cli("status", "--work-dir", str(work_dir.root), env=env)
    assert "0 stale (last confirmed by NDOP more than 21 days ago" in text_status.stdout, text_status.stdout
    assert not any(n in status.stdout + text_status.stdout for n in numbers)
