"""A mesh-sandbox plugin that plays NDOP's *Check for National Data Opt-outs Service* (POS).

Loaded by adding this folder to ``mesh_sandbox.plugins.__path__`` (``dev/mesh_sandbox.py`` does
it). For each ``SPINE_NTT_UPHOLDING`` data message accepted into the NDOP mailbox it posts back to
the sender, with the same local id: the "job created" notice (subject ``SUCCESS``, small JSON body)
and then the reply, the request minus the opted-out numbers; or, if any number fails Modulus 11,
the one line ``The file contains one or more invalid NHS Numbers``.

Settings are read at every message, so a test or a second local run changes opt-outs without a
restart: environment variables ``NDOP_SANDBOX_*`` and, over them, the JSON file named by
``NDOP_SANDBOX_CONFIG`` (keys are the lower-case names without the prefix)::

    MAILBOX            the mailbox this plays (default X26HC065)
    WORKFLOW_ID        request workflow answered (default SPINE_NTT_UPHOLDING)
    REPLY_WORKFLOW_ID  workflow id of the notice and reply (default SPINE_NTT_UPHOLDING)
    OPTED_OUT_FILE     one NHS number a line: these have opted out
    OPT_OUT_FRACTION   and/or this fraction, chosen by :func:`is_opted_out` with SEED
    SEED               (default 0)
    MODE               reply (default) | notice-only | silent
    DELAY              seconds between the notice and the reply (default 0)
    COMPRESS_REPLY     1 (default): store the reply gzip-compressed (level 1), as a sender may;
                       otherwise the sandbox gzips it at level 9 on every download (about 2.6 s
                       for a 12 MB reply here, against 0.04 s; bench/mesh_transfer.py)

Never call the sandbox over HTTP from here: ``on_event`` runs on the server's event loop.
"""
from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import os
import uuid
from typing import Any, ClassVar, Iterable, Mapping, Optional

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.request import datfile

_LOGGER = logging.getLogger("mesh-sandbox.ndop")

PREFIX = "NDOP_SANDBOX_"
DEFAULTS = {
    "mailbox": "X26HC065",
    "workflow_id": "SPINE_NTT_UPHOLDING",
    "reply_workflow_id": "SPINE_NTT_UPHOLDING",
    "opted_out_file": "",
    "opt_out_fraction": "0",
    "seed": "0",
    "mode": "reply",
    "delay": "0",
    "compress_reply": "1",
}
MODES = ("reply", "notice-only", "silent")


def settings(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The plugin's settings now: defaults, then ``NDOP_SANDBOX_*``, then the JSON config file."""
    env = os.environ if env is None else env
    found = dict(DEFAULTS)
    for key in DEFAULTS:
        if f"{PREFIX}{key.upper()}" in env:
            found[key] = env[f"{PREFIX}{key.upper()}"]
    config_file = env.get(f"{PREFIX}CONFIG")
    if config_file and os.path.exists(config_file):
        with open(config_file, encoding="utf-8") as handle:
            text = handle.read().strip()
        for key, value in (json.loads(text) if text else {}).items():
            if key not in DEFAULTS:
                raise ValueError(f"{config_file}: unknown NDOP sandbox setting {key!r}")
            found[key] = "" if value is None else str(value)
    if found["mode"] not in MODES:
        raise ValueError(f"NDOP sandbox mode {found['mode']!r}: use one of {MODES}")
    return found


def is_opted_out(nhs_number: str, fraction: float, seed: int = 0) -> bool:
    """Whether the seeded-fraction rule opts ``nhs_number`` out: a pure, reproducible choice.

    A keyed hash, not a random draw, so a test or the local demo computes the same set the
    sandbox did without sharing any state with it.
    """
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}:{nhs_number}".encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def read_opted_out_file(path: str) -> set[str]:
    if not path:
        return set()
    with open(path, encoding="utf-8") as handle:
        return {line.strip().rstrip(",") for line in handle if line.strip()}


def opted_out(numbers: Iterable[str], opted_out_numbers: set[str], fraction: float, seed: int) -> set[str]:
    """The numbers of a request NDOP would remove: listed ones, plus the seeded fraction."""
    return {n for n in numbers if n in opted_out_numbers or is_opted_out(n, fraction, seed)}


