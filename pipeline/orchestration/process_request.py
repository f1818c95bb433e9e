"""The process step's orchestration (beside run.py): stage a replied request's inputs, run the pipeline
(pipeline/beam/graph.py builds and runs the graph), record the outcome, and hand the acknowledgement to the MESH
driver. When a request may be processed or acknowledged again: the contract in pipeline/lifecycle/state.py.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.ledger import versions as ledger_dirs
from pipeline.ledger import history as ledger_history
from pipeline.core.errors import InputError, NdopError
from pipeline.fhir.config import ENV_URL
from pipeline.privacy.keys import resolve_key_source
from pipeline.beam.options import id_key_option
from pipeline.core.files import atomic_writer, private_dir, write_json
from pipeline.beam.graph import SUMMARY, _is_local, failure_message, join_path, run
from pipeline.core.clock import isoformat, utcnow
from pipeline.lifecycle.state import ACCEPTED, PROCESSED, REPLIED, RequestRecord, WorkDir
from transforms.read_inputs import PATIENT_ID_COLUMN
from pipeline.orchestration.plausibility import swing_problem
from pipeline.ledger.staleness import ledger_summary

_LOGGER = logging.getLogger(__name__)

_STAGE_BLOCK = 8 << 20

Acknowledge = Callable[[str], RequestRecord]


def hand_off_acknowledgement(work_dir: WorkDir, record: RequestRecord,
                             acknowledge: Acknowledge | None) -> RequestRecord:
    """Hand the processed request to the MESH driver's ``acknowledge`` (the caller supplies it, so the
    pipeline side stays free of MESH imports); without one the record stays ``processed``."""
    if acknowledge is None:
        _LOGGER.info("process %s: processed; MESH reply left for `ndop process`/`ndop run` to acknowledge",
                     record["request_id"])
        return record
    with work_dir.lock():
        return acknowledge(record["request_id"])


def has_patient_ids(manifest: Path) -> bool:
    """Whether the request's (local) manifest carries the optional ``patient_id`` column."""
    import pyarrow.parquet as pq


    return PATIENT_ID_COLUMN in pq.read_schema(manifest).names


def provenance_args(record: RequestRecord) -> list[str]:
    """What each Provenance names (transforms/provenance.py): the reply's MESH message id and, unless
    ``--provenance-org`` says otherwise, our MESH mailbox as the exchange."""
    args = []
    if record.get("mailbox"):
        args.append(f"--provenance_org={record['mailbox']}")
    if record.get("reply_message_id"):
        args.append(f"--reply_message_id={record['reply_message_id']}")
    return args


def stage_inputs(folder: Path, files: dict[str, str], stage_dir: str) -> tuple[str, str]:
    """Copy the request's manifest and reply to ``stage_dir`` (e.g. ``gs://bucket/ndop/<ID>``), where a
    remote runner's workers can read them; returns their new paths. Written through ``FileSystems``, so
    any scheme Beam knows works; a re-run overwrites the same objects."""
    staged = []
    for key, default in (("manifest", "manifest.parquet"), ("reply", "reply.dat")):
        source = folder / files.get(key, default)
        target = join_path(stage_dir, source.name)
        try:
            opened: Any
            if _is_local(target):  # a shared disk: the copies hold NHS numbers, so 0600 in a 0700 folder
                private_dir(stage_dir)
                opened = atomic_writer(target)
            else:
                opened = FileSystems.create(target, compression_type=CompressionTypes.UNCOMPRESSED)
            with open(source, "rb") as src, opened as out:
                shutil.copyfileobj(src, out, _STAGE_BLOCK)
        except OSError as err:
            raise NdopError(f"cannot stage {source} to {target}: {err}") from None
        _LOGGER.info("staged %s -> %s", source, target)
        staged.append(target)
    return staged[0], staged[1]


def process_request(work_dir: WorkDir, request_id: str, fhir_url: str | None = None,
                    beam_args: Sequence[str] = (), acknowledge: Acknowledge | None = None,
                    stage_dir: str | None = None, swing: float | None = None) -> RequestRecord:
    """``ndop process``: run the pipeline for a replied request, then mark it processed and acknowledge.

    A record already ``processed`` (an earlier run wrote everything but did not acknowledge) is only
    acknowledged. Any failure or integrity error leaves the record ``replied`` and raises.

    With ``stage_dir`` (a ``gs://`` folder for Dataflow) the inputs are copied to
    ``<stage_dir>/<request_id>/`` and the pipeline reads and writes there, so ``--runner DataflowRunner``
    works from the same work dir; ``summary.json`` is copied back beside the request.

    With ``swing`` (percentage points) a reply that moves the opted-out share more than that against the ledger
    is refused before anything is written (:func:`_check_swing`); None: the person accepted the swing.
    """
    with work_dir.lock():  # decide and act under one lock: one process step per request at a time
        return _process_locked(work_dir, request_id, fhir_url, beam_args, acknowledge, stage_dir, swing)


