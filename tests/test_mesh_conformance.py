"""The MESH API's rules for a client, as a checklist against the real mesh-sandbox (docs/mesh-conformance.md lists each
rule, where the code keeps it, and its test: those not here live in tests/test_mesh_driver.py, tests/test_numbers.py
and tests/test_run_crash.py)."""
from __future__ import annotations

import gzip
import hashlib
import re
import socket
import time
import zlib
from pathlib import Path

import pytest
import requests

from dev.mesh_sandbox import NDOP_MAILBOX
from pipeline.core import nhs
from pipeline.mesh.config import MIN_POLL_INTERVAL
from pipeline.mesh.driver import MeshDriver
from pipeline.mesh.poller import REPLY_FILE
from pipeline.mesh.transport import GzipStreams, UnreadableMessage, content_check, workflow_filter
from pipeline.request.build import RequestSettings, build_request
from pipeline.lifecycle.state import ACCEPTED, FAILED, REPLIED, WorkDir
from tests.fixtures.mesh import OUR_MAILBOX, Mesh
from tests.fixtures.mesh_proxy import MeshFaultProxy, gzip_cut_at_line
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


def answered_by_hand(mesh: Mesh, work_dir: WorkDir, tmp_path: Path, seed: int, count: int = 400,
                     max_chunk_size: int | None = None, md5: bool = False) -> tuple[dict, bytes, str]:
    """A request sent to a silent NDOP and its reply sent by hand from the NDOP mailbox, in chunks of
    ``max_chunk_size``, with the reply's MD5 as ``mex-content-checksum`` when ``md5``: (record, reply, its id)."""
    mesh.plugin(mode="silent")
    record = make_request(work_dir, tmp_path, count=count, seed=seed)
    with MeshDriver(mesh.config(), work_dir) as driver:
        driver.send()
    dat = (work_dir.request_dir(record["request_id"]) / record["files"]["dat"]).read_bytes()
    reply = b"".join(line + b"\r\n" for line in dat.splitlines()[7:])
    with mesh.client(NDOP_MAILBOX) as ndop_client:
        message_id = ndop_client.send_message(OUR_MAILBOX, reply, workflow_id="SPINE_NTT_UPHOLDING",
                                              local_id=record["local_id"], subject=record["subject"],
                                              max_chunk_size=max_chunk_size,
                                              **({"checksum": hashlib.md5(reply).hexdigest()} if md5 else {}))
    return record, reply, message_id


def poll_through(proxy: MeshFaultProxy, mesh: Mesh, work_dir: WorkDir):
    return cli("poll", "--work-dir", str(work_dir.root), env={**mesh.env(), "MESH_URL": proxy.url})


@pytest.mark.parametrize("fault, chunk_size", [("gzip-cut", None), ("split-gzip-cut", 1_500)])
def test_a_gzip_reply_cut_at_a_line_break_is_never_saved_or_acknowledged_and_is_downloaded_again(
        mesh: Mesh, work_dir: WorkDir, tmp_path: Path, fault: str, chunk_size: int | None) -> None:
    """Issue 19 follow-up, through the proxy in front of the real sandbox and the real ``ndop poll``: the reply's
    gzip stream cut at a line break, so what decodes is whole lines and nothing on the wire tells (``gzip-cut``: no
    Content-Length, chunked transfer ended cleanly; ``split-gzip-cut``: one stream split across the MESH chunks,
    each with its right Content-Length). Only the stream's missing end does: the cut reply is not saved, not
    acknowledged, and the next poll downloads it whole."""
    record, reply, ours = answered_by_hand(mesh, work_dir, tmp_path, seed=11, max_chunk_size=chunk_size)
    reply_file = work_dir.request_dir(record["request_id"]) / REPLY_FILE
    with MeshFaultProxy(mesh.url) as proxy:
        proxy.faults, proxy.times = {ours: fault}, {ours: 1}
        first = poll_through(proxy, mesh, work_dir)
        assert first.returncode == 0, first.stderr
        assert "0 reply(ies)" in first.stdout and "1 unreadable skipped" in first.stdout, first.stdout
        [line] = [line for line in first.stderr.splitlines() if ours in line]  # one line says why
        assert f"MESH message {ours} skipped (not saved, not acknowledged" in line, first.stderr
        assert "gzip stream ends early" in line, line
        assert work_dir.load(record["request_id"])["state"] == "sent" and not reply_file.exists()
        assert mesh.inbox() == [ours]  # not acknowledged
        second = poll_through(proxy, mesh, work_dir)
    assert proxy.served == {ours: 1}  # the second download went through untouched
    assert second.returncode == 0 and "1 reply(ies)" in second.stdout, second.stdout + second.stderr
    assert reply_file.read_bytes() == reply  # whole, not the lines before the cut
    saved = work_dir.load(record["request_id"])
    assert saved["state"] == REPLIED and saved["reply_lines"] == 393
    assert mesh.inbox() == [ours]  # acknowledged only once its Consents are stored


