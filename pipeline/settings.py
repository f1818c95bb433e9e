"""Settings given as an option or an environment variable: one parsing rule, one error line."""
from __future__ import annotations

import os

from pipeline.errors import InputError


def days_setting(value: float | None, env: str, default: float | None, *, whole: bool = False) -> float | None:
    """A number of days: ``value`` if given, else ``$env``, else ``default``.

    Not a number, or below 0, is bad input: one line naming the setting, exit 2. ``whole`` asks for whole days.
    """
    source = "" if value is not None else env
    if value is None:
        text = os.environ.get(env, "").strip()
        if not text:
            return default
        try:
            value = int(text) if whole else float(text)
        except ValueError:
            kind = "a whole number of days" if whole else "a number of days"
            raise InputError(f"{env}={text!r} is not {kind}") from None
    if value < 0:
        raise InputError(f"{source + ': ' if source else ''}days must be 0 or more, not {value:g}")
    return value
