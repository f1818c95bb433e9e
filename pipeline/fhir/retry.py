"""Retries of FHIR requests: one backoff rule (:func:`backoff_seconds`, jittered exponential) for the session's
retries and the writer's per-entry ones; urllib3's ``Retry`` on the session's adapter, including POST (every bundle
we post holds only idempotent PUTs), honouring ``Retry-After`` on 429/503.

A request that gets no answer at all (connection refused, timeouts) is retried only ``connect_retries`` times (2),
not the ``max_retries`` (5) a 429/5xx gets: a server that is gone should fail the run in seconds
(:class:`~pipeline.fhir.answers.FhirUnreachableError`), not cost every bundle a minute.
"""
from __future__ import annotations

import logging
import random
from itertools import takewhile
from typing import Callable

import requests
from urllib3.exceptions import (
    ConnectTimeoutError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ProxyError,
    ReadTimeoutError,
)
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util.retry import Retry

from pipeline.fhir.config import FhirClientConfig, url_for_log

_LOGGER = logging.getLogger(__name__)

RETRY_STATUSES = (429, 500, 502, 503, 504)
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

    @staticmethod
    def _kind(error: Exception | None) -> str:
        """Which budget a failure spends, as urllib3 counts them: a connection that was never made, a read that
        broke or timed out, else an answer's status."""
        if isinstance(error, ProxyError) and error.original_error is not None:
            error = error.original_error
        if isinstance(error, ConnectTimeoutError):
            return "connect"
        if isinstance(error, (ReadTimeoutError, ProtocolError)):
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
            url_for_log(url),
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
