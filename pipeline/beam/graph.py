"""The process step: manifest + NDOP reply -> sharded CoGroupByKey -> Consent -> batched FHIR writes.

Runs the same on the local runner (``ndop process --request-id ID``) and on Dataflow::

    python -m pipeline.beam.graph --manifest gs://b/req/manifest.parquet --reply gs://b/req/reply.dat \\
        --checked_at 2024-11-26T10:15:00Z --output_dir gs://b/req --fhir_url https://... \\
        --runner DataflowRunner --setup_file ./setup.py --project P --region R --temp_location gs://b/tmp

Every path goes through Beam's ``FileSystems``; nothing here imports MESH or relies on local
state. The run's outcome is ``summary.json`` (counts from Beam metrics, timings) and
``dead_letters.jsonl`` beside it. When the reply has any integrity error, no Consent is written.

With ``--ledger_in``/``--ledger_out`` (the Consent ledger, :mod:`transforms.ledger_join`) only new patients,
changed statuses and due refreshes are written, and the new ledger comes out of the same join.

Running it for a work-dir request (staging, state, acknowledgement): pipeline/orchestration/process_request.py.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import Any, Iterator, Sequence

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import (PipelineOptions, PortableOptions, PrismRunnerOptions,
                                                  StandardOptions)

from pipeline.request import datfile
from pipeline.core import nhs
from pipeline.beam import progress
from pipeline.ledger import versions as ledger_dirs
from pipeline.core.errors import EXIT_FAILED, EXIT_OK, InputError, NdopError
from pipeline.core.faults import FAULT_ENV, fault_point
from pipeline.core.files import write_json
from pipeline.beam import bulk_load
from pipeline.beam.bulk_load import BulkLoad
from pipeline.beam.options import BulkOptions, LedgerOptions, NdopOptions, fhir_overrides
from pipeline.core.clock import isoformat, utcnow
from transforms.build_consent import BuildConsent, check_checked_at
from transforms.consent_ids import IdKey, KeySource
from transforms.hooks import NO_HOOKS, WorkerHooks
from transforms.dead_letters import DEAD_LETTERS, WriteDeadLetters, file_level_reasons
from transforms import ledger_join as ledger
from transforms.join import MANIFEST, REPLY
from transforms.read_inputs import ReadManifest, ReadPatientIds, ReadReply
from transforms.vocabulary import LEDGER_COUNTERS, METRICS_NAMESPACE, SUMMARY_COUNTERS, Counter
from pipeline.fhir.config import FhirClientConfig
from pipeline.privacy.keys import open_key, resolve_key_source
from transforms.write_consents import SpreadWrites, WriteConsents
from transforms.write_ndjson import WriteNdjson
from transforms.provenance import ProvenanceSettings
from pipeline.fhir.search import check_server

_LOGGER = logging.getLogger(__name__)

SUMMARY = "summary.json"
_STAGE_BLOCK = 8 << 20
DEFAULT_RUNNER = "FnApiRunner"  # DirectRunner would first try (and fail) to download Prism here
# Runners whose workers run on this machine (Prism with its default LOOPBACK harness: in this process).
_LOCAL_RUNNERS = {"FnApiRunner", "DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner", "PrismRunner"}
PRISM_ENV = "NDOP_PRISM"  # a local Prism binary (dev/build_prism.sh builds one), so Beam downloads none
# Portable runners: Beam's driver reads the job's state stream with --job_server_timeout (default 300 s) as
# its deadline, so a run longer than that fails with DEADLINE_EXCEEDED (seen on Prism, 100k to FHIR).
_PORTABLE_RUNNERS = {"PrismRunner", "DirectRunner", "FlinkRunner", "PortableRunner", "SparkRunner"}
JOB_SERVER_TIMEOUT = 7 * 24 * 3600


def join_path(folder: str, name: str) -> str:
    return FileSystems.join(folder, name)


def fhir_config(opts: NdopOptions) -> Any:
    """The writer's client settings: options where given, the environment otherwise."""
    return FhirClientConfig.from_env(**fhir_overrides(opts))


STAGES = ("join", "consents", "write")


def id_key(opts: NdopOptions) -> tuple[IdKey, KeySource]:
    """The Consent id key (read once here, to check it and learn its fingerprint) and the source workers read:
    ``--id_key_source``, else the environment's (pipeline/privacy/keys.py); never a work dir's key, which the
    launcher (``ndop process``) names with ``--id_key_source`` when it is the one."""
    return open_key(resolve_key_source(opts.id_key_source, None, opts.fhir_url, create=False))


