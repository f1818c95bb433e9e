"""The request lifecycle: one folder per request, its ``request.json`` the single record of its state.

This module owns the lifecycle. Every state name, every allowed transition and every crash marker
is written here and nowhere else; other modules move a request only through :meth:`WorkDir.update`,
which refuses a transition :data:`TRANSITIONS` does not allow (:class:`IllegalTransition`) and,
given ``expect=``, a record that is no longer in the state the caller decided on (:class:`StateConflict`).

States, in order of a normal life::

    created -> sent | send-unknown -> accepted -> replied -> processed -> acknowledged
    (or rejected / failed, which end a request)

The crash and idempotency contract (the one statement of it; other modules point here)
----------------------------------------------------------------------------------------
One run at a time per work dir: every step that changes state runs under :meth:`WorkDir.lock`, held
for its whole decide-and-act; a second ``ndop`` either waits (``--wait-lock``) or exits at once with
status 4 (:class:`WorkDirBusy`). Every state change is one atomic rewrite of ``request.json``, so a
process killed anywhere leaves the record of the last completed write, and the next run resumes from it:

- **request** may repeat only as a new request: the folder is built under a dot-name and renamed
  into place, so a crash leaves no half request. ``ndop run`` carries on an unfinished request
  before it builds a new one, so a rerun never sends the same cohort twice.
- **send must not repeat blindly** (a second outbox POST is a second message). Before the POST the
  :data:`SENDING` marker is written; a record found later with the marker but no message id was
  interrupted mid-send and becomes ``send-unknown`` (the message may or may not be in MESH). MESH API
  v2 has no look-up by local id, so such a request is matched by local id when its notice or reply
  arrives, and re-sent (same local id) only after ``resend_after`` with neither. The optional
  ``.ctl`` message follows the same maybe-sent rule with :data:`CTL_SENDING` and ``ctl_send_unknown_since``.
- **poll may repeat**: a notice or report is acknowledged after its state write; a reply is saved
  (atomically, 0600) before ``replied`` is written and is *not* acknowledged then. A crash between the
  download and the state write leaves the message in the inbox, and the next poll downloads it again.
- **process may repeat**: Consents are upserts by a deterministic id (a repeat writes no duplicate);
  a failed or partial run leaves the record ``replied``; only a complete one moves it to ``processed``.
- **The Consent ledger** (``WORK/ledger/``, :mod:`pipeline.ledger.versions`) follows the process rule: a process run
  writes its new ledger to a pending folder, and that ledger is swapped in (``current`` symlink replaced
  with ``os.replace``) only after every Consent of the run is stored, and before the request is marked
  ``processed``. A crash at any point before the swap leaves the previous ledger in force, so the re-run
  decides, and writes, the same delta again (PUTs by id are idempotent); a crash after the swap leaves a
  ledger that already matches the store, so the re-run writes nothing it has not written.
- **acknowledge must not repeat**, and happens only once the Consents are stored (``processed``).
  The :data:`ACKNOWLEDGING` marker is written before the PUT: a run killed between the PUT and the
  state write leaves it, and the next run looks at the inbox instead of acknowledging a second time
  (a reply no longer there was acknowledged). A poll that meets the reply of a ``processed`` request
  acknowledges it too.
- **resolve-reply may repeat** (a person's decision about a second, different reply: :func:`decide_second_reply`):
  a second reply chosen is downloaded whole to a side file first, the messages set aside are then acknowledged
  (one already gone is fine), and only then is the reply file replaced and the record changed. A crash before
  that leaves the request stopped as it was (its chosen reply still in the inbox), and the same command finishes.
"""
from __future__ import annotations

import contextlib
import functools
import errno
import fcntl
import json
import os
import re
import threading
import time
import types
import typing
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, TypedDict

from pipeline.core.clock import isoformat, utcnow
from pipeline.core.errors import EXIT_BUSY, InputError, NdopError
from pipeline.core.files import private_dir, write_json
from pipeline.lifecycle import audit

