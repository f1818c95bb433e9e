"""Talking to the FHIR R4 store: configuration, an authenticated retrying session, search and bundles.

No Beam here: the Beam writer (``transforms/write_consents.py``) and the CLI (reading Patients) share it.

Why the pieces look as they do:
- Secrets (bearer token, client secret) are never fields of :class:`FhirClientConfig`: the config is
  pickled into Beam workers and may be logged, so secrets are read from the environment or a file only
  when a session opens.
- Retries are urllib3's ``Retry`` on the session's adapter, including POST: every bundle we post holds
  only idempotent PUTs (by id, or conditional on the business identifier), so sending one twice is
  harmless. ``Retry-After`` on 429/503 is honoured. One backoff rule, :func:`backoff_seconds` (jittered
  exponential), spaces both these retries and the writer's per-entry retries.
- A request that gets no answer at all (connection refused, timeouts) is retried only
  ``connect_retries`` times (2), not the ``max_retries`` (5) a 429/5xx gets: a server that is gone
  should fail the run in seconds (:class:`FhirUnreachableError`), not cost every bundle a minute.
- A 401 refreshes the credentials once (token re-read, new client-credentials token, or Google refresh)
  and repeats the request; a second 401 raises :class:`FhirAuthError`, whose text names the auth mode and
  never the secret.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError, NewConnectionError
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util.retry import Retry

from pipeline.errors import InputError, NdopError

_LOGGER = logging.getLogger(__name__)

AUTH_NONE = "none"
AUTH_TOKEN = "token"
AUTH_CLIENT_CREDENTIALS = "client-credentials"
AUTH_GOOGLE = "google"
AUTH_MODES = (AUTH_NONE, AUTH_TOKEN, AUTH_CLIENT_CREDENTIALS, AUTH_GOOGLE)

ENV_URL = "FHIR_URL"
ENV_AUTH = "FHIR_AUTH"
ENV_TOKEN = "FHIR_TOKEN"
ENV_TOKEN_FILE = "FHIR_TOKEN_FILE"
ENV_TOKEN_URL = "FHIR_TOKEN_URL"
ENV_CLIENT_ID = "FHIR_CLIENT_ID"
ENV_SCOPE = "FHIR_SCOPE"
ENV_CLIENT_SECRET = "FHIR_CLIENT_SECRET"
ENV_CLIENT_SECRET_FILE = "FHIR_CLIENT_SECRET_FILE"

FHIR_JSON = "application/fhir+json"
RETRY_STATUSES = (429, 500, 502, 503, 504)
# Refresh a client-credentials token this many seconds before it expires (authlib's leeway).
TOKEN_LEEWAY = 60
GOOGLE_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


class FhirError(NdopError):
    """The FHIR server answered with an error we cannot turn into data (e.g. a failed search)."""


class FhirAuthError(FhirError):
    """Credentials missing or refused even after one refresh."""


class FhirUnreachableError(FhirError):
    """The FHIR server stopped answering (connection refused, timeouts on consecutive bundles): writing
    more would only spend every bundle's retries; the run fails and the MESH reply stays unacknowledged."""


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
        }
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown FhirClientConfig fields: {', '.join(sorted(unknown))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


# ---------------------------------------------------------------------------------------------------
# Credentials never travel in a URL (issue 21): a URL is stored (ledger.json), logged and printed.


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
            f"{ENV_CLIENT_ID} and {ENV_CLIENT_SECRET_FILE}")


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


# ---------------------------------------------------------------------------------------------------
# Secrets


def _read_secret(file_name: str | None, env_name: str, what: str, file_option: str) -> str:
    """First line of ``file_name`` when given, else ``$env_name``; the error names where, never what."""
    if file_name:
        try:
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


def _bearer_token(config: FhirClientConfig) -> str:
    return _read_secret(config.token_file, ENV_TOKEN, "FHIR bearer token", ENV_TOKEN_FILE)


def _client_secret(config: FhirClientConfig) -> str:
    return _read_secret(config.client_secret_file, ENV_CLIENT_SECRET, "OAuth2 client secret", ENV_CLIENT_SECRET_FILE)


# ---------------------------------------------------------------------------------------------------
# Retries


def _url_without_query(url: str) -> str:
    """Scheme, host and path: what an error may name (a query may hold an NHS number)."""
    parts = urlsplit(without_userinfo(url))
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _url_for_log(url: str | None) -> str:
    """Path only: a search URL's query may hold an NHS number."""
    return urlsplit(url or "").path or "?"


BACKOFF_MAX = 30.0  # seconds: no single wait longer than this, whatever the attempt
_jitter: Callable[[], float] = random.random  # tests pin it