def worker_hooks(runner: str) -> WorkerHooks:
    """Callbacks for workers in this process (a local runner): the progress line, and the crash tests' fault point
    when ``NDOP_FAULT`` names one. Workers elsewhere get none."""
    if runner not in _LOCAL_RUNNERS:
        return NO_HOOKS
    return WorkerHooks(expect_writes=progress.expect_writes, wrote=progress.advance_writes,
                       fault=fault_point if os.environ.get(FAULT_ENV) else None)


def build_pipeline(p: beam.Pipeline, opts: NdopOptions, *, until: str = "write",
                   ledger_opts: LedgerOptions | None = None, key: KeySource | None = None,
                   hooks: WorkerHooks = NO_HOOKS, bulk: BulkLoad | None = None) -> dict[str, Any]:
    """Add the process graph to ``p``; returns its PCollections by name (tests and the bench use them).

    ``until`` stops the graph early for the bench: ``join`` (read, join, classify), ``consents``
    (and BuildConsent), ``write`` (the whole pipeline, with the dead-letter file). ``key``: where workers
    read the Consent id key (default: :func:`id_key`). ``bulk``: a bulk first load (pipeline/beam/bulk_load.py):
    the Consents and their Provenance go to NDJSON files for the store's import, not PUT.
    """
    if until not in STAGES:
        raise ValueError(f"until must be one of {STAGES}")
    key = key or id_key(opts)[1]
    manifest = p | "ReadManifest" >> ReadManifest(opts.manifest, opts.shards)
    reply = p | "ReadReply" >> ReadReply(opts.reply, opts.shards)
    lopts = ledger_opts or opts.view_as(LedgerOptions)
    previous = p | "ReadLedger" >> ledger.ReadLedger(lopts.ledger_in, opts.shards)
    inputs = {MANIFEST: manifest, REPLY: reply.numbers, ledger.LEDGER: previous}
    if opts.patient_ids:  # a fourth input: each worker holds its shard's Patient ids, not the cohort's
        inputs[ledger.PATIENT_IDS] = p | "ReadPatientIds" >> ReadPatientIds(opts.manifest, opts.shards)
    joined = inputs | "JoinWithLedger" >> (
        ledger.JoinWithLedger(opts.checked_at, opts.request_id, key, lopts.refresh_days, lopts.full_refresh,
                              chunk_size=opts.batch_size, hooks=hooks, ledger_out=lopts.ledger_out))
    errors = (
        reply[ReadReply.INTEGRITY_ERRORS],
        joined[ledger.JoinWithLedger.INTEGRITY_ERRORS],
    ) | "FlattenIntegrityErrors" >> beam.Flatten()
    error_count = errors | "CountIntegrityErrors" >> beam.combiners.Count.Globally()
    outputs: dict[str, Any] = {
        "classified": joined.to_write,
        "ledger": joined[ledger.LEDGER],
        "integrity_errors": errors,
        "integrity_error_count": error_count,
    }
    if lopts.ledger_out:
        outputs["ledger_files"] = joined[ledger.LEDGER] | "WriteLedger" >> ledger.WriteLedgerShards(
            lopts.ledger_out, error_count)
    if until == "join":
        return outputs
    # Bundle-sized chunks, redistributed: the Consents are built and written by every worker, not one per shard.

    spread = joined.to_write | "SpreadWrites" >> SpreadWrites(opts.max_writers)
    consents = spread | "BuildConsent" >> BuildConsent(opts.checked_at, key, opts.sample_validate)
    outputs["consents"] = consents
    if until == "consents":
        return outputs

    if bulk is not None:  # no PUTs: NDJSON files, which the launcher has the store import after the run
        outputs["ndjson_files"] = consents | "WriteNdjson" >> WriteNdjson(
            bulk.folder, opts.batch_size, integrity_errors=error_count, provenance=provenance_settings(opts))
        errors | "WriteDeadLetters" >> WriteDeadLetters(join_path(opts.output_dir, DEAD_LETTERS))
        outputs["dead_letters"] = errors
        return outputs
    written = consents | "WriteConsents" >> WriteConsents(
        fhir_config(opts),
        batch_size=opts.batch_size,
        bundle_type=opts.bundle_type,
        upsert=opts.upsert,
        integrity_errors=error_count,
        provenance=provenance_settings(opts),
        hooks=hooks,
    )
    dead_letters = (errors, written[WriteConsents.DEAD_LETTER]) | "FlattenDeadLetters" >> beam.Flatten()
    dead_letters | "WriteDeadLetters" >> WriteDeadLetters(join_path(opts.output_dir, DEAD_LETTERS))
    outputs.update(bundle_results=written.main, dead_letters=dead_letters)
    return outputs


