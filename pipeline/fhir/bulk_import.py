"""A first load in bulk: resources as NDJSON files, then the FHIR store's own import (issue 24 item 4, first part).

Ten million PUTs take hours (sekmet here: ~900/s) or more than a day (HAPI: ~100/s). Stores import NDJSON far
faster. This module holds the store-facing half:

- :func:`write_ndjson`: resources into one ``.ndjson`` file through Beam's ``FileSystems`` (local, ``gs://``,
  ...), created 0600 when local (Consents carry NHS numbers);
- :class:`ServeFolder`: a loopback HTTP server over a folder, so a store on this machine or network can pull
  the files (HAPI's ``$import`` takes HTTP(S) URLs);
- :class:`HapiImport`: HAPI 8's ``$import`` (``Prefer: respond-async``, a ``Parameters`` manifest of NDJSON
  URLs), polled until the job ends; :func:`hapi_import_complete` reads its answer and says whether every
  resource sent was stored;
- :func:`google_import_request` / :func:`azure_import_parameters`: the Cloud Healthcare API's
  ``fhirStores.import`` request and Azure Health Data Services' ``$import`` ``Parameters`` (checked offline).

The promise the ledger keeps: a load counts only when the store's own job report says every resource was stored
(:func:`hapi_import_complete`); anything else is a failed load (the PUT writer, or a re-run, does it).
The run's side (when to load in bulk, the counts from the report): pipeline/beam/bulk_load.py.
"""
from __future__ import annotations

import base64
import hmac
import json
import logging
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import urljoin

import requests
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.core.errors import NdopError
from pipeline.fhir.answers import FHIR_JSON, response_reason
from pipeline.fhir.config import origin

_LOGGER = logging.getLogger(__name__)

NDJSON = "application/fhir+ndjson"
POLL_SECONDS = 1.0
IMPORT_TIMEOUT = 3600.0