def answer(body: bytes, config: Mapping[str, str]) -> bytes:
    """NDOP's reply body to a request body: the request minus opt-outs, or the invalid-number line."""
    parsed = datfile.parse(body, header_allowed=False)
    if parsed.bad_lines:
        return datfile.INVALID_NUMBERS_REPLY.encode("ascii") + b"\r\n"
    numbers = parsed.numbers
    removed = opted_out(numbers.to_pylist(), read_opted_out_file(config["opted_out_file"]),
                        float(config["opt_out_fraction"] or 0), int(config["seed"] or 0))
    kept = pc.filter(numbers, pc.invert(pc.is_in(numbers, value_set=pa.array(sorted(removed), pa.string()))))
    line_ending = "crlf" if b"\r\n" in body[:64] else "lf"
    return datfile.encode(kept, line_ending)


class NdopPlugin:
    """Answers requests sent to the NDOP mailbox, the way POS does."""

    triggers: ClassVar[list[str]] = ["after_accept_message"]

    async def on_event(self, event: str, event_args: dict[str, Any], exception: Optional[Exception] = None) -> None:
        if exception is not None:
            return
        message = event_args.get("message")
        if message is None:
            return
        try:
            config = settings()
        except (OSError, ValueError) as err:
            _LOGGER.error("NDOP sandbox settings unusable: %s", err)
            return
        if (
            message.recipient.mailbox_id != config["mailbox"].upper()
            or message.message_type != "DATA"
            or message.workflow_id != config["workflow_id"]
            or (message.metadata.file_name or "").lower().endswith(".ctl")
        ):
            return
        try:
            await self._answer(message, config)
        except Exception:  # noqa: BLE001 - a plugin error must not take the sandbox down
            _LOGGER.exception("NDOP sandbox failed to answer message %s", message.message_id)

    async def _answer(self, request: Any, config: Mapping[str, str]) -> None:
        from mesh_sandbox.dependencies import get_messaging

        messaging = get_messaging()
        mode = config["mode"]
        _LOGGER.info("NDOP sandbox: request %s (local id %s), mode %s", request.message_id,
                     request.metadata.local_id, mode)
        if mode == "silent":
            return
        job = {"status": "pending", "stages": [{"name": "received", "status": "complete"}],
               "request_message_id": request.message_id}
        await self._post(messaging, request, config, json.dumps(job).encode(), subject="SUCCESS",
                         file_name="notice.json", content_type="application/json")
        if mode == "notice-only":
            return
        delay = float(config["delay"] or 0)
        if delay > 0:
            await asyncio.sleep(delay)
        parts = [await messaging.get_chunk(request, n) or b"" for n in range(1, max(request.total_chunks, 1) + 1)]
        body = b"".join(parts)
        if request.metadata.content_encoding == "gzip":
            body = gzip.decompress(body)
        reply = await asyncio.get_running_loop().run_in_executor(None, answer, body, config)
        compress = config["compress_reply"].strip().lower() in ("1", "true", "yes", "y", "on")
        if compress:
            reply = await asyncio.get_running_loop().run_in_executor(None, gzip.compress, reply, 1)
        await self._post(messaging, request, config, reply, subject=request.metadata.subject,
                         file_name=request.metadata.file_name, content_type="text/plain",
                         content_encoding="gzip" if compress else None)

    @staticmethod
    async def _post(messaging: Any, request: Any, config: Mapping[str, str], body: bytes, *, subject: str | None,
                    file_name: str | None, content_type: str, content_encoding: str | None = None) -> None:
        from mesh_sandbox.models.message import (
            Message,
            MessageEvent,
            MessageMetadata,
            MessageStatus,
            MessageType,
        )

        sender = await messaging.get_mailbox(config["mailbox"].upper())
        recipient = await messaging.get_mailbox(request.sender.mailbox_id)
        if sender is None or recipient is None:
            _LOGGER.error("NDOP sandbox: mailbox %s or %s missing", config["mailbox"], request.sender.mailbox_id)
            return
        reply = Message(
            message_id=uuid.uuid4().hex.upper(),
            events=[MessageEvent(status=MessageStatus.ACCEPTED)],
            sender=_party(sender),
            recipient=_party(recipient),
            total_chunks=1,
            message_type=MessageType.DATA,
            workflow_id=config["reply_workflow_id"],
            metadata=MessageMetadata(subject=subject, local_id=request.metadata.local_id, file_name=file_name,
                                     content_type=content_type, content_encoding=content_encoding),
        )
        # background_tasks=None: our own messages must not trigger plugins again.
        await messaging.send_message(message=reply, body=body, background_tasks=None)


def _party(mailbox: Any) -> Any:
    from mesh_sandbox.models.message import MessageParty

    return MessageParty(mailbox_id=mailbox.mailbox_id, mailbox_name=mailbox.mailbox_name, ods_code=mailbox.ods_code,
                        org_code=mailbox.org_code, org_name=mailbox.org_name, billing_entity=mailbox.billing_entity)