def provenance_settings(opts: NdopOptions) -> Any:
    """The Provenance each bundle writes (transforms/provenance.py), or None with ``--no_provenance``."""
    if opts.no_provenance:
        return None

    try:
        organisation = opts.provenance_org or os.environ.get("MESH_MAILBOX", "").strip().upper()
        return ProvenanceSettings(organisation=organisation, request_id=opts.request_id or "",
                                  checked_at=opts.checked_at, reply_message_id=opts.reply_message_id or None)
    except ValueError as err:
        raise InputError(f"{err}, or give --no-provenance") from None


def pipeline_options(argv: Sequence[str]) -> PipelineOptions:
    """Parse ``argv``; name the in-process runner unless the caller chose one."""
    options = PipelineOptions(list(argv))
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = DEFAULT_RUNNER
    if standard.runner in _PORTABLE_RUNNERS and not any(a.startswith(("--job_server_timeout", "--job-server-timeout"))
                                                        for a in argv):
        options.view_as(PortableOptions).job_server_timeout = JOB_SERVER_TIMEOUT
    prism = options.view_as(PrismRunnerOptions)
    if standard.runner in ("PrismRunner", "DirectRunner") and not prism.prism_location and os.environ.get(PRISM_ENV):
        prism.prism_location = os.environ[PRISM_ENV]
    return options


def _is_local(path: str) -> bool:
    return "://" not in path


def check_inputs(opts: NdopOptions) -> None:
    """Refuse, with one clear line, what would otherwise fail deep inside the pipeline."""
    missing = [f"--{name}" for name in ("manifest", "reply", "checked_at", "output_dir") if not getattr(opts, name)]
    if missing:
        raise InputError(f"missing {', '.join(missing)}")
    if opts.shards < 1 or opts.batch_size < 1:
        raise InputError("--shards and --batch_size must be at least 1")
    provenance = provenance_settings(opts)
    if provenance is not None:  # the shape every bundle's Provenance takes, validated once (fhir.resources)
        from transforms.provenance import validate_provenance

        try:
            validate_provenance(provenance.build(["Consent/00000000-0000-0000-0000-000000000000"]))
        except ValueError as err:
            raise InputError(str(err)) from None
    try:
        check_checked_at(opts.checked_at)
    except ValueError as err:
        raise InputError(str(err)) from None
    for path in (opts.manifest, opts.reply):
        if not FileSystems.exists(path):
            raise InputError(f"{path}: no such file")
    with FileSystems.open(opts.reply, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        head = handle.read(len(datfile.INVALID_NUMBERS_REPLY) + 8)
    if datfile.INVALID_NUMBERS_REPLY.lower().encode() in head.lower():
        raise NdopError(
            f"{opts.reply}: NDOP rejected the request ({datfile.INVALID_NUMBERS_REPLY!r}); nothing to process"
        )


@contextlib.contextmanager
def _private_files(enabled: bool) -> Iterator[None]:
    """Create files 0600 while an in-process runner writes NHS numbers to a local folder."""
    if not enabled:
        yield
        return
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def _root_message(err: BaseException) -> str:
    """The line that says what went wrong, from under the runner's wrapping of a worker error."""
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    errors = [line for line in lines if line.split(":", 1)[0].endswith(("Error", "Exception"))]
    return nhs.redact(errors[-1] if errors else lines[0] if lines else type(err).__name__)[:500]


def counters(result: Any) -> dict[str, int] | None:
    """Committed counters of namespace ``ndop`` (attempted where a runner has no committed values).

    None when the runner reports no metrics (it cannot, or returned none at all: every run counts
    its manifest rows, so an empty answer means the counters were lost, not that nothing happened).
    """
    try:
        queried = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]
    except (NotImplementedError, AttributeError, KeyError) as err:
        _LOGGER.warning("the runner returned no metrics (%s: %s)", type(err).__name__, err)
        return None
    found: dict[str, int] = {}
    for counter in queried:
        value = counter.committed if counter.committed is not None else counter.attempted
        found[counter.key.metric.name] = found.get(counter.key.metric.name, 0) + int(value or 0)
    return found or None


