"""Sending a request to NDOP: never twice unless provably lost.

The ``.dat`` (and, where configured, the ``.ctl``) goes through :meth:`MeshTransport.post_file`; a first POST
whose outcome is unknown leaves the request ``send-unknown`` and it is sent again, with the same local id, only
after ``resend_after`` and only when the inbox (looked at first) holds neither notice nor reply. The markers and
what a crash leaves: the contract in pipeline/lifecycle/state.py.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

from pipeline.core.errors import InputError
from pipeline.mesh.transport import MaybeSent, MeshTransport, NotSent
from pipeline.core.clock import isoformat, parse_time, utcnow
from pipeline.lifecycle.state import (
    CREATED,
    CTL_SENDING,
    SEND_UNKNOWN,
    SENDING,
    SENT,
    RequestRecord,
    WorkDir,
    check_request_id,
    marker,
)

_LOGGER = logging.getLogger(__name__)


@dataclass
class SendResult:
    request_id: str
    outcome: str  # sent | resent | skipped | waiting | send-unknown | error
    detail: str = ""
    message_id: str | None = None

    @property
    def is_problem(self) -> bool:
        return self.outcome in ("send-unknown", "error")


class Sender:
    """The send policy for one work dir. ``look_at_inbox`` is the poller's one cycle: run before any resend."""

    def __init__(self, transport: MeshTransport, work_dir: WorkDir, look_at_inbox: Callable[[], object]) -> None:
        self.transport = transport
        self.config = transport.config
        self.work_dir = work_dir
        self._look_at_inbox = look_at_inbox

    def send(self, request_id: str | None = None, now: datetime | None = None) -> list[SendResult]:
        """Send one request (or every request due) to NDOP; never twice unless provably lost."""
        if request_id is not None:
            check_request_id(request_id)  # '' (an empty shell variable) is bad input, not "every request"
        with self.work_dir.lock():
            self.settle_interrupted_sends()
            records = [self.work_dir.load(request_id)] if request_id is not None else self.work_dir.all()
            if any(self._resend_due(r, now) or self._ctl_resend_due(r, now) for r in records):
                # What we know of the inbox decides a resend: look once more before sending again.
                self.transport.ensure_handshake()
                self._look_at_inbox()
                records = [self.work_dir.load(r["request_id"]) for r in records]
            return [self._send_one(record, now, explicit=request_id is not None) for record in records]

    # -- when ---------------------------------------------------------------------------------------

    def _due_at(self, since: str) -> datetime:
        return parse_time(since) + self.config.resend_after

    def _is_due(self, since: str, now: datetime | None) -> bool:
        return (now or utcnow()) >= self._due_at(since)

    @staticmethod
    def _unknown_since(record: RequestRecord) -> str:
        return record.get("send_unknown_since") or record.get("sent_at") or record["created_at"]

    def _resend_due(self, record: RequestRecord, now: datetime | None) -> bool:
        return record["state"] == SEND_UNKNOWN and self._is_due(self._unknown_since(record), now)

    def _ctl_unknown(self, record: RequestRecord) -> bool:
        return bool(record["state"] == SENT and self.config.send_ctl and record.get("ctl_send_unknown_since")
                    and not record.get("ctl_message_id"))

    def _ctl_resend_due(self, record: RequestRecord, now: datetime | None) -> bool:
        return self._ctl_unknown(record) and self._is_due(self._ctl_since(record), now)

    @staticmethod
    def _ctl_since(record: RequestRecord) -> str:
        return record.get("ctl_send_unknown_since") or record["created_at"]

    # -- what ---------------------------------------------------------------------------------------

    def _recipient(self, record: RequestRecord) -> str:
        return record.get("ndop_mailbox") or self.config.ndop_mailbox

    @staticmethod
    def _headers(record: RequestRecord, file_key: str = "dat") -> dict[str, str]:
        """The MESH headers of a request's file: workflow, subject, local id and file name carry no patient data."""
        return {"workflow_id": record["workflow_id"], "subject": record["subject"], "local_id": record["local_id"],
                "filename": record["files"][file_key]}

    def _send_one(self, record: RequestRecord, now: datetime | None, explicit: bool) -> SendResult:
        rid, state = record["request_id"], record["state"]
        if self._ctl_unknown(record):
            return self._resend_ctl(record, now)
        if state == SEND_UNKNOWN:
            if not self._resend_due(record, now):
                return SendResult(rid, "waiting", f"outcome of the last send unknown; `ndop poll` matches its reply "
                                  f"by local id; re-sent after {isoformat(self._due_at(self._unknown_since(record)))} "
                                  f"if neither notice nor reply has come")
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
        dat = self.work_dir.request_dir(rid) / record["files"]["dat"]
        check_dat(dat, record)
        if record.get("ndop_mailbox", "").upper() != self.config.ndop_mailbox.upper():
            _LOGGER.warning("request %s was built for NDOP mailbox %s; sending there (config says %s)",
                            rid, record.get("ndop_mailbox"), self.config.ndop_mailbox)
        recipient = self._recipient(record)
        attempt = int(record.get("send_attempts", 0)) + 1
        self.transport.ensure_handshake()
        expected = record["state"]
        self.work_dir.update(rid, expect=expected, **marker(SENDING, {"at": isoformat(utcnow()), "attempt": attempt}))
        try:
            message_id = self.transport.post_file(recipient, dat, self._headers(record))
        except NotSent as err:
            self.work_dir.update(rid, expect=expected, **{SENDING: None}, last_send_error=str(err))
            return SendResult(rid, "error", f"not sent: {err}")
        except MaybeSent as err:
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
            result.detail += self._send_ctl(record)
        return result

    def _send_ctl(self, record: RequestRecord) -> str:
        """The ``.ctl`` as a message of its own (some integrations expect it); the maybe-sent rule of the
        ``.dat`` applies (pipeline/lifecycle/state.py): a lost answer or a crash mid-POST leaves
        ``ctl_send_unknown_since`` and the ``.ctl`` is sent again only after ``resend_after``, while NDOP has not
        answered."""
        rid = record["request_id"]
        ctl = self.work_dir.request_dir(rid) / record["files"]["ctl"]
        self.work_dir.update(rid, expect=SENT, **marker(CTL_SENDING, {"at": isoformat(utcnow())}))
        try:
            ctl_id = self.transport.post_file(self._recipient(record), ctl, self._headers(record, "ctl"))
        except NotSent as err:
            self.work_dir.update(rid, **{CTL_SENDING: None}, ctl_send_error=str(err))
            _LOGGER.warning("request %s: the .ctl message was not sent (%s); the .dat was sent", rid, err)
            return f"; .ctl not sent: {err}"
        except MaybeSent as err:
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
        if not self._ctl_resend_due(record, now):
            return SendResult(rid, "waiting", f"sent as message {record.get('message_id')}; the .ctl's outcome is "
                              f"unknown; sent again after {isoformat(self._due_at(self._ctl_since(record)))} "
                              f"if NDOP has not answered", record.get("message_id"))
        self.transport.ensure_handshake()
        detail = self._send_ctl(record)
        return SendResult(rid, "skipped", f"already sent (message {record.get('message_id')}){detail}",
                          record.get("message_id"))

    def settle_interrupted_sends(self) -> None:
        """A ``sending`` (or ``ctl_sending``) marker without a result means a crash mid-POST: the outcome is
        unknown (pipeline/lifecycle/state.py)."""
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


def check_dat(path: Path, record: RequestRecord) -> None:
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
