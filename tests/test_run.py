"""``ndop run`` end to end against the real mesh-sandbox (playing NDOP) and the real FHIR server."""
from __future__ import annotations

import json
import re
import subprocess

import requests

from pipeline.core import nhs
from pipeline.lifecycle.state import ACKNOWLEDGED, WorkDir
from tests.helpers import cli

SYSTEM = nhs.NHS_NUMBER_SYSTEM


def ndop_run(work_dir: WorkDir, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return cli("run", "--work-dir", str(work_dir.root), "--wait", "20", "--interval", "0.2", "--runner=FnApiRunner",
               *args, env=env, timeout=180)


def statuses(fhir: str, numbers: list[str], by: str = "patient:identifier") -> dict[str, list[str]]:
    """Each patient's Consent statuses (a list, so a duplicate would show), searched ``by`` the NHS number."""
    found = {}
    for number in numbers:
        bundle = requests.get(f"{fhir}/Consent", params={by: f"{SYSTEM}|{number}"}, timeout=30).json()
        found[number] = [e["resource"]["status"] for e in bundle.get("entry", [])]
        assert all(e["resource"].get("dateTime") for e in bundle.get("entry", []))
    return found


def test_two_runs_write_then_update_exactly_the_changed_statuses(tmp_path, work_dir, mesh, fhir_server) -> None:
    numbers = nhs.synthetic_numbers(40, seed=9601).to_pylist()
    cohort = tmp_path / "cohort.txt"
    cohort.write_text("\n".join(numbers + ["9434765918"]) + "\n")  # one invalid number: never sent
    opted = tmp_path / "opted-out.txt"
    opted.write_text("\n".join(numbers[:6]) + "\n")
    mesh.plugin(opted_out_file=str(opted))
    env = {**mesh.env(), "FHIR_URL": fhir_server}

    first = ndop_run(work_dir, env, "--cohort", str(cohort))
    assert first.returncode == 0, first.stderr
    assert statuses(fhir_server, numbers) == {n: ["active" if n in numbers[:6] else "inactive"] for n in numbers}
    first_id = work_dir.all()[0]["request_id"]
    first_report = json.loads((work_dir.request_dir(first_id) / "report.json").read_text())
    assert first_report["changes"]["new_patients"] == 40 and first_report["changes"]["to_write"] == 40

    # NDOP's answer changes: 0-2 withdraw their opt-out, 6-9 opt out, 3-5 stay opted out.
    opted.write_text("\n".join(numbers[3:10]) + "\n")
    second = ndop_run(work_dir, env, "--cohort", str(cohort))
    assert second.returncode == 0, second.stderr
    assert "[write] 7/7 Consents written (100%)" in second.stderr  # progress counts what the ledger writes
    assert statuses(fhir_server, numbers) == {n: ["active" if n in numbers[3:10] else "inactive"] for n in numbers}

    records = work_dir.all()
    assert [r["state"] for r in records] == [ACKNOWLEDGED, ACKNOWLEDGED] and records[0]["request_id"] == first_id
    report = json.loads((work_dir.request_dir(records[1]["request_id"]) / "report.json").read_text())
    assert report["changes"] == {  # counted by the ledger join; only the 7 changes are written
        "to_write": 7, "newly_opted_out": 4, "opt_out_withdrawn": 3, "new_patients": 0, "refreshed": 0,
        "left_cohort": 0, "superseded": 0, "unchanged": 33,
    }
    assert report["cohort"]["invalid"] == 1 and report["cohort"]["sent"] == 40
    assert report["results"]["opted_out"] == 7 and report["results"]["written"] == 7
    markdown = (work_dir.request_dir(records[1]["request_id"]) / "report.md").read_text()
    assert "| 7 | 0 | 4 | 3 | 0 | 33 | 0 | 0 |" in markdown and markdown in second.stdout
    for text in (first.stdout, first.stderr, second.stdout, second.stderr, markdown):
        assert not any(n in text for n in numbers)
    assert mesh.inbox() == []


def test_still_waiting_exits_3_and_the_next_run_carries_the_same_request_on(tmp_path, work_dir, mesh,
                                                                            fhir_server) -> None:
    numbers = nhs.synthetic_numbers(5, seed=9602).to_pylist()
    cohort = tmp_path / "cohort.txt"
    cohort.write_text("\n".join(numbers) + "\n")
    env = {**mesh.env(), "FHIR_URL": fhir_server}
    mesh.plugin(mode="silent")  # NDOP has not answered yet
    waiting = ndop_run(work_dir, env, "--cohort", str(cohort), "--wait", "0.5")
    assert waiting.returncode == 3, waiting.stderr
    assert "still waiting for NDOP" in waiting.stdout
    [record] = work_dir.all()
    again = ndop_run(work_dir, env, "--cohort", str(cohort), "--wait", "0.5")
    assert again.returncode == 3 and "carrying on " + record["request_id"] in again.stderr
    assert len(work_dir.all()) == 1  # no second request, no second message

    # NDOP answers the request it got (simulated by sending the reply as NDOP would)
    with mesh.client("X26HC065") as ndop:
        ndop.send_message("X26ABC1", ("".join(f"{n},\r\n" for n in numbers[1:])).encode(),
                          workflow_id="SPINE_NTT_UPHOLDING", local_id=record["local_id"], subject=record["subject"])
    done = ndop_run(work_dir, env, "--cohort", str(cohort))
    assert done.returncode == 0, done.stderr
    assert statuses(fhir_server, numbers[:2]) == {numbers[0]: ["active"], numbers[1]: ["inactive"]}
    assert [r["state"] for r in work_dir.all()] == [ACKNOWLEDGED]


def test_new_request_option_forces_a_second_request(tmp_path, work_dir, mesh, fhir_server) -> None:
    cohort = tmp_path / "cohort.txt"
    cohort.write_text("\n".join(nhs.synthetic_numbers(3, seed=9603).to_pylist()) + "\n")
    env = {**mesh.env(), "FHIR_URL": fhir_server}
    mesh.plugin(mode="silent")
    assert ndop_run(work_dir, env, "--cohort", str(cohort), "--wait", "0").returncode == 3
    assert ndop_run(work_dir, env, "--cohort", str(cohort), "--wait", "0", "--new-request").returncode == 3
    assert len(work_dir.all()) == 2


def test_rejected_request_exits_1_with_the_reason(tmp_path, work_dir, mesh, fhir_server) -> None:
    cohort = tmp_path / "cohort.txt"
    cohort.write_text("\n".join(nhs.synthetic_numbers(3, seed=9604).to_pylist()) + "\n")
    env = {**mesh.env(), "FHIR_URL": fhir_server}
    mesh.plugin(mode="silent")
    assert ndop_run(work_dir, env, "--cohort", str(cohort), "--wait", "0").returncode == 3
    [record] = work_dir.all()
    with mesh.client("X26HC065") as ndop:
        ndop.send_message("X26ABC1", b"The file contains one or more invalid NHS Numbers\r\n",
                          workflow_id="SPINE_NTT_UPHOLDING", local_id=record["local_id"], subject=record["subject"])
    failed = ndop_run(work_dir, env)
    assert failed.returncode == 1
    assert re.search(r"ndop run: error: request \S+ rejected: .*invalid NHS Numbers", failed.stderr)
    assert work_dir.all()[0]["state"] == "rejected"


def test_bad_input_exits_2(tmp_path, work_dir, mesh) -> None:
    done = ndop_run(work_dir, mesh.env(), "--cohort", str(tmp_path / "missing.txt"))
    assert done.returncode == 2 and "missing.txt: no such file" in done.stderr
    nothing = ndop_run(work_dir, mesh.env())
    assert nothing.returncode == 2 and "give --cohort" in nothing.stderr


def test_cohort_from_the_fhir_store(tmp_path, work_dir, mesh, fhir_store, fhir_store_kind) -> None:
    fhir_server = fhir_store
    numbers = nhs.synthetic_numbers(12, seed=9605).to_pylist()
    for i, number in enumerate(numbers):  # Patients as the exchange holds them, one without an NHS number
        identifiers = [{"system": SYSTEM, "value": number}] if i else [{"system": "urn:local", "value": "x"}]
        answer = requests.put(f"{fhir_server}/Patient/run-test-{number[-6:]}", timeout=30,
                              json={"resourceType": "Patient", "id": f"run-test-{number[-6:]}", "identifier": identifiers})
        assert answer.status_code in (200, 201), answer.text
    env = {**mesh.env(), "FHIR_URL": fhir_server}
    done = ndop_run(work_dir, env, "--cohort", "fhir")
    assert done.returncode == 0, done.stderr
    [record] = work_dir.all()
    assert record["cohort"] == {"name": "fhir", "format": "fhir"}
    import pyarrow.parquet as pq
    sent = set(pq.read_table(work_dir.request_dir(record["request_id"]) / "manifest.parquet")["nhs_number"].to_pylist())
    assert set(numbers[1:]) <= sent and numbers[0] not in sent
    # Each Consent points at its Patient (the id came from the search, through the manifest) ...
    for number in numbers[1:]:
        by_reference = requests.get(f"{fhir_server}/Consent", params={"patient": f"Patient/run-test-{number[-6:]}"},
                                    timeout=30).json()
        [consent] = [e["resource"] for e in by_reference.get("entry", [])]
        assert consent["patient"] == {"reference": f"Patient/run-test-{number[-6:]}",
                                      "identifier": {"system": SYSTEM, "value": number}}
    # ... so the chained search by NHS number finds it on both servers; HAPI refuses the :identifier
    # modifier on a reference (HAPI-2498: not among its search modifiers), sekmet answers it.
    assert all(len(v) == 1 for v in statuses(fhir_server, numbers[1:], by="patient.identifier").values())
    if fhir_store_kind == "hapi":
        refused = requests.get(f"{fhir_server}/Consent", params={"patient:identifier": f"{SYSTEM}|{numbers[1]}"},
                               timeout=30)
        assert refused.status_code == 400 and "HAPI-2498" in refused.text
    else:
        assert all(len(v) == 1 for v in statuses(fhir_server, numbers[1:]).values())


def test_ndop_run_with_basic_auth_and_the_fhir_username_option(tmp_path, work_dir, mesh, fhir_server) -> None:
    """FHIR_AUTH=basic end to end through a store that takes only HTTP Basic (tests/fixtures/fhir_proxy.py): the
    CLI's --fhir-username reaches the process pipeline and the read-back sample (--verify-sample)."""
    from tests.fixtures.fhir_proxy import FaultProxy

    numbers = nhs.synthetic_numbers(10, seed=9621).to_pylist()
    cohort = tmp_path / "cohort.txt"
    cohort.write_text("\n".join(numbers) + "\n")
    opted = tmp_path / "opted-out.txt"
    opted.write_text("\n".join(numbers[:3]) + "\n")
    mesh.plugin(opted_out_file=str(opted))
    password = tmp_path / "fhir.password"
    password.write_text("run-Pa55-basic\n")
    password.chmod(0o600)
    with FaultProxy(fhir_server, require_basic=("ndop-run", "run-Pa55-basic")) as proxy:
        env = {**mesh.env(), "FHIR_URL": proxy.url, "FHIR_AUTH": "basic", "FHIR_PASSWORD_FILE": str(password)}
        done = ndop_run(work_dir, env, "--cohort", str(cohort), "--fhir-username", "ndop-run", "--verify-sample", "5")
    assert done.returncode == 0, done.stderr
    assert proxy.refused == 0 and proxy.authorized >= 3  # the server check, the writes, the read-back
    assert statuses(fhir_server, numbers) == {n: ["active" if n in numbers[:3] else "inactive"] for n in numbers}
    record = work_dir.all()[0]
    assert record["state"] == ACKNOWLEDGED and record["verified"]["checked"] == 5, record
    assert "run-Pa55-basic" not in done.stdout + done.stderr
