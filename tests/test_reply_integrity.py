"""Issue 9 item 1 end to end: a reply that is not data never writes the cohort as opted out.

``ndop run`` against the real mesh-sandbox and FHIR server; NDOP's stand-in is silent and the "reply" is
sent by hand from the NDOP mailbox, as a service that answers with an error page would.
"""
from __future__ import annotations

import pytest

import json
import re

import requests

from pipeline.core import nhs
from pipeline.lifecycle import audit
from pipeline.core.errors import InputError
from pipeline.lifecycle.state import REPLIED, decide_second_reply
from pipeline.orchestration.plausibility import swing_problem
from tests.helpers import cli
from tests.test_run import ndop_run, statuses

SYSTEM = nhs.NHS_NUMBER_SYSTEM


def waiting_request(tmp_path, work_dir, mesh, fhir_server, seed: int, count: int = 6):
    """A request sent by a real ``ndop run`` to an NDOP that stays silent: (numbers, env, record); the test then
    answers from the NDOP mailbox by hand."""
    numbers = nhs.synthetic_numbers(count, seed=seed).to_pylist()
    cohort = tmp_path / "cohort.txt"
    cohort.write_text("\n".join(numbers) + "\n")
    env = {**mesh.env(), "FHIR_URL": fhir_server}
    mesh.plugin(mode="silent")
    assert ndop_run(work_dir, env, "--cohort", str(cohort), "--wait", "0").returncode == 3
    [record] = work_dir.all()
    return numbers, env, record


def test_a_reply_that_is_not_data_writes_nothing_and_is_not_acknowledged(tmp_path, work_dir, mesh,
                                                                         fhir_server) -> None:
    """A service's error text as the whole reply (the header-only reply: tests/test_read_inputs.py)."""
    body, why = b"Service Unavailable, please try again later\r\n", "not an NHSNUMBER, line"
    numbers, env, record = waiting_request(tmp_path, work_dir, mesh, fhir_server, seed=9901)
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
    numbers, env, record = waiting_request(tmp_path, work_dir, mesh, fhir_server, seed=9902)
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


def stopped_by_a_second_reply(tmp_path, work_dir, mesh, fhir_server, seed: int, first: bytes, second: bytes,
                              first_subject: str | None = None):
    """A request whose saved reply is ``first`` and a second, different reply ``second`` came after it (every
    ``ndop poll`` then exits 1): (numbers, env, request id, first's MESH id, second's MESH id)."""
    numbers, env, record = waiting_request(tmp_path, work_dir, mesh, fhir_server, seed=seed)
    messages = []
    for body, subject in ((first, first_subject or record["subject"]), (second, record["subject"])):
        with mesh.client("X26HC065") as ndop:
            messages.append(ndop.send_message("X26ABC1", body(numbers) if callable(body) else body,
                                              workflow_id="SPINE_NTT_UPHOLDING", local_id=record["local_id"],
                                              subject=subject))
        polled = cli("poll", "--work-dir", str(work_dir.root), env=env)
        assert polled.returncode == (0 if len(messages) == 1 else 1), polled.stdout + polled.stderr
    assert work_dir.load(record["request_id"])["second_replies"][0]["message_id"] == messages[1]
    return numbers, env, record["request_id"], messages[0], messages[1]


def resolve(work_dir, env, *args: str):
    return cli("resolve-reply", "--work-dir", str(work_dir.root), *args, env=env)


def decisions(work_dir) -> list[dict]:
    return [e for e in audit.read_events(work_dir.root) if e["event"] == "decision"]