def _check_swing(work_dir: WorkDir, record: RequestRecord, allowed: float) -> None:
    """The plausibility gate (pipeline/orchestration/plausibility.py). A refused reply is set aside, not used: the
    request goes back to waiting for NDOP, so the next poll downloads the reply again while MESH holds it."""

    sent = int(record.get("counts", {}).get("sent", 0))
    problem = swing_problem(ledger_summary(work_dir, 0), sent, int(record.get("reply_lines", 0)), allowed)
    if problem is None:
        return
    rid = record["request_id"]
    refused = {"message_id": record.get("reply_message_id"), "sha256": record.get("reply_sha256"),
               "reason": problem, "at": isoformat(utcnow())}
    (work_dir.request_dir(rid) / record.get("files", {}).get("reply", "reply.dat")).unlink(missing_ok=True)
    work_dir.update(rid, state=ACCEPTED, expect=REPLIED, reply_message_id=None, reply_sha256=None,
                    refused_replies=[*record.get("refused_replies", []), refused])
    raise NdopError(f"request {rid}: reply {refused['message_id']} not used: {problem}")


def _process_locked(work_dir: WorkDir, request_id: str, fhir_url: str | None, beam_args: Sequence[str],
                    acknowledge: Acknowledge | None, stage_dir: str | None, swing: float | None) -> RequestRecord:
    record = work_dir.load(request_id)
    if record.get("state") == PROCESSED:
        _LOGGER.info("process %s: already processed; acknowledging only", request_id)
        return hand_off_acknowledgement(work_dir, record, acknowledge)
    if record.get("state") != REPLIED:
        raise InputError(f"request {request_id} is {record.get('state')!r}; process needs a 'replied' request")
    if record.get("second_replies"):
        second = record["second_replies"][-1]
        raise NdopError(f"request {request_id}: a second, different reply (MESH message {second.get('message_id')}) "
                        "came for it; which answer is NDOP's is for a person to decide: `ndop resolve-reply "
                        f"--request-id {request_id} --use first|second` (docs/guarantees.md)")
    if not record.get("checked_at"):
        raise NdopError(f"request {request_id}: the record has no checked_at (when NDOP answered)")
    if swing is not None:
        _check_swing(work_dir, record, swing)
    folder = work_dir.request_dir(request_id)
    files = record.get("files", {})
    if stage_dir:
        output_dir = join_path(stage_dir, request_id)
        manifest, reply = stage_inputs(folder, files, output_dir)
    else:
        output_dir = str(folder)
        manifest = str(folder / files.get("manifest", "manifest.parquet"))
        reply = str(folder / files.get("reply", "reply.dat"))
    argv = [
        *provenance_args(record),  # before beam_args: a --provenance-org given there wins
        *beam_args,
        f"--manifest={manifest}",
        f"--reply={reply}",
        f"--checked_at={record['checked_at']}",
        f"--output_dir={output_dir}",
        f"--request_id={request_id}",
    ]
    if fhir_url:
        argv.append(f"--fhir_url={fhir_url}")
    if id_key_option(beam_args) is None:  # the environment's source, else the work dir's own (loopback, made here)
        spec = resolve_key_source(None, work_dir.root, fhir_url or os.environ.get(ENV_URL), create=True)
        argv.append(f"--id_key_source={spec}")
    if has_patient_ids(folder / files.get("manifest", "manifest.parquet")):
        argv.append("--patient_ids")
    argv += ledger_dirs.pipeline_args(work_dir, request_id, stage_dir)  # the work dir's ledger in, a pending one out
    summary = run(argv)
    if stage_dir:
        write_json(folder / SUMMARY, summary)  # the local record of the run; dead letters stay on the bucket
    fields: dict[str, Any] = {"processing": {"summary": SUMMARY, "ok": summary["ok"], "counts": summary["counts"],
                             "at": summary["timings"]["finished_at"]}}
    if not summary["ok"] and not summary.get("retry"):
        work_dir.update(request_id, expect=REPLIED, **fields)
        raise NdopError(f"request {request_id}: {failure_message(summary)}")
    # Every Consent stored (or, with a retry set, all but those the store refused): the new ledger in force.
    promoted = ledger_dirs.promote(work_dir, request_id, stage_dir)
    ledger_history.record(work_dir, promoted, request_id, summary.get("checked_at"))  # for ndop filter --as-of
    record = work_dir.update(request_id, state=PROCESSED, expect=REPLIED, processed_at=isoformat(utcnow()), **fields)
    record = hand_off_acknowledgement(work_dir, record, acknowledge)
    if summary.get("retry"):  # NDOP checks go on; the refused Consents are written again by the next run
        raise NdopError(f"request {request_id}: {summary['retry']['patients']} Consents refused by the FHIR store "
                        f"(the rest stored, the reply acknowledged); the next run writes them again: "
                        f"{failure_message(summary)}")
    return record
