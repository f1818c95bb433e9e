"""The MESH driver: send a request to NDOP, poll the inbox for what comes back, acknowledge safely.

MESH rules this module keeps (NDOP.md): never retry the first ``POST .../outbox`` blindly (it can
duplicate the message); page the inbox past 500 ids; acknowledge a message only once what it
carried is durably stored. The reply ``.dat`` is therefore *not* acknowledged by :meth:`poll`:
the process step calls :meth:`MeshDriver.acknowledge` after the Consents are written.

Crash safety: every state change is one atomic rewrite of ``request.json``. Before the outbox POST
a ``sending`` marker is written; a record found later with the marker but no message id was
interrupted mid-send and becomes ``send-unknown`` (the message may or may not be in MESH). MESH
API v2 has no look-up by local id, so such a request is matched by local id when its notice or
reply arrives, and re-sent (same local id) only after ``resend_after`` with neither.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import requests
from mesh_client import DEP_ENDPOINT, INT_ENDPOINT, LIVE_ENDPOINT, MeshClient
from mesh_client.io_helpers import SplitStream
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from pipeline import datfile, nhs
from pipeline.faults import FAULT_ENV, fault_point  # noqa: F401 (FAULT_ENV re-exported for tests)
from pipeline.errors import InputError, NdopError
from pipeline.files import atomic_writer
from pipeline.mesh_config import DEFAULT_OVERDUE_AFTER, MeshConfig
from pipeline.state import (
    ACCEPTED,
    ACKNOWLEDGED,
    CREATED,
    FAILED,
    IN_FLIGHT,
    PROCESSED,
    REJECTED,
    REPLIED,
    SEND_UNKNOWN,
    SENT,
    WorkDir,
    isoformat,
    parse_time,
    utcnow,
)

_LOGGER = logging.getLogger(__name__)

REPLY_FILE = "reply.dat"
NOTICE_SUBJECT = "SUCCESS"
OPEN = (CREATED, SENT, SEND_UNKNOWN, ACCEPTED)  # a notice, reply or report may still come
_NOTICE_MAX_BYTES = 64 * 1024
_READ_BLOCK = 1 << 20
_ENDPOINTS = {"int": INT_ENDPOINT, "live": LIVE_ENDPOINT, "dep": DEP_ENDPOINT}


@dataclass
class SendResult:
    request_id: str
    outcome: str  # sent | resent | skipped | waiting | send-unknown | error
    detail: str = ""
    message_id: str | None = None

    @property
    def is_problem(self) -> bool:
        return self.outcome in ("send-unknown", "error")


@dataclass
class PollReport:
    listed: int = 0
    notices: list[str] = field(default_factory=list)  # request ids
    replies: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (request id, reason)
    failed: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)  # message ids acknowledged and ignored
    awaiting_processing: set[str] = field(default_factory=set)  # request ids
    unknown_local_id: set[str] = field(default_factory=set)  # message ids left alone
    other_workflow: int = 0
    in_flight: list[str] = field(default_factory=list)
    timed_out: bool = False

    @property
    def problems(self) -> list[tuple[str, str]]:
        return self.rejected + self.failed


@dataclass
class StatusRow:
    request_id: str
    state: str
    sent: int | None
    replied: int | None
    age: timedelta
    since: timedelta  # in this state for
    overdue: bool
    note: str = ""


class MeshDriver:
    """One mailbox's conversation with NDOP, recorded in the work dir's ``request.json`` files."""

    def __init__(
        self,
        config: MeshConfig,
        work_dir: WorkDir,
        client_factory: Callable[[MeshConfig], MeshClient] | None = None,
        max_chunk_size: int = 75 * 1024 * 1024,
    ) -> None:
        self.config = config
        self.work_dir = work_dir
        self._client_factory = client_factory or make_client
        self.max_chunk_size = max_chunk_size
        self._client: MeshClient | None = None
        self._handshake_at: float | None = None
        self.fault_hook: Callable[[str], None] | None = None  # tests: raise at a named point

    # -- connection -------------------------------------------------------------------------------

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> "MeshDriver":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client(self) -> MeshClient:
        if self._client is None:
            self._client = self._client_factory(self.config)
        return self._client

    def handshake(self) -> None:
        """Authenticate (MESH asks for one a day): a wrong key or password fails here, clearly."""
        with _mesh_errors(self.config, "handshake"):
            self.client.handshake()
        self._handshake_at = time.monotonic()
        _LOGGER.debug("handshake with %s as %s ok", _where(self.config), self.config.mailbox)

    def _hook(self, point: str) -> None:
        if self.fault_hook is not None:
            self.fault_hook(point)
        fault_point(point)

    # -- send ---------------------------------------------------------------------------------------

    def send(self, request_id: str | None = None, now: datetime | None = None) -> list[SendResult]:
        """Send one request (or every request due) to NDOP; never twice unless provably lost."""
        results: list[SendResult] = []
        with self.work_dir.lock():
            self._settle_interrupted_sends()
            records = [self.work_dir.load(request_id)] if request_id else self.work_dir.all()
            due_resend = [r for r in records if r["state"] == SEND_UNKNOWN and self._resend_due(r, now)]
            if due_resend:
                # What we know of the inbox decides a resend: look once more before sending again.
                self.handshake()
                self._poll_once(PollReport(), set())
                records = [self.work_dir.load(r["request_id"]) for r in records]
            for record in records:
                results.append(self._send_one(record, now, explicit=request_id is not None))
        return results

    def _resend_due(self, record: dict[str, Any], now: datetime | None) -> bool:
        since = record.get("send_unknown_since") or record.get("sent_at") or record["created_at"]
        return (now or utcnow()) - parse_time(since) >= self.config.resend_after

    def _send_one(self, record: dict[str, Any], now: datetime | None, explicit: bool) -> SendResult:
        rid, state = record["request_id"], record["state"]
        if state == SEND_UNKNOWN:
            if not self._resend_due(record, now):
                since = parse_time(record.get("send_unknown_since") or record["created_at"])
                return SendResult(rid, "waiting", f"outcome of the last send unknown; `ndop poll` matches its reply "
                                  f"by local id; re-sent after {isoformat(since + self.config.resend_after)} if "
                                  f"neither notice nor reply has come")
            return self._post(record, resend=True)
        if state != CREATED:
            if explicit:
                return SendResult(rid, "skipped", f"already {state} (message {record.get('message_id')}); nothing to do",
                                  record.get("message_id"))
            return SendResult(rid, "skipped", f"already {state}")
        return self._post(record, resend=False)

    def _post(self, record: dict[str, Any], resend: bool) -> SendResult:
        rid = record["request_id"]
        folder = self.work_dir.request_dir(rid)
        dat = folder / record["files"]["dat"]
        _check_dat(dat, record)
        if record.get("ndop_mailbox", "").upper() != self.config.ndop_mailbox.upper():
            _LOGGER.warning("request %s was built for NDOP mailbox %s; sending there (config says %s)",
                            rid, record.get("ndop_mailbox"), self.config.ndop_mailbox)
        recipient = record.get("ndop_mailbox") or self.config.ndop_mailbox
        attempt = int(record.get("send_attempts", 0)) + 1
        headers = {"workflow_id": record["workflow_id"], "subject": record["subject"],
                   "local_id": record["local_id"], "filename": record["files"]["dat"]}
        if self._handshake_at is None:
            self.handshake()
        self.work_dir.update(rid, sending={"at": isoformat(utcnow()), "attempt": attempt})
        try:
            message_id = self._post_file(recipient, dat, headers)
        except _NotSent as err:
            self.work_dir.update(rid, sending=None, last_send_error=str(err))
            return SendResult(rid, "error", f"not sent: {err}")
        except _MaybeSent as err:
            self.work_dir.update(rid, state=SEND_UNKNOWN, sending=None, send_attempts=attempt,
                                 send_unknown_since=isoformat(utcnow()), last_send_error=str(err))
            return SendResult(rid, "send-unknown", f"the send failed after the request may have reached MESH ({err}); "
                              f"`ndop poll` completes it if it did; otherwise it is re-sent, same local id, after "
                              f"{_hours(self.config.resend_after)}")
        sent_at = isoformat(utcnow())
        history = list(record.get("messages_sent", [])) + [{"message_id": message_id, "at": sent_at}]
        fields: dict[str, Any] = {"message_id": message_id, "sent_at": sent_at, "send_attempts": attempt,
                                  "messages_sent": history, "sending": None, "last_send_error": None}
        record = self.work_dir.update(rid, state=SENT, **fields)
        _LOGGER.info("request %s sent to %s as message %s (local id %s)", rid, recipient, message_id, record["local_id"])
        result = SendResult(rid, "resent" if resend else "sent", f"message {message_id} to {recipient}", message_id)
        if self.config.send_ctl and not record.get("ctl_message_id"):
            result.detail += self._send_ctl(record, recipient, headers)
        return result

    def _send_ctl(self, record: dict[str, Any], recipient: str, headers: dict[str, str]) -> str:
        """The ``.ctl`` as a message of its own (some integrations expect it); never retried blindly."""
        rid = record["request_id"]
        ctl = self.work_dir.request_dir(rid) / record["files"]["ctl"]
        self.work_dir.update(rid, ctl_sending=isoformat(utcnow()))
        try:
            ctl_id = self._post_file(recipient, ctl, {**headers, "filename": record["files"]["ctl"]})
        except (_NotSent, _MaybeSent) as err:
            self.work_dir.update(rid, ctl_send_error=str(err))
            _LOGGER.warning("request %s: the .ctl message failed (%s); the .dat was sent", rid, err)
            return f"; .ctl not sent: {err}"
        self.work_dir.update(rid, ctl_message_id=ctl_id, ctl_sending=None)
        return f"; .ctl as message {ctl_id}"

    def _post_file(self, recipient: str, path: Path, headers: dict[str, str]) -> str:
        """mesh-client's ``send_message``, chunk by chunk, telling a lost first POST from a refused one.

        mesh-client never retries the first POST (it could duplicate the message); later chunks it
        retries. A first POST that MESH answered with 4xx created nothing (:class:`_NotSent`); one
        that never connected neither; anything else (timeout, reset, 5xx) may have (:class:`_MaybeSent`).
        """
        client = self.client
        with open(path, "rb") as handle:
            chunks = SplitStream(handle, self.max_chunk_size)
            total = len(chunks)
            parts = iter(chunks)
            try:
                response = client.send_chunk(recipient=recipient, chunk=next(parts), chunk_num=1,
                                             total_chunks=total, **headers)
                self._hook("after-outbox-post")  # tests: the answer is lost, or we crash, right here
            except (requests.ConnectTimeout, requests.ConnectionError) as err:
                if _never_connected(err):
                    raise _NotSent(f"cannot connect to MESH at {_where(self.config)}") from err
                raise _MaybeSent(f"connection lost: {type(err).__name__}") from err
            except requests.RequestException as err:
                raise _MaybeSent(f"{type(err).__name__}: {err}") from err
            if 400 <= response.status_code < 500:
                raise _NotSent(f"MESH refused the message: HTTP {response.status_code} {_error_text(response)}")
            try:
                message_id = response.json()["message_id"]
            except (ValueError, KeyError, TypeError) as err:
                raise _MaybeSent(f"unexpected answer to the outbox POST: HTTP {response.status_code}") from err
            for number, chunk in enumerate(parts, start=2):
                try:
                    client.send_chunk(recipient=recipient, chunk=chunk, chunk_num=number, total_chunks=total,
                                      message_id=message_id)
                except requests.RequestException as err:
                    # The message exists but is incomplete: MESH never delivers it, so sending anew is safe.
                    raise _NotSent(f"chunk {number}/{total} of message {message_id} failed: {err}") from err
        return message_id

    def _settle_interrupted_sends(self) -> None:
        """A ``sending`` marker without a result means a crash mid-POST: the outcome is unknown."""
        for record in self.work_dir.in_state(CREATED):
            marker = record.get("sending")
            if marker:
                _LOGGER.warning("request %s: an earlier send was interrupted; its outcome is unknown", record["request_id"])
                self.work_dir.update(record["request_id"], state=SEND_UNKNOWN, sending=None,
                                     send_attempts=marker.get("attempt", 1), send_unknown_since=marker["at"],
                                     last_send_error="interrupted during send")

    # -- poll ---------------------------------------------------------------------------------------

    def poll(self, wait: float = 0, interval: float = 30, sleep: Callable[[float], None] = time.sleep) -> PollReport:
        """Bring every request up to date with the inbox; with ``wait``, until none is in flight."""
        deadline = time.monotonic() + max(wait, 0)
        report = PollReport()
        left_alone: set[str] = set()
        self.handshake()
        while True:
            with self.work_dir.lock():
                self._settle_interrupted_sends()
                if self._handshake_at is None or time.monotonic() - self._handshake_at > 3600:
                    self.handshake()
                self._poll_once(report, left_alone)
                report.in_flight = [r["request_id"] for r in self.work_dir.in_state(*IN_FLIGHT)]
            if not wait or not report.in_flight:
                return report
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                report.timed_out = True
                return report
            sleep(min(max(interval, 0.05), remaining))

    def _list_ids(self) -> tuple[list[str], int]:
        """Our workflows' message ids (every page), and how many others are in the inbox."""
        ours: dict[str, None] = {}
        with _mesh_errors(self.config, "list inbox"):
            for workflow in self.config.workflow_ids:
                for message_id in self.client.iterate_message_ids(workflow_filter=workflow):
                    ours[message_id] = None
            everything = sum(1 for _ in self.client.iterate_message_ids())
        return list(ours), max(everything - len(ours), 0)

    def _poll_once(self, report: PollReport, left_alone: set[str]) -> None:
        ids, others = self._list_ids()
        report.listed = len(ids)
        report.other_workflow = others
        records = self.work_dir.all()
        by_local = {r["local_id"]: r["request_id"] for r in records if r.get("local_id")}
        by_message = {m["message_id"]: r["request_id"] for r in records for m in r.get("messages_sent", [])}
        for message_id in ids:
            if message_id in left_alone:
                continue
            with _mesh_errors(self.config, f"download message {message_id}"):
                message = self.client.retrieve_message(message_id)
            try:
                kept = self._handle(message, by_local, by_message, report)
            finally:
                message.close()
            if kept:
                left_alone.add(message_id)

    def _handle(self, message: Any, by_local: dict[str, str], by_message: dict[str, str], report: PollReport) -> bool:
        """Deal with one inbox message; True when it stays in the inbox untouched."""
        message_id = message.id()
        local_id = message.local_id or ""
        is_report = (message.message_type or "").upper() == "REPORT"
        rid = by_local.get(local_id)
        if rid is None and is_report:
            rid = by_message.get(message.mex_header("linkedmsgid") or "")
        if rid is None:
            _LOGGER.info("message %s (local id %r, workflow %s) matches no request here; left in the inbox",
                         message_id, local_id, message.workflow_id)
            report.unknown_local_id.add(message_id)
            return True
        record = self.work_dir.load(rid)
        if is_report:
            return self._on_report(message, record, report)
        sender = (message.sender or "").upper()
        if sender and sender != (record.get("ndop_mailbox") or self.config.ndop_mailbox).upper():
            _LOGGER.warning("message %s for request %s comes from %s, not the NDOP mailbox; left in the inbox",
                            message_id, rid, sender)
            report.unknown_local_id.add(message_id)
            return True
        if (message.subject or "").strip().upper() == NOTICE_SUBJECT:
            return self._on_notice(message, record, report)
        return self._on_data(message, record, report)

    def _ack(self, message_id: str) -> None:
        with _mesh_errors(self.config, f"acknowledge message {message_id}", gone_ok=True):
            self.client.acknowledge_message(message_id)

    def _on_report(self, message: Any, record: dict[str, Any], report: PollReport) -> bool:
        rid, message_id = record["request_id"], message.id()
        code = message.mex_header("statuscode") or ""
        description = message.mex_header("statusdescription") or ""
        linked = message.mex_header("linkedmsgid") or None
        current = record.get("message_id")
        if record["state"] in OPEN and not (linked and current and linked != current):
            reason = f"MESH report {code}: {description}".strip()
            self.work_dir.update(rid, state=FAILED, failure={
                "message_id": message_id, "code": code, "description": description, "linked_message_id": linked,
                "at": isoformat(utcnow())})
            report.failed.append((rid, reason))
            _LOGGER.error("request %s failed: %s", rid, reason)
        else:
            _LOGGER.info("request %s (%s): MESH report %s %s about message %s; acknowledged and ignored",
                         rid, record["state"], code, description, linked)
            report.duplicates.append(message_id)
        self._ack(message_id)
        return False

    def _on_notice(self, message: Any, record: dict[str, Any], report: PollReport) -> bool:
        rid, message_id = record["request_id"], message.id()
        body = message.read(_NOTICE_MAX_BYTES)
        try:
            notice: Any = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            notice = {"text": body[:200].decode("utf-8", "replace")}
        if record["state"] in OPEN:
            self.work_dir.update(rid, state=ACCEPTED, notice={
                "message_id": message_id, "received_at": isoformat(utcnow()),
                "at": _mesh_time(message) or isoformat(utcnow()), "body": notice})
            report.notices.append(rid)
            _LOGGER.info("request %s accepted by NDOP (job created notice %s)", rid, message_id)
        else:
            report.duplicates.append(message_id)
        self._ack(message_id)
        return False

    def _on_data(self, message: Any, record: dict[str, Any], report: PollReport) -> bool:
        rid, message_id = record["request_id"], message.id()
        if record.get("reply_message_id") == message_id:
            if record["state"] in (PROCESSED, ACKNOWLEDGED):
                # Processed but not yet acknowledged (or the ack's state write was lost): safe to ack now.
                self._ack(message_id)
                if record["state"] == PROCESSED:
                    self.work_dir.update(rid, state=ACKNOWLEDGED, acknowledged_at=isoformat(utcnow()))
                return False
            report.awaiting_processing.add(rid)
            return True  # downloaded already; acknowledged once processed
        if record["state"] not in OPEN:
            _LOGGER.info("request %s is %s; late duplicate reply %s acknowledged and ignored",
                         rid, record["state"], message_id)
            self._ack(message_id)
            self.work_dir.update(rid, duplicate_replies=list(record.get("duplicate_replies", [])) + [message_id])
            report.duplicates.append(message_id)
            return False
        head = message.read(256)
        if len(head) < 256 and datfile.INVALID_NUMBERS_REPLY.lower() in head.decode("utf-8", "replace").lower():
            reason = nhs.redact(head.decode("utf-8", "replace").strip())  # NDOP's text: shown in logs and status
            self.work_dir.update(rid, state=REJECTED, rejection={
                "message_id": message_id, "reason": reason, "at": isoformat(utcnow())})
            report.rejected.append((rid, reason))
            _LOGGER.error("request %s rejected by NDOP: %s", rid, reason)
            self._ack(message_id)
            return False
        size, lines, digest = self._save_reply(message, head, self.work_dir.request_dir(rid) / REPLY_FILE)
        self._hook("after-reply-download")
        now = isoformat(utcnow())
        self.work_dir.update(
            rid, state=REPLIED, reply_message_id=message_id, files={**record["files"], "reply": REPLY_FILE},
            reply_bytes=size, reply_sha256=digest, reply_lines=lines, replied_at=now,
            checked_at=_mesh_time(message) or now, reply_workflow_id=message.workflow_id,
        )
        report.replies.append(rid)
        _LOGGER.info("request %s: reply %s saved (%d bytes, %d lines; %d sent)",
                     rid, message_id, size, lines, record.get("counts", {}).get("sent", -1))
        return True

    @staticmethod
    def _save_reply(message: Any, head: bytes, target: Path) -> tuple[int, int, str]:
        """Stream the body to ``target`` (0600, atomic); never hold a large reply in memory."""
        digest = hashlib.sha256()
        size = lines = 0
        last = b""
        with atomic_writer(target) as out:
            block = head
            while block:
                out.write(block)
                digest.update(block)
                size += len(block)
                lines += block.count(b"\n")
                last = block[-1:]
                block = message.read(_READ_BLOCK)
        if size and last != b"\n":
            lines += 1
        return size, lines, digest.hexdigest()

    # -- acknowledge --------------------------------------------------------------------------------

    def acknowledge(self, request_id: str) -> dict[str, Any]:
        """Acknowledge a processed request's reply in MESH (deleting it there); idempotent, and once.

        The process step calls this only once the Consents are durably stored. It does not take
        the work-dir lock (the caller normally holds it; flock would deadlock on a second open).
        An ``acknowledging`` marker is written before the PUT, like ``sending`` before a send: a
        run killed between the PUT and the state write leaves it, and the next run then looks at
        the inbox instead of acknowledging a second time (a reply no longer there was acknowledged).
        """
        record = self.work_dir.load(request_id)
        if record["state"] == ACKNOWLEDGED:
            return record
        if record["state"] != PROCESSED:
            raise NdopError(f"request {request_id} is {record['state']}: only a processed request's reply is acknowledged")
        message_id = record.get("reply_message_id")
        if not message_id:
            raise NdopError(f"request {request_id}: no reply message id recorded; cannot acknowledge")
        if record.get("acknowledging") and message_id not in self._list_ids()[0]:
            _LOGGER.info("request %s: reply %s already gone from the inbox: an interrupted run acknowledged it",
                         request_id, message_id)
        else:
            self.work_dir.update(request_id, acknowledging=isoformat(utcnow()))
            self._ack(message_id)
            self._hook("after-ack")  # crash tests: acknowledged in MESH, not yet recorded
            _LOGGER.info("request %s: reply %s acknowledged", request_id, message_id)
        return self.work_dir.update(request_id, state=ACKNOWLEDGED, acknowledging=None,
                                    acknowledged_at=isoformat(utcnow()))


