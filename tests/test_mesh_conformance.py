"""The MESH API's rules for a client, as a checklist against the real mesh-sandbox (docs/mesh-conformance.md lists each
rule, where the code keeps it, and its test: those not here live in tests/test_mesh_driver.py, tests/test_numbers.py
and tests/test_run_crash.py)."""
from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest
import requests

from dev.mesh_sandbox import NDOP_MAILBOX
from pipeline.core import nhs
from pipeline.mesh.config import MIN_POLL_INTERVAL
from pipeline.mesh.driver import MeshDriver
from pipeline.mesh.poller import REPLY_FILE
from pipeline.mesh.transport import workflow_filter
from pipeline.request.build import RequestSettings, build_request
from pipeline.lifecycle.state import ACCEPTED, FAILED, REPLIED, WorkDir
from tests.fixtures.mesh import OUR_MAILBOX, Mesh
from tests.fixtures.mesh_proxy import MeshFaultProxy
from tests.helpers import cli

INBOX = f"/messageexchange/{OUR_MAILBOX}/inbox"
HANDSHAKE = f"/messageexchange/{OUR_MAILBOX}"


class StopPolling(Exception):
    """Raised by a test's sleep to end ``poll(wait=...)`` after a number of cycles."""


def make_request(work_dir: WorkDir, tmp_path: Path, count: int = 20, seed: int = 3) -> dict:
    cohort = tmp_path / f"cohort-{seed}.txt"
    cohort.write_text("\n".join(nhs.synthetic_numbers(count, seed=seed).to_pylist()) + "\n")
    return build_request(cohort, work_dir, RequestSettings(mailbox=OUR_MAILBOX))


def sleeps_until(cycles: int, mesh: Mesh, seen: list[tuple[float, int]]):
    """A ``sleep`` for ``poll``: records (seconds asked, inbox listings so far), stops after ``cycles`` sleeps."""
    def sleep(seconds: float) -> None:
        seen.append((seconds, len(mesh.requests_to("GET", INBOX))))
        if len(seen) >= cycles:
            raise StopPolling
        time.sleep(0.05)
    return sleep


