"""Polling the inbox: every message of ours dealt with as pipeline/mesh/inbox.py's classifier decides, and the
acknowledgement of a reply once its Consents are stored.

The MESH API's polling rules (one listing a cycle, cycles at least five minutes apart against a real MESH, again at
once after a full page, a handshake at most once a cycle and at least once a day) are kept by :meth:`Poller.poll`.
What a crash leaves (the ``acknowledging`` marker): the contract in pipeline/lifecycle/state.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from pipeline.core import nhs
from pipeline.core.errors import NdopError
from pipeline.core.files import atomic_writer
from pipeline.mesh.inbox import HEAD_BYTES, LEAVES, Action, InboxMessage, classify_inbox_message, match_request
from pipeline.mesh.transport import READ_BLOCK, MeshTransport, UnreadableMessage, mesh_errors
from pipeline.mesh.config import MIN_POLL_INTERVAL
from pipeline.core.clock import isoformat, utcnow
from pipeline.lifecycle.state import (
    ACCEPTED,
    ACKNOWLEDGED,
    ACKNOWLEDGING,
    FAILED,
    IN_FLIGHT,
    OPEN,
    PROCESSED,
    REJECTED,
    REPLIED,
    ReplyDecision,
    RequestRecord,
    USE_SECOND,
    WorkDir,
    decide_second_reply,
    marker,
)
from pipeline.lifecycle import audit

_LOGGER = logging.getLogger(__name__)

REPLY_FILE = "reply.dat"
PAGE_SIZE = 500  # MESH lists at most this many message ids a page
_NOTICE_MAX_BYTES = 64 * 1024


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
                  f"a person to decide (`ndop resolve-reply`, docs/guarantees.md)")
            for rid, mid in self.second_replies]


class Poller:
    """One work dir's inbox. ``settle`` (the sender's) runs first each cycle: an interrupted send becomes
    ``send-unknown`` before the inbox is matched against it."""

    def __init__(self, transport: MeshTransport, work_dir: WorkDir, settle: Callable[[], None]) -> None:
        self.transport = transport
        self.config = transport.config
        self.work_dir = work_dir
        self._settle = settle

    def poll(self, wait: float = 0, interval: float = MIN_POLL_INTERVAL,
             sleep: Callable[[float], None] = time.sleep) -> PollReport:
        """Bring every request up to date with the inbox; with ``wait``, until none is in flight.

        The MESH API's polling rules: one inbox listing a cycle (:meth:`MeshTransport.list_ids`), cycles
        ``interval`` apart (at least :data:`MIN_POLL_INTERVAL` against a real MESH: checked by the CLI), except
        that a cycle which saw a full page (:data:`PAGE_SIZE` ids) and acted on some goes again at once; a
        handshake at most once a cycle and at least once a day (:meth:`MeshTransport.ensure_handshake`).
        """
        deadline = time.monotonic() + max(wait, 0)
        report = PollReport()
        left_alone: set[str] = set()
        while True:
            with self.work_dir.lock():
                self._settle()
                self.transport.ensure_handshake()
                full_page = self.poll_once(report, left_alone)
                report.in_flight = [r["request_id"] for r in self.work_dir.in_state(*IN_FLIGHT)]
            if not wait or not report.in_flight:
                return report
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                report.timed_out = True
                return report
            if not full_page:
                sleep(min(max(interval, 0.05), remaining))

    def poll_once(self, report: PollReport, left_alone: set[str]) -> bool:
        """One cycle: list once, handle each message. True when the listing was a full page and some of it was
        acted on (the MESH API: poll again at once while more messages are waiting)."""
        ids = self.transport.list_ids()
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
                message = self.transport.download(message_id)
                with mesh_errors(self.config, f"download message {message_id}"):
                    try:
                        kept = self._handle(message, by_local, by_message, report)
                    finally:
                        message.close()
            except UnreadableMessage as err:  # skipped this cycle; never saved, never acknowledged
                _LOGGER.warning("MESH message %s skipped (not saved, not acknowledged; tried again next poll): %s",
                                message_id, err)
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
            self.transport.acknowledge(facts.message_id)
            self.work_dir.update(record["request_id"], state=ACKNOWLEDGED, expect=(PROCESSED, ACKNOWLEDGED),
                                 acknowledged_at=record.get("acknowledged_at") or isoformat(utcnow()))
        elif action == Action.LATE_DUPLICATE:
            _LOGGER.info("request %s is %s; late duplicate reply %s acknowledged and ignored",
                         record["request_id"], record["state"], facts.message_id)
            self.transport.acknowledge(facts.message_id)
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
        self.transport.acknowledge(facts.message_id)

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
        self.transport.acknowledge(facts.message_id)

    def _on_rejection(self, facts: InboxMessage, record: RequestRecord, report: PollReport) -> None:
        rid = record["request_id"]
        reason = nhs.redact(facts.head.decode("utf-8", "replace").strip())  # NDOP's text: shown in logs and status
        self.work_dir.update(rid, state=REJECTED, expect=OPEN, rejection={
            "message_id": facts.message_id, "reason": reason, "at": isoformat(utcnow())})
        report.rejected.append((rid, reason))
        _LOGGER.info("request %s rejected by NDOP: %s", rid, reason)  # the command's own error line says it (once)
        self.transport.acknowledge(facts.message_id)

    def _on_reply(self, message: Any, facts: InboxMessage, record: RequestRecord, report: PollReport) -> None:
        rid = record["request_id"]
        size, lines, digest = self._save_reply(message, facts.head, self.work_dir.request_dir(rid) / REPLY_FILE)
        self.transport.hook("after-reply-download")
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
                block = message.read(READ_BLOCK)
        if size and last != b"\n":
            lines += 1
        return size, lines, digest.hexdigest()

    def resolve_second_reply(self, request_id: str, use: str, message_id: str | None = None) -> tuple[
            RequestRecord, ReplyDecision]:
        """``ndop resolve-reply``: act on a person's decision (:func:`decide_second_reply`, the rule; the order, crash
        by crash: pipeline/lifecycle/state.py). A second reply used is downloaded whole and must be the message the
        poll recorded (its SHA-256); every message set aside is acknowledged in MESH; the decision is audited."""
        with self.work_dir.lock():
            record = self.work_dir.load(request_id)
            decision = decide_second_reply(record, use, message_id)
            self.transport.ensure_handshake()
            folder = self.work_dir.request_dir(request_id)
            reply_file = folder / record.get("files", {}).get("reply", REPLY_FILE)
            side_file = folder / f".{REPLY_FILE}.chosen"
            changes: dict[str, Any] = {}
            if decision.use == USE_SECOND:
                chosen = decision.keep["message_id"]
                with mesh_errors(self.config, f"download message {chosen}"):
                    message = self.transport.download(chosen)
                    try:
                        size, lines, digest = self._save_reply(message, message.read(HEAD_BYTES), side_file)
                        mesh_time, workflow = _mesh_time(message), message.workflow_id
                    finally:
                        message.close()
                if decision.keep.get("sha256") and digest != decision.keep["sha256"]:
                    side_file.unlink(missing_ok=True)
                    raise NdopError(f"request {request_id}: MESH message {chosen} is not the second reply the poll "
                                    f"recorded (SHA-256 {digest[:12]}..., recorded {decision.keep['sha256'][:12]}...)")
                now = isoformat(utcnow())
                changes = dict(reply_message_id=chosen, reply_bytes=size, reply_sha256=digest, reply_lines=lines,
                               replied_at=now, checked_at=mesh_time or now, reply_workflow_id=workflow)
            for aside in decision.set_aside:
                if aside.get("message_id"):
                    self.transport.acknowledge(aside["message_id"])
            self.transport.hook("after-resolve-acknowledge")  # crash tests: set aside in MESH, not yet recorded
            if decision.use == USE_SECOND:
                os.replace(side_file, reply_file)
            at = isoformat(utcnow())
            record = self.work_dir.update(request_id, expect=REPLIED, second_replies=[], resolved_replies=[
                *record.get("resolved_replies", []), decision.record(at)], **changes)
            audit.decision_event(self.work_dir.root, request_id, decision.record(at))
            _LOGGER.info("request %s: the %s reply (MESH message %s) is NDOP's answer; set aside: %s", request_id,
                         decision.use, decision.keep["message_id"],
                         ", ".join(a["message_id"] for a in decision.set_aside if a.get("message_id")))
            return record, decision

    def acknowledge(self, request_id: str) -> RequestRecord:
        """Acknowledge a processed request's reply in MESH (deleting it there); idempotent, and once.

        The process step calls this only once the Consents are durably stored; decide and act run under
        the work dir's lock. The ``acknowledging`` marker and what a crash leaves: pipeline/lifecycle/state.py.
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
            if record.get(ACKNOWLEDGING) and message_id not in self.transport.list_ids():
                _LOGGER.info("request %s: reply %s already gone from the inbox: an interrupted run acknowledged it",
                             request_id, message_id)
            else:
                self.work_dir.update(request_id, expect=PROCESSED, **marker(ACKNOWLEDGING, isoformat(utcnow())))
                self.transport.acknowledge(message_id)
                self.transport.hook("after-ack")  # crash tests: acknowledged in MESH, not yet recorded
                _LOGGER.info("request %s: reply %s acknowledged", request_id, message_id)
            return self.work_dir.update(request_id, state=ACKNOWLEDGED, expect=PROCESSED, **{ACKNOWLEDGING: None},
                                        acknowledged_at=isoformat(utcnow()))


def _digest_of(message: Any, head: bytes) -> str:
    """SHA-256 of a message's whole body (``head`` already read), streamed."""
    digest = hashlib.sha256(head)
    for block in iter(lambda: message.read(READ_BLOCK), b""):
        digest.update(block)
    return digest.hexdigest()


def _mesh_time(message: Any) -> str | None:
    """When MESH accepted the message (``mex-statustimestamp``, UTC ``YYYYMMDDHHMMSS``)."""
    value = message.mex_header("statustimestamp")
    if not value:
        return None
    try:
        return isoformat(datetime.strptime(value[:14], "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc))
    except ValueError:
        return None
