"""Issue 9 item 1 end to end: a reply that is not data never writes the cohort as opted out.

``ndop run`` against the real mesh-sandbox and FHIR server; NDOP's stand-in is silent and the "reply" is
sent by hand from the NDOP mailbox, as a service that answers with an error page would.
"""
from __future__ import annotations

import json

import requests

from pipeline import nhs
from pipeline.state import REPLIED
from tests.helpers import cli
from tests.test_run import ndop_run

SYSTEM = nhs.NHS_NUMBER_SYSTEM


def test_a_reply_that_is_not_data_writes_nothing_and_is_not_acknowledged(tmp_path, work_dir, mesh,
                                                                         fhir_server) -> None:
    """A service's error text as the whole reply (the header-only reply: tests/test_read_inputs.py)."""
    body, why = b"Service Unavailable, please try again later\r\n", "not an NHSNUMBER, line"
    numbers = nhs.synthetic_numbers(6, seed=9901).to_pylist()
    cohort = tmp_path / "cohort.txt"
    cohort.write_text("\n".join(numbers) + "\n")
    env = {**mesh.env(), "FHIR_URL": fhir_server}
    mesh.plugin(mode="silent")
    assert ndop_run(work_dir, env, "--cohort", str(cohort), "--wait", "0").returncode == 3
    [record] = work_dir.all()
    with mesh.client("X26HC065") as ndop:
        ndop.send_message("X26ABC1", body, workflow_id="SPINE_NTT_UPHOLDING", local_id=record["local_id"],
                          subject=record["subject"])

    done = ndop_run(work_dir, env)
    assert done.returncode == 1, done.stdout + done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("ndop run: error: ") and "integrity error" in error and why in error
    for number in numbers:  # nothing written: not one Consent, least of all an "active" opt-out
        found = requests.get(f"{fhir_server}/Consent", params={"patient:identifier": f"{SYSTEM}|{number}"},
                             timeout=30).json()
        assert found.get("entry", []) == [], number
    [record] = work_dir.all()
    assert record["state"] == REPLIED and not record["processing"]["ok"]
    assert len(mesh.inbox()) == 1  # the reply is still there, unacknowledged
    report = json.loads((work_dir.request_dir(record["request_id"]) / "report.json").read_text())
    assert any(why in problem for problem in report["problems"]) and "changes" not in report
    assert why in done.stdout  # the printed report says why


def test_a_second_different_reply_stops_the_request_for_a_person(tmp_path, work_dir, mesh, fhir_server) -> None:
    """Issue 19 item 6: a job notice whose subject is not SUCCESS is saved as the reply; the real reply that
    follows is a second, different answer: never acknowledged unread, and the request stops for a person."""
    numbers = nhs.synthetic_numbers(6, seed=9902).to_pylist()
    cohort = tmp_path / "cohort.txt"
    cohort.write_text("\n".join(numbers) + "\n")
    env = {**mesh.env(), "FHIR_URL": fhir_server}
    mesh.plugin(mode="silent")
    assert ndop_run(work_dir, env, "--cohort", str(cohort), "--wait", "0").returncode == 3
    [record] = work_dir.all()
    with mesh.client("X26HC065") as ndop:
        ndop.send_message("X26ABC1", b'{"status": "pending", "stages": []}', workflow_id="SPINE_NTT_UPHOLDING",
                          local_id=record["local_id"], subject="PENDING")
    assert cli("poll", "--work-dir", str(work_dir.root), env=env).returncode == 0
    assert work_dir.load(record["request_id"])["state"] == REPLIED  # the notice, taken for the reply
    with mesh.client("X26HC065") as ndop:
        real = ndop.send_message("X26ABC1", "".join(f"{n},\r\n" for n in numbers).encode(),
                                 workflow_id="SPINE_NTT_UPHOLDING", local_id=record["local_id"],
                                 subject=record["subject"])

    for _ in range(2):  # and again on the next scheduled run
        done = ndop_run(work_dir, env)
        assert done.returncode == 1, done.stdout + done.stderr
        error = done.stderr.strip().splitlines()[-1]
        assert "a second, different reply" in error and real in error, error
    assert len(mesh.inbox()) == 2 and real in mesh.inbox()  # neither acknowledged
    assert work_dir.load(record["request_id"])["state"] == REPLIED
    for number in numbers:  # nothing written
        found = requests.get(f"{fhir_server}/Consent", params={"patient:identifier": f"{SYSTEM}|{number}"},
                             timeout=30).json()
        assert found.get("entry", []) == [], number
