"""The bulk first load, launcher side: whether a run loads in bulk, then the store's import and its report.

A first load (no ledger in force, or ``--full_refresh``) of a large cohort writes every Consent: 10M PUTs take hours
(sekmet here) to more than a day (HAPI). With ``--bulk_import STORE`` and a cohort of at least
``--bulk_min_patients``, the pipeline writes the Consents and their Provenance as NDJSON (transforms/write_ndjson.py)
in place of the PUTs; after it, this module has the store import them (pipeline/fhir/bulk_import.py) and turns the
job's own report into the run's counts:

- ``consents_created`` / ``consents_updated``: what the store reports it stored, never what was sent;
- so the summary is ``ok`` (and the new ledger promoted) only when the report accounts for every Consent staged,
  with no other outcome; anything else is a failed run, the request stays ``replied`` and a re-run loads again
  (every resource is imported under its id, so a second load replaces, never duplicates).

Consents are imported first and their Provenance in a second job once they are stored (a Provenance's targets must
exist: HAPI enforces referential integrity). The NDJSON files hold NHS numbers: 0600 in a 0700 folder, served only
to the store under a secret path while its job runs, and removed when the import ends, whatever its outcome.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow.parquet as pq
import requests
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.beam.options import BulkOptions, NdopOptions
from pipeline.core import nhs
from pipeline.core.errors import InputError, NdopError
from pipeline.core.files import private_dir
from pipeline.fhir.bulk_import import GoogleImport, HapiImport, ImportResult, ServeFolder, google_store
from pipeline.fhir.config import FhirClientConfig
from pipeline.fhir.sessions import open_session
from transforms.vocabulary import Counter
from transforms.write_ndjson import CONSENT_FILES, PROVENANCE_FILES, SUFFIX

_LOGGER = logging.getLogger(__name__)

BULK_FOLDER = "bulk"
GOOGLE = "google"


@dataclass(frozen=True)
class BulkLoad:
    """A run that loads in bulk: which store's import, where the NDJSON goes, where it is served from."""

    store: str
    folder: str
    serve_host: str = "127.0.0.1"
    timeout: float = 24 * 3600.0


def manifest_rows(path: str) -> int:
    """How many rows the manifest has (its Parquet footer only)."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return int(pq.read_metadata(handle).num_rows)


def plan(opts: NdopOptions, bulk: BulkOptions, first_load: bool, fhir_url: str = "") -> BulkLoad | None:
    """The bulk load this run does, or None (PUTs): only with ``--bulk_import``, on a first load, for a cohort of at
    least ``--bulk_min_patients``. Settings that cannot work are refused (exit 2) before anything runs."""
    if not bulk.bulk_import:
        return None
    if not first_load:
        _LOGGER.info("bulk import: a ledger is in force, so this run PUTs only what changed")
        return None
    rows = manifest_rows(opts.manifest)
    if rows < bulk.bulk_min_patients:
        _LOGGER.info("bulk import: %d patients, under --bulk_min_patients %d: the Consents are PUT", rows,
                     bulk.bulk_min_patients)
        return None
    if opts.upsert != "id":
        raise InputError("--bulk_import needs --upsert id: the store imports each Consent under its own id")
    folder = bulk.bulk_dir or FileSystems.join(opts.output_dir, BULK_FOLDER)
    if bulk.bulk_import == GOOGLE:
        if not folder.startswith("gs://"):
            raise InputError(f"--bulk_import google: the Cloud Healthcare API imports from Cloud Storage, so the "
                             f"NDJSON folder must be gs://... (--bulk_dir, or an --output_dir on gs://), not {folder}")
        try:
            google_store(fhir_url)
        except ValueError as err:
            raise InputError(f"--bulk_import google: {err}") from None
    elif "://" in folder:
        raise InputError(f"--bulk_import {bulk.bulk_import} serves the NDJSON from this machine: --bulk_dir must be "
                         f"a local folder, not {folder}")
    else:
        folder = os.path.abspath(folder)
    _LOGGER.info("bulk import: a first load of %d patients, as NDJSON imported by the store (%s)", rows,
                 bulk.bulk_import)
    return BulkLoad(bulk.bulk_import, folder, bulk.bulk_serve_host, float(bulk.bulk_timeout))


def prepare(load: BulkLoad) -> None:
    """An empty (and, when local, private) folder for the files: a crashed run's files are never imported."""
    discard(load)
    if "://" not in load.folder:
        private_dir(load.folder)


def discard(load: BulkLoad) -> None:
    """Remove the folder and its files (NHS numbers): after the import, or when none can be run."""
    if FileSystems.exists(load.folder):
        FileSystems.delete([load.folder])