def backoff_seconds(retry: int, factor: float, cap: float = BACKOFF_MAX) -> float:
    """How long to wait before retry number ``retry`` (1, 2, ...): ``factor * 2**(retry-1)``, capped at
    ``cap``, times a random 0.5-1 (so writers that failed together do not retry together, as Beam's
    own ``FuzzedExponentialIntervals``). The one backoff rule of every FHIR retry here."""
    if retry < 1 or factor <= 0:
        return 0.0
    return min(cap, factor * 2 ** (retry - 1)) * (0.5 + 0.5 * _jitter())


class LoggingRetry(Retry):
    """urllib3's Retry with :func:`backoff_seconds` for its waits, plus a WARNING per retry (it only logs at
    DEBUG) that names which budget the retry comes from."""

    _drawn: float | None = None

    def get_backoff_time(self) -> float:
        if self._drawn is None:  # drawn once, so the wait logged is the wait slept
            errors = len(list(takewhile(lambda h: h.redirect_location is None, reversed(self.history))))
            self._drawn = backoff_seconds(errors, self.backoff_factor)
        return self._drawn

    def _kind(self, error: Exception | None) -> str:
        if error is not None and self._is_connection_error(error):
            return "connect"
        if error is not None and self._is_read_error(error):
            return "read"
        return "status"

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):  # type: ignore[no-untyped-def, override]
        new = super().increment(method, url, response, error, _pool, _stacktrace)
        cause = f"HTTP {response.status}" if response is not None and response.status else type(error).__name__
        retry_after = response.headers.get("Retry-After") if response is not None else None
        kind = self._kind(error)
        used = sum(1 for h in new.history if self._kind(h.error) == kind)
        left = getattr(new, kind)
        limit = used + left if isinstance(left, int) else -1  # each budget counts down per retry
        if isinstance(self.total, int):
            limit = min(limit, self.total + len(self.history)) if limit >= 0 else self.total + len(self.history)
        _LOGGER.warning(
            "FHIR %s %s failed (%s); retry %d of %d%s",
            method,
            _url_for_log(url),
            cause,
            used,
            limit,
            f" after Retry-After {retry_after}" if retry_after else f", backoff {new.get_backoff_time():.1f} s",
        )
        return new


def is_timeout(exc: requests.RequestException) -> bool:
    """Whether a request that got no answer timed out (requests reports retries spent on timeouts as a
    ConnectionError wrapping urllib3's MaxRetryError), rather than being refused or reset."""
    if isinstance(exc, requests.Timeout):
        return True
    cause = exc.args[0] if exc.args else None
    reason = cause.reason if isinstance(cause, MaxRetryError) else None
    # urllib3's NewConnectionError (refused) subclasses its ConnectTimeoutError: a refusal is no timeout
    return isinstance(reason, Urllib3Timeout) and not isinstance(reason, NewConnectionError)


def make_retry(config: FhirClientConfig) -> Retry:
    return LoggingRetry(
        total=config.max_retries,
        connect=config.no_answer_retries,
        read=config.no_answer_retries,
        status=config.max_retries,
        other=0,
        backoff_factor=config.backoff,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=None,  # POST too: our bundles hold only idempotent PUTs
        respect_retry_after_header=True,
        raise_on_status=False,  # hand back the last 5xx/429 so the writer can dead-letter it with its text
    )


# ---------------------------------------------------------------------------------------------------
# Sessions


class _FhirSessionMixin:
    """Default timeout, FHIR JSON headers, and refresh-once-on-401 for any requests.Session flavour."""

    _config: FhirClientConfig
    _fetching_token = False  # the token request itself goes through this session: no 401 dance for it

    def _setup_fhir(self, config: FhirClientConfig) -> None:
        self._config = config
        self.headers["Accept"] = FHIR_JSON  # type: ignore[attr-defined]
        adapter = HTTPAdapter(max_retries=make_retry(config), pool_connections=4, pool_maxsize=4)
        self.mount("http://", adapter)  # type: ignore[attr-defined]
        self.mount("https://", adapter)  # type: ignore[attr-defined]

    def _refresh_credentials(self) -> None:
        """Get fresh credentials after a 401 (subclasses)."""

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        kwargs.setdefault("timeout", self._config.timeout)
        response = super().request(method, url, *args, **kwargs)  # type: ignore[misc]
        if response.status_code != 401 or self._fetching_token:
            return response
        if self._config.auth == AUTH_NONE:
            raise FhirAuthError(
                f"the FHIR server {self._config.base_url} wants authentication (401) but FHIR auth is 'none': "
                f"set {ENV_AUTH} / --fhir-auth"
            )
        _LOGGER.warning("FHIR %s %s: 401; refreshing the %s credentials once", method, _url_for_log(url),
                        self._config.auth)
        response.close()
        self._refresh_credentials()
        response = super().request(method, url, *args, **kwargs)  # type: ignore[misc]
        if response.status_code == 401:
            raise FhirAuthError(
                f"the FHIR server {self._config.base_url} refused the '{self._config.auth}' credentials (401) "
                f"even after a refresh: {_auth_hint(self._config)}"
            )
        return response