def write_ndjson(resources: Iterable[Mapping[str, Any]], path: str) -> int:
    """``resources`` as NDJSON (one compact JSON object a line) at ``path``; returns how many were written."""
    count = 0
    local = "://" not in path
    previous = os.umask(0o077) if local else None
    try:
        with FileSystems.create(path, mime_type=NDJSON, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            for resource in resources:
                handle.write(json.dumps(resource, separators=(",", ":")).encode() + b"\n")
                count += 1
    finally:
        if previous is not None:
            os.umask(previous)
    return count


class _FilesHandler(BaseHTTPRequestHandler):
    """GET of exactly the files named when the server started, under its secret path; nothing else (no listing)."""

    files: Mapping[str, Path] = {}
    authorization = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if not hmac.compare_digest(self.headers.get("Authorization", ""), self.authorization):
            self.send_error(401)
            return
        path = self.files.get(self.path)
        if path is None or not path.is_file():
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", NDJSON)  # HAPI refuses application/octet-stream
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()
        with path.open("rb") as handle:
            shutil.copyfileobj(handle, self.wfile, 1 << 20)

    def log_message(self, *args: Any) -> None:  # no request lines in the logs (the path holds the secret)
        pass


class ServeFolder:
    """The ``.ndjson`` files in ``folder`` over HTTP on ``host`` (loopback by default) and a free port, while the
    ``with`` block runs.

    The files hold NHS numbers, so only those files are served (no listing, no other path), each under a random
    128-bit path segment made for this server, and only to a client that sends :attr:`credential` (HTTP Basic, made
    for this server too): the store is handed both with the job (HAPI's ``storageDetail.credentialHttpBasic``).
    """

    def __init__(self, folder: str | os.PathLike[str], host: str = "127.0.0.1") -> None:
        self.folder = Path(folder)
        self._host = host
        self._secret = secrets.token_urlsafe(16)
        self.credential = f"ndop-sync:{secrets.token_urlsafe(24)}"
        files = {f"/{self._secret}/{path.name}": path for path in sorted(self.folder.glob("*.ndjson"))}
        authorization = "Basic " + base64.b64encode(self.credential.encode()).decode()
        handler = type("_Handler", (_FilesHandler,), {"files": files, "authorization": authorization})
        self._server = ThreadingHTTPServer((host, 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://{self._host}:{self._server.server_port}/{self._secret}/{name}"

    def __enter__(self) -> "ServeFolder":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def hapi_import_parameters(files: Mapping[str, Iterable[str]], credential: str | None = None) -> dict[str, Any]:
    """HAPI's ``$import`` manifest: ``{resource type: [NDJSON URL, ...]}`` as a ``Parameters`` resource;
    ``credential`` (``user:password``): what HAPI sends, as HTTP Basic, to fetch the files."""
    inputs = [{"name": "input", "part": [{"name": "type", "valueCode": kind}, {"name": "url", "valueUri": url}]}
              for kind, urls in files.items() for url in urls]
    return {"resourceType": "Parameters", "parameter": [
        {"name": "inputFormat", "valueCode": NDJSON},
        {"name": "inputSource", "valueUri": "https://ndop-sync.invalid/first-load"},
        {"name": "storageDetail", "part": [
            {"name": "type", "valueCode": "https"},
            *([{"name": "credentialHttpBasic", "valueString": credential}] if credential else []),
        ]},
        *inputs,
    ]}


@dataclass(frozen=True)
class ImportResult:
    """What the store's job said when it ended: stored counts by source file, and any problem.

    ``created``: how many of the stored resources the store says it created (the rest it updated)."""

    stored: dict[str, int]
    problem: str | None
    report: str
    created: int = 0

    @property
    def total(self) -> int:
        return sum(self.stored.values())


def hapi_import_complete(report: str, expected: Mapping[str, int]) -> ImportResult:
    """Read HAPI's finished ``$import`` answer and say whether every resource was stored.

    HAPI 8.8 answers an OperationOutcome whose first issue's diagnostics is ``{"reportMsg": "..."}``, a text
    report with, per ``Source: <url>``, lines ``* <OUTCOME>: <count>`` (``SUCCESSFUL_UPDATE_AS_CREATE``,
    ``SUCCESSFUL_UPDATE``, ... or failures). ``expected``: resources sent per source URL. ``problem`` is None only
    when each source's successful outcomes add up to what was sent and nothing else was reported.
    """
    stored: dict[str, int] = {}
    other: dict[str, int] = {}
    created = 0
    try:
        outcome = json.loads(report)
        diagnostics = str((outcome.get("issue") or [{}])[0].get("diagnostics") or "")
        message = str(json.loads(diagnostics).get("reportMsg") or "")
    except (ValueError, AttributeError, TypeError):
        return ImportResult({}, "the import job's answer is not the report HAPI gives", report[:500])
    source = None
    for line in message.splitlines():
        line = line.strip()
        if line.startswith("Source:"):
            source = line[len("Source:"):].strip()
            stored.setdefault(source, 0)
        elif line.startswith("* ") and source is not None and ":" in line:
            kind, _, count = line[2:].rpartition(":")
            kind = kind.strip()
            target = stored if kind.startswith("SUCCESSFUL") else other
            target[source] = target.get(source, 0) + int(count)
            created += int(count) if target is stored and kind.endswith("CREATE") else 0
    problem = None
    if other:
        problem = f"the store reports outcomes other than stored: {other}"
    elif stored != dict(expected):
        problem = f"the store reports {sum(stored.values())} stored of {sum(expected.values())} sent ({stored})"
    return ImportResult(stored, problem, report[:2000], created)


class HapiImport:
    """HAPI 8's bulk ``$import``: kick off with a manifest of NDJSON URLs, poll until the job ends."""

    def __init__(self, session: requests.Session, base_url: str, poll_seconds: float = POLL_SECONDS,
                 timeout: float = IMPORT_TIMEOUT) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._poll = poll_seconds
        self._timeout = timeout

    def start(self, files: Mapping[str, Iterable[str]], credential: str | None = None) -> str:
        """POST ``$import``; the poll URL (``Content-Location``) of the accepted job. ``credential``: the file
        server's (:attr:`ServeFolder.credential`)."""
        manifest = hapi_import_parameters(files, credential)
        response = self._session.post(f"{self._base}/$import", data=json.dumps(manifest),
                                      headers={"Content-Type": FHIR_JSON, "Prefer": "respond-async"})
        location = response.headers.get("Content-Location")
        if response.status_code != 202 or not location:
            raise NdopError(f"$import not accepted ({response.status_code}): {response_reason(response)}")
        location = urljoin(self._base + "/", location)
        if origin(location) != origin(self._base):  # our credentials go only to the store's own origin
            raise NdopError(f"$import: the store's job status URL is on {origin(location)}, not the FHIR base "
                            f"URL's origin {origin(self._base)}")
        return location

    def wait(self, poll_url: str, expected: Mapping[str, int]) -> ImportResult:
        """Poll ``poll_url`` until the job ends (202: still running); the job's own account of what it stored
        (``expected``: resources per source URL)."""
        deadline = time.monotonic() + self._timeout
        while True:
            response = self._session.get(poll_url, headers={"Accept": FHIR_JSON})
            if response.status_code == 200:
                return hapi_import_complete(response.text, expected)
            if response.status_code != 202:
                return ImportResult({}, f"the import job failed ({response.status_code}): {response_reason(response)}",
                                    response.text[:2000])
            if time.monotonic() > deadline:
                return ImportResult({}, f"the import job did not end within {self._timeout:.0f} s", "")
            time.sleep(self._poll)


def _json(response: requests.Response) -> dict[str, Any] | None:
    """The answer's JSON object, or None (not JSON, or JSON but not an object)."""
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


GOOGLE_API_ROOT = "https://healthcare.googleapis.com/v1"


def google_store(fhir_url: str) -> tuple[str, str]:
    """``(API root, FHIR store name)`` of a Cloud Healthcare FHIR base URL
    (``https://healthcare.googleapis.com/v1/projects/P/locations/L/datasets/D/fhirStores/S/fhir``)."""
    root, found, rest = fhir_url.rstrip("/").partition("/projects/")
    store = f"projects/{rest}".removesuffix("/fhir")
    if not found or not rest.endswith("/fhir") or "/fhirStores/" not in store or store.count("/") != 7:
        raise ValueError(f"not a Cloud Healthcare FHIR base URL (.../projects/P/locations/L/datasets/D/fhirStores/S"
                         f"/fhir): {fhir_url}")
    return root, store


def google_import_request(fhir_store: str, gcs_uri: str, api_root: str = GOOGLE_API_ROOT
                          ) -> tuple[str, dict[str, Any]]:
    """The Cloud Healthcare API's import: ``(URL to POST, body)`` for NDJSON resources under ``gcs_uri``
    (e.g. ``gs://bucket/ndop/load/*.ndjson``) into ``fhir_store``
    (``projects/P/locations/L/datasets/D/fhirStores/S``). The answer is a long-running operation; its
    ``metadata.counter`` has ``success`` and ``failure``."""
    if not fhir_store.startswith("projects/") or "/fhirStores/" not in fhir_store:
        raise ValueError(f"not a FHIR store name: {fhir_store!r}")
    if not gcs_uri.startswith("gs://"):
        raise ValueError(f"the Cloud Healthcare API imports from Cloud Storage (gs://), not {gcs_uri!r}")
    return (f"{api_root}/{fhir_store}:import",
            {"contentStructure": "RESOURCE", "gcsSource": {"uri": gcs_uri}})


class GoogleImport:
    """Cloud Healthcare's ``fhirStores.import`` from Cloud Storage: start it, poll its long-running operation.

    The store reads the files itself (its service agent needs read access to the bucket) and imports each resource
    under its id, creating or replacing it; the operation counts successes and failures, not which were created."""

    def __init__(self, session: requests.Session, fhir_url: str, poll_seconds: float = 5.0,
                 timeout: float = IMPORT_TIMEOUT) -> None:
        self._session = session
        self._root, self._store = google_store(fhir_url)
        self._poll = poll_seconds
        self._timeout = timeout

    def start(self, gcs_uri: str) -> str:
        """POST the import; the URL of its long-running operation."""
        url, body = google_import_request(self._store, gcs_uri, self._root)
        response = self._session.post(url, json=body)
        name = str((_json(response) or {}).get("name") or "")
        if response.status_code != 200 or not name.startswith(self._store.rsplit("/fhirStores/", 1)[0]):
            raise NdopError(f"the Cloud Healthcare import was not accepted: HTTP {response.status_code} "
                            f"{response.text[:200]}")
        return f"{self._root}/{name}"

    def wait(self, operation_url: str, source: str, expected: int) -> ImportResult:
        """Poll the operation until it is done; what it says it stored from ``source`` (``expected`` resources)."""
        deadline = time.monotonic() + self._timeout
        while True:
            response = self._session.get(operation_url)
            operation = _json(response)
            if response.status_code != 200 or not isinstance(operation, dict):
                return ImportResult({}, f"the import operation could not be read: HTTP {response.status_code} "
                                        f"{response.text[:300]}", response.text[:2000])
            if operation.get("done"):
                counter = (operation.get("metadata") or {}).get("counter") or {}
                return ImportResult({source: int(counter.get("success", 0))},
                                    google_import_complete(operation, expected), json.dumps(operation)[:2000])
            if time.monotonic() > deadline:
                return ImportResult({}, f"the import operation did not end within {self._timeout:.0f} s", "")
            time.sleep(self._poll)


def google_import_complete(operation: Mapping[str, Any], expected: int) -> str | None:
    """None when a finished Cloud Healthcare import operation stored ``expected`` resources and failed none."""
    if not operation.get("done"):
        return "the import operation has not finished"
    if operation.get("error"):
        return f"the import operation failed: {operation['error'].get('message', operation['error'])}"
    counter = (operation.get("metadata") or {}).get("counter") or {}
    success, failure = int(counter.get("success", 0)), int(counter.get("failure", 0))
    if failure or success != expected:
        return f"the store imported {success} of {expected} ({failure} failed)"
    return None


def azure_import_parameters(files: Mapping[str, Iterable[str]], initial_load: bool = True) -> dict[str, Any]:
    """Azure Health Data Services' ``$import`` body: NDJSON blobs by resource type; ``InitialLoad`` mode (the
    service's fast path for an empty store) or ``IncrementalLoad``."""
    inputs = [{"name": "input", "part": [{"name": "type", "valueString": kind}, {"name": "url", "valueUri": url}]}
              for kind, urls in files.items() for url in urls]
    return {"resourceType": "Parameters", "parameter": [
        {"name": "inputFormat", "valueString": NDJSON},
        {"name": "mode", "valueString": "InitialLoad" if initial_load else "IncrementalLoad"},
        *inputs,
    ]}