def summarise(found: dict[str, int] | None, opts: NdopOptions, started: Any, seconds: float, dead_letters: str,
              integrity_reasons: Sequence[str] = ()) -> dict[str, Any]:
    """The run's summary; ``ok`` only when the counters were read and they add up."""
    metrics_available = found is not None
    counts = {name: (found or {}).get(metric, 0) for name, metric in SUMMARY_COUNTERS.items()}
    counts["written"] = counts["created"] + counts["updated"]
    classified = counts["opted_out"] + counts["not_opted_out"]
    problems = []
    if not metrics_available:
        problems.append("the runner returned no metrics: counts unknown, so the run is not reported as a success")
    if counts["integrity_errors"]:
        why = f" ({'; '.join(integrity_reasons)})" if integrity_reasons else ""
        problems.append(f"{counts['integrity_errors']} integrity errors in the reply{why}: no Consent written")
    if counts["failed"] or counts["refused"]:
        problems.append(f"{counts['failed']} Consents failed, {counts['refused']} refused")
    if counts["provenances_failed"]:
        problems.append(f"{counts['provenances_failed']} Provenance(s) not written (a re-run writes them)")
    if not counts["integrity_errors"] and counts["written"] != counts["to_write"]:
        problems.append(f"{counts['written']} Consents written of {counts['to_write']} to write "
                        f"({classified} patients)")
    return {
        "request_id": opts.request_id,
        "checked_at": opts.checked_at,
        "ok": not problems,
        "problems": problems,
        "metrics_available": metrics_available,
        "counts": counts,
        "changes": {key: counts[key] for key in LEDGER_COUNTERS if key != "ledger_rows"},
        "dead_letters": dead_letters,
        "timings": {
            "started_at": isoformat(started),
            "finished_at": isoformat(utcnow()),
            "pipeline_seconds": round(seconds, 3),
            "consents_per_second": round(counts["written"] / seconds, 1) if seconds > 0 else None,
        },
    }


def only_refused_entries(summary: dict[str, Any]) -> bool:
    """Whether the run stored every Consent but those the store refused entry by entry (dead letters): counters
    read, no integrity error, nothing withheld, every Provenance written, and written + failed adds up."""
    c = summary["counts"]
    return (summary["metrics_available"] and c["failed"] > 0 and not c["integrity_errors"] and not c["refused"]
            and not c["provenances_failed"] and c["written"] + c["failed"] == c["to_write"])


def refused_by_the_store(path: str) -> set[int]:
    """The NHS numbers of a run's dead letters when every one is an entry the store refused with a 4xx (not 429)
    in its own batch-response; otherwise (no answer, 5xx, an answer that said nothing) the empty set."""
    if not FileSystems.exists(path):
        return set()
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        records = [json.loads(line) for line in handle.read().decode().splitlines() if line.strip()]
    if not records or not all(r.get("nhs_number") and 400 <= int(r.get("status") or 0) < 500
                              and int(r.get("status") or 0) != 429 for r in records):
        return set()
    return {int(r["nhs_number"]) for r in records}