def test_poll_lists_the_inbox_once_a_cycle_five_minutes_apart_and_handshakes_once(
        mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    mesh.plugin(mode="notice-only")  # NDOP accepts and never replies: the request stays in flight
    record = make_request(work_dir, tmp_path)
    seen: list[tuple[float, int]] = []
    with MeshDriver(mesh.config(), work_dir) as driver:
        driver.send()
        with pytest.raises(StopPolling):
            driver.poll(wait=7 * 86_400, sleep=sleeps_until(3, mesh, seen))  # the default interval
    assert work_dir.load(record["request_id"])["state"] == ACCEPTED
    assert [seconds for seconds, _ in seen] == [MIN_POLL_INTERVAL] * 3  # never sooner than 5 minutes
    assert [listings for _, listings in seen] == [1, 2, 3]  # one listing a cycle (one filter, not one per workflow)
    assert len(mesh.requests_to("POST", HANDSHAKE)) == 1  # one handshake for the send and every poll cycle


def test_a_full_page_acted_on_is_listed_again_at_once(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    mesh.plugin(mode="notice-only")
    failing, waiting = make_request(work_dir, tmp_path, seed=4), make_request(work_dir, tmp_path, seed=5)
    with MeshDriver(mesh.config(), work_dir) as driver:
        driver.send()
        for _ in range(505):  # more than a page of messages we act on: MESH REPORTs about one of our requests
            mesh.sandbox.inject_report(OUR_MAILBOX, "14", "undelivered", "SPINE_NTT_UPHOLDING",
                                       local_id=failing["local_id"])
        mesh.sandbox.clear_request_log()
        seen: list[tuple[float, int]] = []
        with pytest.raises(StopPolling):
            driver.poll(wait=7 * 86_400, interval=MIN_POLL_INTERVAL, sleep=sleeps_until(1, mesh, seen))
    assert work_dir.load(failing["request_id"])["state"] == FAILED
    assert work_dir.load(waiting["request_id"])["state"] == ACCEPTED
    # First cycle: two pages (507 ids) acted on, so no sleep; the second cycle's one page; then the 5-minute wait.
    assert seen == [(MIN_POLL_INTERVAL, 3)]
    assert mesh.inbox() == []  # every report acknowledged, once


def test_one_workflow_filter_covers_every_workflow_id() -> None:
    assert workflow_filter(("SPINE_NTT_UPHOLDING", "SPINE_NTT_UPHOLDING_RESPONSE")) == "SPINE_NTT_UPHOLDING*"
    assert workflow_filter(("SPINE_NTT_UPHOLDING",)) == "SPINE_NTT_UPHOLDING"
    assert workflow_filter(("ALPHA", "BETA")) is None  # no common prefix: the whole inbox, left alone by workflow


def test_chunked_send_and_a_chunked_compressed_reply(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    mesh.plugin(mode="silent")  # NDOP's answer is played by hand, chunked and gzipped
    record = make_request(work_dir, tmp_path, count=3_000)
    dat = (work_dir.request_dir(record["request_id"]) / record["files"]["dat"]).read_bytes()
    with MeshDriver(mesh.config(), work_dir, max_chunk_size=10_000) as driver:
        driver.send()
    with mesh.client(NDOP_MAILBOX) as ndop_client:
        [message_id] = ndop_client.list_messages()
        with ndop_client.retrieve_message(message_id) as message:
            assert message.mex_header("chunk-range") == "1:4" and message.read() == dat  # 36,000 bytes in 4 chunks
        reply = b"".join(line + b"\r\n" for line in dat.splitlines()[100:])
        ndop_client.send_message(OUR_MAILBOX, reply, max_chunk_size=8_000, compress=True,
                                 workflow_id="SPINE_NTT_UPHOLDING", local_id=record["local_id"],
                                 subject=record["subject"])
    with MeshDriver(mesh.config(), work_dir) as driver:
        driver.poll()
    replied = work_dir.load(record["request_id"])
    assert replied["state"] == REPLIED and replied["reply_lines"] == 2_900
    assert (work_dir.request_dir(record["request_id"]) / REPLY_FILE).read_bytes() == reply


def test_no_patient_data_in_local_id_subject_or_file_name(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    mesh.plugin(mode="silent")
    record = make_request(work_dir, tmp_path, count=50, seed=6)
    with MeshDriver(mesh.config(), work_dir) as driver:
        driver.send()
    with mesh.client(NDOP_MAILBOX) as ndop_client:
        [message_id] = ndop_client.list_messages()
        with ndop_client.retrieve_message(message_id) as message:
            sent = {name: message.mex_header(name) or "" for name in ("localid", "subject", "filename")}
    assert sent == {"localid": record["local_id"], "subject": record["subject"], "filename": record["files"]["dat"]}
    for value in sent.values():
        assert not re.search(r"\d{10}", value) and ":" not in value


def test_one_request_per_auth_token(mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    tokens: list[str] = []

    def remember(response: requests.Response, *args, **kwargs) -> None:
        tokens.append(response.request.headers.get("Authorization", ""))

    record = make_request(work_dir, tmp_path, seed=7)
    with MeshDriver(mesh.config(), work_dir) as driver:
        driver.client._session.hooks["response"].append(remember)  # every request the real client makes
        driver.send()
        driver.poll(wait=20, interval=0.2)
    assert work_dir.load(record["request_id"])["state"] == REPLIED
    assert len(tokens) >= 4 and all(tokens) and len(set(tokens)) == len(tokens)  # never a token twice


def test_a_mesh_that_accepts_and_never_answers_fails_the_poll_quickly(work_dir: WorkDir, tmp_path: Path) -> None:
    """Issue 19 item 6: mesh-client's own timeout is 10 minutes a try; ours (NDOP_MESH_TIMEOUT, 15 s, 1 s here)
    makes a silent MESH fail the step in about a minute at most, with one line and exit 1."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts connections (the kernel completes the handshake), never reads or answers
    try:
        env = {"MESH_URL": f"http://127.0.0.1:{silent.getsockname()[1]}", "MESH_MAILBOX": OUR_MAILBOX,
               "MESH_PASSWORD": "password", "NDOP_MESH_TIMEOUT": "1"}
        started = time.monotonic()
        done = cli("poll", "--work-dir", str(work_dir.root), env=env, timeout=120)
        took = time.monotonic() - started
    finally:
        silent.close()
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]  # before it: urllib3's retry warnings, read timeout=1.0 each
    assert last.startswith("ndop poll: error: MESH handshake failed: cannot talk to http://127.0.0.1:"), last
    assert "read timeout=1.0" in done.stderr
    assert took < 30, took


def test_a_message_mesh_cannot_serve_or_cut_short_is_skipped_and_never_blocks_our_reply(
        mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    """Issue 19 items 2 and 6, through a fault-injecting proxy in front of the real sandbox: another request's
    message that MESH answers 500 for is skipped and counted on every cycle; our reply, cut short once (fewer bytes
    than its Content-Length, which mesh-client's own reader takes as the end), is not saved, and the next cycle
    downloads it whole."""
    mesh.plugin(mode="silent")
    record = make_request(work_dir, tmp_path, count=40, seed=8)
    with MeshDriver(mesh.config(), work_dir) as driver:
        driver.send()
    dat = (work_dir.request_dir(record["request_id"]) / record["files"]["dat"]).read_bytes()
    reply = b"".join(line + b"\r\n" for line in dat.splitlines()[3:])
    with mesh.client(NDOP_MAILBOX) as ndop_client:
        stray = ndop_client.send_message(OUR_MAILBOX, b"x" * 2000, workflow_id="SPINE_NTT_UPHOLDING",
                                         local_id="NDOP-SOMEONE-ELSES", subject="x")
        ours = ndop_client.send_message(OUR_MAILBOX, reply, workflow_id="SPINE_NTT_UPHOLDING",
                                        local_id=record["local_id"], subject=record["subject"])
    with MeshFaultProxy(mesh.url) as proxy:
        proxy.faults = {stray: "500", ours: "cut"}
        proxy.times = {ours: 1}
        with MeshDriver(mesh.config(url=proxy.url), work_dir) as driver:
            first = driver.poll()  # one cycle: both skipped
            assert set(first.unreadable) == {stray, ours} and "HTTP 500" in first.unreadable[stray]
            assert "could not be read whole" in first.unreadable[ours]
            assert work_dir.load(record["request_id"])["state"] == "sent"
            assert not (work_dir.request_dir(record["request_id"]) / REPLY_FILE).exists()
            second = driver.poll()
    assert set(second.unreadable) == {stray} and second.replies == [record["request_id"]]
    assert (work_dir.request_dir(record["request_id"]) / REPLY_FILE).read_bytes() == reply  # whole, not the half
    assert work_dir.load(record["request_id"])["reply_lines"] == 37
    assert sorted(mesh.inbox()) == sorted([stray, ours])  # nothing acknowledged: ours waits for its Consents