# -- status -----------------------------------------------------------------------------------------

def status_rows(work_dir: WorkDir, overdue_after: timedelta = DEFAULT_OVERDUE_AFTER,
                now: datetime | None = None) -> list[StatusRow]:
    """One row per request: no MESH connection, no NHS numbers."""
    now = now or utcnow()
    rows = []
    for record in work_dir.all():
        state = record["state"]
        history = record.get("history") or [{"at": record["created_at"]}]
        since = now - parse_time(history[-1]["at"])
        waiting_since = record.get("sent_at") or record.get("send_unknown_since")
        overdue = state in IN_FLIGHT and waiting_since is not None and now - parse_time(waiting_since) > overdue_after
        note = ""
        if state == REJECTED:
            note = (record.get("rejection") or {}).get("reason", "")
        elif state == FAILED:
            failure = record.get("failure") or {}
            note = f"MESH {failure.get('code', '')} {failure.get('description', '')}".strip()
        elif state == SEND_UNKNOWN:
            note = "send outcome unknown; waiting for notice or reply"
        elif state == REPLIED:
            note = "reply downloaded; waiting for ndop process"
        if overdue:
            note = f"OVERDUE: no reply after {_age(now - parse_time(waiting_since))}" + (f"; {note}" if note else "")
        rows.append(StatusRow(
            request_id=record["request_id"], state=state, sent=(record.get("counts") or {}).get("sent"),
            replied=record.get("reply_lines"), age=now - parse_time(record["created_at"]), since=since,
            overdue=overdue, note=note,
        ))
    return rows


