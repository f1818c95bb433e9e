"""The MESH transport: one mailbox's HTTP conversation, typed, with every failure turned into one clear line.

What it does: authenticate (handshake, daily), list the inbox once (every page, one workflow filter), download a
message whole or not at all (:class:`VerifiedMessage`), post a file chunk by chunk telling a lost first POST from
a refused one (:class:`NotSent` / :class:`MaybeSent`), acknowledge. What to do with a message is the poller's
(pipeline/mesh/poller.py); when to send, the sender's (pipeline/mesh/sender.py).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import requests
import urllib3
from mesh_client import DEP_ENDPOINT, INT_ENDPOINT, LIVE_ENDPOINT, MeshClient, Message
from mesh_client.io_helpers import SplitStream
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from pipeline.core.errors import InputError, NdopError
from pipeline.core.faults import fault_point
from pipeline.mesh.config import HANDSHAKE_EVERY, MeshConfig

_LOGGER = logging.getLogger(__name__)

READ_BLOCK = 1 << 20
_ENDPOINTS = {"int": INT_ENDPOINT, "live": LIVE_ENDPOINT, "dep": DEP_ENDPOINT}

FaultHook = Callable[[str], None]


class NotSent(Exception):
    """The outbox POST certainly created no message."""


class MaybeSent(Exception):
    """The outbox POST may have created a message: never send again blindly."""


class MeshTransport:
    """mesh-client for one mailbox: opened on first use, closed with the transport.

    ``fault_hook`` (tests only: production never sets it) is called at named points, e.g. to lose the answer to
    an outbox POST; ``NDOP_FAULT`` (pipeline/core/faults.py) kills the process at one, for the crash tests.
    """

    def __init__(self, config: MeshConfig, client_factory: Callable[[MeshConfig], MeshClient] | None = None,
                 max_chunk_size: int = 75 * 1024 * 1024) -> None:
        self.config = config
        self.max_chunk_size = max_chunk_size
        self.fault_hook: FaultHook | None = None
        self._client_factory = client_factory or make_client
        self._client: MeshClient | None = None
        self._handshake_at: float | None = None

    @property
    def client(self) -> MeshClient:
        if self._client is None:
            self._client = self._client_factory(self.config)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def hook(self, point: str) -> None:
        if self.fault_hook is not None:
            self.fault_hook(point)
        fault_point(point)

    def handshake(self) -> None:
        """Authenticate (MESH asks for one a day): a wrong key or password fails here, clearly."""
        with mesh_errors(self.config, "handshake"):
            self.client.handshake()
        self._handshake_at = time.monotonic()
        _LOGGER.debug("handshake with %s as %s ok", self.config.url, self.config.mailbox)

    def ensure_handshake(self) -> None:
        """Handshake once per transport (one scheduled cycle) and again only when the last is a day old: the MESH
        API asks for a daily mailbox validation and no more."""
        if self._handshake_at is None or time.monotonic() - self._handshake_at >= HANDSHAKE_EVERY.total_seconds():
            self.handshake()

    def list_ids(self) -> list[str]:
        """One inbox listing (every page, through MESH's ``links.next``) of our workflows' messages.

        One filter covers every workflow id where the API allows it: their common prefix as a "begins with" filter
        (``SPINE_NTT_UPHOLDING*`` for the defaults); with no common prefix, the whole inbox.
        """
        ids: list[str] = []
        with mesh_errors(self.config, "list inbox"):
            ids = list(dict.fromkeys(self.client.iterate_message_ids(
                workflow_filter=workflow_filter(self.config.workflow_ids))))
        return ids

    def download(self, message_id: str) -> "VerifiedMessage":
        """The message, its body read whole or not at all (close it when done)."""
        message: VerifiedMessage | None = None
        with mesh_errors(self.config, f"download message {message_id}"):
            message = VerifiedMessage(self.client, message_id)
        assert message is not None  # mesh_errors lets nothing pass silently but an acknowledgement of a gone message
        return message

    def acknowledge(self, message_id: str) -> None:
        """Acknowledge (delete from the inbox); one already gone is fine."""
        with mesh_errors(self.config, f"acknowledge message {message_id}", gone_ok=True):
            self.client.acknowledge_message(message_id)

    def post_file(self, recipient: str, path: Path, headers: dict[str, Any]) -> str:
        """mesh-client's ``send_message``, chunk by chunk, telling a lost first POST from a refused one.

        mesh-client never retries the first POST (it could duplicate the message); later chunks it
        retries. A first POST that MESH answered with 4xx created nothing (:class:`NotSent`); one
        that never connected neither; anything else (timeout, reset, 5xx) may have (:class:`MaybeSent`).
        """
        client = self.client
        with open(path, "rb") as handle:
            chunks = SplitStream(handle, self.max_chunk_size)
            total = len(chunks)
            parts = iter(chunks)
            try:
                response = client.send_chunk(recipient=recipient, chunk=next(parts), chunk_num=1,
                                             total_chunks=total, **headers)
                self.hook("after-outbox-post")  # tests: the answer is lost, or we crash, right here
            except (requests.ConnectTimeout, requests.ConnectionError) as err:
                if _never_connected(err):
                    raise NotSent(f"cannot connect to MESH at {self.config.url}") from err
                raise MaybeSent(f"connection lost: {type(err).__name__}") from err
            except requests.RequestException as err:
                raise MaybeSent(f"{type(err).__name__}: {err}") from err
            if 400 <= response.status_code < 500:
                raise NotSent(f"MESH refused the message: HTTP {response.status_code} {_error_text(response)}")
            try:
                message_id = response.json()["message_id"]
            except (ValueError, KeyError, TypeError) as err:
                raise MaybeSent(f"unexpected answer to the outbox POST: HTTP {response.status_code}") from err
            for number, chunk in enumerate(parts, start=2):
                try:
                    client.send_chunk(recipient=recipient, chunk=chunk, chunk_num=number, total_chunks=total,
                                      message_id=message_id)
                except requests.RequestException as err:
                    # The message exists but is incomplete: MESH never delivers it, so sending anew is safe.
                    raise NotSent(f"chunk {number}/{total} of message {message_id} failed: {err}") from err
        return str(message_id)


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
    must bring its full Content-Length (urllib3 checks while streaming), and the chunks must be ``1:N`` .. ``N:N``.
    A gzip-compressed message (every chunk ``Content-Encoding: gzip``) is read as one series of gzip streams across
    its chunks, so both a stream per chunk (mesh-client's way) and one stream split across chunks decode, and the
    last stream must reach its end (its trailer's CRC and length checked by zlib) when the last chunk does: a
    stream cut anywhere, even at a line break with no Content-Length to tell, is caught. When the sender set
    ``mex-content-checksum`` (:func:`content_check`), the decoded content must match it. Anything less raises, and
    :class:`mesh_errors` turns that into :class:`UnreadableMessage`.
    """

    def __init__(self, client: MeshClient, message_id: str) -> None:
        self._first = client.retrieve_message_chunk(message_id, 1)
        self._meta = Message(message_id, self._first, client)
        self._check = content_check(self._first.headers.get("Mex-Content-Checksum"))
        self._blocks = self._chunks(client, message_id)
        self._buffer = b""

    def __getattr__(self, name: str) -> Any:  # headers and ids: mesh-client's Message
        return getattr(self._meta, name)

    def _chunks(self, client: MeshClient, message_id: str) -> Iterator[bytes]:
        total = int((self._first.headers.get("Mex-Chunk-Range") or "1:1").split(":")[1])
        gunzip: GzipStreams | None = None
        for number in range(1, total + 1):
            response = self._first if number == 1 else client.retrieve_message_chunk(message_id, number)
            with response:
                found = response.headers.get("Mex-Chunk-Range") or "1:1"
                if found != f"{number}:{total}":
                    raise UnreadableMessage(f"chunk {number} of {total} came as chunk {found}")
                gzipped = (response.headers.get("Content-Encoding") or "").lower() == "gzip"
                if number == 1:
                    gunzip = GzipStreams() if gzipped else None
                elif gzipped != (gunzip is not None):
                    raise UnreadableMessage(f"chunk {number} of {total} is {'' if gzipped else 'not '}gzip-compressed "
                                            f"and chunk 1 {'is not' if gzipped else 'is'}")
                for raw in response.raw.stream(READ_BLOCK, decode_content=False):
                    yield self._checked(gunzip.feed(raw) if gunzip is not None else raw)
        if gunzip is not None and not gunzip.complete:
            raise UnreadableMessage(f"its gzip stream ends early (at the end of chunk {total} of {total})")
        if self._check is not None:
            self._check.verify()

    def _checked(self, block: bytes) -> bytes:
        if self._check is not None:
            self._check.update(block)
        return block

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


class GzipStreams:
    """Decompress a series of gzip streams (RFC 1952 members) fed in pieces that may split a stream anywhere.

    ``complete`` is true only between streams, after at least one: a stream cut short, whatever its last
    byte, is never complete; a corrupt one raises ``zlib.error`` (its CRC-32 and length are checked at its end).
    """

    def __init__(self) -> None:
        self._inflate: Any = None  # the stream being read; None between streams
        self._streams = 0

    def feed(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._inflate is None:
                self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out.append(self._inflate.decompress(data))
            if not self._inflate.eof:
                break
            data, self._inflate = self._inflate.unused_data, None
            self._streams += 1
        return b"".join(out)

    @property
    def complete(self) -> bool:
        return self._inflate is None and self._streams > 0


_CHECKSUM_ALGORITHMS = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
_CHECKSUM_FORM = re.compile(r"^(?:(md5|sha-?1|sha-?256|sha-?512)\s*[:/-]?\s*)?([0-9a-f]+)$", re.IGNORECASE)


@dataclass
class ContentCheck:
    """A message's ``mex-content-checksum`` (the sender's, of the content before MESH's own compression), checked
    against the decoded content as it is read."""

    algorithm: str
    expected: str
    header: str
    digest: Any = None

    def __post_init__(self) -> None:
        self.digest = hashlib.new(self.algorithm)

    def update(self, block: bytes) -> None:
        self.digest.update(block)

    def verify(self) -> None:
        if self.digest.hexdigest() != self.expected:
            raise UnreadableMessage(
                f"its content does not match its mex-content-checksum ({self.algorithm} {self.expected[:12]}..., "
                f"content {self.digest.hexdigest()[:12]}...)")


def content_check(header: str | None) -> ContentCheck | None:
    """The check a ``mex-content-checksum`` value asks for, or None when the sender set none.

    The header is free text set by the sender (MESH only stores it; mesh-sandbox allows letters, digits, spaces and
    ``:-/``). A hex digest, optionally named (``md5:``, ``sha256:``, ``SHA-256 ``...), is checked: the algorithm is
    the one named, or the one whose digest has that many hex digits (32: MD5, as the MESH client's ``DataChecksum``;
    40: SHA-1; 64: SHA-256; 128: SHA-512). Any other form cannot be checked: logged, and the message read as if it
    had none.
    """
    if not header or not header.strip():
        return None
    found = _CHECKSUM_FORM.match(header.strip())
    named = (found.group(1) or "").lower().replace("-", "") if found else ""
    digits = found.group(2).lower() if found else ""
    algorithm = named or next((name for name, size in _CHECKSUM_ALGORITHMS.items() if size == len(digits)), "")
    if not algorithm or _CHECKSUM_ALGORITHMS[algorithm] != len(digits):
        _LOGGER.warning("mex-content-checksum %r is not a digest this tool can check: the content is read without it",
                        header[:100])
        return None
    return ContentCheck(algorithm, digits, header)


_BODY_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, zlib.error, EOFError)


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


class mesh_errors:  # noqa: N801 (used as a context manager, like contextlib's)
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
