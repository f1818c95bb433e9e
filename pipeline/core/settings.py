"""Numbers given as an option, an environment variable or a config file: one parser, a finite range, one error line.

Every number a user can set goes through :func:`parse_number` with a :class:`Range`: ``nan``, ``inf``, ``1e300``,
``-1`` or ``ten`` are bad input (:class:`~pipeline.core.errors.InputError`: one line naming the setting, exit 2),
raised before anything is sent or written. :func:`number_option` is the same rule as an argparse ``type=``.

Also the one rule for "a peer on this machine" (:func:`is_loopback_url`): a MESH sandbox may be polled faster, a
FHIR dev server may be written with the work dir's own Consent id key.
"""
from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass
from typing import Callable, Mapping
from urllib.parse import urlparse

from pipeline.core.errors import InputError


@dataclass(frozen=True)
class Range:
    """The finite interval a setting may take, and how to name it in an error line."""

    low: float
    high: float
    unit: str = ""
    whole: bool = False

    def describe(self) -> str:
        kind = "a whole number" if self.whole else "a number"
        unit = f" of {self.unit}" if self.unit else ""
        return f"{kind}{unit} from {_show(self.low)} to {_show(self.high)}"


def _show(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:g}"


DAYS = Range(0, 3650, "days")  # ten years: a retention, staleness or overdue period
WHOLE_DAYS = Range(0, 3650, "days", whole=True)
HOURS = Range(0, 24 * 3650, "hours")
SECONDS_A_DAY = 86_400
POLL_INTERVAL = Range(0, SECONDS_A_DAY, "seconds")  # MESH: poll at least once a day
WAIT = Range(0, 7 * SECONDS_A_DAY, "seconds")  # MESH keeps an unacknowledged message 5 days
PROGRESS_SECONDS = Range(0, 3600, "seconds")
MESH_TIMEOUT = Range(1, 600, "seconds")
BATCH = Range(1, 100_000, "entries", whole=True)
SHARDS = Range(1, 65_536, "shards", whole=True)
SAMPLE = Range(0, 1_000_000, "Consents", whole=True)
WRITERS = Range(0, 10_000, "writers", whole=True)  # concurrent FHIR writers; 0: as many as the runner runs
PATIENTS = Range(0, 100_000_000, "patients", whole=True)  # a cohort size (England: about 60 million people)
IMPORT_WAIT = Range(1, 7 * SECONDS_A_DAY, "seconds")  # a store's bulk import job


def parse_number(value: str | float | int, name: str, allowed: Range) -> float:
    """``value`` as a number in ``allowed``; anything else is :class:`InputError` naming ``name``."""
    text = value.strip() if isinstance(value, str) else value
    try:
        number: float = int(text) if allowed.whole else float(text)
        if allowed.whole and isinstance(text, float) and not text.is_integer():
            raise ValueError(text)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{name}={text!r} is not {allowed.describe()}") from None
    if not math.isfinite(number) or not allowed.low <= number <= allowed.high:
        raise InputError(f"{name}={text!r} is out of range: give {allowed.describe()}")
    return number


def number_option(name: str, allowed: Range) -> Callable[[str], float]:
    """An argparse ``type=`` for ``name``: a bad value raises :class:`InputError` (one line, exit 2), not a usage
    dump."""
    def parse(text: str) -> float:
        number = parse_number(text, name, allowed)
        return int(number) if allowed.whole else number

    parse.__name__ = name  # argparse names the type in its messages
    return parse


def env_number(env: str, default: float | None, allowed: Range,
               environ: Mapping[str, str] | None = None) -> float | None:
    """``$env`` parsed by the one rule, or ``default`` when it is unset or blank."""
    text = (os.environ if environ is None else environ).get(env, "").strip()
    if not text:
        return default
    number = parse_number(text, env, allowed)
    return int(number) if allowed.whole else number


def days_setting(value: float | None, env: str, default: float | None, *, whole: bool = False) -> float | None:
    """A number of days: ``value`` if given (an option), else ``$env``, else ``default``; each by the one rule."""
    allowed = WHOLE_DAYS if whole else DAYS
    if value is None:
        return env_number(env, default, allowed)
    return parse_number(value, "days", allowed)


def is_loopback_url(url: str) -> bool:
    """True for a URL on this machine (``localhost``, ``127.0.0.0/8``, ``::1``): a sandbox or dev server."""
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
