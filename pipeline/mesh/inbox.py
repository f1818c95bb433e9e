"""What to do with one MESH inbox message: a pure decision on its metadata and the request it names.

The MESH driver (pipeline/mesh/: driver, transport, poller) lists, downloads and acknowledges; this module only decides,
so every kind of message is tested without a sandbox (tests/test_inbox.py). Why a reply is never
acknowledged before its Consents are stored: see the contract in pipeline/lifecycle/state.py.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Collection, Mapping

from pipeline.request import datfile
from pipeline.lifecycle.state import ACKNOWLEDGED, OPEN, PROCESSED, REJECTED

NOTICE_SUBJECT = "SUCCESS"
HEAD_BYTES = 256  # how much of a body the decision may look at


class Action(str, enum.Enum):
    LEAVE_UNMATCHED = "leave-unmatched"  # no request here has its local id: left in the inbox
    LEAVE_OTHER_WORKFLOW = "leave-other-workflow"  # not an NDOP workflow: left in the inbox
    LEAVE_FOREIGN_SENDER = "leave-foreign-sender"  # names our request but is not from the NDOP mailbox
    FAIL = "fail"  # a MESH report about our message: the request failed
    IGNORE_REPORT = "ignore-report"  # a report about an older message or a settled request
    ACCEPT = "accept"  # NDOP's job-created notice
    DUPLICATE_NOTICE = "duplicate-notice"  # a notice for a request past that point
    REJECT = "reject"  # NDOP's invalid-numbers reply
    SAVE_REPLY = "save-reply"  # the reply: saved, not acknowledged until processed
    AWAIT_PROCESSING = "await-processing"  # the reply already saved, not yet processed: left
    ACK_PROCESSED = "ack-processed"  # the reply of a processed request: acknowledge it now
    LATE_DUPLICATE = "late-duplicate"  # the same reply again (same content digest) for a request that has its answer
    NEEDS_DIGEST = "needs-digest"  # decided only by the body's SHA-256: download it whole, then decide again
    SECOND_REPLY = "second-reply"  # a different reply for a request that has its answer: left for a person


ACKNOWLEDGES = frozenset({Action.FAIL, Action.IGNORE_REPORT, Action.ACCEPT, Action.DUPLICATE_NOTICE, Action.REJECT,
                          Action.ACK_PROCESSED, Action.LATE_DUPLICATE})
LEAVES = frozenset({Action.LEAVE_UNMATCHED, Action.LEAVE_OTHER_WORKFLOW, Action.LEAVE_FOREIGN_SENDER,
                    Action.AWAIT_PROCESSING, Action.SECOND_REPLY})


@dataclass(frozen=True)
class InboxMessage:
    """What the decision needs of a MESH message (no transport object)."""

    message_id: str
    local_id: str = ""
    message_type: str = "DATA"
    subject: str = ""
    sender: str = ""
    workflow_id: str = ""
    linked_message_id: str = ""
    head: bytes = b""  # the first HEAD_BYTES of the body (fewer: the whole body)
    sha256: str | None = None  # the whole body's digest, when the decision asked for it (NEEDS_DIGEST)

    @property
    def is_report(self) -> bool:
        return self.message_type.upper() == "REPORT"


def match_request(message: InboxMessage, by_local: Mapping[str, str], by_message: Mapping[str, str]) -> str | None:
    """The request a message is about: by local id, or (a MESH report) by the message it is linked to."""
    found = by_local.get(message.local_id) if message.local_id else None
    if found is None and message.is_report and message.linked_message_id:
        found = by_message.get(message.linked_message_id)
    return found


def is_invalid_numbers_reply(head: bytes) -> bool:
    """NDOP's short text reply saying the request held an invalid number (docs/ndop-and-mesh.md)."""
    return len(head) < HEAD_BYTES and datfile.INVALID_NUMBERS_REPLY.lower() in head.decode("utf-8", "replace").lower()


def classify_inbox_message(message: InboxMessage, record: Mapping[str, object] | None, *, ndop_mailbox: str,
                           workflow_ids: Collection[str] = ()) -> Action:
    """Exactly one action for ``message``; ``record`` is the matched request's record (None: no match)."""
    if workflow_ids and message.workflow_id and message.workflow_id not in workflow_ids:
        return Action.LEAVE_OTHER_WORKFLOW
    if record is None:
        return Action.LEAVE_UNMATCHED
    state = record.get("state")
    if message.is_report:
        current = record.get("message_id")
        about_older = bool(message.linked_message_id and current and message.linked_message_id != current)
        return Action.FAIL if state in OPEN and not about_older else Action.IGNORE_REPORT
    expected_sender = str(record.get("ndop_mailbox") or ndop_mailbox).upper()
    if message.sender and message.sender.upper() != expected_sender:
        return Action.LEAVE_FOREIGN_SENDER
    if record.get("reply_message_id") == message.message_id:  # the saved reply, whatever else it claims to be
        return Action.ACK_PROCESSED if state in (PROCESSED, ACKNOWLEDGED) else Action.AWAIT_PROCESSING
    if message.subject.strip().upper() == NOTICE_SUBJECT:
        return Action.ACCEPT if state in OPEN else Action.DUPLICATE_NOTICE
    if state not in OPEN:  # the request has its answer: only the same answer again may be acknowledged unread
        if state == REJECTED and is_invalid_numbers_reply(message.head):
            return Action.LATE_DUPLICATE
        if message.sha256 is None:
            return Action.NEEDS_DIGEST
        return Action.LATE_DUPLICATE if message.sha256 == record.get("reply_sha256") else Action.SECOND_REPLY
    if is_invalid_numbers_reply(message.head):
        return Action.REJECT
    return Action.SAVE_REPLY