def format_status(rows: list[StatusRow]) -> list[str]:
    if not rows:
        return ["no requests"]
    header = ("REQUEST", "STATE", "SENT", "REPLY", "AGE", "IN STATE", "NOTE")
    table = [header] + [
        (r.request_id, r.state, "-" if r.sent is None else str(r.sent), "-" if r.replied is None else str(r.replied),
         _age(r.age), _age(r.since), r.note)
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in table]


# -- helpers ----------------------------------------------------------------------------------------

def make_client(config: MeshConfig) -> MeshClient:
    """A mesh-client session from our settings (TLS client cert and CA bundle where given)."""
    url: Any = _ENDPOINTS.get(config.url.lower(), config.url)
    if not config.shared_key:
        _LOGGER.warning("no MESH_SHARED_KEY: using mesh-client's default against the local sandbox %s", config.url)
    cert = (config.client_cert, config.client_key) if config.client_cert and config.client_key else None
    return MeshClient(
        url, config.mailbox, config.password,
        shared_key=config.shared_key.encode("utf-8") if config.shared_key else None,
        cert=cert, verify=config.ca_cert or None, application_name="ndop-sync",
    )


class _NotSent(Exception):
    """The outbox POST certainly created no message."""


class _MaybeSent(Exception):
    """The outbox POST may have created a message: never send again blindly."""