CREATED = "created"
SENT = "sent"
SEND_UNKNOWN = "send-unknown"
ACCEPTED = "accepted"
REPLIED = "replied"
PROCESSED = "processed"
ACKNOWLEDGED = "acknowledged"
REJECTED = "rejected"
FAILED = "failed"

# state -> the states it may move to (staying in a state is not a transition).
TRANSITIONS: dict[str, frozenset[str]] = {
    CREATED: frozenset({SENT, SEND_UNKNOWN, ACCEPTED, REPLIED, REJECTED, FAILED}),
    SENT: frozenset({ACCEPTED, REPLIED, REJECTED, FAILED}),
    SEND_UNKNOWN: frozenset({SENT, ACCEPTED, REPLIED, REJECTED, FAILED}),
    ACCEPTED: frozenset({REPLIED, REJECTED, FAILED}),
    REPLIED: frozenset({PROCESSED, ACCEPTED}),  # back to waiting: a reply the plausibility gate set aside
    PROCESSED: frozenset({ACKNOWLEDGED}),
    ACKNOWLEDGED: frozenset(),
    REJECTED: frozenset(),
    FAILED: frozenset(),
}
STATES = tuple(TRANSITIONS)
IN_FLIGHT = (SENT, SEND_UNKNOWN, ACCEPTED)  # waiting for NDOP
OPEN = (CREATED, *IN_FLIGHT)  # a notice, reply or report may still come
FINAL = tuple(s for s, after in TRANSITIONS.items() if not after)

# Crash markers: written before a step that must not repeat, cleared (set to None) by its outcome.
SENDING = "sending"
CTL_SENDING = "ctl_sending"
ACKNOWLEDGING = "acknowledging"
MARKERS = (SENDING, CTL_SENDING, ACKNOWLEDGING)

REQUEST_FILE = "request.json"
LOCK_FILE = ".lock"
DEFAULT_WORK_DIR = "./ndop-work"
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", re.ASCII)
_LOCK_POLL_SECONDS = 0.1


class RequestRecord(TypedDict, total=False):
    """``request.json``: every key any step writes (``None`` clears a marker or an error)."""

    request_id: str
    local_id: str
    subject: str
    created_at: str
    mailbox: str
    ndop_mailbox: str
    workflow_id: str
    line_ending: str
    cohort: dict[str, Any]
    files: dict[str, str]
    counts: dict[str, int]
    dat_sha256: str
    dat_bytes: int
    state: str
    history: list[dict[str, str]]
    # send
    sending: dict[str, Any] | None
    send_attempts: int
    send_unknown_since: str
    last_send_error: str | None
    message_id: str
    sent_at: str
    messages_sent: list[dict[str, str]]
    ctl_sending: dict[str, Any] | None
    ctl_message_id: str
    ctl_send_error: str | None
    ctl_send_unknown_since: str | None
    # poll
    notice: dict[str, Any]
    failure: dict[str, Any]
    rejection: dict[str, Any]
    reply_message_id: str
    reply_bytes: int
    reply_sha256: str
    reply_lines: int
    reply_workflow_id: str
    replied_at: str
    checked_at: str
    duplicate_replies: list[str]
    second_replies: list[dict[str, str]]  # different replies after the answer: never used, left for a person
    resolved_replies: list[dict[str, Any]]  # a person's decisions about them (`ndop resolve-reply`)
    verified: dict[str, Any]  # ndop run --verify-sample: counts of Consents read back (pipeline/ledger/verify.py)
    refused_replies: list[dict[str, Any]]  # replies the plausibility gate set aside (downloaded again next poll)
    # process and acknowledge
    processing: dict[str, Any]
    processed_at: str
    acknowledging: str | None
    acknowledged_at: str
    stage_seconds: dict[str, float]
    # retention (pipeline/privacy/purge.py)
    purged_at: str
    purged: list[dict[str, Any]]


class IllegalTransition(NdopError):
    """A move :data:`TRANSITIONS` does not allow: a bug, or a record edited by hand."""


class StateConflict(NdopError):
    """The record is no longer in the state the caller decided on (another run moved it)."""


