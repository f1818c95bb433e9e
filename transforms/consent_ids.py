"""The Consent id rule: keyed, so an id in a log, a Provenance or a dead letter does not give the NHS number away.

A Consent's logical id (and its business identifier) is ``HMAC-SHA256(key, "consent|" + NHS number)``, its first
16 bytes shaped as an RFC 9562 version 8 UUID (a valid FHIR id). Without the key, a list of ids says nothing: the
NHS number space (about 900 million valid numbers) cannot be searched for a match. The earlier, unkeyed rule
(:func:`unkeyed_consent_id`, UUIDv5 under a published namespace) is kept only so ``ndop rekey`` can find the
Consents written under it: enumerating the 999 range reversed those ids in seconds.

The key is 32 random bytes, written hex-encoded by ``ndop keygen`` into a 0600 file. It never travels in
pipeline options: a worker is given a :class:`KeySource` (where to read the key, and the fingerprint it must
have) and reads it in ``DoFn.setup``. Sources:

``file:PATH``
    a 0600 file (a local run, or a secret mounted into Flink/Kubernetes workers at the same path);
``env:NAME``
    an environment variable holding the hex key (set on the workers by the deployment);
``gcp-secret:projects/P/secrets/S/versions/V``
    Google Secret Manager, read with the workers' service account (``google-cloud-secret-manager``).

The fingerprint (``HMAC-SHA256(key, "ndop-sync key fingerprint")``, 16 hex characters) names a key without
revealing it; ``ledger.json`` records it, so a run with another key stops before writing.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.files import require_private

KEY_FILE_ENV = "NDOP_ID_KEY_FILE"
KEY_ENV = "NDOP_ID_KEY"
KEY_SOURCE_ENV = "NDOP_ID_KEY_SOURCE"  # where workers read it (file:/env:/gcp-secret:), when not the launcher's file
KEY_BYTES = 32

_UNKEYED_NAMESPACE = uuid.UUID("6f1c2a4e-3b0d-5c7e-9a41-0d5e8b2f7c13").bytes  # the published namespace of old ids
_FINGERPRINT_MESSAGE = b"ndop-sync key fingerprint"


class KeyError_(ValueError):
    """A key that cannot be read or is not a key (one line: the source and the problem, never the key)."""


def _uuid_text(digest: bytes, version: int) -> str:
    raw = bytearray(digest[:16])
    raw[6] = (raw[6] & 0x0F) | (version << 4)
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122/9562 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class IdKey:
    """A Consent id key: :meth:`consent_id` is the id rule. ``repr`` shows the fingerprint only."""

    __slots__ = ("_mac", "fingerprint")

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise KeyError_(f"a Consent id key needs at least 16 bytes, got {len(key)}")
        self._mac = hmac.new(key, b"consent|", hashlib.sha256)  # copied per id: the key schedule is done once
        self.fingerprint = hmac.new(key, _FINGERPRINT_MESSAGE, hashlib.sha256).hexdigest()[:16]

    def consent_id(self, nhs_number: str) -> str:
        """The patient's Consent id: the same on every run under this key, so a PUT never duplicates."""
        mac = self._mac.copy()
        mac.update(nhs_number.encode("ascii"))
        return _uuid_text(mac.digest(), 8)

    def __repr__(self) -> str:
        return f"IdKey(fingerprint={self.fingerprint})"

    def __reduce__(self):  # noqa: ANN204 (a key is never pickled into a pipeline graph or a log)
        raise TypeError("an IdKey is not pickled: give workers a KeySource")


def unkeyed_consent_id(nhs_number: str) -> str:
    """The old, unkeyed id (UUIDv5 of the number under a published namespace): only to find old Consents."""
    return _uuid_text(hashlib.sha1(_UNKEYED_NAMESPACE + nhs_number.encode("ascii")).digest(), 5)


def generate_key() -> str:
    """A new key, hex-encoded (what ``ndop keygen`` writes)."""
    return secrets.token_hex(KEY_BYTES)


