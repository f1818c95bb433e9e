"""Start a local mesh-sandbox that plays NDOP: for the test fixtures and for ``run_local.sh``.

``MeshSandbox`` (a context manager) runs ``python -m dev.mesh_sandbox`` as a subprocess on a free
127.0.0.1 port and waits until it answers; that same command, run by hand, serves in the
foreground until killed::

    python -m dev.mesh_sandbox --port 8700 --store-dir /tmp/mesh --opted-out-file optouts.txt
    python -m dev.mesh_sandbox --port 8700 --store-dir /tmp/mesh --opt-out-fraction 0.05 --seed 7

The server runs ``uvicorn mesh_sandbox.api:app`` with ``dev/mesh_plugins`` added to
``mesh_sandbox.plugins.__path__`` (so ``ndop_plugin`` plays NDOP), ``AUTH_MODE=full`` with a shared
key, and ``STORE_MODE=file``: an upper-case folder per mailbox under the store dir creates that
mailbox, which is how the live NDOP mailbox ``X26HC065`` exists locally. Every mailbox's password
is ``password`` (the sandbox's own default). The shared key comes from ``SHARED_KEY`` in the
environment (generated if unset); the foreground command prints nothing secret.

``--request-log FILE`` appends ``METHOD PATH STATUS`` for every HTTP request the sandbox answers:
the sandbox's own admin API cannot tell how often a message was sent or acknowledged (a second
acknowledgement is a silent no-op), and the crash tests must count exactly that.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import ssl
import sys
import tempfile
from pathlib import Path
from typing import Any

import requests

from dev.service import HOST, LocalService, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
PLUGIN_DIR = Path(__file__).resolve().parent / "mesh_plugins"
NDOP_MAILBOX = "X26HC065"
OUR_MAILBOXES = ("X26ABC1", "X26ABC2")  # built into the sandbox
PASSWORD = "password"


def prepare_store(store_dir: Path, mailboxes: tuple[str, ...]) -> None:
    """An upper-case folder per mailbox: the file store creates those mailboxes at start and reset."""
    for mailbox in mailboxes:
        (store_dir / mailbox.upper() / "in").mkdir(parents=True, exist_ok=True)


def clear_store(store_dir: Path) -> None:
    """Delete every stored message (the file store reloads from disk on reset)."""
    for inbox in store_dir.glob("*/in"):
        for entry in inbox.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


class MeshSandbox(LocalService):
    """A running mesh-sandbox playing NDOP; ``url``, ``shared_key``, ``mailboxes``, ``password``."""

    name = "mesh-sandbox"

    def __init__(
        self,
        store_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        shared_key: str | None = None,
        mailboxes: tuple[str, ...] = (NDOP_MAILBOX,),
        plugin_env: dict[str, str] | None = None,
        log_file: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30,
        tls: dict[str, str] | None = None,
        request_log: str | os.PathLike[str] | None = None,
    ) -> None:
        self._own_store = store_dir is None
        self.store_dir = Path(store_dir) if store_dir else Path(tempfile.mkdtemp(prefix="mesh-sandbox-"))
        self.port = port or free_port()
        super().__init__(Path(log_file) if log_file else self.store_dir.parent / f"mesh-sandbox-{self.port}.log",
                         startup_timeout)
        self.shared_key = shared_key or secrets.token_hex(16)
        self.mailboxes = tuple(m.upper() for m in mailboxes)
        self.password = PASSWORD
        self.plugin_env = dict(plugin_env or {})
        self.tls = dict(tls or {})  # certfile, keyfile[, ca_certs: then client certificates are required]
        self.request_log = Path(request_log) if request_log else None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.port}"

    def prepare(self) -> None:
        prepare_store(self.store_dir, self.mailboxes)

    def command(self) -> tuple[list[str], Path, dict[str, str]]:
        env = {**os.environ, **self.plugin_env, "PYTHONPATH": str(REPO_ROOT), "SHARED_KEY": self.shared_key}
        argv = [sys.executable, "-m", "dev.mesh_sandbox", "--port", str(self.port), "--store-dir", str(self.store_dir),
                *[arg for m in self.mailboxes for arg in ("--mailbox", m)],
                *[arg for key, value in self.tls.items() for arg in (f"--ssl-{key.replace('_', '-')}", value)],
                *(["--request-log", str(self.request_log)] if self.request_log else [])]
        return argv, REPO_ROOT, env

    def ready(self) -> bool:
        if self.tls:  # a client certificate may be required: an open port is ready enough
            with socket.create_connection((HOST, self.port), timeout=1):
                return True
        return requests.get(f"{self.url}/messageexchange/_ping", timeout=1).ok

    def stop(self) -> None:
        super().stop()
        if self._own_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def reset(self) -> None:
        """Empty every mailbox (files on disk, then the server's memory)."""
        clear_store(self.store_dir)
        response = requests.delete(f"{self.url}/messageexchange/admin/reset", timeout=10)
        response.raise_for_status()

    def inject_report(self, mailbox: str, code: str, description: str, workflow_id: str, *, local_id: str | None = None,
                      subject: str | None = None, linked_message_id: str | None = None,
                      status: str = "error") -> str:
        """Put a MESH ``REPORT`` into ``mailbox``'s inbox (admin API, not part of real MESH)."""
        response = requests.post(f"{self.url}/messageexchange/admin/report", json={
            "mailbox_id": mailbox, "code": code, "description": description, "workflow_id": workflow_id,
            "subject": subject, "local_id": local_id, "linked_message_id": linked_message_id, "status": status,
        }, timeout=10)
        response.raise_for_status()
        return str(response.json()["message_id"])

    def requests_seen(self) -> list[tuple[str, str, int]]:
        """``(method, path, status)`` of every request answered since the log was last cleared."""
        if self.request_log is None or not self.request_log.exists():
            return []
        seen = []
        for line in self.request_log.read_text().splitlines():
            method, path, code = line.split(" ")
            seen.append((method, path, int(code)))
        return seen

    def clear_request_log(self) -> None:
        if self.request_log is not None:
            self.request_log.write_text("")

    def message_details(self, message_id: str) -> dict[str, Any]:
        response = requests.get(f"{self.url}/messageexchange/admin/message/{message_id}", timeout=10)
        response.raise_for_status()
        return dict(response.json())


class _RequestLog:
    """ASGI middleware: one ``METHOD PATH STATUS`` line a request, written before the client can
    see the answer (so a client that has its answer finds the line)."""

    def __init__(self, app: Any, path: Path) -> None:
        self.app, self.path = app, path

    def _note(self, scope: dict[str, Any], status: int) -> None:
        with open(self.path, "a", encoding="utf-8") as log:  # one short O_APPEND write a line
            log.write(f"{scope['method']} {scope['path']} {status}\n")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        noted = False

        async def note_then_send(message: dict[str, Any]) -> None:
            nonlocal noted
            if message["type"] == "http.response.start" and not noted:
                noted = True
                self._note(scope, int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, note_then_send)
        finally:
            if not noted:  # the app failed before answering; the server answers 500
                self._note(scope, 500)


def serve(port: int, store_dir: Path, mailboxes: tuple[str, ...], host: str = "127.0.0.1",
          tls: dict[str, str] | None = None, request_log: Path | None = None) -> None:
    """Run the sandbox in this process, with the NDOP plugin loaded, until killed."""
    os.environ.setdefault("STORE_MODE", "file")
    os.environ.setdefault("AUTH_MODE", "full")
    os.environ["MAILBOXES_DATA_DIR"] = str(store_dir)
    if "SHARED_KEY" not in os.environ:
        os.environ["SHARED_KEY"] = secrets.token_hex(16)
        print("mesh-sandbox: generated a shared key; set SHARED_KEY to choose one", file=sys.stderr)
    prepare_store(store_dir, mailboxes)

    import mesh_sandbox.plugins
    import uvicorn

    if str(PLUGIN_DIR) not in mesh_sandbox.plugins.__path__:
        mesh_sandbox.plugins.__path__.append(str(PLUGIN_DIR))
    tls = tls or {}
    options: dict[str, Any] = {f"ssl_{key}": value for key, value in tls.items()}
    if tls.get("ca_certs"):
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED  # mutual TLS, as MESH does
    from mesh_sandbox.api import app

    uvicorn.run(_RequestLog(app, request_log) if request_log else app, host=host, port=port, log_level="warning",
                **options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dev.mesh_sandbox", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--store-dir", required=True, type=Path, help="MAILBOXES_DATA_DIR (file store)")
    parser.add_argument("--mailbox", action="append", default=[],
                        help=f"extra mailbox to create (repeatable; {NDOP_MAILBOX} always)")
    parser.add_argument("--opted-out-file", help="NDOP plugin: one opted-out NHS number a line")
    parser.add_argument("--opt-out-fraction", type=float, help="NDOP plugin: opt out this seeded fraction")
    parser.add_argument("--seed", type=int, help="NDOP plugin: seed of the fraction (default 0)")
    parser.add_argument("--reply-workflow-id", help="NDOP plugin: workflow id of notice and reply")
    parser.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--ssl-keyfile", help="... and this key")
    parser.add_argument("--ssl-ca-certs", help="require client certificates signed by these CAs")
    parser.add_argument("--plugin-config", help="NDOP plugin: JSON settings file, re-read at every message")
    parser.add_argument("--request-log", type=Path, help="append METHOD PATH STATUS of every request to this file")
    args = parser.parse_args(argv)
    for key, value in (("OPTED_OUT_FILE", args.opted_out_file), ("OPT_OUT_FRACTION", args.opt_out_fraction),
                       ("SEED", args.seed), ("REPLY_WORKFLOW_ID", args.reply_workflow_id),
                       ("CONFIG", args.plugin_config)):
        if value is not None:
            os.environ[f"NDOP_SANDBOX_{key}"] = str(Path(value).resolve()) if key in ("OPTED_OUT_FILE", "CONFIG") \
                else str(value)
    mailboxes = tuple(dict.fromkeys([NDOP_MAILBOX, *(m.upper() for m in args.mailbox)]))
    tls = {key: value for key, value in (("certfile", args.ssl_certfile), ("keyfile", args.ssl_keyfile),
                                         ("ca_certs", args.ssl_ca_certs)) if value}
    serve(args.port, args.store_dir, mailboxes, args.host, tls, args.request_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