def test_a_person_resolves_a_second_reply_by_using_it(tmp_path, work_dir, mesh, fhir_server) -> None:
    """The follow-up to issue 19 item 6: a job notice taken for the reply, then NDOP's real reply; the person says
    the second is NDOP's. It is downloaded and saved as the reply, the notice is acknowledged unused, the decision
    is audited, and the next ``ndop run`` writes the real answer and acknowledges it."""
    def answer(numbers: list[str]) -> bytes:
        return "".join(f"{n},\r\n" for n in numbers[2:]).encode()  # the first two opted out

    numbers, env, rid, notice, real = stopped_by_a_second_reply(
        tmp_path, work_dir, mesh, fhir_server, 9904, b'{"status": "pending", "stages": []}', answer, "PENDING")
    assert work_dir.load(rid)["reply_message_id"] == notice and sorted(mesh.inbox()) == sorted([notice, real])
    done = resolve(work_dir, env, "--request-id", rid, "--use", "second")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"the second reply (MESH message {real}) is NDOP's answer; acknowledged unused: {notice}" in done.stdout
    saved = work_dir.load(rid)
    assert saved["state"] == REPLIED and saved["reply_message_id"] == real and saved["second_replies"] == []
    assert saved["reply_lines"] == len(numbers) - 2
    assert (work_dir.request_dir(rid) / "reply.dat").read_bytes() == answer(numbers)
    assert mesh.inbox() == [real]  # the notice taken for the reply: acknowledged unused
    [decision] = decisions(work_dir)
    assert decision["request_id"] == rid and decision["use"] == "second" and decision["kept"]["message_id"] == real
    assert [a["message_id"] for a in decision["set_aside"]] == [notice] and decision["user"]
    assert not any(n in (work_dir.root / "audit.jsonl").read_text() for n in numbers)

    ran = ndop_run(work_dir, env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert work_dir.load(rid)["state"] == "acknowledged" and mesh.inbox() == []
    found = statuses(fhir_server, numbers)
    assert [found[n] for n in numbers] == [["active"]] * 2 + [["inactive"]] * (len(numbers) - 2)


def test_a_person_resolves_a_second_reply_by_keeping_the_first(tmp_path, work_dir, mesh, fhir_server) -> None:
    """The saved reply is NDOP's: the second is acknowledged unused and polls stop reporting it; the request keeps
    the reply it had (``ndop process`` then takes it like any other: the test above runs it)."""
    def reply(numbers: list[str]) -> bytes:
        return "".join(f"{n},\r\n" for n in numbers).encode()

    def other(numbers: list[str]) -> bytes:
        return "".join(f"{n},\r\n" for n in numbers[1:]).encode()

    numbers, env, rid, first, second = stopped_by_a_second_reply(tmp_path, work_dir, mesh, fhir_server, 9905,
                                                                 reply, other)
    refused = resolve(work_dir, env, "--request-id", rid, "--use", "first", "--message-id", second)
    assert refused.returncode == 2 and "--use first sets every second reply aside" in refused.stderr, refused.stderr
    assert len(decisions(work_dir)) == 0 and sorted(mesh.inbox()) == sorted([first, second])

    done = resolve(work_dir, env, "--request-id", rid, "--use", "first")
    assert done.returncode == 0, done.stdout + done.stderr
    saved = work_dir.load(rid)
    assert saved["state"] == REPLIED and saved["reply_message_id"] == first and saved["second_replies"] == []
    assert [r["use"] for r in saved["resolved_replies"]] == ["first"]
    assert (work_dir.request_dir(rid) / "reply.dat").read_bytes() == reply(numbers)
    assert mesh.inbox() == [first]  # the second acknowledged unused
    assert [d["set_aside"][0]["message_id"] for d in decisions(work_dir)] == [second]
    polled = cli("poll", "--work-dir", str(work_dir.root), env=env)
    assert polled.returncode == 0, polled.stdout + polled.stderr  # nothing left for a person


def test_the_resolve_rule() -> None:
    """Which requests ``ndop resolve-reply`` takes, and what each choice keeps and sets aside."""
    first = {"message_id": "M1", "sha256": "a" * 64}
    seconds = [{"message_id": "M2", "sha256": "b" * 64, "at": "t"}, {"message_id": "M3", "sha256": "c" * 64, "at": "t"}]
    stopped = {"request_id": "R", "state": REPLIED, "reply_message_id": "M1", "reply_sha256": "a" * 64,
               "second_replies": seconds[:1]}
    kept = decide_second_reply(stopped, "first")
    assert kept.keep == first and kept.set_aside == (seconds[0],)
    used = decide_second_reply(stopped, "second")
    assert used.keep == seconds[0] and used.set_aside == (first,)
    two = {**stopped, "second_replies": seconds}
    with pytest.raises(InputError, match="name the one to use with --message-id"):
        decide_second_reply(two, "second")
    assert decide_second_reply(two, "second", "M3").set_aside == (first, seconds[0])
    assert decide_second_reply(two, "first").set_aside == tuple(seconds)
    for record, use, message_id, why in [
            ({**stopped, "second_replies": []}, "first", None, "no second reply waiting"),
            ({**stopped, "state": "processed"}, "first", None, "'processed' with no second reply waiting"),
            ({**stopped, "state": "accepted"}, "second", None, "only for a replied request stopped"),
            (stopped, "both", None, "--use must be first or second"),
            (stopped, "second", "M1", "'M1' is not one of its second replies"),
            (stopped, "first", "M2", "--use first sets every second reply aside")]:
        with pytest.raises(InputError, match=re.escape(why)):
            decide_second_reply(record, use, message_id)


@pytest.mark.slow  # stage 2 of the test command (run_tests.sh --all)
def test_a_reply_that_swings_the_share_is_set_aside_downloaded_again_and_used_only_when_accepted(
        tmp_path, work_dir, mesh, fhir_server) -> None:
    """Issue 19 item 2: a reply cut short (nothing on the wire tells) reads as half the cohort opting out; against
    the ledger the swing is the tell. Nothing is written or acknowledged; the next poll downloads the reply again
    (MESH still holds it); ``--accept-swing`` lets a person confirm it."""
    numbers = nhs.synthetic_numbers(100, seed=9903).to_pylist()
    cohort = tmp_path / "cohort.txt"
    cohort.write_text("\n".join(numbers) + "\n")
    opted = tmp_path / "opted-out.txt"
    opted.write_text("\n".join(numbers[:5]) + "\n")
    mesh.plugin(opted_out_file=str(opted))
    env = {**mesh.env(), "FHIR_URL": fhir_server}
    assert ndop_run(work_dir, env, "--cohort", str(cohort)).returncode == 0  # the ledger: 5% opted out

    mesh.plugin(mode="silent")
    assert ndop_run(work_dir, env, "--cohort", str(cohort), "--wait", "0").returncode == 3
    record = work_dir.all()[-1]
    cut = "".join(f"{n},\r\n" for n in numbers[5:55]).encode()  # the reply cut short after 50 lines
    with mesh.client("X26HC065") as ndop:
        reply = ndop.send_message("X26ABC1", cut, workflow_id="SPINE_NTT_UPHOLDING", local_id=record["local_id"],
                                  subject=record["subject"])
    for _ in range(2):  # refused, and downloaded again by the next run's poll
        refused = ndop_run(work_dir, env)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        error = refused.stderr.strip().splitlines()[-1]
        assert "opted-out share from 5.0% to 50.0%" in error and "--accept-swing" in error, error
        saved = work_dir.load(record["request_id"])
        assert saved["state"] == "accepted" and not (work_dir.request_dir(record["request_id"]) / "reply.dat").exists()
        assert mesh.inbox() == [reply]  # not acknowledged
        report = json.loads((work_dir.request_dir(record["request_id"]) / "report.json").read_text())
        assert any("opted-out share" in problem for problem in report["problems"])
    assert [r["message_id"] for r in saved["refused_replies"]] == [reply, reply]
    for number in numbers[5:]:  # nothing written: every one of them still "inactive"
        found = requests.get(f"{fhir_server}/Consent", params={"patient:identifier": f"{SYSTEM}|{number}"},
                             timeout=30).json()
        assert [e["resource"]["status"] for e in found["entry"]] == ["inactive"], number

    accepted = ndop_run(work_dir, env, "--accept-swing")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert work_dir.load(record["request_id"])["state"] == "acknowledged" and mesh.inbox() == []


def test_the_swing_rule() -> None:
    ledger = {"by_status": {"opted_out": 50, "not_opted_out": 950}}  # 5%
    assert swing_problem(ledger, 1000, 940, 2.0) is None  # 6%: +1 point
    assert "5.0% to 50.0%" in (swing_problem(ledger, 1000, 500, 2.0) or "")  # a reply cut in half
    assert swing_problem({"by_status": {"opted_out": 6, "not_opted_out": 34}}, 40, 33, 2.0) is None  # 1 patient
    assert "to 100.0%" in (swing_problem({"by_status": {"opted_out": 1, "not_opted_out": 9}}, 10, 0, 2.0) or "")
    assert swing_problem(None, 1000, 0, 2.0) is None  # a first load: nothing to compare
