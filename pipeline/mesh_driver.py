"""The MESH driver: send a request to NDOP, poll the inbox for what comes back, acknowledge safely.

MESH rules this module keeps (docs/ndop-and-mesh.md, docs/mesh-conformance.md): never retry the first
``POST .../outbox`` blindly (it can duplicate the message); page the inbox past 500 ids; acknowledge a message
only once what it carried is durably stored. What to do with each inbox message is decided by
:func:`pipeline.inbox.classify_inbox_message`; the crash and idempotency contract (the ``sending``,
``ctl_sending`` and ``acknowledging`` markers, ``send-unknown``) is stated once, in pipeline/state.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import requests
import urllib3
from mesh_client import DEP_ENDPOINT, INT_ENDPOINT, LIVE_ENDPOINT, MeshClient, Message
from mesh_client.io_helpers import SplitStream
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from pipeline import nhs
from pipeline.faults import fault_point
from pipeline.errors import InputError, NdopError
from pipeline.files import atomic_writer
from pipeline.inbox import HEAD_BYTES, LEAVES, Action, InboxMessage, classify_inbox_message, match_request
from pipeline.mesh_config import HANDSHAKE_EVERY, MIN_POLL_INTERVAL, MeshConfig
from pipeline.state import (
    ACCEPTED,
    ACKNOWLEDGED,
    ACKNOWLEDGING,
    CREATED,
    CTL_SENDING,
    FAILED,
    IN_FLIGHT,
    OPEN,
    PROCESSED,
    REJECTED,
    REPLIED,
    SEND_UNKNOWN,
    SENDING,
    SENT,
    RequestRecord,
    WorkDir,
    check_request_id,
    isoformat,
    marker,
    parse_time,
    utcnow,
)

_LOGGER = logging.getLogger(__name__)

REPLY_FILE = "reply.dat"
PAGE_SIZE = 500  # MESH lists at most this many message ids a page
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
    second_replies: list[tuple[str, str]] = field(default_factory=list)  # (request id, message id): for a person
    unreadable: dict[str, str] = field(default_factory=dict)  # message id -> why: skipped, tried again next cycle

    @property
    def problems(self) -> list[tuple[str, str]]:
        return self.rejected + self.failed + [
            (rid, f"a second, different reply (MESH message {mid}) came after its answer: left in the inbox for "
                  f"a person to decide (docs/guarantees.md)") for rid, mid in self.second_replies]


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

    def ensure_handshake(self) -> None:
        """Handshake once per driver (one scheduled cycle) and again only when the last is a day old: the MESH API
        asks for a daily mailbox validation and no more."""
        if self._handshake_at is None or time.monotonic() - self._handshake_at >= HANDSHAKE_EVERY.total_seconds():
            self.handshake()

    def _hook(self, point: str) -> None:
        if self.fault_hook is not None:
            self.fault_hook(point)
        fault_point(point)

    # -- send ---------------------------------------------------------------------------------------

    def send(self, request_id: str | None = None, now: datetime | None = None) -> list[SendResult]:
        """Send one request (or every request due) to NDOP; never twice unless provably lost."""
        results: list[SendResult] = []
        if request_id is not None:
            check_request_id(request_id)  # '' (an empty shell variable) is bad input, not "every request"
        with self.work_dir.lock():
            self._settle_interrupted_sends()
            records = [self.work_dir.load(request_id)] if request_id is not None else self.work_dir.all()
            due_resend = [r for r in records if (r["state"] == SEND_UNKNOWN and self._resend_due(r, now))
                          or self._ctl_resend_due(r, now)]
            if due_resend:
                # What we know of the inbox decides a resend: look once more before sending again.
                self.ensure_handshake()
                self._poll_once(PollReport(), set())
                records = [self.work_dir.load(r["request_id"]) for r in records]
            for record in records:
                results.append(self._send_one(record, now, explicit=request_id is not None))
        return results

    def _resend_due(self, record: RequestRecord, now: datetime | None) -> bool:
        since = record.get("send_unknown_since") or record.get("sent_at") or record["created_at"]
        return (now or utcnow()) - parse_time(since) >= self.config.resend_after

    def _ctl_unknown(self, record: RequestRecord) -> bool:
        return bool(record["state"] == SENT and self.config.send_ctl and record.get("ctl_send_unknown_since")
                    and not record.get("ctl_message_id"))

    def _ctl_resend_due(self, record: RequestRecord, now: datetime | None) -> bool:
        since = record.get("ctl_send_unknown_since")
        return self._ctl_unknown(record) and since is not None and \
            (now or utcnow()) - parse_time(since) >= self.config.resend_after

    def _send_one(self, record: RequestRecord, now: datetime | None, explicit: bool) -> SendResult:
        rid, state = record["request_id"], record["state"]
        if self._ctl_unknown(record):
            return self._resend_ctl(record, now)
        if state == SEND_UNKNOWN:
            if not self._resend_due(record, now):
                since = parse_time(record.get("send_unknown_since") or record["created_at"])
                return SendResult(rid, "waiting", f"outcome of the last send unknown; `ndop poll` matches its reply "
                                  f"by local id; re-sent after {isoformat(since + self.config.resend_after)} if "
                                  f"neither notice nor reply has come")
            return self._post(record, resend=True)
        if state != CREATED:
            if explicit:
                return SendResult(rid, "skipped",
                                  f"already {state} (message {record.get('message_id')}); nothing to do",
                                  record.get("message_id"))
            return SendResult(rid, "skipped", f"already {state}")
        return self._post(record, resend=False)

    def _post(self, record: RequestRecord, resend: bool) -> SendResult:
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
        self.ensure_handshake()
        expected = record["state"]
        self.work_dir.update(rid, expect=expected, **marker(SENDING, {"at": isoformat(utcnow()), "attempt": attempt}))
        try:
            message_id = self._post_file(recipient, dat, headers)
        except _NotSent as err:
            self.work_dir.update(rid, expect=expected, **{SENDING: None}, last_send_error=str(err))
            return SendResult(rid, "error", f"not sent: {err}")
        except _MaybeSent as err:
            self.work_dir.update(rid, state=SEND_UNKNOWN, expect=expected, **{SENDING: None}, send_attempts=attempt,
                                 send_unknown_since=isoformat(utcnow()), last_send_error=str(err))
            return SendResult(rid, "send-unknown", f"the send failed after the request may have reached MESH ({err}); "
                              f"`ndop poll` completes it if it did; otherwise it is re-sent, same local id, after "
                              f"{_hours(self.config.resend_after)}")
        sent_at = isoformat(utcnow())
        history = list(record.get("messages_sent", [])) + [{"message_id": message_id, "at": sent_at}]
        fields: dict[str, Any] = {"message_id": message_id, "sent_at": sent_at, "send_attempts": attempt,
                                  "messages_sent": history, SENDING: None, "last_send_error": None}
        record = self.work_dir.update(rid, state=SENT, expect=expected, **fields)
        _LOGGER.info("request %s sent to %s as message %s (local id %s)", rid, recipient, message_id,
                     record["local_id"])
        result = SendResult(rid, "resent" if resend else "sent", f"message {message_id} to {recipient}", message_id)
        if self.config.send_ctl and not record.get("ctl_message_id"):
            result.detail += self._send_ctl(record, recipient, headers)
        return result

    def _send_ctl(self, record: RequestRecord, recipient: str, headers: dict[str, str]) -> str:
        """The ``.ctl`` as a message of its own (some integrations expect it); the maybe-sent rule of the
        ``.dat`` applies (pipeline/state.py): a lost answer or a crash mid-POST leaves ``ctl_send_unknown_since``
        and the ``.ctl`` is sent again only after ``resend_after``, while NDOP has not answered."""
        rid = record["request_id"]
        ctl = self.work_dir.request_dir(rid) / record["files"]["ctl"]
        self.work_dir.update(rid, expect=SENT, **marker(CTL_SENDING, {"at": isoformat(utcnow())}))
        try:
            ctl_id = self._post_file(recipient, ctl, {**headers, "filename": record["files"]["ctl"]})
        except _NotSent as err:
            self.work_dir.update(rid, **{CTL_SENDING: None}, ctl_send_error=str(err))
            _LOGGER.warning("request %s: the .ctl message was not sent (%s); the .dat was sent", rid, err)
            return f"; .ctl not sent: {err}"
        except _MaybeSent as err:
            self.work_dir.update(rid, **{CTL_SENDING: None}, ctl_send_error=str(err),
                                 ctl_send_unknown_since=isoformat(utcnow()))
            _LOGGER.warning("request %s: the .ctl message may not have been sent (%s); sent again after %s "
                            "if NDOP has not answered", rid, err, _hours(self.config.resend_after))
            return f"; .ctl outcome unknown: {err}"
        self.work_dir.update(rid, ctl_message_id=ctl_id, **{CTL_SENDING: None}, ctl_send_error=None,
                             ctl_send_unknown_since=None)
        return f"; .ctl as message {ctl_id}"

    def _resend_ctl(self, record: RequestRecord, now: datetime | None) -> SendResult:
        rid = record["request_id"]
        since = parse_time(record.get("ctl_send_unknown_since") or record["created_at"])
        if (now or utcnow()) - since < self.config.resend_after:
            return SendResult(rid, "waiting", f"sent as message {record.get('message_id')}; the .ctl's outcome is "
                              f"unknown; sent again after {isoformat(since + self.config.resend_after)} if NDOP has "
                              f"not answered", record.get("message_id"))
        self.ensure_handshake()
        recipient = record.get("ndop_mailbox") or self.config.ndop_mailbox
        headers = {"workflow_id": record["workflow_id"], "subject": record["subject"],
                   "local_id": record["local_id"], "filename": record["files"]["dat"]}
        detail = self._send_ctl(record, recipient, headers)
        return SendResult(rid, "skipped", f"already sent (message {record.get('message_id')}){detail}",
                          record.get("message_id"))

    def _post_file(self, recipient: str, path: Path, headers: dict[str, Any]) -> str:
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
        """A ``sending`` (or ``ctl_sending``) marker without a result means a crash mid-POST: the outcome is
        unknown (pipeline/state.py)."""
        for record in self.work_dir.all():
            rid = record["request_id"]
            sending: Any = record.get(SENDING)
            if sending and record["state"] == CREATED:
                _LOGGER.warning("request %s: an earlier send was interrupted; its outcome is unknown", rid)
                self.work_dir.update(rid, state=SEND_UNKNOWN, expect=CREATED, **{SENDING: None},
                                     send_attempts=sending.get("attempt", 1), send_unknown_since=sending["at"],
                                     last_send_error="interrupted during send")
            ctl_marker: Any = record.get(CTL_SENDING)
            if ctl_marker:
                _LOGGER.warning("request %s: an earlier send of the .ctl was interrupted; its outcome is unknown", rid)
                at = ctl_marker["at"] if isinstance(ctl_marker, dict) else str(ctl_marker)
                self.work_dir.update(rid, **{CTL_SENDING: None}, ctl_send_unknown_since=at,
                                     ctl_send_error="interrupted during send")

    # -- poll ---------------------------------------------------------------------------------------

    def poll(self, wait: float = 0, interval: float = MIN_POLL_INTERVAL,
             sleep: Callable[[float], None] = time.sleep) -> PollReport:
        """Bring every request up to date with the inbox; with ``wait``, until none is in flight.

        The MESH API's polling rules: one inbox listing a cycle (:meth:`_list_ids`), cycles ``interval`` apart
        (at least :data:`MIN_POLL_INTERVAL` against a real MESH: checked by the CLI), except that a cycle which
        saw a full page (:data:`PAGE_SIZE` ids) and acted on some goes again at once; a handshake at most once a
        cycle and at least once a day (:meth:`ensure_handshake`).
        """
        deadline = time.monotonic() + max(wait, 0)
        report = PollReport()
        left_alone: set[str] = set()
        while True:
            with self.work_dir.lock():
                self._settle_interrupted_sends()
                self.ensure_handshake()
                full_page = self._poll_once(report, left_alone)
                report.in_flight = [r["request_id"] for r in self.work_dir.in_state(*IN_FLIGHT)]
            if not wait or not report.in_flight:
                return report
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                report.timed_out = True
                return report
            if not full_page:
                sleep(min(max(interval, 0.05), remaining))

    def _list_ids(self) -> list[str]:
        """One inbox listing (every page, through MESH's ``links.next``) of our workflows' messages.

        One filter covers every workflow id where the API allows it: their common prefix as a "begins with" filter
        (``SPINE_NTT_UPHOLDING*`` for the defaults); with no common prefix, the whole inbox. A message of another
        workflow the filter lets through is left alone by the classifier and counted.
        """
        ids: list[str] = []
        with _mesh_errors(self.config, "list inbox"):
            ids = list(dict.fromkeys(self.client.iterate_message_ids(
                workflow_filter=workflow_filter(self.config.workflow_ids))))
        return ids

    def _poll_once(self, report: PollReport, left_alone: set[str]) -> bool:
        """One cycle: list once, handle each message. True when the listing was a full page and some of it was
        acted on (the MESH API: poll again at once while more messages are waiting)."""
        ids = self._list_ids()
        report.listed = len(ids)
        report.other_workflow = 0
        acted = 0
        records = self.work_dir.all()
        by_local = {r["local_id"]: r["request_id"] for r in records if r.get("local_id")}
        by_message = {m["message_id"]: r["request_id"] for r in records for m in r.get("messages_sent", [])}
        for message_id in ids:
            if message_id in left_alone:
                continue
            try:
                with _mesh_errors(self.config, f"download message {message_id}"):
                    message = VerifiedMessage(self.client, message_id)
                    try:
                        kept = self._handle(message, by_local, by_message, report)
                    finally:
                        message.close()
            except UnreadableMessage as err:  # skipped this cycle; never saved, never acknowledged
                _LOGGER.warning("message %s skipped: %s", message_id, err)
                report.unreadable[message_id] = str(err)  # tried again next cycle: our reply may come whole
                continue
            if kept:
                left_alone.add(message_id)
            else:
                acted += 1
        return len(ids) >= PAGE_SIZE and acted > 0

    def _handle(self, message: Any, by_local: dict[str, str], by_message: dict[str, str], report: PollReport) -> bool:
        """Deal with one inbox message as :func:`classify_inbox_message` decides; True when it stays untouched."""
        is_report = (message.message_type or "").upper() == "REPORT"
        facts = InboxMessage(
            message_id=message.id(), local_id=message.local_id or "", message_type=message.message_type or "",
            subject=message.subject or "", sender=message.sender or "", workflow_id=message.workflow_id or "",
            linked_message_id=(message.mex_header("linkedmsgid") or "") if is_report else "",
            head=b"" if is_report else message.read(HEAD_BYTES),
        )
        rid = match_request(facts, by_local, by_message)
        record = self.work_dir.load(rid) if rid is not None else None
        action = classify_inbox_message(facts, record, ndop_mailbox=self.config.ndop_mailbox,
                                        workflow_ids=self.config.workflow_ids)
        if action == Action.NEEDS_DIGEST:  # the same reply again, or a different one? Read it whole to know.
            facts = dataclasses.replace(facts, sha256=_digest_of(message, facts.head))
            action = classify_inbox_message(facts, record, ndop_mailbox=self.config.ndop_mailbox,
                                            workflow_ids=self.config.workflow_ids)
        if record is not None and action == Action.SECOND_REPLY:
            self._on_second_reply(facts, record, report)
            return True
        if record is None or action in LEAVES:
            self._on_left_alone(facts, action, rid, report)
            return True
        if action in (Action.FAIL, Action.IGNORE_REPORT):
            self._on_report(message, facts, action, record, report)
        elif action in (Action.ACCEPT, Action.DUPLICATE_NOTICE):
            self._on_notice(message, facts, action, record, report)
        elif action == Action.ACK_PROCESSED:
            self._ack(facts.message_id)
            self.work_dir.update(record["request_id"], state=ACKNOWLEDGED, expect=(PROCESSED, ACKNOWLEDGED),
                                 acknowledged_at=record.get("acknowledged_at") or isoformat(utcnow()))
        elif action == Action.LATE_DUPLICATE:
            _LOGGER.info("request %s is %s; late duplicate reply %s acknowledged and ignored",
                         record["request_id"], record["state"], facts.message_id)
            self._ack(facts.message_id)
            self.work_dir.update(record["request_id"], expect=record["state"],
                                 duplicate_replies=[*record.get("duplicate_replies", []), facts.message_id])
            report.duplicates.append(facts.message_id)
        elif action == Action.REJECT:
            self._on_rejection(facts, record, report)
        else:
            self._on_reply(message, facts, record, report)
            return True
        return False

    def _on_second_reply(self, facts: InboxMessage, record: RequestRecord, report: PollReport) -> None:
        """A different reply for a request that has its answer: never acknowledged unread, never used; the
        request waits for a person (``ndop process`` refuses it), and every poll says so until then."""
        rid = record["request_id"]
        seen = record.get("second_replies") or []
        if all(s.get("message_id") != facts.message_id for s in seen):
            self.work_dir.update(rid, expect=record["state"], second_replies=[
                *seen, {"message_id": facts.message_id, "sha256": facts.sha256 or "", "at": isoformat(utcnow())}])
        _LOGGER.error("request %s is %s, and a second, different reply %s came: left in the inbox for a person",
                      rid, record["state"], facts.message_id)
        report.second_replies.append((rid, facts.message_id))

    def _on_left_alone(self, facts: InboxMessage, action: Action, rid: str | None, report: PollReport) -> None:
        if action == Action.AWAIT_PROCESSING and rid is not None:
            report.awaiting_processing.add(rid)  # downloaded already; acknowledged once processed
        elif action == Action.LEAVE_FOREIGN_SENDER:
            _LOGGER.warning("message %s for request %s comes from %s, not the NDOP mailbox; left in the inbox",
                            facts.message_id, rid, facts.sender.upper())
            report.unknown_local_id.add(facts.message_id)
        elif action == Action.LEAVE_OTHER_WORKFLOW:
            report.other_workflow += 1
        else:
            _LOGGER.info("message %s (local id %r, workflow %s) matches no request here; left in the inbox",
                         facts.message_id, facts.local_id, facts.workflow_id)
            report.unknown_local_id.add(facts.message_id)

    def _ack(self, message_id: str) -> None:
        with _mesh_errors(self.config, f"acknowledge message {message_id}", gone_ok=True):
            self.client.acknowledge_message(message_id)

    def _on_report(self, message: Any, facts: InboxMessage, action: Action, record: RequestRecord,
                   report: PollReport) -> None:
        rid = record["request_id"]
        code = message.mex_header("statuscode") or ""
        description = message.mex_header("statusdescription") or ""
        linked = facts.linked_message_id or None
        if action == Action.FAIL:
            reason = f"MESH report {code}: {description}".strip()
            self.work_dir.update(rid, state=FAILED, expect=OPEN, failure={
                "message_id": facts.message_id, "code": code, "description": description, "linked_message_id": linked,
                "at": isoformat(utcnow())})
            report.failed.append((rid, reason))
            _LOGGER.info("request %s failed: %s", rid, reason)  # the command's own error line says it (once)
        else:
            _LOGGER.info("request %s (%s): MESH report %s %s about message %s; acknowledged and ignored",
                         rid, record["state"], code, description, linked)
            report.duplicates.append(facts.message_id)
        self._ack(facts.message_id)

    def _on_notice(self, message: Any, facts: InboxMessage, action: Action, record: RequestRecord,
                   report: PollReport) -> None:
        rid = record["request_id"]
        body = facts.head + message.read(max(_NOTICE_MAX_BYTES - len(facts.head), 0))
        try:
            notice: Any = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            notice = {"text": body[:200].decode("utf-8", "replace")}
        if action == Action.ACCEPT:
            self.work_dir.update(rid, state=ACCEPTED, expect=OPEN, notice={
                "message_id": facts.message_id, "received_at": isoformat(utcnow()),
                "at": _mesh_time(message) or isoformat(utcnow()), "body": notice})
            report.notices.append(rid)
            _LOGGER.info("request %s accepted by NDOP (job created notice %s)", rid, facts.message_id)
        else:
            report.duplicates.append(facts.message_id)
        self._ack(facts.message_id)

    def _on_rejection(self, facts: InboxMessage, record: RequestRecord, report: PollReport) -> None:
        rid = record["request_id"]
        reason = nhs.redact(facts.head.decode("utf-8", "replace").strip())  # NDOP's text: shown in logs and status
        self.work_dir.update(rid, state=REJECTED, expect=OPEN, rejection={
            "message_id": facts.message_id, "reason": reason, "at": isoformat(utcnow())})
        report.rejected.append((rid, reason))
        _LOGGER.info("request %s rejected by NDOP: %s", rid, reason)  # the command's own error line says it (once)
        self._ack(facts.message_id)

    def _on_reply(self, message: Any, facts: InboxMessage, record: RequestRecord, report: PollReport) -> None:
        rid = record["request_id"]
        size, lines, digest = self._save_reply(message, facts.head, self.work_dir.request_dir(rid) / REPLY_FILE)
        self._hook("after-reply-download")
        now = isoformat(utcnow())
        self.work_dir.update(
            rid, state=REPLIED, expect=OPEN, reply_message_id=facts.message_id,
            files={**record["files"], "reply": REPLY_FILE}, reply_bytes=size, reply_sha256=digest, reply_lines=lines,
            replied_at=now, checked_at=_mesh_time(message) or now, reply_workflow_id=message.workflow_id,
        )
        report.replies.append(rid)
        _LOGGER.info("request %s: reply %s saved (%d bytes, %d lines; %d sent)",
                     rid, facts.message_id, size, lines, record.get("counts", {}).get("sent", -1))

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

    def acknowledge(self, request_id: str) -> RequestRecord:
        """Acknowledge a processed request's reply in MESH (deleting it there); idempotent, and once.

        The process step calls this only once the Consents are durably stored; decide and act run under
        the work dir's lock. The ``acknowledging`` marker and what a crash leaves: pipeline/state.py.
        """
        with self.work_dir.lock():
            record = self.work_dir.load(request_id)
            if record["state"] == ACKNOWLEDGED:
                return record
            if record["state"] != PROCESSED:
                raise NdopError(f"request {request_id} is {record['state']}: only a processed request's reply is "
                                "acknowledged")
            message_id = record.get("reply_message_id")
            if not message_id:
                raise NdopError(f"request {request_id}: no reply message id recorded; cannot acknowledge")
            if record.get(ACKNOWLEDGING) and message_id not in self._list_ids():
                _LOGGER.info("request %s: reply %s already gone from the inbox: an interrupted run acknowledged it",
                             request_id, message_id)
            else:
                self.work_dir.update(request_id, expect=PROCESSED, **marker(ACKNOWLEDGING, isoformat(utcnow())))
                self._ack(message_id)
                self._hook("after-ack")  # crash tests: acknowledged in MESH, not yet recorded
                _LOGGER.info("request %s: reply %s acknowledged", request_id, message_id)
            return self.work_dir.update(request_id, state=ACKNOWLEDGED, expect=PROCESSED, **{ACKNOWLEDGING: None},
                                        acknowledged_at=isoformat(utcnow()))


# -- helpers ----------------------------------------------------------------------------------------

def _digest_of(message: Any, head: bytes) -> str:
    """SHA-256 of a message's whole body (``head`` already read), streamed."""
    digest = hashlib.sha256(head)
    for block in iter(lambda: message.read(_READ_BLOCK), b""):
        digest.update(block)
    return digest.hexdigest()


def workflow_filter(workflow_ids: tuple[str, ...]) -> str | None:
    """The one MESH inbox ``workflow_filter`` that lists every id in ``workflow_ids``: the id itself for one, their
    common prefix as "begins with" (``PREFIX*``) for several, None (the whole inbox) when they share no prefix."""
    if len(workflow_ids) == 1:
        return workflow_ids[0]
    prefix = os.path.commonprefix(list(workflow_ids))
    return f"{prefix}*" if len(prefix) >= 2 else None  # the API's filter is 2 to 255 characters


def make_client(config: MeshConfig) -> MeshClient:
    """A mesh-client session from our settings (TLS client cert and CA bundle where given)."""
    url: Any = _ENDPOINTS.get(config.url.lower(), config.url)
    if not config.shared_key:
        _LOGGER.warning("no MESH_SHARED_KEY: using mesh-client's default against the local sandbox %s", config.url)
    cert = (config.client_cert, config.client_key) if config.client_cert and config.client_key else None
    return MeshClient(
        url, config.mailbox, config.password,
        shared_key=config.shared_key.encode("utf-8") if config.shared_key else None,
        cert=cert, verify=config.ca_cert or None, application_name="ndop-sync", timeout=config.timeout,
    )


class UnreadableMessage(NdopError):
    """One inbox message could not be downloaded or decoded whole: skipped this cycle, counted, never used."""


class VerifiedMessage:
    """A MESH inbox message whose body is read whole or not at all.

    mesh-client's ``Message`` gives the headers; its own reader takes a short read as the end of a chunk, so a body
    cut short in transit would pass as the whole message. Here every chunk is read from its own response: each
    must bring its full Content-Length (urllib3 checks while streaming), the chunks must be ``1:N`` .. ``N:N``, and
    each gzip stream (MESH compresses chunk by chunk) must reach its end. Anything less raises, and
    :class:`_mesh_errors` turns that into :class:`UnreadableMessage`.
    """

    def __init__(self, client: MeshClient, message_id: str) -> None:
        self._first = client.retrieve_message_chunk(message_id, 1)
        self._meta = Message(message_id, self._first, client)
        self._blocks = self._chunks(client, message_id)
        self._buffer = b""

    def __getattr__(self, name: str) -> Any:  # headers and ids: mesh-client's Message
        return getattr(self._meta, name)

    def _chunks(self, client: MeshClient, message_id: str) -> Iterator[bytes]:
        total = int((self._first.headers.get("Mex-Chunk-Range") or "1:1").split(":")[1])
        for number in range(1, total + 1):
            response = self._first if number == 1 else client.retrieve_message_chunk(message_id, number)
            with response:
                found = response.headers.get("Mex-Chunk-Range") or "1:1"
                if found != f"{number}:{total}":
                    raise UnreadableMessage(f"chunk {number} of {total} came as chunk {found}")
                gzipped = (response.headers.get("Content-Encoding") or "").lower() == "gzip"
                inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzipped else None
                for raw in response.raw.stream(_READ_BLOCK, decode_content=False):
                    yield inflate.decompress(raw) if inflate is not None else raw
                if inflate is not None:
                    yield inflate.flush()
                    if not inflate.eof:
                        raise UnreadableMessage(f"the gzip stream of chunk {number} of {total} ends early")

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            block = next(self._blocks, None)
            if block is None:
                break
            self._buffer += block
        cut = len(self._buffer) if size < 0 else size
        out, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return out

    def close(self) -> None:
        self._first.close()


_BODY_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, zlib.error, EOFError)


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
            if self.action.startswith("download") and code >= 500:  # MESH cannot serve this message now
                raise UnreadableMessage(f"MESH answered HTTP {code} {_error_text(err.response)}") from None
            raise NdopError(f"MESH {self.action} failed: HTTP {code} {_error_text(err.response)}") from None
        if self.action.startswith("download") and isinstance(err, _BODY_ERRORS):
            # A body cut short (fewer bytes than its Content-Length, a chunked stream broken off), or a gzip
            # stream that does not decode: what was read is discarded (the reply file is written atomically).
            raise UnreadableMessage(f"its body could not be read whole ({type(err).__name__})") from None
        if isinstance(err, requests.exceptions.SSLError):
            raise NdopError(f"MESH {self.action} failed: TLS with {self.config.url} failed; check MESH_CLIENT_CERT, "
                            f"MESH_CLIENT_KEY and MESH_CA_CERT") from None
        if isinstance(err, requests.RequestException):
            hint = ("; check MESH_CLIENT_CERT, MESH_CLIENT_KEY and MESH_CA_CERT"
                    if isinstance(err, requests.ConnectionError) and not self.config.url.startswith("http://") else "")
            raise NdopError(
                f"MESH {self.action} failed: cannot talk to {self.config.url} ({type(err).__name__}){hint}") from None
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


def _check_dat(path: Path, record: RequestRecord) -> None:
    """Send exactly the file the request step validated (it may be large: hashed without reading it whole)."""
    try:
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
    except FileNotFoundError:
        raise InputError(f"{path}: request file missing") from None
    if record.get("dat_sha256") and digest != record["dat_sha256"]:
        raise InputError(f"{path}: changed since `ndop request` validated it (SHA-256 differs); build a new request")


def _hours(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 3600:g} h"