def write_summary(output_dir: str, summary: dict[str, Any]) -> str:
    path = join_path(output_dir, SUMMARY)
    if _is_local(path):
        write_json(path, summary)
    else:
        with FileSystems.create(path, mime_type="application/json") as handle:
            handle.write((json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    return path


def run(argv: Sequence[str]) -> dict[str, Any]:
    """Run the pipeline to completion; write and return the summary (``summary["ok"]`` says whether it
    may be acknowledged). Raises :class:`NdopError` when the pipeline itself fails."""
    options = pipeline_options(argv)
    opts = options.view_as(NdopOptions)
    check_inputs(opts)

    config = fhir_config(opts)  # where Consents go, from the options and the environment, once
    check_server(config)
    key, source = id_key(opts)
    lopts = options.view_as(LedgerOptions)
    lopts.ledger_in = ledger_dirs.check_ledger(lopts.ledger_in, config.base_url, key.fingerprint,
                                               lopts.full_refresh)
    bulk = bulk_load.plan(opts, options.view_as(BulkOptions), first_load=not lopts.ledger_in or lopts.full_refresh,
                          fhir_url=config.base_url)
    runner = options.view_as(StandardOptions).runner
    local = _is_local(opts.output_dir) and runner in _LOCAL_RUNNERS
    if _is_local(opts.output_dir):
        os.makedirs(opts.output_dir, mode=0o700, exist_ok=True)
    if lopts.ledger_out and _is_local(lopts.ledger_out):
        os.makedirs(lopts.ledger_out, mode=0o700, exist_ok=True)
    dead_letters = join_path(opts.output_dir, DEAD_LETTERS)
    _LOGGER.info("process %s: %s -> %s (runner %s)", opts.request_id or "-", opts.reply,
                 opts.fhir_url or "FHIR from env", runner)
    started, clock = utcnow(), time.monotonic()
    try:
        with _private_files(local):
            p = beam.Pipeline(options=options)
            if bulk is not None:
                bulk_load.prepare(bulk)
            build_pipeline(p, opts, ledger_opts=lopts, key=source, hooks=worker_hooks(runner), bulk=bulk)
            # The total is what the ledger join decides to write (it reports it shard by shard), not the cohort.
            with progress.tracking_writes(None, enabled=runner in _LOCAL_RUNNERS):  # the write DoFn reports
                result = p.run()
            # Dataflow: progress from the job's metrics while it runs. Not on portable runners (Flink): their
            # wait_until_finish(duration=...) reads the job's state stream again each time, and a second
            # reader breaks the stream ("Internal gRPC call error 8", seen on Flink with Beam 2.62).
            if runner not in _LOCAL_RUNNERS and runner not in _PORTABLE_RUNNERS:
                progress.follow_job(result, None, lambda r: _written(counters(r) or {}))
            result.wait_until_finish()
    except Exception as err:  # the runner wraps worker errors; say the one line that matters
        if bulk is not None:  # no import follows a failed pipeline: its files (NHS numbers) go now
            bulk_load.discard(bulk)
        if isinstance(err, NdopError):
            raise
        _LOGGER.debug("pipeline failed", exc_info=True)
        raise NdopError(f"process {opts.request_id or opts.reply}: pipeline failed: {_root_message(err)}") from err
    if _is_local(dead_letters) and os.path.exists(dead_letters):
        os.chmod(dead_letters, 0o600)
    found = counters(result)
    loaded = None
    if bulk is not None and found is not None and not found.get(Counter.INTEGRITY_ERRORS):
        loaded = bulk_load.import_staged(bulk, config, found)  # the written counts: the store's report
    elif bulk is not None:  # nothing may be imported: the files go
        bulk_load.discard(bulk)
    reasons = file_level_reasons(dead_letters) if found and found.get("integrity_errors") else []
    summary = summarise(found, opts, started, time.monotonic() - clock, dead_letters, reasons)
    if loaded is not None:
        summary["bulk_import"] = loaded
        if loaded["problem"]:
            summary["problems"].insert(0, loaded["problem"])
            summary["ok"] = False
    if summary["ok"] and lopts.ledger_out:  # a ledger is described (valid) only once every Consent is stored
        ledger_dirs.finish(lopts.ledger_out, summary, config.base_url, key.fingerprint)
    elif lopts.ledger_out and only_refused_entries(summary) and (refused := refused_by_the_store(dead_letters)):
        # Every Consent is stored but those the store itself refused, entry by entry, with its reason (a 4xx in its
        # batch-response): the ledger forgets just those patients (the retry set: the next run writes them again)
        # and is described, so what was stored is promoted and NDOP checks go on; the run still fails while
        # anything is refused. A bundle that got no answer the store gave entry by entry never takes this path.
        summary["retry"] = {"patients": len(refused),
                            "ledger_rows_dropped": ledger_dirs.drop_patients(lopts.ledger_out, refused)}
        summary["counts"]["ledger_rows"] -= summary["retry"]["ledger_rows_dropped"]
        ledger_dirs.finish(lopts.ledger_out, summary, config.base_url, key.fingerprint)
    summary["summary"] = write_summary(opts.output_dir, summary)
    c = summary["counts"]
    _LOGGER.info(
        "process %s: %d requested, %d opted out, %d not opted out, %d written, %d failed, %d integrity errors in %.1fs",
        opts.request_id or "-", c["requested"], c["opted_out"], c["not_opted_out"], c["written"], c["failed"],
        c["integrity_errors"], summary["timings"]["pipeline_seconds"],
    )
    return summary


def _written(found: dict[str, int]) -> int:
    return sum(found.get(SUMMARY_COUNTERS[k], 0) for k in ("created", "updated", "failed", "refused"))


def failure_message(summary: dict[str, Any]) -> str:
    return f"{'; '.join(summary['problems'])}; see {summary['dead_letters']}"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.beam.graph``: the Dataflow entry point; exit 1 when anything failed."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = run(sys.argv[1:] if argv is None else argv)
    except NdopError as err:
        print(f"pipeline.beam.graph: error: {err}", file=sys.stderr)
        return err.exit_code
    if not summary["ok"]:
        print(f"pipeline.beam.graph: error: {failure_message(summary)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
