"""MESH settings: where the mailbox is, how we authenticate, and which inbox messages are NDOP's.

Secrets (password, shared key) come only from the environment or a ``--mesh-config`` file, never
from the command line, and are never logged: :meth:`MeshConfig.__repr__` masks them.

The ``--mesh-config`` file is ``KEY=value`` lines with the same names as the environment
variables (``#`` starts a comment line, surrounding quotes are stripped). Precedence: an explicit
command-line option (``--mesh-url``) over the file over the environment.

mesh-client silently falls back to a built-in shared key when none is given, which against live
MESH fails later with an opaque 403; so a missing shared key is refused at start-up, except
against a loopback sandbox, where the sandbox's own default may be what is wanted.
"""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Mapping
from urllib.parse import urlparse

from pipeline.core.errors import InputError, at
from pipeline.request.build import NDOP_MAILBOX, WORKFLOW_ID
from pipeline.core.settings import DAYS, HOURS, MESH_TIMEOUT, is_loopback_url, parse_number

_LOGGER = logging.getLogger(__name__)

REPLY_WORKFLOW_IDS = (WORKFLOW_ID, f"{WORKFLOW_ID}_RESPONSE")  # docs/ndop-and-mesh.md: accept both
DEFAULT_RESEND_AFTER = timedelta(hours=24)
DEFAULT_OVERDUE_AFTER = timedelta(days=5)  # the MESH inbox expiry
ENDPOINT_NAMES = ("int", "live", "dep")
MIN_POLL_INTERVAL = 300  # MESH API: poll at most once every five minutes (unless more messages are waiting)
HANDSHAKE_EVERY = timedelta(days=1)  # MESH API: validate the mailbox (handshake) once a day
# Seconds to connect, and between bytes of an answer; mesh-client retries a request up to 3 times, so a MESH that
# accepts connections and never answers fails a step in about a minute (mesh-client's own default: 10 minutes).
DEFAULT_MESH_TIMEOUT = 15.0

# Every setting: config-file / environment name -> MeshConfig field.
SETTINGS = {
    "MESH_URL": "url",
    "MESH_MAILBOX": "mailbox",
    "MESH_PASSWORD": "password",
    "MESH_SHARED_KEY": "shared_key",
    "MESH_CLIENT_CERT": "client_cert",
    "MESH_CLIENT_KEY": "client_key",
    "MESH_CA_CERT": "ca_cert",
    "NDOP_MAILBOX": "ndop_mailbox",
    "NDOP_WORKFLOW_IDS": "workflow_ids",
    "NDOP_RESEND_AFTER_HOURS": "resend_after",
    "NDOP_OVERDUE_DAYS": "overdue_after",
    "NDOP_SEND_CTL": "send_ctl",
    "NDOP_MESH_TIMEOUT": "timeout",
}
SECRET_FIELDS = ("password", "shared_key")


