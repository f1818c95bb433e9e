"""An authenticated FHIR session: default timeout, FHIR JSON, the retrying adapter, and the auth modes (none, a
bearer token, OAuth2 client credentials, Google application default credentials, HTTP Basic).

A 401 refreshes the credentials once (token or password re-read, new client-credentials token, or Google refresh)
and repeats the request; a second 401 raises :class:`~pipeline.fhir.answers.FhirAuthError`, whose text names the
auth mode and never the secret.
"""
from __future__ import annotations

import base64
import logging
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from pipeline.fhir.answers import FHIR_JSON, FhirAuthError
from pipeline.fhir.config import (
    AUTH_BASIC,
    AUTH_CLIENT_CREDENTIALS,
    AUTH_GOOGLE,
    AUTH_NONE,
    AUTH_TOKEN,
    ENV_AUTH,
    ENV_CLIENT_SECRET,
    ENV_PASSWORD,
    ENV_TOKEN,
    GOOGLE_SCOPE,
    TOKEN_LEEWAY,
    FhirClientConfig,
    basic_password,
    bearer_token,
    client_secret,
    url_for_log,
)
from pipeline.fhir.retry import make_retry

_LOGGER = logging.getLogger(__name__)


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
        _LOGGER.warning("FHIR %s %s: 401; refreshing the %s credentials once", method, url_for_log(url),
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
    if config.auth == AUTH_BASIC:
        return f"check the user name {config.username!r} and the password in {config.password_file or ENV_PASSWORD}"
    return "check the application default credentials and their IAM role on the FHIR store"


class _PlainSession(_FhirSessionMixin, requests.Session):
    pass


class _TokenSession(_FhirSessionMixin, requests.Session):
    def _refresh_credentials(self) -> None:
        # Token files are often rotated by something else (a sidecar, a cron): read it again.
        self.headers["Authorization"] = f"Bearer {bearer_token(self._config)}"


class _BasicSession(_FhirSessionMixin, requests.Session):
    def _refresh_credentials(self) -> None:
        # A session header, like the token: requests drops it on a redirect to another host, and paging links and
        # a bulk import's status URL are followed only on the base URL's origin. The password file is read again
        # (rotated meanwhile). UTF-8, as RFC 7617 asks (requests' own HTTPBasicAuth encodes latin-1).
        pair = f"{self._config.username}:{basic_password(self._config)}".encode()
        self.headers["Authorization"] = f"Basic {base64.b64encode(pair).decode('ascii')}"


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
        client_secret=client_secret(config),
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
    if config.auth in (AUTH_TOKEN, AUTH_BASIC):
        session = _TokenSession() if config.auth == AUTH_TOKEN else _BasicSession()
        session._setup_fhir(config)
        session._refresh_credentials()
        return session
    session = _PlainSession()
    session._setup_fhir(config)
    return session
