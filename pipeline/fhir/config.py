"""Where the FHIR store is and how to authenticate: :class:`FhirClientConfig`, the ``FHIR_*`` settings, URLs
without credentials, and the secrets read only when a session opens.

Secrets (bearer token, client secret, HTTP Basic password) are never fields of :class:`FhirClientConfig`: the config
is pickled into Beam workers and may be logged, so secrets are read from the environment or a file only when a
session opens (:func:`bearer_token`, :func:`client_secret`, :func:`basic_password`). Credentials never travel in a
URL: a URL is stored (ledger.json), logged and printed.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

from pipeline.core.errors import InputError
from pipeline.core.files import require_private
from pipeline.core.settings import is_loopback_url

AUTH_NONE = "none"
AUTH_TOKEN = "token"
AUTH_CLIENT_CREDENTIALS = "client-credentials"
AUTH_GOOGLE = "google"
AUTH_BASIC = "basic"
AUTH_MODES = (AUTH_NONE, AUTH_TOKEN, AUTH_CLIENT_CREDENTIALS, AUTH_GOOGLE, AUTH_BASIC)

ENV_URL = "FHIR_URL"
ENV_AUTH = "FHIR_AUTH"
ENV_TOKEN = "FHIR_TOKEN"
ENV_TOKEN_FILE = "FHIR_TOKEN_FILE"
ENV_TOKEN_URL = "FHIR_TOKEN_URL"
ENV_CLIENT_ID = "FHIR_CLIENT_ID"
ENV_SCOPE = "FHIR_SCOPE"
ENV_CLIENT_SECRET = "FHIR_CLIENT_SECRET"
ENV_CLIENT_SECRET_FILE = "FHIR_CLIENT_SECRET_FILE"
ENV_USERNAME = "FHIR_USERNAME"
ENV_PASSWORD = "FHIR_PASSWORD"
ENV_PASSWORD_FILE = "FHIR_PASSWORD_FILE"

# Refresh a client-credentials token this many seconds before it expires (authlib's leeway).
TOKEN_LEEWAY = 60
GOOGLE_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


@dataclass(frozen=True)
class FhirClientConfig:
    """Where the FHIR store is and how to authenticate; picklable, and holding no secret."""

    base_url: str
    auth: str = AUTH_NONE
    token_file: str | None = None
    token_url: str | None = None
    client_id: str | None = None
    scope: str | None = None
    client_secret_file: str | None = None
    username: str | None = None  # HTTP Basic; its password is read only when a session opens (basic_password)
    password_file: str | None = None
    timeout: float = 60.0  # seconds, for connect and for each read
    max_retries: int = 5  # for a 429 / 5xx answer
    backoff: float = 0.5  # backoff_seconds' factor: about 0.5, 1, 2, 4 ... seconds between retries
    connect_retries: int = 2  # for no answer at all (connection refused, reset, timeout)

    def __post_init__(self) -> None:
        if not self.base_url:
            raise InputError(f"no FHIR base URL: set {ENV_URL} or --fhir-url")
        refuse_userinfo(self.base_url, f"--fhir-url / {ENV_URL}")
        refuse_userinfo(self.token_url, ENV_TOKEN_URL, "token endpoint URL")
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        if self.auth not in AUTH_MODES:
            raise InputError(f"unknown FHIR auth mode {self.auth!r}: choose one of {', '.join(AUTH_MODES)}")
        if self.auth == AUTH_CLIENT_CREDENTIALS:
            missing = [
                name
                for name, value in ((ENV_TOKEN_URL, self.token_url), (ENV_CLIENT_ID, self.client_id))
                if not value
            ]
            if missing:
                raise InputError(f"FHIR auth client-credentials needs {' and '.join(missing)}")
        if self.auth == AUTH_BASIC:
            check_basic(self)
        if self.timeout <= 0 or self.max_retries < 0 or self.connect_retries < 0 or self.backoff < 0:
            raise InputError("FHIR timeout must be > 0, retries and backoff >= 0")

    @property
    def no_answer_retries(self) -> int:
        """Retries of a request that got no answer: ``connect_retries``, never more than ``max_retries``."""
        return min(self.connect_retries, self.max_retries)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "FhirClientConfig":
        """Settings from ``FHIR_*`` variables; keyword ``overrides`` (e.g. from CLI options) win unless None."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            "base_url": env.get(ENV_URL, ""),
            "auth": env.get(ENV_AUTH) or AUTH_NONE,
            "token_file": env.get(ENV_TOKEN_FILE) or None,
            "token_url": env.get(ENV_TOKEN_URL) or None,
            "client_id": env.get(ENV_CLIENT_ID) or None,
            "scope": env.get(ENV_SCOPE) or None,
            "client_secret_file": env.get(ENV_CLIENT_SECRET_FILE) or None,
            "username": env.get(ENV_USERNAME) or None,
            "password_file": env.get(ENV_PASSWORD_FILE) or None,
        }
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown FhirClientConfig fields: {', '.join(sorted(unknown))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def without_userinfo(url: str) -> str:
    """``url`` without a ``user:password@`` part: what a ledger stores and compares and a message may name."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def same_base_url(a: str, b: str) -> bool:
    """Whether two FHIR base URLs name the same store (userinfo and a trailing ``/`` ignored)."""
    return without_userinfo(a).rstrip("/") == without_userinfo(b).rstrip("/")


def refuse_userinfo(url: str | None, source: str, what: str = "FHIR URL") -> None:
    """One line (exit 2) when a FHIR URL holds ``user:password@``; the line names the URL without it and where
    credentials go instead, never the user name or password."""
    if url and "@" in urlsplit(url).netloc:
        raise InputError(
            f"{source}: the {what} {without_userinfo(url)} holds a user name or password (user:password@); "
            f"credentials never go in a URL (it is stored and logged): remove them and set {ENV_AUTH}=token with "
            f"{ENV_TOKEN_FILE} (or {ENV_TOKEN}), or {ENV_AUTH}={AUTH_CLIENT_CREDENTIALS} with {ENV_TOKEN_URL}, "
            f"{ENV_CLIENT_ID} and {ENV_CLIENT_SECRET_FILE}, or {ENV_AUTH}={AUTH_BASIC} with {ENV_USERNAME} and "
            f"{ENV_PASSWORD_FILE}")


def check_basic(config: FhirClientConfig) -> None:
    """HTTP Basic's settings: a user name (no ``:``, which would end it), a password source, and a URL where the
    password, sent with every request, cannot be read on the way (https, or this machine). One line, exit 2."""
    if not config.username:
        raise InputError(f"FHIR auth basic needs a user name: set {ENV_USERNAME} or --fhir-username")
    if ":" in config.username:
        raise InputError(f"{ENV_USERNAME}: an HTTP Basic user name cannot hold ':'")
    if not config.password_file and not os.environ.get(ENV_PASSWORD, "").strip():
        raise InputError(f"FHIR auth basic needs a password: set {ENV_PASSWORD_FILE} (a 0600 file) or {ENV_PASSWORD}")
    if urlsplit(config.base_url).scheme.lower() != "https" and not is_loopback_url(config.base_url):
        raise InputError(f"FHIR auth basic sends the password with every request, so only over https or to this "
                         f"machine (loopback), not to {url_without_query(config.base_url)}")


_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str) -> str:
    """``scheme://host:port`` of a URL, the default port written out (never a path, query or userinfo): what a
    paging link must share with the FHIR base URL before the session's credentials go with it."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    try:
        port: int | str | None = parts.port
    except ValueError:  # a port that is no number: shown as written, and never equal to a real origin
        port = parts.netloc.rpartition(":")[2]
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port or _DEFAULT_PORTS.get(scheme, '')}"


