"""The MESH driver against a real mesh-sandbox whose NDOP plugin plays the opt-out service."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import requests

from dev.mesh_sandbox import NDOP_MAILBOX
from pipeline.request import datfile
from pipeline.core import nhs
from pipeline.core.errors import EXIT_WAITING, InputError, NdopError
from pipeline.core.faults import FAULT_ENV
from pipeline.mesh.driver import MeshDriver
from pipeline.request.build import RequestSettings, build_request
from pipeline.core.clock import utcnow
from pipeline.lifecycle.state import (
    ACCEPTED,
    ACKNOWLEDGED,
    CREATED,
    FAILED,
    PROCESSED,
    REJECTED,
    REPLIED,
    SEND_UNKNOWN,
    SENT,
    WorkDir,
)
from pipeline.ops.status import format_status, status_rows
from tests.fixtures.mesh import OUR_MAILBOX, Mesh
from tests.helpers import REPO_ROOT, cli



def make_request(work_dir: WorkDir, tmp_path: Path, count: int = 20, seed: int = 1) -> dict:
    numbers = nhs.synthetic_numbers(count, seed=seed).to_pylist()
    cohort = tmp_path / f"cohort-{seed}-{count}.txt"
    cohort.write_text("\n".join(numbers) + "\n")
    return build_request(cohort, work_dir, RequestSettings(mailbox=OUR_MAILBOX))


def numbers_of(record: dict, work_dir: WorkDir) -> list[str]:
    body = (work_dir.request_dir(record["request_id"]) / record["files"]["dat"]).read_bytes()
    return datfile.parse(body).numbers.to_pylist()


def ndop(args: list[str], mesh: Mesh, work_dir: WorkDir, **env: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess running this checkout's code."""
    return cli(*args, "--work-dir", str(work_dir.root), env={**mesh.env(), **env})


def lose_response(point: str):
    """A fault hook: the outbox POST reached MESH but its answer is lost on the way back."""
    def hook(at: str) -> None:
        if at == point:
            raise requests.ConnectionError("connection reset by peer")
    return hook


# -- send -----------------------------------------------------------------------------------------

