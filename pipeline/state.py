"""The work dir: one folder per request, its ``request.json`` the single record of its state.

Every step (request, send, poll, process, run) reads and moves state only through
:class:`WorkDir`, so a crash between any two steps leaves a record the next run resumes from.

States, in order of a normal life::

    created -> sent | send-unknown -> accepted -> replied -> processed -> acknowledged
    (or rejected / failed, which end a request)

The Consent ledger (``WORK/ledger/``, :mod:`pipeline.ledger`) follows the same rule: a process run
writes its new ledger to a pending folder, and that ledger is swapped in (``current`` symlink replaced
with ``os.replace``) only after every Consent of the run is stored, and before the request is marked
``processed``. A crash at any point before the swap leaves the previous ledger in force, so the re-run
decides, and writes, the same delta again (PUTs by id are idempotent); a crash after the swap leaves a
ledger that already matches the store, so the re-run writes nothing it has not written.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import InputError
from pipeline.files import private_dir, write_json

CREATED = "created"
SENT = "sent"
SEND_UNKNOWN = "send-unknown"
ACCEPTED = "accepted"
REPLIED = "replied"
PROCESSED = "processed"
ACKNOWLEDGED = "acknowledged"
REJECTED = "rejected"
FAILED = "failed"

STATES = (CREATED, SENT, SEND_UNKNOWN, ACCEPTED, REPLIED, PROCESSED, ACKNOWLEDGED, REJECTED, FAILED)
IN_FLIGHT = (SENT, SEND_UNKNOWN, ACCEPTED)  # waiting for NDOP
FINAL = (ACKNOWLEDGED, REJECTED, FAILED)

REQUEST_FILE = "request.json"
DEFAULT_WORK_DIR = "./ndop-work"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def isoformat(moment: datetime) -> str:
    """UTC, second precision, ``Z`` suffix: what every timestamp in our records looks like."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class WorkDir:
    """The folder that holds every request's files and state."""

    def __init__(self, root: str | os.PathLike[str] = DEFAULT_WORK_DIR) -> None:
        self.root = Path(root)
        self.requests = self.root / "requests"

    def ensure(self) -> "WorkDir":
        private_dir(self.requests)
        return self

    def request_dir(self, request_id: str) -> Path:
        return self.requests / request_id

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the work dir's lock: one writer of request state at a time (one MESH poller)."""
        self.ensure()
        with open(self.root / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def all(self) -> list[dict[str, Any]]:
        """Every request's record in creation order; folders still being built (dot-names) are not requests."""
        if not self.requests.is_dir():
            return []
        records = [
            self.load(p.name) for p in self.requests.iterdir()
            if not p.name.startswith(".") and (p / REQUEST_FILE).is_file()
        ]
        return sorted(records, key=lambda r: (r.get("created_at", ""), r["request_id"]))

    def load(self, request_id: str) -> dict[str, Any]:
        path = self.request_dir(request_id) / REQUEST_FILE
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"{self.root}: no request {request_id!r}") from None
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{err.lineno}: request record is not valid JSON: {err.msg}") from None

    def save(self, record: dict[str, Any]) -> dict[str, Any]:
        """Replace a request's record atomically."""
        write_json(self.request_dir(record["request_id"]) / REQUEST_FILE, record)
        return record

    def update(self, request_id: str, *, state: str | None = None, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into the record (and move it to ``state``), keeping a history of states."""
        record = self.load(request_id)
        record.update(fields)
        if state is not None and state != record.get("state"):
            if state not in STATES:
                raise ValueError(f"unknown state {state!r}")
            record["state"] = state
            record.setdefault("history", []).append({"state": state, "at": isoformat(utcnow())})
        return self.save(record)

    def find_by_local_id(self, local_id: str) -> dict[str, Any] | None:
        for record in self.all():
            if record.get("local_id") == local_id:
                return record
        return None

    def in_state(self, *states: str) -> list[dict[str, Any]]:
        return [r for r in self.all() if r.get("state") in states]
