"""Log output for ``ndop``: ``--log-format text`` (default) or ``json`` (env ``NDOP_LOG_FORMAT``).

``json`` writes one JSON object a line (``time``, ``level``, ``logger``, ``message``, and ``exception``
when there is one) for log pipelines. The message is the same text the text format shows: call sites
already mask NHS numbers (:func:`pipeline.core.nhs.mask`, :func:`pipeline.core.nhs.redact`); a traceback, which
quotes foreign text, goes through :func:`pipeline.core.nhs.redact` in both formats.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import TextIO

from pipeline.core import nhs
from pipeline.core.clock import isoformat

FORMATS = ("text", "json")
ENV = "NDOP_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PROGRESS_LOGGER = "ndop.progress"


def default_format() -> str:
    value = os.environ.get(ENV, "text").strip().lower()
    return value if value in FORMATS else "text"


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatException(self, ei) -> str:  # type: ignore[no-untyped-def]
        return nhs.redact(super().formatException(ei))


class JsonFormatter(logging.Formatter):
    """One JSON object a line."""

    def format(self, record: logging.LogRecord) -> str:
        from datetime import datetime, timezone

        entry = {
            "time": isoformat(datetime.fromtimestamp(record.created, timezone.utc)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = nhs.redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


_JSON = False


def json_active() -> bool:
    """Whether stderr carries JSON lines: then progress lines go through logging too (one format a stream)."""
    return _JSON


def progress_line(line: str, stream: TextIO | None = None) -> None:
    """A progress line on stderr: plain text, or a JSON log object (logger ``ndop.progress``) in json mode."""
    if _JSON and stream in (None, sys.stderr):
        logging.getLogger(PROGRESS_LOGGER).info("%s", line)
    else:
        print(line, file=stream if stream is not None else sys.stderr, flush=True)


class _StderrHandler(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record is emitted, not the one it was made with (a
    caller that swaps stderr, like pytest's capture, would otherwise leave it writing to a closed file)."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def configure(log_format: str = "text", verbose: bool = False, stream: TextIO | None = None) -> None:
    """Replace the root logger's handlers with one on stderr in ``log_format``."""
    global _JSON
    _JSON = log_format == "json"
    handler: logging.StreamHandler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # Quiet by default: each step already says what it did once, as a progress line ([send] ...) or on stdout,
    # so INFO log lines would only repeat it; warnings and errors always show. -v shows every log line.
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger(PROGRESS_LOGGER).setLevel(logging.INFO)  # progress lines themselves, in json mode
    if not verbose:  # Beam's INFO lines drown the progress a person wants to follow
        logging.getLogger("apache_beam").setLevel(logging.WARNING)
        # and it logs starting and stopping a job server (Prism, Flink's) as warnings ("Really destroying service")
        logging.getLogger("apache_beam.utils.subprocess_server").setLevel(logging.ERROR)
