"""Start and stop the local HAPI FHIR R4 JPA server (``dev/hapi/``), the second real FHIR server.

``dev/setup_env.sh`` builds it with Maven into ``.cache/hapi/`` (``build/ndop-hapi.jar`` plus
``classpath.txt`` pointing into the cached Maven repository); this module only runs it. The database
is an in-memory H2, so every start is an empty store. It listens on 127.0.0.1 only.

A JVM with HAPI's JPA stack takes tens of seconds to boot on two cores, so the test session *launches*
it early and waits for it only when the first HAPI test needs it (``tests/fixtures/hapi.py``):

    server = HapiServer(log_dir).launch()
    ...                       # other work while it boots
    server.wait_ready(); requests.get(server.base_url + "/metadata")

or, in the foreground until killed:

    python -m dev.hapi_server --port 8093 --log-dir .local-run/hapi
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

import requests

from dev.service import HOST, LocalService, free_port, serve_until_stopped

_LOGGER = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
HAPI_CACHE_ENV = "NDOP_HAPI_CACHE"
DEFAULT_CACHE = REPO_ROOT / ".cache" / "hapi"
MAIN_CLASS = "ndop.hapi.HapiServer"
START_TIMEOUT = 300.0  # seen: 18-45 s on an idle 2-core machine, minutes when six builds share it
# C1-only JIT and class-data sharing: measured to start HAPI faster than the default tiered JIT here,
# and a test run is too short for C2's better code to pay back.
JVM_OPTIONS = ["-Xmx768m", "-Xss1m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Xshare:auto"]


def hapi_cache() -> Path:
    return Path(os.environ.get(HAPI_CACHE_ENV) or DEFAULT_CACHE)


def hapi_classpath(cache: Path | None = None) -> str:
    """``jar:dependencies`` of the built server; a clear error naming the fix when it is not built."""
    cache = cache or hapi_cache()
    jar, deps = cache / "build" / "ndop-hapi.jar", cache / "classpath.txt"
    if not jar.is_file() or not deps.is_file():
        raise FileNotFoundError(f"HAPI server not built in {cache}: run dev/setup_env.sh (needs java 17 and mvn)")
    return f"{jar}{os.pathsep}{deps.read_text().strip()}"


class HapiServer(LocalService):
    """A HAPI JVM on a loopback port; ``with HapiServer(dir) as s:`` starts and waits, then stops it."""

    name = "hapi"

    def __init__(self, log_dir: str | os.PathLike[str], port: int | None = None,
                 start_timeout: float = START_TIMEOUT, validate: bool = True) -> None:
        """``validate=False`` leaves HAPI's validator off (storage speed only; tests keep it on)."""
        self.log_dir = Path(log_dir).resolve()
        self.validate = validate
        super().__init__(self.log_dir / "hapi.log", start_timeout)
        self.port = port or free_port()
        self.base_url = f"http://{HOST}:{self.port}/fhir"

    def prepare(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def command(self) -> tuple[list[str], Path, dict[str, str]]:
        java = shutil.which("java") or "java"
        argv = [java, *JVM_OPTIONS, f"-Dndop.validate={str(self.validate).lower()}", "-cp", hapi_classpath(), MAIN_CLASS,
                f"--server.port={self.port}", f"--server.address={HOST}"]
        return argv, self.log_dir, dict(os.environ)

    def ready(self) -> bool:
        return requests.get(f"{self.base_url}/metadata", timeout=5).status_code == 200

    def wait_ready(self) -> "HapiServer":
        super().wait_ready()
        _LOGGER.info("FHIR server (HAPI) up at %s", self.base_url)
        return self


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dev.hapi_server",
                                     description="Run the local HAPI FHIR R4 server until killed.")
    parser.add_argument("--port", type=int, default=0, help="loopback port (default: a free one)")
    parser.add_argument("--log-dir", required=True, help="where HAPI's log goes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return serve_until_stopped(HapiServer(args.log_dir, port=args.port or None), "HAPI")


if __name__ == "__main__":
    sys.exit(main())