def parse_key(text: str, where: str) -> IdKey:
    value = text.strip()
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise KeyError_(f"{where}: not a Consent id key (expected {KEY_BYTES * 2} hex characters)") from None
    if len(raw) != KEY_BYTES:
        raise KeyError_(f"{where}: not a Consent id key (expected {KEY_BYTES * 2} hex characters, got {len(value)})")
    return IdKey(raw)


def read_key_file(path: str | os.PathLike[str]) -> IdKey:
    """A key file: must be private (no group or other access), like every secret file."""
    file = Path(path)
    try:
        require_private(file, "Consent id key", KeyError_)
        return parse_key(file.read_text(encoding="ascii"), str(file))
    except OSError as err:
        raise KeyError_(f"{file}: cannot read the Consent id key ({err.strerror})") from None
    except UnicodeDecodeError:
        raise KeyError_(f"{file}: not a Consent id key (not text)") from None


def write_key_file(path: str | os.PathLike[str]) -> IdKey:
    """Write a new key to ``path`` (0600; never over an existing file: a lost key means a rekey)."""
    file = Path(path)
    text = generate_key()
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(text + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return parse_key(text, str(file))


def _read_gcp_secret(name: str) -> str:  # pragma: no cover - needs a Google project; the call is checked offline
    try:
        from google.cloud import secretmanager  # type: ignore[import-not-found]
    except ImportError:
        raise KeyError_(f"Consent id key source gcp-secret:{name}: google-cloud-secret-manager is not installed "
                        "on this worker") from None
    client = secretmanager.SecretManagerServiceClient()
    return str(client.access_secret_version(name=name).payload.data.decode("ascii"))


SOURCE_KINDS = ("file", "env", "gcp-secret")


@dataclass(frozen=True)
class KeySource:
    """Where a worker reads the key, and the fingerprint it must have: holds no secret, so it may be pickled
    into the pipeline graph and shown in options."""

    spec: str
    fingerprint: str

    def load(self) -> IdKey:
        """Read the key (on a worker: in ``setup``); a key with another fingerprint is an error, never used."""
        key = read_source(self.spec)
        if not hmac.compare_digest(key.fingerprint, self.fingerprint):
            raise KeyError_(f"Consent id key from {self.spec} has fingerprint {key.fingerprint}, "
                            f"expected {self.fingerprint}: another key would write other ids")
        return key


def read_source(spec: str) -> IdKey:
    """The key a source (``file:``, ``env:``, ``gcp-secret:``) names."""
    kind, _, rest = spec.partition(":")
    if kind not in SOURCE_KINDS or not rest:
        raise KeyError_(f"Consent id key source {spec!r}: expected file:PATH, env:NAME or "
                        "gcp-secret:projects/P/secrets/S/versions/V")
    if kind == "file":
        return read_key_file(rest)
    if kind == "env":
        if not os.environ.get(rest):
            raise KeyError_(f"Consent id key source env:{rest}: the variable is not set")
        return parse_key(os.environ[rest], f"env:{rest}")
    return parse_key(_read_gcp_secret(rest), spec)


def configured_source(environ: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
    """The key source the environment names (``NDOP_ID_KEY_SOURCE``, else the file ``NDOP_ID_KEY_FILE``,
    else the variable ``NDOP_ID_KEY``), or None."""
    if environ.get(KEY_SOURCE_ENV):
        return environ[KEY_SOURCE_ENV]
    if environ.get(KEY_FILE_ENV):
        return f"file:{os.path.abspath(environ[KEY_FILE_ENV])}"
    if environ.get(KEY_ENV):
        return f"env:{KEY_ENV}"
    return None


def open_source(spec: str) -> tuple[IdKey, KeySource]:
    """Read the key a source names (the launcher does, once) and the :class:`KeySource` workers get."""
    key = read_source(spec)
    return key, KeySource(spec, key.fingerprint)