class WorkDirBusy(NdopError):
    """Another process holds the work dir's lock."""

    exit_code = EXIT_BUSY


def check_transition(current: str | None, new: str) -> None:
    if new not in TRANSITIONS:
        raise IllegalTransition(f"unknown state {new!r}")
    if current is None or current == new:
        return
    if new not in TRANSITIONS.get(current, frozenset()):
        raise IllegalTransition(f"a request cannot move from {current!r} to {new!r}")


def marker(name: str, value: Any) -> dict[str, Any]:
    """``{name: value}`` for :meth:`WorkDir.update`, for one of :data:`MARKERS` (None clears it)."""
    if name not in MARKERS:
        raise ValueError(f"unknown marker {name!r}")
    return {name: value}


def initial_state(at: datetime) -> dict[str, Any]:
    """The state fields of a new record."""
    return {"state": CREATED, "history": [{"state": CREATED, "at": isoformat(at)}]}


USE_FIRST, USE_SECOND = "first", "second"
REPLY_CHOICES = (USE_FIRST, USE_SECOND)


@dataclass(frozen=True)
class ReplyDecision:
    """A person's answer to "which reply is NDOP's?" for a request stopped by a second, different reply: ``keep``
    becomes (or stays) the request's reply; every message in ``set_aside`` is acknowledged in MESH unused."""

    request_id: str
    use: str
    keep: dict[str, str]  # message_id, sha256
    set_aside: tuple[dict[str, str], ...]

    def record(self, at: str) -> dict[str, Any]:
        return {"at": at, "use": self.use, "kept": self.keep, "set_aside": list(self.set_aside)}


def decide_second_reply(record: Mapping[str, Any], use: str, message_id: str | None = None) -> ReplyDecision:
    """The one rule for ``ndop resolve-reply``: only a ``replied`` request that a second, different reply stopped
    (``second_replies``, recorded by the poll; ``ndop process`` refuses it) may be resolved. ``first`` keeps the
    saved reply and sets every second one aside; ``second`` uses the second reply (``message_id`` names which
    when more than one came) and sets aside the saved one and any other. Anything else is bad input."""
    rid = str(record.get("request_id"))
    seconds: list[dict[str, str]] = list(record.get("second_replies") or [])
    if record.get("state") != REPLIED or not seconds:
        raise InputError(f"request {rid} is {record.get('state')!r} with no second reply waiting: resolve-reply is "
                         "only for a replied request stopped by a second, different reply")
    if use not in REPLY_CHOICES:
        raise InputError(f"--use must be {' or '.join(REPLY_CHOICES)}, not {use!r}")
    ids = [str(s.get("message_id")) for s in seconds]
    if message_id is not None and message_id not in ids:
        raise InputError(f"request {rid}: MESH message {message_id!r} is not one of its second replies "
                         f"({', '.join(ids)})")
    first = {"message_id": str(record.get("reply_message_id") or ""), "sha256": str(record.get("reply_sha256") or "")}
    if use == USE_FIRST:
        if message_id is not None:
            raise InputError("--message-id names the second reply to use; --use first sets every second reply aside")
        return ReplyDecision(rid, use, first, tuple(seconds))
    if message_id is None and len(seconds) > 1:
        raise InputError(f"request {rid} has {len(seconds)} second replies ({', '.join(ids)}): name the one to use "
                         "with --message-id")
    chosen = seconds[ids.index(message_id)] if message_id is not None else seconds[0]
    return ReplyDecision(rid, use, chosen, (first, *[s for s in seconds if s is not chosen]))


class DamagedRecord(InputError):
    """A ``request.json`` that is not a request record (valid JSON or not): named in one line, never acted on."""


_REQUIRED = ("request_id", "created_at", "state")  # what every reader needs; any other key is checked when present


@functools.cache
def _record_hints() -> dict[str, Any]:
    return typing.get_type_hints(RequestRecord)