def test_one_gzip_stream_split_across_mesh_chunks_is_read_whole(mesh: Mesh, work_dir: WorkDir,
                                                                 tmp_path: Path) -> None:
    """A sender that compresses the whole file and then chunks it (each chunk a piece of one gzip stream): read as
    one stream across the chunks (mesh-client's reader, and this tool's before, read a gzip stream per chunk and
    never decoded it)."""
    record, reply, ours = answered_by_hand(mesh, work_dir, tmp_path, seed=12, max_chunk_size=1_500)
    with mesh.client() as client, client.retrieve_message_chunk(ours, 1) as first_chunk:
        assert first_chunk.headers["Mex-Chunk-Range"] == "1:4"  # the sandbox serves a message in chunks
    with MeshFaultProxy(mesh.url) as proxy:
        proxy.faults = {ours: "split-gzip"}
        done = poll_through(proxy, mesh, work_dir)
    assert done.returncode == 0 and "1 reply(ies)" in done.stdout, done.stdout + done.stderr
    assert proxy.served == {ours: 1}
    assert (work_dir.request_dir(record["request_id"]) / REPLY_FILE).read_bytes() == reply


def test_a_reply_whose_content_does_not_match_its_checksum_is_never_saved_or_acknowledged(
        mesh: Mesh, work_dir: WorkDir, tmp_path: Path) -> None:
    """``mex-content-checksum`` (optional, set by the sender): the sender sets the reply's MD5 (as the MESH client's
    ``DataChecksum``); the proxy first swaps in a wrong SHA-256. The download is not saved or acknowledged, one
    line says why, and the next poll (the sandbox's own header, right) saves it."""
    record, reply, ours = answered_by_hand(mesh, work_dir, tmp_path, seed=13, count=60, md5=True)
    wrong = hashlib.sha256(reply + b"9990000018,\r\n").hexdigest()
    with MeshFaultProxy(mesh.url) as proxy:
        proxy.headers = {ours: {"Mex-Content-Checksum": f"sha256:{wrong}"}}
        first = poll_through(proxy, mesh, work_dir)
        assert first.returncode == 0 and "1 unreadable skipped" in first.stdout, first.stdout + first.stderr
        [line] = [line for line in first.stderr.splitlines() if ours in line]
        assert "does not match its mex-content-checksum (sha256" in line, first.stderr
        assert work_dir.load(record["request_id"])["state"] == "sent"
        assert not (work_dir.request_dir(record["request_id"]) / REPLY_FILE).exists()
        assert mesh.inbox() == [ours]
        proxy.headers = {}
        second = poll_through(proxy, mesh, work_dir)
    assert second.returncode == 0 and "1 reply(ies)" in second.stdout, second.stdout + second.stderr
    assert (work_dir.request_dir(record["request_id"]) / REPLY_FILE).read_bytes() == reply
    assert mesh.inbox() == [ours]


def test_what_a_content_checksum_header_asks_for() -> None:
    body = b"9990000018,\r\n"
    assert content_check(None) is None and content_check("  ") is None  # absent: read as today
    for header, algorithm in [(hashlib.md5(body).hexdigest(), "md5"), (hashlib.sha1(body).hexdigest(), "sha1"),
                              (f"sha256:{hashlib.sha256(body).hexdigest()}", "sha256"),
                              (f"SHA-256 - {hashlib.sha256(body).hexdigest().upper()}", "sha256"),
                              (f"sha512/{hashlib.sha512(body).hexdigest()}", "sha512")]:
        check = content_check(header)
        assert check is not None and check.algorithm == algorithm, header
        check.update(body[:4])
        check.update(body[4:])
        check.verify()  # matches
        wrong = content_check(header)
        assert wrong is not None
        wrong.update(body + b"x")
        with pytest.raises(UnreadableMessage, match="does not match its mex-content-checksum"):
            wrong.verify()
    for unknown in ("crc32:1234abcd", "sha256:" + "ab" * 16, "a note, not a digest", "abc"):
        assert content_check(unknown) is None, unknown  # cannot be checked: logged, read as if absent


def test_gzip_streams_split_anywhere_decode_and_a_cut_one_is_never_complete() -> None:
    plain = b"".join(b"%010d,\r\n" % n for n in range(2_000))
    one = gzip.compress(plain)
    per_chunk = gzip.compress(plain[:7_000]) + gzip.compress(plain[7_000:])  # mesh-client's way: a stream a chunk
    for stream in (one, per_chunk):
        for size in (1, 7, 1_000, len(stream)):  # pieces splitting the stream anywhere, headers and trailers too
            reader = GzipStreams()
            decoded = b"".join(reader.feed(stream[i:i + size]) for i in range(0, len(stream), size))
            assert decoded == plain and reader.complete, size
    cut = GzipStreams()
    assert cut.feed(gzip_cut_at_line(plain)) == plain[:plain.rfind(b"\n", 0, len(plain) // 2) + 1]
    assert not cut.complete  # whole lines, and still not the whole message
    assert not GzipStreams().complete  # no stream at all is not an (empty) message either
    damaged = bytearray(one)
    damaged[-6] ^= 0xFF  # the trailer's CRC-32
    with pytest.raises(zlib.error):
        GzipStreams().feed(bytes(damaged))