def _auth_hint(config: FhirClientConfig) -> str:
    if config.auth == AUTH_TOKEN:
        return f"check the token in {config.token_file or ENV_TOKEN}"
    if config.auth == AUTH_CLIENT_CREDENTIALS:
        secret = config.client_secret_file or ENV_CLIENT_SECRET
        return f"check the client id, scope and secret ({secret}) at {config.token_url}"
    return "check the application default credentials and their IAM role on the FHIR store"


class _PlainSession(_FhirSessionMixin, requests.Session):
    pass


class _TokenSession(_FhirSessionMixin, requests.Session):
    def _refresh_credentials(self) -> None:
        # Token files are often rotated by something else (a sidecar, a cron): read it again.
        self.headers["Authorization"] = f"Bearer {_bearer_token(self._config)}"


def _client_credentials_session(config: FhirClientConfig) -> requests.Session:
    from authlib.integrations.requests_client import OAuth2Session
    from authlib.integrations.base_client import OAuthError

    class _ClientCredentialsSession(_FhirSessionMixin, OAuth2Session):
        """authlib fetches the token, caches it and fetches a new one ``leeway`` s before it expires."""

        def _refresh_credentials(self) -> None:
            self._fetch()

        def ensure_active_token(self, token: Any = None) -> bool:
            # authlib calls this before each request; route its refresh through _fetch's error handling.
            token = token if token is not None else self.token
            if token is None or token.is_expired(leeway=self.leeway):
                self._fetch()
            return True

        def _fetch(self) -> None:
            self._fetching_token = True
            try:
                self.fetch_token(grant_type="client_credentials")
            except OAuthError as exc:
                raise FhirAuthError(
                    f"the token endpoint {config.token_url} refused client {config.client_id!r}: "
                    f"{exc.error}{': ' + exc.description if exc.description else ''}"
                ) from None
            except requests.RequestException as exc:
                raise FhirAuthError(
                    f"cannot reach the token endpoint {config.token_url}: {type(exc).__name__}") from None
            finally:
                self._fetching_token = False

    session = _ClientCredentialsSession(
        client_id=config.client_id,
        client_secret=_client_secret(config),
        token_endpoint=config.token_url,
        token_endpoint_auth_method="client_secret_basic",
        scope=config.scope,
        grant_type="client_credentials",
        leeway=TOKEN_LEEWAY,
    )
    session._setup_fhir(config)
    session._fetch()
    return session


def _google_session(config: FhirClientConfig) -> requests.Session:
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError
    from google.auth.transport.requests import AuthorizedSession

    class _GoogleSession(_FhirSessionMixin, AuthorizedSession):
        """google-auth refreshes before expiry and once on 401 (max_refresh_attempts=1) by itself."""

    try:
        credentials, _project = google.auth.default(scopes=[config.scope or GOOGLE_SCOPE])
    except DefaultCredentialsError as exc:
        raise FhirAuthError(f"no Google application default credentials: {exc}") from None
    session = _GoogleSession(credentials, refresh_status_codes=(401,), max_refresh_attempts=1)
    session._setup_fhir(config)
    return session


def open_session(config: FhirClientConfig) -> requests.Session:
    """A session for ``config.base_url`` with auth, timeouts, and retries attached; close it when done."""
    session: requests.Session
    if config.auth == AUTH_CLIENT_CREDENTIALS:
        return _client_credentials_session(config)
    if config.auth == AUTH_GOOGLE:
        return _google_session(config)
    if config.auth == AUTH_TOKEN:
        session = _TokenSession()
        session._setup_fhir(config)
        session._refresh_credentials()
        return session
    session = _PlainSession()
    session._setup_fhir(config)
    return session


# ---------------------------------------------------------------------------------------------------
# Reading answers


def status_code(status: str | int | None) -> int:
    """The number in ``Bundle.entry.response.status``: servers send "201" or "201 Created"."""
    text = str(status or "").strip()
    digits = text.split(" ", 1)[0]
    return int(digits) if digits.isdigit() else 0