def _never_connected(err: BaseException) -> bool:
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (NewConnectionError, ConnectTimeoutError, requests.ConnectTimeout)):
            return True
        for arg in getattr(seen, "args", ()):
            reason = getattr(arg, "reason", None)
            if isinstance(arg, (NewConnectionError, ConnectTimeoutError)) or isinstance(
                    reason, (NewConnectionError, ConnectTimeoutError)):
                return True
        seen = seen.__cause__ or seen.__context__
    return False


def _error_text(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        return str(body.get("errorDescription") or body.get("detail") or body)[:200]
    return str(body)[:200]


def _where(config: MeshConfig) -> str:
    return config.url


class _mesh_errors:
    """Turn requests/mesh-client failures into one clear :class:`NdopError` line (no secrets)."""

    def __init__(self, config: MeshConfig, action: str, gone_ok: bool = False) -> None:
        self.config, self.action, self.gone_ok = config, action, gone_ok

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: type | None, err: BaseException | None, tb: object) -> bool:
        if err is None or isinstance(err, NdopError):
            return False
        if isinstance(err, requests.HTTPError) and err.response is not None:
            code = err.response.status_code
            if self.gone_ok and code in (404, 410):
                _LOGGER.info("%s: already gone from MESH (HTTP %d)", self.action, code)
                return True
            if code in (401, 403):
                raise InputError(
                    f"MESH at {self.config.url} refused mailbox {self.config.mailbox} ({self.action}: HTTP {code}): "
                    f"check MESH_MAILBOX, MESH_PASSWORD and MESH_SHARED_KEY"
                ) from None
            raise NdopError(f"MESH {self.action} failed: HTTP {code} {_error_text(err.response)}") from None
        if isinstance(err, requests.exceptions.SSLError):
            raise NdopError(f"MESH {self.action} failed: TLS with {self.config.url} failed; check MESH_CLIENT_CERT, "
                            f"MESH_CLIENT_KEY and MESH_CA_CERT") from None
        if isinstance(err, requests.RequestException):
            hint = ("; check MESH_CLIENT_CERT, MESH_CLIENT_KEY and MESH_CA_CERT"
                    if isinstance(err, requests.ConnectionError) and not self.config.url.startswith("http://") else "")
            raise NdopError(f"MESH {self.action} failed: cannot talk to {self.config.url} ({type(err).__name__}){hint}") \
                from None
        return False


def _mesh_time(message: Any) -> str | None:
    """When MESH accepted the message (``mex-statustimestamp``, UTC ``YYYYMMDDHHMMSS``)."""
    value = message.mex_header("statustimestamp")
    if not value:
        return None
    try:
        return isoformat(datetime.strptime(value[:14], "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc))
    except ValueError:
        return None


def _check_dat(path: Path, record: dict[str, Any]) -> None:
    """Send exactly the file the request step validated (it may be large: hash it in blocks)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(_READ_BLOCK), b""):
                digest.update(block)
    except FileNotFoundError:
        raise InputError(f"{path}: request file missing") from None
    if record.get("dat_sha256") and digest.hexdigest() != record["dat_sha256"]:
        raise InputError(f"{path}: changed since `ndop request` validated it (SHA-256 differs); build a new request")


def _hours(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 3600:g} h"


def _age(delta: timedelta) -> str:
    seconds = int(max(delta.total_seconds(), 0))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
