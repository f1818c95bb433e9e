"""What the local stand-ins (mesh-sandbox, the FHIR server) share: a child server on loopback.

Each runs in its own process group (so stopping it also reaps anything it spawned), logs to a
file, is ready when its own health check says so, and is stopped with SIGTERM, then SIGKILL.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
STOP_TIMEOUT = 10.0


_LOGGER = logging.getLogger(__name__)


def exit_on_termination() -> None:
    """SIGTERM and SIGHUP raise ``SystemExit(128 + signal)`` in the main thread, as Ctrl-C raises
    KeyboardInterrupt: ``with`` blocks and ``finally`` run, so the servers a process started (each in its own
    session, out of reach of a signal to our process group) are stopped rather than orphaned."""

    def _terminate(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)


def stop_child(process: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT) -> None:
    """Stop a child that shares our process group: SIGTERM, then SIGKILL after ``timeout`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def serve_until_stopped(server: Any, name: str) -> int:
    """``python -m dev.<server>``: print the base URL, then keep the server up until Ctrl-C or SIGTERM/SIGHUP
    (0), or until it stops by itself (1, naming its log)."""
    exit_on_termination()
    with server:
        print(server.base_url, flush=True)  # run_local.sh and people read the base URL from this line
        try:
            while server.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            return 0
        _LOGGER.error("%s stopped by itself; log: %s", name, server.log_path)
        return 1


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class LocalService:
    """Base of a local server process; subclasses say how to launch it and when it is ready."""

    name = "service"

    def __init__(self, log_path: Path, start_timeout: float) -> None:
        self.log_path = log_path
        self.start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None

    # -- for subclasses ------------------------------------------------------------------------

    def command(self) -> tuple[list[str], Path, dict[str, str]]:
        """``(argv, cwd, env)`` of the server process."""
        raise NotImplementedError

    def ready(self) -> bool:
        """One health check; exceptions count as not ready yet."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Anything to write before the process starts."""

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "LocalService":
        self.launch()
        return self.wait_ready()

    def launch(self) -> "LocalService":
        """Start the process without waiting for it (a slow server can boot while other work runs)."""
        self.prepare()
        argv, cwd, env = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        self._launched = time.monotonic()
        return self

    def wait_ready(self) -> "LocalService":
        """Block until the launched process answers its health check (stopping it if it never does)."""
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        # counted from launch: a server launched early has had that time already; but always asked at
        # least once (it may have been up for minutes when the first test needs it)
        deadline = getattr(self, "_launched", time.monotonic()) + self.start_timeout
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self._process.returncode} before answering; "
                                   f"log tail:\n{self.log_tail()}")
            try:
                if self.ready():
                    return
            except Exception:  # noqa: BLE001 - not up yet, whatever the client says
                pass
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} did not answer within {self.start_timeout:.0f} s; "
                           f"log tail:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(timeout=STOP_TIMEOUT)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