def outcome_text(outcome: Mapping[str, Any] | None) -> str:
    """The human part of an OperationOutcome: each issue's diagnostics, else details.text, else code,
    followed by ``(at ELEMENT)`` when the issue names the element that failed (its ``expression``, else
    its ``location``; HAPI's ``Line[1] Col[90]`` positions are left out: they point into our own JSON)."""
    if not outcome:
        return ""
    parts = []
    for issue in outcome.get("issue") or []:
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code") or ""
        if text:
            where = _issue_elements(issue)
            parts.append(f"{text} (at {where})" if where else str(text))
    return "; ".join(parts)


def _issue_elements(issue: Mapping[str, Any]) -> str:
    paths = [str(p) for p in (issue.get("expression") or issue.get("location") or [])
             if p and not str(p).startswith("Line[")]
    return ", ".join(dict.fromkeys(paths))


def response_reason(response: requests.Response) -> str:
    """Why a whole request failed: the OperationOutcome text when the body is one, else the HTTP reason."""
    try:
        body = response.json()
    except ValueError:
        body = None
    text = outcome_text(body) if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome" else ""
    return text or f"HTTP {response.status_code} {response.reason or ''}".strip()


def _get(session: requests.Session, url: str, params: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """GET a search page; a server that never answers (after the session's retries) is one FhirError line."""
    try:
        response = session.get(url, params=params)
    except requests.RequestException as exc:
        raise FhirError(f"{what} failed: no answer from the FHIR server {_url_without_query(url)} "
                        f"({type(exc).__name__})") from None
    if response.status_code != 200:
        raise FhirError(f"{what} failed: HTTP {response.status_code}: {response_reason(response)}")
    return response.json()


def check_server(config: FhirClientConfig) -> None:
    """Fail fast, before a pipeline posts anything: a server that is down (or refuses our credentials)
    would otherwise cost every bundle its whole retry budget before the run could fail."""
    with open_session(config) as session:
        _get(session, f"{config.base_url.rstrip('/')}/metadata", None, "FHIR server check")


# ---------------------------------------------------------------------------------------------------
# Search and bundles


def iter_search(
    session: requests.Session, base_url: str, resource_type: str, params: Mapping[str, Any] | None = None
) -> Iterator[dict[str, Any]]:
    """Every resource a search matches, page after page (following ``link[relation=next]``)."""
    url: str | None = f"{base_url.rstrip('/')}/{resource_type}"
    query: Mapping[str, Any] | None = params
    pages = 0
    while url:
        bundle = _get(session, url, query, f"search {resource_type}")
        pages += 1
        for entry in bundle.get("entry") or []:
            resource = entry.get("resource")
            if resource and entry.get("search", {}).get("mode", "match") == "match":
                yield resource
        link = next((link.get("url") for link in bundle.get("link") or [] if link.get("relation") == "next"), None)
        url = _next_page(url, str(link), base_url, resource_type) if link else None
        query = None  # the next link carries the whole query
    _LOGGER.debug("search %s: %d pages", resource_type, pages)


def _next_page(page: str, link: str, base_url: str, resource_type: str) -> str:
    """The next page's URL (a relative link resolved against the page), only on the base URL's origin: the
    session sends its credentials (a bearer token) with every request, so a link elsewhere stops the read with
    one line naming that origin (never the link's path or query, which may carry a paging token)."""
    target = urljoin(page, link)
    if origin(target) != origin(base_url) or "@" in urlsplit(target).netloc:
        raise FhirError(
            f"search {resource_type}: the server's next-page link leads to {origin(target)}, not the FHIR base "
            f"URL's origin {origin(base_url)}: paging stopped so no credential is sent there (the FHIR server's "
            "own base address must be the one ndop uses)")
    return target


def search_total(session: requests.Session, base_url: str, resource_type: str, params: Mapping[str, Any]) -> int:
    """How many resources match (``_summary=count``)."""
    bundle = _get(session, f"{base_url.rstrip('/')}/{resource_type}", {**params, "_summary": "count"},
                  f"count {resource_type}")
    return int(bundle.get("total", 0))


def encode(resource: Mapping[str, Any]) -> bytes:
    """Compact JSON for the wire (no spaces: bundles of 500 Consents are big enough)."""
    return json.dumps(resource, separators=(",", ":"), ensure_ascii=False).encode()


def post_bundle(session: requests.Session, base_url: str, bundle: Mapping[str, Any]) -> requests.Response:
    """POST a batch/transaction Bundle to the base; retries are the session's."""
    return session.post(base_url, data=encode(bundle), headers={"Content-Type": FHIR_JSON})