def test_send_uploads_the_dat_with_ndop_headers(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    mesh.plugin(mode="silent")
    record = make_request(work_dir, tmp_path)
    with MeshDriver(mesh.config(), work_dir) as driver:
        [result] = driver.send()
    assert result.outcome == "sent"
    saved = work_dir.load(record["request_id"])
    assert saved["state"] == SENT and saved["message_id"] == result.message_id and saved["sent_at"]
    assert saved.get("sending") is None
    with mesh.client(NDOP_MAILBOX) as ndop_client:
        [message_id] = list(ndop_client.iterate_message_ids())
        message = ndop_client.retrieve_message(message_id)
        assert message_id == saved["message_id"]
        assert message.workflow_id == "SPINE_NTT_UPHOLDING"
        assert message.local_id == record["local_id"]
        assert message.subject == record["subject"]
        assert message.filename == record["files"]["dat"]
        assert message.sender == OUR_MAILBOX
        assert message.read() == (work_dir.request_dir(record["request_id"]) / record["files"]["dat"]).read_bytes()


def test_a_second_send_of_a_sent_request_does_nothing(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    mesh.plugin(mode="silent")
    record = make_request(work_dir, tmp_path)
    with MeshDriver(mesh.config(), work_dir) as driver:
        driver.send()
        before = work_dir.load(record["request_id"])
        [again] = driver.send(request_id=record["request_id"])
        [again_all] = driver.send()
    assert again.outcome == "skipped" and again_all.outcome == "skipped"
    assert work_dir.load(record["request_id"]) == before
    assert len(mesh.inbox(NDOP_MAILBOX)) == 1


def test_send_ctl_option_sends_the_control_file_too(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    record = make_request(work_dir, tmp_path)
    with MeshDriver(mesh.config(send_ctl=True), work_dir) as driver:
        [result] = driver.send()
        report = driver.poll(wait=10, interval=0.1)
    saved = work_dir.load(record["request_id"])
    assert result.outcome == "sent" and saved["ctl_message_id"] not in (None, saved["message_id"])
    with mesh.client(NDOP_MAILBOX) as ndop_client:
        ctl = ndop_client.retrieve_message(saved["ctl_message_id"])
        assert ctl.filename == record["files"]["ctl"] and ctl.read().startswith(b"<?xml")
    # The stand-in ignores the .ctl, as POS must: the request completes, not rejected.
    assert report.replies == [record["request_id"]] and not report.problems


def lose_nth_response(point: str, n: int):
    """Like :func:`lose_response`, for the ``n``-th time ``point`` is reached only (1: the .dat, 2: the .ctl)."""
    seen = {"count": 0}

    def hook(at: str) -> None:
        if at == point:
            seen["count"] += 1
            if seen["count"] == n:
                raise requests.ConnectionError("connection reset by peer")
    return hook


def test_a_ctl_whose_send_outcome_is_unknown_is_resent_only_after_the_limit(mesh: Mesh, work_dir: WorkDir,
                                                                            tmp_path: Path) -> None:
    mesh.plugin(mode="silent")
    record = make_request(work_dir, tmp_path)
    rid = record["request_id"]
    with MeshDriver(mesh.config(send_ctl=True), work_dir) as driver:
        driver.fault_hook = lose_nth_response("after-outbox-post", 2)
        [result] = driver.send()
        driver.fault_hook = None
        assert result.outcome == "sent" and ".ctl outcome unknown" in result.detail
        saved = work_dir.load(rid)
        assert saved["ctl_send_unknown_since"] and not saved.get("ctl_sending") and not saved.get("ctl_message_id")
        assert len(mesh.inbox(NDOP_MAILBOX)) == 2  # the .dat, and the .ctl that did arrive
        [early] = driver.send(now=utcnow() + timedelta(hours=23))
        assert early.outcome == "waiting" and len(mesh.inbox(NDOP_MAILBOX)) == 2  # not sent again blindly
        [late] = driver.send(now=utcnow() + timedelta(hours=25))
        assert ".ctl as message" in late.detail and len(mesh.inbox(NDOP_MAILBOX)) == 3
    saved = work_dir.load(rid)
    assert saved["state"] == SENT and saved["ctl_message_id"] and saved.get("ctl_send_unknown_since") is None


def test_a_crash_while_the_ctl_is_sent_is_settled_as_unknown(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    mesh.plugin(mode="silent")
    record = make_request(work_dir, tmp_path)
    rid = record["request_id"]
    with MeshDriver(mesh.config(send_ctl=True), work_dir) as driver:
        def crash(at: str) -> None:
            if at == "after-outbox-post" and work_dir.load(rid).get("ctl_sending"):
                raise KeyboardInterrupt  # dies mid-.ctl: the marker stays
        driver.fault_hook = crash
        with pytest.raises(KeyboardInterrupt):
            driver.send()
        assert work_dir.load(rid)["ctl_sending"]
        driver.fault_hook = None
        [result] = driver.send()  # the next send settles the marker: maybe sent, so not sent again now
        assert result.outcome == "waiting"
    saved = work_dir.load(rid)
    assert saved.get("ctl_sending") is None and saved["ctl_send_unknown_since"] and not saved.get("ctl_message_id")
    assert len(mesh.inbox(NDOP_MAILBOX)) == 2


def test_unreachable_mesh_leaves_the_request_created(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    record = make_request(work_dir, tmp_path)
    closed = f"http://127.0.0.1:{_closed_port()}"
    with MeshDriver(mesh.config(url=closed), work_dir) as driver, pytest.raises(NdopError, match="cannot talk"):
        driver.send()
    saved = work_dir.load(record["request_id"])
    assert saved["state"] == CREATED and not saved.get("sending")
    with MeshDriver(mesh.config(), work_dir) as driver:
        [result] = driver.send()
    assert result.outcome == "sent"


def test_send_refuses_a_dat_changed_since_it_was_validated(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    record = make_request(work_dir, tmp_path)
    dat = work_dir.request_dir(record["request_id"]) / record["files"]["dat"]
    dat.write_bytes(dat.read_bytes() + b"9434765918,\r\n")
    with MeshDriver(mesh.config(), work_dir) as driver, pytest.raises(InputError, match="changed since"):
        driver.send()
    assert mesh.inbox(NDOP_MAILBOX) == []


# -- poll: the happy path ---------------------------------------------------------------------------

def test_notice_moves_a_request_to_accepted_and_is_acknowledged(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    mesh.plugin(mode="notice-only")
    record = make_request(work_dir, tmp_path)
    with MeshDriver(mesh.config(), work_dir) as driver:
        driver.send()
        report = driver.poll(wait=1.5, interval=0.1)
    saved = work_dir.load(record["request_id"])
    assert saved["state"] == ACCEPTED and report.notices == [record["request_id"]]
    assert saved["notice"]["body"]["status"] == "pending"
    assert report.timed_out and report.in_flight == [record["request_id"]]
    assert mesh.inbox() == []  # the notice was acknowledged


def test_reply_is_saved_recorded_and_not_acknowledged(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    record = make_request(work_dir, tmp_path, count=50)
    numbers = numbers_of(record, work_dir)
    opted_out = set(numbers[::7])
    (tmp_path / "optouts.txt").write_text("\n".join(sorted(opted_out)) + "\n")
    mesh.plugin(opted_out_file=str(tmp_path / "optouts.txt"))
    with MeshDriver(mesh.config(), work_dir) as driver:
        driver.send()
        report = driver.poll(wait=10, interval=0.1)
    saved = work_dir.load(record["request_id"])
    reply = work_dir.request_dir(record["request_id"]) / "reply.dat"
    body = reply.read_bytes()
    assert saved["state"] == REPLIED and report.replies == [record["request_id"]]
    assert stat.S_IMODE(reply.stat().st_mode) == 0o600
    assert saved["files"]["reply"] == "reply.dat"
    assert saved["reply_bytes"] == len(body) and saved["reply_sha256"] == hashlib.sha256(body).hexdigest()
    assert saved["reply_lines"] == len(numbers) - len(opted_out)
    assert datfile.parse(body).numbers.to_pylist() == [n for n in numbers if n not in opted_out]
    assert saved["checked_at"] and saved["replied_at"] and [h["state"] for h in saved["history"]] == [
        CREATED, SENT, ACCEPTED, REPLIED]
    assert mesh.inbox() == [saved["reply_message_id"]]  # still there: acknowledged only after processing

    # A second poll neither duplicates state nor downloads the reply again.
    with MeshDriver(mesh.config(), work_dir) as driver:
        again = driver.poll()
    assert work_dir.load(record["request_id"]) == saved and again.replies == []
    assert again.awaiting_processing == {record["request_id"]}


def test_reply_on_the_response_workflow_is_matched(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    mesh.plugin(reply_workflow_id="SPINE_NTT_UPHOLDING_RESPONSE")
    record = make_request(work_dir, tmp_path)
    with MeshDriver(mesh.config(), work_dir) as driver:
        driver.send()
        driver.poll(wait=10, interval=0.1)
    saved = work_dir.load(record["request_id"])
    assert saved["state"] == REPLIED and saved["reply_workflow_id"] == "SPINE_NTT_UPHOLDING_RESPONSE"


def test_empty_reply_means_everybody_opted_out(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    record = make_request(work_dir, tmp_path, count=10)
    (tmp_path / "all.txt").write_text("\n".join(numbers_of(record, work_dir)) + "\n")
    mesh.plugin(opted_out_file=str(tmp_path / "all.txt"))
    with MeshDriver(mesh.config(), work_dir) as driver:
        driver.send()
        report = driver.poll(wait=10, interval=0.1)
    saved = work_dir.load(record["request_id"])
    assert saved["state"] == REPLIED and not report.problems
    assert saved["reply_bytes"] == 0 and saved["reply_lines"] == 0
    assert (work_dir.request_dir(record["request_id"]) / "reply.dat").read_bytes() == b""


# -- poll: failures ---------------------------------------------------------------------------------

def test_invalid_number_reply_rejects_the_request(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    record = make_request(work_dir, tmp_path)
    dat = work_dir.request_dir(record["request_id"]) / record["files"]["dat"]
    body = dat.read_bytes() + b"9990000019,\r\n"  # fails Modulus 11
    dat.write_bytes(body)
    work_dir.update(record["request_id"], dat_sha256=hashlib.sha256(body).hexdigest(), dat_bytes=len(body))
    assert ndop(["send"], mesh, work_dir).returncode == 0
    result = ndop(["poll", "--wait", "10", "--interval", "0.1"], mesh, work_dir)
    saved = work_dir.load(record["request_id"])
    assert result.returncode == 1
    assert f"request {record['request_id']} rejected by NDOP: The file contains one or more invalid NHS Numbers" \
        in result.stderr
    assert saved["state"] == REJECTED and "invalid NHS Numbers" in saved["rejection"]["reason"]
    assert not (work_dir.request_dir(record["request_id"]) / "reply.dat").exists()
    assert mesh.inbox() == []  # notice and rejection both acknowledged


def test_rejection_text_quoting_a_number_is_masked_everywhere(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    """The rejection reason is NDOP's own text: if it ever names the bad number, no log, record or status shows it."""
    mesh.plugin(mode="silent")
    record = make_request(work_dir, tmp_path)
    assert ndop(["send"], mesh, work_dir).returncode == 0
    quoted = numbers_of(record, work_dir)[0]
    with mesh.client("X26HC065") as pos:
        pos.send_message(OUR_MAILBOX, f"The file contains one or more invalid NHS Numbers: {quoted}\r\n".encode(),
                         workflow_id="SPINE_NTT_UPHOLDING", local_id=record["local_id"], subject=record["subject"])
    result = ndop(["poll"], mesh, work_dir)
    status = ndop(["status"], mesh, work_dir)
    saved = work_dir.load(record["request_id"])
    assert result.returncode == 1 and saved["state"] == REJECTED
    assert saved["rejection"]["reason"] == f"The file contains one or more invalid NHS Numbers: {nhs.mask(quoted)}"
    for text in (result.stdout, result.stderr, status.stdout, status.stderr, json.dumps(saved)):
        assert quoted not in text
    assert nhs.mask(quoted) in status.stdout


def test_mesh_report_fails_the_request(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    mesh.plugin(mode="silent")
    first = make_request(work_dir, tmp_path, seed=1)
    second = make_request(work_dir, tmp_path, seed=2)
    with MeshDriver(mesh.config(), work_dir) as driver:
        driver.send()
    sent_second = work_dir.load(second["request_id"])
    mesh.sandbox.inject_report(OUR_MAILBOX, "14", "Message not collected by recipient after 5 days",
                               "SPINE_NTT_UPHOLDING", local_id=first["local_id"], status="undeliverable")
    # Correlated by the linked message id alone (no local id on the report).
    mesh.sandbox.inject_report(OUR_MAILBOX, "17", "Workflow not registered for mailbox", "SPINE_NTT_UPHOLDING",
                               linked_message_id=sent_second["message_id"])
    result = ndop(["poll"], mesh, work_dir)
    assert result.returncode == 1, result.stderr
    failed_first, failed_second = work_dir.load(first["request_id"]), work_dir.load(second["request_id"])
    assert failed_first["state"] == FAILED and failed_first["failure"]["code"] == "14"
    assert failed_second["state"] == FAILED and failed_second["failure"]["code"] == "17"
    assert "Workflow not registered" in failed_second["failure"]["description"]
    assert f"request {second['request_id']} failed: MESH report 17" in result.stderr
    assert mesh.inbox() == []
    assert ndop(["poll"], mesh, work_dir).returncode == 0  # nothing new; state unchanged
    assert work_dir.load(first["request_id"]) == failed_first


def test_unknown_local_id_and_other_workflows_are_left_alone(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    with mesh.client(NDOP_MAILBOX) as ndop_client:
        stray = ndop_client.send_message(OUR_MAILBOX, b"9434765919,\r\n", workflow_id="SPINE_NTT_UPHOLDING",
                                         local_id="NDOP-SOMEONE-ELSES", subject="x")
        other = ndop_client.send_message(OUR_MAILBOX, b"hello", workflow_id="OTHER_WORKFLOW", subject="y")
        # Passes the one "SPINE_NTT_UPHOLDING*" inbox filter, but is not one of our workflow ids.
        near = ndop_client.send_message(OUR_MAILBOX, b"hello", workflow_id="SPINE_NTT_UPHOLDING_OTHER", subject="z")
    with MeshDriver(mesh.config(), work_dir) as driver:
        report = driver.poll()
    assert report.unknown_local_id == {stray} and report.other_workflow == 1
    assert sorted(mesh.inbox()) == sorted([stray, other, near])
    # The other workflow's message is not even listed, so never downloaded (one filtered listing a cycle).
    assert mesh.requests_to("GET", f"/messageexchange/{OUR_MAILBOX}/inbox/{other}") == []
    result = ndop(["poll"], mesh, work_dir)
    assert result.returncode == 0 and "1 with no matching request left alone, 1 of other workflows" in result.stdout


def test_poll_pages_past_500_messages(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    for number in range(510):
        mesh.sandbox.inject_report(OUR_MAILBOX, "14", "undelivered", "SPINE_NTT_UPHOLDING",
                                   local_id=f"NDOP-ELSEWHERE-{number}")
    record = make_request(work_dir, tmp_path)
    with MeshDriver(mesh.config(), work_dir) as driver:
        driver.send()
        report = driver.poll(wait=15, interval=0.2)
    assert work_dir.load(record["request_id"])["state"] == REPLIED  # its reply came after the first 500
    assert len(report.unknown_local_id) == 510 and report.listed >= 511


def test_poll_wait_times_out_with_exit_3(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    mesh.plugin(mode="notice-only")
    record = make_request(work_dir, tmp_path)
    assert ndop(["send"], mesh, work_dir).returncode == 0
    result = ndop(["poll", "--wait", "1", "--interval", "0.2"], mesh, work_dir)
    assert result.returncode == EXIT_WAITING and record["request_id"] in result.stderr
    assert work_dir.load(record["request_id"])["state"] == ACCEPTED


# -- safety rules -----------------------------------------------------------------------------------

def test_crash_between_reply_download_and_state_write_recovers(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    record = make_request(work_dir, tmp_path, count=30)
    assert ndop(["send"], mesh, work_dir).returncode == 0
    crashed = ndop(["poll", "--wait", "10", "--interval", "0.1"], mesh, work_dir, **{FAULT_ENV: "after-reply-download"})
    assert crashed.returncode == 86, crashed.stderr
    folder = work_dir.request_dir(record["request_id"])
    assert (folder / "reply.dat").exists()  # downloaded ...
    assert work_dir.load(record["request_id"])["state"] == ACCEPTED  # ... but never recorded
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]

    recovered = ndop(["poll"], mesh, work_dir)
    saved = work_dir.load(record["request_id"])
    assert recovered.returncode == 0, recovered.stderr
    assert saved["state"] == REPLIED and [h["state"] for h in saved["history"]].count(REPLIED) == 1
    assert saved["reply_sha256"] == hashlib.sha256((folder / "reply.dat").read_bytes()).hexdigest()
    assert saved["reply_lines"] == 30
    assert mesh.inbox() == [saved["reply_message_id"]]


def test_crash_right_after_the_outbox_post_never_sends_twice(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    record = make_request(work_dir, tmp_path)
    crashed = ndop(["send"], mesh, work_dir, **{FAULT_ENV: "after-outbox-post"})
    assert crashed.returncode == 86
    interrupted = work_dir.load(record["request_id"])
    assert interrupted["state"] == CREATED and interrupted["sending"]["attempt"] == 1
    again = ndop(["send"], mesh, work_dir)
    assert again.returncode == 0 and "waiting" in again.stdout
    assert work_dir.load(record["request_id"])["state"] == SEND_UNKNOWN
    assert len(mesh.inbox(NDOP_MAILBOX)) == 1  # not sent a second time
    assert ndop(["poll", "--wait", "10", "--interval", "0.1"], mesh, work_dir).returncode == 0
    assert work_dir.load(record["request_id"])["state"] == REPLIED  # matched by local id


def test_send_unknown_completes_when_the_message_did_arrive(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    record = make_request(work_dir, tmp_path)
    with MeshDriver(mesh.config(), work_dir) as driver:
        driver.fault_hook = lose_response("after-outbox-post")
        [result] = driver.send()
        assert result.outcome == "send-unknown" and result.is_problem
        assert work_dir.load(record["request_id"])["state"] == SEND_UNKNOWN
        driver.fault_hook = None
        driver.poll(wait=10, interval=0.1)
    saved = work_dir.load(record["request_id"])
    assert [h["state"] for h in saved["history"]] == [CREATED, SEND_UNKNOWN, ACCEPTED, REPLIED]
    assert len(mesh.inbox(NDOP_MAILBOX)) == 1


def test_send_unknown_is_resent_only_after_the_limit(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    mesh.plugin(mode="silent")  # the first copy is lost: NDOP never answers it
    record = make_request(work_dir, tmp_path)
    with MeshDriver(mesh.config(), work_dir) as driver:
        driver.fault_hook = lose_response("after-outbox-post")
        driver.send()
        driver.fault_hook = None
        [early] = driver.send(now=utcnow() + timedelta(hours=23))
        assert early.outcome == "waiting" and len(mesh.inbox(NDOP_MAILBOX)) == 1
        mesh.plugin(mode="reply")
        [late] = driver.send(now=utcnow() + timedelta(hours=25))
        assert late.outcome == "resent"
        driver.poll(wait=10, interval=0.1)
    saved = work_dir.load(record["request_id"])
    copies = mesh.inbox(NDOP_MAILBOX)
    assert len(copies) == 2 and saved["send_attempts"] == 2 and saved["state"] == REPLIED
    with mesh.client(NDOP_MAILBOX) as ndop_client:
        assert {ndop_client.retrieve_message(m).local_id for m in copies} == {record["local_id"]}


def test_no_resend_when_a_notice_has_come(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    mesh.plugin(mode="notice-only")
    record = make_request(work_dir, tmp_path)
    with MeshDriver(mesh.config(), work_dir) as driver:
        driver.fault_hook = lose_response("after-outbox-post")
        driver.send()
        driver.fault_hook = None
        _wait_for_inbox(mesh, 1)
        [result] = driver.send(now=utcnow() + timedelta(hours=25))  # looks at the inbox before re-sending
    assert result.outcome == "skipped"
    assert work_dir.load(record["request_id"])["state"] == ACCEPTED
    assert len(mesh.inbox(NDOP_MAILBOX)) == 1


def test_acknowledge_after_processing_and_late_duplicate_reply(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    record = make_request(work_dir, tmp_path)
    rid = record["request_id"]
    with MeshDriver(mesh.config(), work_dir) as driver:
        driver.send()
        driver.poll(wait=10, interval=0.1)
        with pytest.raises(NdopError, match="only a processed request"):
            driver.acknowledge(rid)
    replied = work_dir.load(rid)
    work_dir.update(rid, state=PROCESSED, expect=REPLIED)  # what `ndop process` does once the Consents are stored
    with MeshDriver(mesh.config(), work_dir) as later_run:  # a new run: the message id comes from request.json
        acknowledged = later_run.acknowledge(rid)
        assert acknowledged["state"] == ACKNOWLEDGED and acknowledged["acknowledged_at"]
        assert later_run.acknowledge(rid) == acknowledged  # idempotent
    assert mesh.inbox() == []

    reply_before = (work_dir.request_dir(rid) / "reply.dat").read_bytes()
    with mesh.client(NDOP_MAILBOX) as ndop_client:  # NDOP sends the same answer for the same local id again
        duplicate = ndop_client.send_message(OUR_MAILBOX, reply_before, workflow_id="SPINE_NTT_UPHOLDING",
                                             local_id=record["local_id"], subject=record["subject"])
    with MeshDriver(mesh.config(), work_dir) as driver:
        report = driver.poll()
    saved = work_dir.load(rid)
    assert report.duplicates == [duplicate] and mesh.inbox() == [] and not report.problems
    assert saved["state"] == ACKNOWLEDGED and saved["duplicate_replies"] == [duplicate]
    assert saved["reply_message_id"] == replied["reply_message_id"]
    assert (work_dir.request_dir(rid) / "reply.dat").read_bytes() == reply_before

    # A different answer for the same request (issue 19 item 6): never acknowledged unread, left for a person.
    other = nhs.synthetic_numbers(1, seed=4242).to_pylist()[0]
    with mesh.client(NDOP_MAILBOX) as ndop_client:
        different = ndop_client.send_message(OUR_MAILBOX, f"{other},\r\n".encode(), workflow_id="SPINE_NTT_UPHOLDING",
                                             local_id=record["local_id"], subject=record["subject"])
    for _ in range(2):  # every poll says so, and records it once
        with MeshDriver(mesh.config(), work_dir) as driver:
            report = driver.poll()
        assert report.second_replies == [(rid, different)] and report.duplicates == []
        assert mesh.inbox() == [different] and "second, different reply" in report.problems[0][1]
    assert [s["message_id"] for s in work_dir.load(rid)["second_replies"]] == [different]


def test_poll_finishes_an_acknowledgement_whose_state_write_was_lost(mesh: Mesh, work_dir: WorkDir,
                                                                     tmp_path: Path) -> None:
    record = make_request(work_dir, tmp_path)
    with MeshDriver(mesh.config(), work_dir) as driver:
        driver.send()
        driver.poll(wait=10, interval=0.1)
        work_dir.update(record["request_id"], state=PROCESSED)
        driver.poll()
    assert work_dir.load(record["request_id"])["state"] == ACKNOWLEDGED and mesh.inbox() == []


# -- configuration and authentication ---------------------------------------------------------------

def test_wrong_shared_key_is_a_clear_error(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    make_request(work_dir, tmp_path)
    result = ndop(["poll"], mesh, work_dir, MESH_SHARED_KEY="not-the-key")
    assert result.returncode == 2
    assert "refused mailbox X26ABC1" in result.stderr and "MESH_SHARED_KEY" in result.stderr
    assert "not-the-key" not in result.stderr + result.stdout
    assert mesh.sandbox.password not in result.stderr.replace("MESH_PASSWORD", "")


def test_missing_shared_key_refuses_to_start(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    make_request(work_dir, tmp_path)
    env = {k: v for k, v in mesh.env().items() if k != "MESH_SHARED_KEY"}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "send", "--work-dir", str(work_dir.root), "--mesh-url", "live"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("MESH_")}, **env,
             "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 2
    assert "MESH_SHARED_KEY is not set" in result.stderr
    assert len(mesh.inbox(NDOP_MAILBOX)) == 0


# -- status and logs --------------------------------------------------------------------------------

def test_status_shows_states_counts_and_overdue_without_nhs_numbers(mesh: Mesh, work_dir: WorkDir,
                                                                     tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    mesh.plugin(mode="notice-only")
    waiting = make_request(work_dir, tmp_path, seed=1, count=12)
    never_sent = make_request(work_dir, tmp_path, seed=2, count=7)
    with MeshDriver(mesh.config(), work_dir) as driver:
        driver.send(request_id=waiting["request_id"])
        driver.poll(wait=1, interval=0.1)
    rows = {r.request_id: r for r in status_rows(work_dir)}
    assert rows[waiting["request_id"]].state == ACCEPTED and rows[waiting["request_id"]].sent == 12
    assert not rows[waiting["request_id"]].overdue
    assert rows[never_sent["request_id"]].state == CREATED and not rows[never_sent["request_id"]].overdue
    later = status_rows(work_dir, now=utcnow() + timedelta(days=6))
    assert [r.overdue for r in later] == [True, False]
    assert "OVERDUE" in format_status(later)[1]

    result = ndop(["status"], mesh, work_dir)
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 3
    assert waiting["request_id"] in result.stdout and "accepted" in result.stdout
    shown = result.stdout + result.stderr + caplog.text
    for number in numbers_of(waiting, work_dir) + numbers_of(never_sent, work_dir):
        assert number not in shown


def _closed_port() -> int:
    from dev.mesh_sandbox import free_port

    return free_port()


def _wait_for_inbox(mesh: Mesh, count: int, timeout: float = 10) -> None:
    import time

    deadline = time.monotonic() + timeout
    while len(mesh.inbox()) < count:
        assert time.monotonic() < deadline, "the NDOP stand-in did not answer"
        time.sleep(0.05)


def test_resolve_reply_killed_after_setting_the_first_aside_finishes_when_run_again(
        mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    """``ndop resolve-reply --use second`` stopped after the saved reply was acknowledged in MESH, before the record
    changed (the order in pipeline/lifecycle/state.py): the request is still stopped, its reply file untouched, and
    the same command again finishes the job (the message already gone is fine)."""
    mesh.plugin(mode="silent")
    record = make_request(work_dir, tmp_path, seed=31)
    rid = record["request_id"]
    numbers = numbers_of(record, work_dir)
    first, second = (b"".join(f"{n},\r\n".encode() for n in numbers[skip:]) for skip in (0, 3))
    with MeshDriver(mesh.config(), work_dir) as driver:
        driver.send()
        ids = []
        for body in (first, second):
            with mesh.client(NDOP_MAILBOX) as ndop_client:
                ids.append(ndop_client.send_message(OUR_MAILBOX, body, workflow_id="SPINE_NTT_UPHOLDING",
                                                    local_id=record["local_id"], subject=record["subject"]))
            driver.poll()
        assert work_dir.load(rid)["second_replies"][0]["message_id"] == ids[1]

        def crash(point: str) -> None:
            if point == "after-resolve-acknowledge":
                raise SystemExit("killed")

        driver.fault_hook = crash
        with pytest.raises(SystemExit):
            driver.resolve_second_reply(rid, "second")
        stopped = work_dir.load(rid)
        assert stopped["reply_message_id"] == ids[0] and stopped["second_replies"] and mesh.inbox() == [ids[1]]
        assert (work_dir.request_dir(rid) / "reply.dat").read_bytes() == first
        driver.fault_hook = None
        resolved, decision = driver.resolve_second_reply(rid, "second")
    assert resolved["reply_message_id"] == ids[1] and resolved["second_replies"] == [] and decision.use == "second"
    assert resolved["reply_lines"] == len(numbers) - 3
    assert resolved["reply_sha256"] == hashlib.sha256(second).hexdigest()
    assert (work_dir.request_dir(rid) / "reply.dat").read_bytes() == second
    assert not list(work_dir.request_dir(rid).glob(".reply.dat*"))  # no side file left
    assert mesh.inbox() == [ids[1]]  # acknowledged only once its Consents are stored