def check_cli_url(option_value: str | None, env: Mapping[str, str] | None = None) -> None:
    """Before a command touches anything: the FHIR URL it would use (``--fhir-url``, else ``FHIR_URL``)."""
    env = os.environ if env is None else env
    if option_value:
        refuse_userinfo(option_value, "--fhir-url")
    else:
        refuse_userinfo(env.get(ENV_URL), ENV_URL)


def url_without_query(url: str) -> str:
    """Scheme, host and path: what an error may name (a query may hold an NHS number)."""
    parts = urlsplit(without_userinfo(url))
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def url_for_log(url: str | None) -> str:
    """Path only: a search URL's query may hold an NHS number."""
    return urlsplit(url or "").path or "?"


def read_secret(file_name: str | None, env_name: str, what: str, file_option: str, *, private: bool = False) -> str:
    """First line of ``file_name`` when given, else ``$env_name``; the error names where, never what. ``private``:
    the file must be 0600 or stricter (:func:`~pipeline.core.files.require_private`)."""
    if file_name:
        try:
            if private:
                require_private(file_name, what)
            value = Path(file_name).read_text().strip().splitlines()
        except OSError as exc:
            raise InputError(f"{file_name}: cannot read the {what}: {exc.strerror}") from None
        if not value or not value[0].strip():
            raise InputError(f"{file_name}: the {what} file is empty")
        return value[0].strip()
    value_env = os.environ.get(env_name, "").strip()
    if not value_env:
        raise InputError(f"no {what}: set {env_name} or {file_option}")
    return value_env


def bearer_token(config: FhirClientConfig) -> str:
    return read_secret(config.token_file, ENV_TOKEN, "FHIR bearer token", ENV_TOKEN_FILE)


def client_secret(config: FhirClientConfig) -> str:
    return read_secret(config.client_secret_file, ENV_CLIENT_SECRET, "OAuth2 client secret", ENV_CLIENT_SECRET_FILE)


def basic_password(config: FhirClientConfig) -> str:
    return read_secret(config.password_file, ENV_PASSWORD, "FHIR password", ENV_PASSWORD_FILE, private=True)