def count_lines(path: str) -> int:
    count = 0
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        while block := handle.read(1 << 20):
            count += block.count(b"\n")
    return count


def staged_files(folder: str, kind: str) -> dict[str, int]:
    """``{file name: resources}`` of one resource type's non-empty NDJSON files in ``folder``."""
    found = FileSystems.match([FileSystems.join(folder, f"{kind}-*{SUFFIX}")])[0].metadata_list
    counts = {os.path.basename(meta.path): count_lines(meta.path) for meta in found}
    return {name: count for name, count in sorted(counts.items()) if count}


def import_staged(load: BulkLoad, config: FhirClientConfig, found: dict[str, int]) -> dict[str, Any]:
    """Have the store import what the pipeline staged; set the written counters in ``found`` from the job's
    report, and return what the summary says of the load (``problem`` None only when every resource is stored).
    The files are removed afterwards, whatever the outcome."""
    started = time.monotonic()
    section: dict[str, Any] = {"store": load.store, "problem": None}
    try:
        consents = staged_files(load.folder, CONSENT_FILES)
        provenances = staged_files(load.folder, PROVENANCE_FILES)
        section.update(files=len(consents) + len(provenances), consents_staged=sum(consents.values()),
                       provenances_staged=sum(provenances.values()))
        if sum(consents.values()) != found.get(Counter.CONSENTS_STAGED, 0):
            section["problem"] = (f"the NDJSON files hold {sum(consents.values())} Consents, the pipeline staged "
                                  f"{found.get(Counter.CONSENTS_STAGED, 0)}: nothing imported")
            return section
        if not consents:
            return section
        with contextlib.ExitStack() as stack:
            session = stack.enter_context(open_session(config))
            return _import(_importer(load, config, session, stack), consents, provenances, found, section)
    except (NdopError, requests.RequestException) as err:
        section["problem"] = f"bulk import: {nhs.redact(str(err))[:300]}"
        return section
    finally:
        section["seconds"] = round(time.monotonic() - started, 1)
        discard(load)


Importer = Callable[[str, dict[str, int]], ImportResult]  # (resource type, {file name: resources}) -> report


def _importer(load: BulkLoad, config: FhirClientConfig, session: requests.Session,
              stack: contextlib.ExitStack) -> Importer:
    """The store's import of one resource type's files, run to its end."""
    if load.store == GOOGLE:
        google = GoogleImport(session, config.base_url, timeout=load.timeout)

        def from_cloud_storage(kind: str, files: dict[str, int]) -> ImportResult:
            uri = FileSystems.join(load.folder, f"{kind}-*{SUFFIX}")
            return google.wait(google.start(uri), uri, sum(files.values()))
        return from_cloud_storage
    served = stack.enter_context(ServeFolder(load.folder, load.serve_host))
    hapi = HapiImport(session, config.base_url, timeout=load.timeout)

    def over_http(kind: str, files: dict[str, int]) -> ImportResult:
        urls = {served.url(name): count for name, count in files.items()}
        return hapi.wait(hapi.start({kind: list(urls)}, served.credential), urls)
    return over_http


def _import(importer: Importer, consents: dict[str, int], provenances: dict[str, int], found: dict[str, int],
            section: dict[str, Any]) -> dict[str, Any]:
    """The Consents' job, then (once every one is stored) the Provenance's."""
    result = _run_job(importer, CONSENT_FILES, consents)
    found[Counter.CONSENTS_CREATED] = result.created
    found[Counter.CONSENTS_UPDATED] = result.total - result.created
    section["consents_stored"] = result.total
    if result.problem:
        section["problem"] = f"bulk import of the Consents: {result.problem}"
        found[Counter.PROVENANCES_FAILED] = sum(provenances.values())
        return section
    if provenances:
        result = _run_job(importer, PROVENANCE_FILES, provenances)
        found[Counter.PROVENANCES_WRITTEN] = result.total
        found[Counter.PROVENANCES_FAILED] = sum(provenances.values()) - result.total
        section["provenances_stored"] = result.total
        if result.problem:
            section["problem"] = f"bulk import of the Provenance: {result.problem}"
    return section


def _run_job(importer: Importer, kind: str, files: dict[str, int]) -> ImportResult:
    _LOGGER.info("bulk import: %d %s resources in %d files, the store's job started", sum(files.values()), kind,
                 len(files))
    result = importer(kind, files)
    _LOGGER.info("bulk import: the store reports %d of %d %s resources stored%s", result.total, sum(files.values()),
                 kind, f" ({result.problem})" if result.problem else "")
    return result
