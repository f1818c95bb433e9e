"""Progress a person can follow on the long steps: the wait for NDOP and the FHIR writes.

At most one line every few seconds (``NDOP_PROGRESS_SECONDS``, default 5), on stderr. Where stderr is a
terminal the line is a ``tqdm`` bar redrawn in place; otherwise (cron, CI, a log file) a plain line.
Nothing here ever sees an NHS number: only counts and times.

* :func:`poll_sleeper` wraps the poll loop's ``sleep`` to say how long the run has waited, when it polls
  next and how long NDOP usually takes (the median of earlier requests, from ``runs.jsonl``).
* :func:`tracking_writes` / :func:`advance_writes` count Consents written by an in-process runner (the
  launcher hands the write DoFn :func:`advance_writes` as a hook, transforms/hooks.py; remote workers get none).
* :func:`follow_job` reports the same figures from a running job's metrics (Dataflow, Flink), polling
  ``wait_until_finish(duration=...)`` until the job ends.
"""
from __future__ import annotations

import contextlib
import shutil
import sys
import threading
import time
from typing import Any, Callable, Iterator, TextIO

from pipeline.core.settings import PROGRESS_SECONDS, env_number

DEFAULT_EVERY = 5.0
_TERMINAL = ("DONE", "FAILED", "CANCELLED", "DRAINED", "UPDATED")


def every_seconds() -> float:
    """How often a progress line may appear (env ``NDOP_PROGRESS_SECONDS``)."""
    every = env_number("NDOP_PROGRESS_SECONDS", DEFAULT_EVERY, PROGRESS_SECONDS)
    return DEFAULT_EVERY if every is None else every


def duration(seconds: float | None) -> str:
    """``1h 02m``, ``3m 20s``, ``45s``: how long, for a person."""
    if seconds is None:
        return "-"
    total = round(max(seconds, 0))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


class Reporter:
    """One progress line at most every ``every`` seconds; a tqdm bar on a terminal, plain lines otherwise."""

    def __init__(self, label: str, total: float | None = None, unit: str = "", stream: TextIO | None = None,
                 every: float | None = None, clock: Callable[[], float] = time.monotonic,
                 tty: bool | None = None, bar_postfix: bool = True) -> None:
        self.label = label
        self.bar_postfix = bar_postfix  # the write bar shows count, rate and ETA itself
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.every = every_seconds() if every is None else every
        self.clock = clock
        self.started = clock()
        self._last: float | None = None
        self._bar: Any = None
        if tty if tty is not None else _isatty(self.stream):
            from tqdm import tqdm

            size = shutil.get_terminal_size((100, 20))  # a terminal that reports no size (0x0) still gets a bar
            self._bar = tqdm(total=total, desc=label, unit=unit, file=self.stream, mininterval=self.every,
                             ncols=size.columns, nrows=size.lines, leave=True)

    def update(self, done: float, text: str, force: bool = False) -> bool:
        """Show ``text`` (the plain line) or move the bar to ``done``; returns whether anything was shown."""
        now = self.clock()
        if self._bar is not None:
            self._bar.n = done
            if self.bar_postfix:
                self._bar.set_postfix_str(text, refresh=False)
            self._bar.refresh()
            return True
        if not force and self._last is not None and now - self._last < self.every:
            return False
        self._last = now
        from pipeline.core.logs import progress_line  # deferred: loads numpy only when used

        progress_line(f"[{self.label}] {text}", self.stream)
        return True

    def set_total(self, total: float | None) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.total = total

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# -- the wait for NDOP -------------------------------------------------------------------------------