@dataclass
class MeshConfig:
    url: str = ""
    mailbox: str = ""
    password: str = field(default="", repr=False)
    shared_key: str | None = field(default=None, repr=False)
    client_cert: str | None = None
    client_key: str | None = None
    ca_cert: str | None = None
    ndop_mailbox: str = NDOP_MAILBOX
    workflow_ids: tuple[str, ...] = REPLY_WORKFLOW_IDS
    resend_after: timedelta = DEFAULT_RESEND_AFTER
    overdue_after: timedelta = DEFAULT_OVERDUE_AFTER
    send_ctl: bool = False
    timeout: float = DEFAULT_MESH_TIMEOUT

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={'***' if f.name in SECRET_FIELDS and getattr(self, f.name) else getattr(self, f.name)!r}"
            for f in fields(self)
        )
        return f"MeshConfig({shown})"

    @property
    def is_local(self) -> bool:
        """True for a loopback URL: a local mesh-sandbox, never a real MESH."""
        return self.url.lower() not in ENDPOINT_NAMES and is_loopback_url(self.url)

    def check_poll_interval(self, seconds: float) -> None:
        """The MESH API's rule: against a real MESH, poll at most once every five minutes (a sandbox may go faster)."""
        if seconds < MIN_POLL_INTERVAL and not self.is_local:
            raise InputError(
                f"--interval {seconds:g}: the MESH API allows polling the inbox at most once every "
                f"{MIN_POLL_INTERVAL} seconds (5 minutes); only a loopback sandbox may be polled faster")

    def validate(self) -> "MeshConfig":
        """Refuse to start on settings that would fail later, or silently do the wrong thing."""
        missing = [name for name, attr in (("MESH_URL", "url"), ("MESH_MAILBOX", "mailbox"),
                                           ("MESH_PASSWORD", "password")) if not getattr(self, attr)]
        if missing:
            raise InputError(
                f"MESH settings missing: {', '.join(missing)} (set them in the environment or --mesh-config)")
        if self.url.lower() not in ENDPOINT_NAMES and urlparse(self.url).scheme not in ("http", "https"):
            raise InputError(f"MESH_URL {self.url!r}: use an http(s) URL or one of {', '.join(ENDPOINT_NAMES)}")
        if not self.shared_key and not self.is_local:
            raise InputError(
                "MESH_SHARED_KEY is not set: without it mesh-client would silently use a built-in key "
                "that MESH rejects; set MESH_SHARED_KEY (environment or --mesh-config)"
            )
        if bool(self.client_cert) != bool(self.client_key):
            raise InputError("MESH_CLIENT_CERT and MESH_CLIENT_KEY go together: set both or neither")
        for name, path in (("MESH_CLIENT_CERT", self.client_cert), ("MESH_CLIENT_KEY", self.client_key),
                           ("MESH_CA_CERT", self.ca_cert)):
            if path and not Path(path).is_file():
                raise InputError(f"{name} {path}: no such file")
        if not self.workflow_ids:
            raise InputError("NDOP_WORKFLOW_IDS is empty: name at least one workflow id")
        return self


def _convert(key: str, value: str, source: str) -> object:
    attr = SETTINGS[key]
    try:
        if attr == "workflow_ids":
            return tuple(w.strip() for w in value.split(",") if w.strip())
        if attr == "resend_after":
            return timedelta(hours=parse_number(value, f"{source}: {key}", HOURS))
        if attr == "overdue_after":
            return timedelta(days=parse_number(value, f"{source}: {key}", DAYS))
        if attr == "timeout":
            return parse_number(value, f"{source}: {key}", MESH_TIMEOUT)
        if attr == "send_ctl":
            if value.strip().lower() not in ("1", "0", "true", "false", "yes", "no", "y", "n", "on", "off", ""):
                raise ValueError(value)
            return value.strip().lower() in ("1", "true", "yes", "y", "on")
    except ValueError:
        raise InputError(f"{source}: {key}={value!r} is not a valid value") from None
    if attr in ("mailbox", "ndop_mailbox"):
        return value.strip().upper()
    if attr in ("shared_key", "client_cert", "client_key", "ca_cert"):
        return value.strip() or None
    return value.strip()


def read_config_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """``KEY=value`` lines; unknown keys are an error (a typo must not silently drop a setting)."""
    source = Path(path)
    try:
        text = source.read_text()
        mode = source.stat().st_mode
    except OSError as err:
        raise InputError(f"{source}: cannot read MESH config: {err.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        _LOGGER.warning("%s holds MESH secrets but is readable by others; chmod 600 it", source)
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise InputError(f"{at(source, number)}: expected KEY=value")
        if key not in SETTINGS:
            raise InputError(f"{at(source, number)}: unknown setting {key!r} (known: {', '.join(SETTINGS)})")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def load_config(
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, str | None] | None = None,
    validate: bool = True,
) -> MeshConfig:
    """Settings from the environment, then ``config_file`` (or ``MESH_CONFIG``), then ``overrides``."""
    env = os.environ if env is None else env
    config_file = config_file or env.get("MESH_CONFIG") or None
    layers: list[tuple[str, Mapping[str, str]]] = [("environment", {k: v for k, v in env.items() if k in SETTINGS})]
    if config_file:
        layers.append((str(config_file), read_config_file(config_file)))
    layers.append(("command line", {k: v for k, v in (overrides or {}).items() if v is not None}))
    config = MeshConfig()
    for source, values in layers:
        for key, value in values.items():
            setattr(config, SETTINGS[key], _convert(key, value, source))
    return config.validate() if validate else config