def _fits(value: Any, hint: Any) -> bool:
    """Does a JSON value have the shape a :class:`RequestRecord` annotation asks for (outer type only)?"""
    if hint is Any or value is None:  # None clears a field (update's convention)
        return True
    arms = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return any(isinstance(value, typing.get_origin(arm) or arm) for arm in arms)


def check_record(data: Any, path: Path, request_id: str) -> RequestRecord:
    """``data`` as a :class:`RequestRecord` (the TypedDict is the schema), or :class:`DamagedRecord` naming ``path``
    and the first thing wrong."""
    if not isinstance(data, dict):
        raise DamagedRecord(f"{path}: not a request record (a JSON {type(data).__name__}, not an object)")
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise DamagedRecord(f"{path}: not a request record: no {', '.join(missing)}")
    for key, hint in _record_hints().items():
        if key in data and not _fits(data[key], hint):
            raise DamagedRecord(f"{path}: damaged request record: {key} is a JSON {type(data[key]).__name__}")
    if data["request_id"] != request_id:
        raise DamagedRecord(f"{path}: damaged request record: it names request {data['request_id']!r}")
    if data["state"] not in STATES:
        raise DamagedRecord(f"{path}: damaged request record: unknown state {data['state']!r}")
    return typing.cast(RequestRecord, data)


def check_request_id(request_id: str | None) -> str:
    """A request id as the request step makes them (e.g. ``X26ABC1-021226-0001``); anything else, including
    ``''`` (an empty shell variable) or a path, is bad input."""
    if request_id is None or not REQUEST_ID_PATTERN.fullmatch(request_id):
        shown = "" if request_id is None else request_id[:80].encode("unicode_escape").decode("ascii")
        raise InputError(f"not a request id: {shown!r} (letters, digits, '-' and '_' only, as `ndop request` prints)")
    return request_id



class _Held:
    """One process's hold on one work dir's lock: a thread lock (re-entrant) over the file lock."""

    def __init__(self) -> None:
        self.thread_lock = threading.RLock()
        self.depth = 0
        self.handle: IO[str] | None = None


_HELD: dict[str, _Held] = {}
_HELD_GUARD = threading.Lock()