def poll_sleeper(wait: float, interval: float, typical: float | None, reporter: Reporter | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> Callable[[float], None]:
    """A ``sleep`` for :meth:`MeshDriver.poll` that reports the wait while it sleeps."""
    reporter = reporter or Reporter("poll", total=wait, unit="s")
    usual = (f"NDOP usually answers in {duration(typical)}" if typical is not None
             else "no earlier reply to compare with")

    def sleeper(seconds: float) -> None:
        until = reporter.clock() + seconds
        while True:
            now = reporter.clock()
            left = until - now
            elapsed = now - reporter.started
            reporter.update(min(elapsed, wait), f"waited {duration(elapsed)} of {duration(wait)}; "
                                                f"next poll in {duration(left)}; {usual}")
            if left <= 0:
                return
            sleep(min(left, max(reporter.every, 0.05)))

    return sleeper


# -- the FHIR writes -----------------------------------------------------------------------------------

class WriteTracker:
    """Consents written so far against the total: rate and ETA."""

    def __init__(self, total: int | None, reporter: Reporter) -> None:
        self.total = total
        self.reporter = reporter
        self.done = 0
        self.shown: int | None = None  # the count on the last line shown (the closing line never repeats it)
        self._lock = threading.Lock()

    def line(self) -> str:
        elapsed = max(self.reporter.clock() - self.reporter.started, 1e-9)
        rate = self.done / elapsed
        if self.total:
            left = (self.total - self.done) / rate if rate > 0 else None
            return (f"{self.done}/{self.total} Consents written ({100 * self.done / self.total:.0f}%), "
                    f"{rate:.0f}/s, ETA {duration(left)}")
        return f"{self.done} Consents written, {rate:.0f}/s"

    def set(self, done: int, force: bool = False) -> None:
        with self._lock:
            self.done = done
            if self.reporter.update(done, self.line(), force=force):
                self.shown = done

    def advance(self, count: int) -> None:
        with self._lock:
            self.done += count
            if self.reporter.update(self.done, self.line()):
                self.shown = self.done

    def expect(self, count: int) -> None:
        """``count`` more Consents are to be written (the ledger join decides the total as it goes)."""
        with self._lock:
            self.total = (self.total or 0) + count
            self.reporter.set_total(self.total)


_TRACKER: WriteTracker | None = None


def advance_writes(count: int) -> None:
    """Called by the write DoFn after each bundle; does nothing unless this process is tracking writes."""
    tracker = _TRACKER
    if tracker is not None:
        tracker.advance(count)


def expect_writes(count: int) -> None:
    """Called by the ledger's decide step per shard with the Consents it sends on to be written (with a
    ledger the total is what changed, not the cohort); does nothing unless this process is tracking writes."""
    tracker = _TRACKER
    if tracker is not None:
        tracker.expect(count)


@contextlib.contextmanager
def tracking_writes(total: int | None, enabled: bool = True,
                    reporter: Reporter | None = None) -> Iterator[WriteTracker | None]:
    """Track the writes of an in-process pipeline run for the duration of the block."""
    global _TRACKER
    if not enabled:
        yield None
        return
    tracker = WriteTracker(total, reporter or Reporter("write", total=total, unit="Consent", bar_postfix=False))
    _TRACKER = tracker
    try:
        yield tracker
        if tracker.done and tracker.done != tracker.shown:  # the final count, once
            tracker.set(tracker.done, force=True)
    finally:
        _TRACKER = None
        tracker.reporter.close()


def follow_job(result: Any, total: int | None, written: Callable[[Any], int], reporter: Reporter | None = None) -> None:
    """Report a remote job's writes from its metrics while it runs (``written(result)`` reads them)."""
    tracker = WriteTracker(total, reporter or Reporter("write", total=total, unit="Consent", bar_postfix=False))
    try:
        while True:
            state = str(getattr(result, "state", "") or "")
            if any(state.endswith(t) for t in _TERMINAL):
                return
            result.wait_until_finish(duration=int(max(tracker.reporter.every, 1) * 1000))
            with contextlib.suppress(Exception):  # a runner without live metrics: no progress, no failure
                tracker.set(written(result))
    finally:
        tracker.reporter.close()
