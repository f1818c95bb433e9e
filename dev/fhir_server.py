"""Start and stop the local FHIR R4 server (sekmet-fhir) that tests and ``run_local.sh`` write to.

sekmet lives in its own venv (``<repo>/.venv-fhir``, made by ``dev/setup_env.sh``) because its FastAPI
cannot share one with mesh-sandbox, so it runs as a child process, never imported. It only ever listens
on 127.0.0.1; its traffic log and hospital simulator (both on by default) are switched off.

    with FhirServer(data_dir) as server:
        requests.get(server.base_url + "/metadata")

or, in the foreground until killed (what ``run_local.sh`` uses):

    python -m dev.fhir_server --port 8092 --data-dir .local-run/fhir
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import requests

from dev.service import HOST, LocalService, free_port, serve_until_stopped

_LOGGER = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SEKMET_ENV = "NDOP_SEKMET"
DEFAULT_SEKMET = REPO_ROOT / ".venv-fhir" / "bin" / "sekmet"
START_TIMEOUT = 30.0


def sekmet_binary() -> Path:
    """The sekmet executable: ``$NDOP_SEKMET`` when set, else the project's own ``.venv-fhir``."""
    path = Path(os.environ.get(SEKMET_ENV) or DEFAULT_SEKMET)
    if not path.is_file() or not os.access(path, os.X_OK):
        raise FileNotFoundError(
            f"sekmet not found at {path}: run dev/setup_env.sh or set {SEKMET_ENV} to the sekmet binary"
        )
    return path


def settings(port: int, data_dir: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """sekmet's settings (names checked against sekmet/config.py of sekmet-fhir 0.1.1)."""
    base: dict[str, Any] = {
        "host": HOST,  # sekmet's default is 0.0.0.0
        "port": port,
        "base_url": f"http://{HOST}:{port}/fhir",
        "data_dir": str(data_dir),
        "own_private_key_path": str(data_dir / "keys" / "sekmet_private.pem"),
        "log_inbound": False,
        "simulator": {"enabled": False},
    }
    base.update(extra or {})
    return base


class FhirServer(LocalService):
    """A sekmet process on a loopback port, stopped on exit from the ``with`` block (even on error).

    ``extra_settings`` are merged into the settings file, e.g. ``{"server_auth": {...}}`` for a server
    that demands a bearer token.
    """

    name = "sekmet"

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int | None = None,
        extra_settings: dict[str, Any] | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        super().__init__(self.data_dir / "sekmet.log", start_timeout)
        self.port = port or free_port()
        self.base_url = f"http://{HOST}:{self.port}/fhir"
        self.extra_settings = extra_settings or {}

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # JSON is YAML: no YAML writer needed on this side.
        self.config_path.write_text(json.dumps(settings(self.port, self.data_dir, self.extra_settings), indent=2))

    @property
    def config_path(self) -> Path:
        return self.data_dir / "settings.yaml"

    def command(self) -> tuple[list[str], Path, dict[str, str]]:
        # cwd: anything sekmet writes relative to its working directory stays in data_dir
        return [str(sekmet_binary()), "serve", "-c", str(self.config_path)], self.data_dir, dict(os.environ)

    def ready(self) -> bool:
        return requests.get(f"{self.base_url}/metadata", timeout=2).status_code == 200

    def start(self) -> "FhirServer":
        super().start()
        _LOGGER.info("FHIR server (sekmet) up at %s, data in %s", self.base_url, self.data_dir)
        return self


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dev.fhir_server", description="Run the local FHIR R4 server until killed."
    )
    parser.add_argument("--port", type=int, default=0, help="loopback port (default: a free one)")
    parser.add_argument("--data-dir", required=True, help="where sekmet keeps its SQLite store and log")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return serve_until_stopped(FhirServer(args.data_dir, port=args.port or None), "sekmet")


if __name__ == "__main__":
    sys.exit(main())