class WorkDir:
    """The folder that holds every request's files and state."""

    def __init__(self, root: str | os.PathLike[str] = DEFAULT_WORK_DIR) -> None:
        self.root = Path(root)
        self.requests = self.root / "requests"

    def ensure(self) -> "WorkDir":
        try:
            private_dir(self.requests)
        except OSError as err:  # e.g. under /proc, or a path through a regular file
            raise InputError(f"{self.root}: cannot create the work dir: {err.strerror or err}") from None
        return self

    def discard_if_unused(self) -> bool:
        """Remove the work dir when it holds nothing but what :meth:`ensure` and :meth:`lock` made (a command that
        failed before doing anything must not leave a work dir behind); True when removed."""
        try:
            if {p.name for p in self.root.iterdir()} - {LOCK_FILE, self.requests.name} or any(self.requests.iterdir()):
                return False
            self.requests.rmdir()
            (self.root / LOCK_FILE).unlink(missing_ok=True)
            self.root.rmdir()
        except OSError:
            return False
        return True

    def request_dir(self, request_id: str) -> Path:
        return self.requests / request_id

    @contextlib.contextmanager
    def lock(self, wait: bool = True) -> Iterator[None]:
        """Hold the work dir's lock: one writer of request state at a time (one MESH poller).

        Re-entrant within a process (a step holding it may call another that takes it). Held by another
        process: wait for it, or with ``wait=False`` raise :class:`WorkDirBusy` at once.
        """
        key = str(self.root.resolve())
        with _HELD_GUARD:
            held = _HELD.setdefault(key, _Held())
        if not held.thread_lock.acquire(blocking=wait):
            raise self._busy()
        try:
            if held.depth == 0:
                self.ensure()
                handle = open(self.root / LOCK_FILE, "a")
                try:
                    self._flock(handle, wait)
                except BaseException:
                    handle.close()
                    raise
                held.handle = handle
            held.depth += 1
            try:
                yield
            finally:
                held.depth -= 1
                if held.depth == 0 and held.handle is not None:
                    fcntl.flock(held.handle, fcntl.LOCK_UN)
                    held.handle.close()
                    held.handle = None
        finally:
            held.thread_lock.release()

    def _flock(self, handle: IO[str], wait: bool) -> None:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if not wait:
                raise self._busy()
            time.sleep(_LOCK_POLL_SECONDS)

    def _busy(self) -> WorkDirBusy:
        return WorkDirBusy(f"{self.root}: another ndop command is working in this work dir (one at a time); "
                           "try again later, or give --wait-lock to wait for it")

    def all(self) -> list[RequestRecord]:
        """Every request's record in creation order; folders still being built (dot-names) are not requests."""
        records = [self.load(request_id) for request_id in self._request_ids()]
        return sorted(records, key=lambda r: (r.get("created_at", ""), r["request_id"]))

    def _request_ids(self) -> list[str]:
        if not self.requests.is_dir():
            return []
        return [p.name for p in self.requests.iterdir()
                if REQUEST_ID_PATTERN.fullmatch(p.name) and (p / REQUEST_FILE).is_file()]

    def load(self, request_id: str) -> RequestRecord:
        """The request's record, checked against :class:`RequestRecord` (:class:`DamagedRecord` if it is not one)."""
        path = self.request_dir(check_request_id(request_id)) / REQUEST_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"{self.root}: no request {request_id!r}") from None
        except json.JSONDecodeError as err:
            raise DamagedRecord(f"{path}:{err.lineno}: request record is not valid JSON: {err.msg}") from None
        return check_record(data, path, request_id)

    def readable(self) -> tuple[list[RequestRecord], list[DamagedRecord]]:
        """Every request's record, and what is wrong with each damaged one (``ndop status`` shows both; a command
        that acts on records uses :meth:`all`, which refuses a damaged one)."""
        records, damaged = [], []
        for request_id in self._request_ids():
            try:
                records.append(self.load(request_id))
            except DamagedRecord as err:
                damaged.append(err)
        return sorted(records, key=lambda r: (r.get("created_at", ""), r["request_id"])), damaged

    def save(self, record: Mapping[str, Any]) -> RequestRecord:
        """Replace a request's record atomically (a new record, or one whose state this module moved)."""
        write_json(self.request_dir(check_request_id(record["request_id"])) / REQUEST_FILE, dict(record))
        return record  # type: ignore[return-value]

    def update(self, request_id: str, *, state: str | None = None, expect: str | tuple[str, ...] | None = None,
               **changes: Any) -> RequestRecord:
        """Merge ``changes`` into the record and move it to ``state``, keeping a history of states.

        Compare-and-set: with ``expect`` (a state or states) the record must still be in one of them, else
        :class:`StateConflict`; a move the table does not allow raises :class:`IllegalTransition`.
        Load, check and save happen under the work dir's lock.
        """
        with self.lock():
            record = self.load(request_id)
            current = record.get("state")
            if expect is not None:
                expected = (expect,) if isinstance(expect, str) else expect
                if current not in expected:
                    raise StateConflict(f"request {request_id} is {current!r}, expected {' or '.join(expected)}: "
                                        "another run moved it; nothing done")
            if state is not None:
                check_transition(current, state)
            merged: dict[str, Any] = {**record, **changes}
            if state is not None and state != current:
                merged["state"] = state
                merged["history"] = [*record.get("history", []), {"state": state, "at": isoformat(utcnow())}]
            saved = self.save(merged)
            if state is not None and state != current:
                self.audit_state(saved, current)
            return saved

    def audit_state(self, record: Mapping[str, Any], old: str | None) -> None:
        """One ``audit.jsonl`` line for a state change (pipeline/lifecycle/audit.py): ids, counts, never a number."""

        audit.append(self.root, "state", **audit.state_fields(record, old))

    def in_state(self, *states: str) -> list[RequestRecord]:
        return [r for r in self.all() if r.get("state") in states]
