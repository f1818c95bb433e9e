"""The audit log: ``WORK/audit.jsonl``, one JSON line per command run, per request state change and per decision a
person makes about a request (``ndop resolve-reply``).

Who ran what, when, and what it changed, for a data protection officer: UTC time, OS user, host,
command, request id, old and new state, counts, MESH message ids, FHIR base URL. Never an NHS number and
never a secret: events are built from fields this tool controls, and every string is passed through
:func:`pipeline.core.nhs.redact` as well, so a number that slipped into a reason is masked.

Append-only and crash-safe: each event is one ``write`` to a file opened with ``O_APPEND`` (0600), then
fsynced, so a crash can at worst cut the last line short, never corrupt an earlier one;
:func:`read_events` skips such a torn last line.
"""
from __future__ import annotations

import getpass
import json
import os
import re
import socket
from pathlib import Path
from typing import Any, Iterator, Mapping

from pipeline.core import nhs
from pipeline.core.files import PRIVATE
from pipeline.core.clock import isoformat, utcnow

AUDIT_FILE = "audit.jsonl"

# Keys that can name a secret; an event never carries them (defence in depth: callers do not pass them).
_SECRET_WORDS = ("password", "secret", "token", "shared_key", "authorization", "key_file", "cert")


def audit_path(work_dir_root: str | os.PathLike[str]) -> Path:
    return Path(work_dir_root) / AUDIT_FILE


# Keys whose values are ids this tool or MESH made (``X26ABC1-021226-0001``): kept as they are when they look
# like one (letters among the digits), since the number-masking rule would hide their date and sequence.
_ID_KEYS = frozenset({"request_id", "message_id", "ctl_message_id", "reply_message_id", "sha256"})
_ID_SHAPE = re.compile(r"(?=.*[A-Za-z])[A-Za-z0-9][A-Za-z0-9_-]{0,99}", re.ASCII)


def _clean(value: Any, key: str = "") -> Any:
    if isinstance(value, str):
        return value if key in _ID_KEYS and _ID_SHAPE.fullmatch(value) else nhs.redact(value)
    if isinstance(value, Mapping):
        return {str(k): _clean(v, str(k)) for k, v in value.items()
                if not any(w in str(k).lower() for w in _SECRET_WORDS)}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _who() -> dict[str, str]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = str(os.getuid())
    return {"user": user, "host": socket.gethostname()}


def append(work_dir_root: str | os.PathLike[str], event: str, **fields: Any) -> dict[str, Any]:
    """Append one event (``command`` or ``state``) with ``fields``; returns what was written."""

    record = {"at": isoformat(utcnow()), "event": event, **_who(), "pid": os.getpid(), **_clean(fields)}
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    root = Path(work_dir_root)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(audit_path(root), os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return record


def read_events(work_dir_root: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Every whole event in order (a torn last line, from a crash mid-write, is skipped)."""
    path = audit_path(work_dir_root)
    if not path.is_file():
        return
    with open(path, "rb") as handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                return
            yield json.loads(raw)


# Record keys an audit line of a state change carries (ids, counts, times: never a number or a secret).
_MESSAGE_IDS = ("message_id", "ctl_message_id", "reply_message_id")


def state_fields(record: Mapping[str, Any], old: str | None) -> dict[str, Any]:
    """What a ``state`` event says about ``record`` moving from ``old`` to its current state."""
    fields: dict[str, Any] = {"request_id": record.get("request_id"), "old_state": old,
                              "new_state": record.get("state")}
    fields["mesh_message_ids"] = {k: record[k] for k in _MESSAGE_IDS if record.get(k)}
    if record.get("counts"):
        fields["counts"] = dict(record["counts"])
    processed = (record.get("processing") or {}).get("counts")
    if processed:
        fields["processed"] = {k: processed[k] for k in ("opted_out", "not_opted_out", "written", "failed",
                                                          "provenances", "provenance_targets") if k in processed}
    return fields


def decision_event(work_dir_root: str | os.PathLike[str], request_id: str, decision: Mapping[str, Any]) -> dict[
        str, Any]:
    """A person's decision about a request (``ndop resolve-reply``: which reply is NDOP's), with the MESH message
    ids and SHA-256 digests it kept and set aside."""
    return append(work_dir_root, "decision", request_id=request_id, **decision)


def command_event(work_dir_root: str | os.PathLike[str], command: str, exit_status: int, *,
                  fhir_url: str | None = None, request_id: str | None = None) -> dict[str, Any] | None:
    """The ``command`` event of one ``ndop`` run, in a work dir that exists (a command that failed before
    making one, e.g. a bad ``--work-dir``, or ``ndop status`` of a new one, leaves no line and no folder)."""
    root = Path(work_dir_root)
    if not root.is_dir():
        return None
    fields: dict[str, Any] = {"command": command, "exit_status": exit_status, "work_dir": str(root.resolve()),
                              "fhir_url": _base_url(fhir_url or os.environ.get("FHIR_URL"))}
    if request_id:
        fields["request_id"] = request_id
    return append(root, "command", **fields)


def _base_url(url: str | None) -> str | None:
    """A FHIR base URL without any user:password part or query (defence in depth)."""
    if not url:
        return None
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
