"""WriteConsents: upsert Consent resources into a FHIR R4 store in batch or transaction Bundles.

Idempotent by construction: every entry is a PUT, either by the Consent's deterministic id
(``upsert="id"``) or conditional on its business identifier (``upsert="conditional"``,
``PUT Consent?identifier=SYSTEM|VALUE``), so a re-run, or a retried POST, never duplicates a Consent.

What fails becomes data: every entry that is still refused after the retries is emitted on the
``dead_letter`` output (NHS number, Consent id, HTTP status, the OperationOutcome text, time), which the
pipeline writes to a 0600 file. Logs only ever show masked numbers.

Retries: the session (``pipeline.fhir``) retries whole requests on 429 (honouring Retry-After),
5xx and timeouts. Inside a ``batch`` response, entries that failed with one of those statuses are posted
again (only them), spaced by the same rule (``pipeline.fhir.retry.backoff_seconds``). A ``transaction`` refused as
a whole with a 4xx (one bad entry rolls the lot back, or the server refuses large transactions) is posted
once more as a ``batch`` of the same entries, so the good Consents land and only the bad ones are
dead-lettered; a transaction that still fails with 5xx/429 after the retries dead-letters all its entries
with the server's reason.

Unreachable: a bundle that gets no answer because the connection is refused or reset (after the session's
few ``connect_retries``), or the second bundle in a row that times out, raises
:class:`~pipeline.fhir.answers.FhirUnreachableError`: the run fails in seconds (so nothing is acknowledged)
rather than every remaining bundle spending its retries. A 429 or a 5xx keeps the retries above.

Believe no peer: an entry counts as written only when the store's answer says so for that entry
(:func:`answer_problem`): a 201/202/204 or anything but a full batch/transaction-response is a failed bundle.

Integrity gate: given ``integrity_errors`` (a PCollection of one int), the writer posts nothing when it
is above zero and counts every Consent as ``consents_refused``.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterable, Iterator, Mapping, Sequence
from urllib.parse import urlencode

import apache_beam as beam
import numpy as np
import requests
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from pipeline.core import nhs
from pipeline.fhir.answers import FhirUnreachableError, answer_problem, read_entries, response_reason
from pipeline.fhir.config import FhirClientConfig
from pipeline.fhir.retry import RETRY_STATUSES, backoff_seconds, is_timeout
from pipeline.fhir.search import post_bundle
from pipeline.fhir.sessions import open_session
from pipeline.core.clock import isoformat, utcnow
from transforms.shards import shard_of
from transforms.provenance import ProvenanceSettings, consent_reference, put_provenance, transaction_entry
from transforms.hooks import NO_HOOKS, WorkerHooks
from transforms.vocabulary import METRICS_NAMESPACE, Counter

_LOGGER = logging.getLogger(__name__)

BUNDLE_TYPES = ("batch", "transaction")
UPSERT_MODES = ("id", "conditional")
DEFAULT_BATCH_SIZE = 500
STATUS_NO_ANSWER = 0  # dead-letter status when no HTTP answer came at all (timeouts, refused connection)
STATUS_BAD_ANSWER = 502  # an answer that does not say what was stored: retried like a bad gateway's
UNREACHABLE_AFTER_TIMEOUTS = 2  # bundles in a row whose requests all timed out: the server is gone


def nhs_number_of(consent: Mapping[str, Any]) -> str:
    return str(((consent.get("patient") or {}).get("identifier") or {}).get("value", ""))


def request_url(consent: Mapping[str, Any], upsert: str) -> str:
    """The entry's ``request.url``: where this Consent is PUT."""
    if upsert == "id":
        return f"Consent/{consent['id']}"
    identifier = consent["identifier"][0]
    return "Consent?" + urlencode({"identifier": f"{identifier['system']}|{identifier['value']}"})


def build_bundle(consents: Sequence[Mapping[str, Any]], bundle_type: str, upsert: str) -> dict[str, Any]:
    """A batch/transaction Bundle of PUTs, one per Consent, in input order.

    With a conditional update the resource goes without its id: the server keeps the id of the Consent the
    identifier matches (or assigns one), and a body id that differs from the match would be refused.
    """
    entries = []
    for consent in consents:
        resource = consent if upsert == "id" else {k: v for k, v in consent.items() if k != "id"}
        entries.append({"resource": resource, "request": {"method": "PUT", "url": request_url(consent, upsert)}})
    return {"resourceType": "Bundle", "type": bundle_type, "entry": entries}


class _PostBundlesFn(beam.DoFn):
    """Posts one batch of Consents as one Bundle; one session per DoFn instance."""

    def __init__(self, config: FhirClientConfig, bundle_type: str, upsert: str,
                 provenance: ProvenanceSettings | None = None, hooks: WorkerHooks = NO_HOOKS) -> None:
        self._config = config
        self._hooks = hooks
        self._bundle_type = bundle_type
        self._upsert = upsert
        self._provenance = provenance
        self._stored_in_transaction: dict[str, Any] | None = None  # the Provenance a transaction carried
        self._session: requests.Session | None = None
        self._timeouts_in_a_row = 0
        self.provenances = Metrics.counter(METRICS_NAMESPACE, Counter.PROVENANCES_WRITTEN)
        self.provenance_targets = Metrics.counter(METRICS_NAMESPACE, Counter.PROVENANCE_TARGETS)
        self.provenance_failed = Metrics.counter(METRICS_NAMESPACE, Counter.PROVENANCES_FAILED)
        self.created = Metrics.counter(METRICS_NAMESPACE, "consents_created")
        self.updated = Metrics.counter(METRICS_NAMESPACE, "consents_updated")
        self.failed = Metrics.counter(METRICS_NAMESPACE, "consents_failed")
        self.refused = Metrics.counter(METRICS_NAMESPACE, "consents_refused")
        self.bundles = Metrics.counter(METRICS_NAMESPACE, "bundles_posted")

    def setup(self) -> None:
        self._session = open_session(self._config)

    def teardown(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def process(self, batch: Sequence[Mapping[str, Any]], integrity_errors: int = 0) -> Iterator[Any]:
        if integrity_errors:
            self.refused.inc(len(batch))
            _LOGGER.error(
                "not writing %d Consents: %d integrity errors in this run", len(batch), integrity_errors
            )
            yield {"created": 0, "updated": 0, "failed": 0, "refused": len(batch)}
            return
        outcome = {"created": 0, "updated": 0, "failed": 0, "refused": 0}
        dead: list[dict[str, Any]] = []
        written: list[Mapping[str, Any]] = []
        self._stored_in_transaction = None
        for code, reason, consent in self._post(list(batch)):
            if 200 <= code < 300:
                written.append(consent)
            if code == 201:
                outcome["created"] += 1
            elif 200 <= code < 300:
                outcome["updated"] += 1
            else:
                outcome["failed"] += 1
                dead.append(
                    {
                        "nhs_number": nhs_number_of(consent),
                        "consent_id": consent.get("id"),
                        "status": code,
                        "reason": reason,
                        "at": isoformat(utcnow()),
                    }
                )
        self.created.inc(outcome["created"])
        self.updated.inc(outcome["updated"])
        if self._provenance is not None and written:
            self._record_provenance(written)
        self._hooks.written(len(batch))  # the local runner's progress line (no hook on remote workers)
        self._hooks.at("after-first-bundle")  # crash tests: killed in the middle of the FHIR writes
        if dead:
            self.failed.inc(len(dead))
            first = dead[0]
            _LOGGER.error(
                "giving up on %d of %d Consents in a %s bundle; first: %s HTTP %d: %s",
                len(dead),
                len(batch),
                self._bundle_type,
                nhs.mask(first["nhs_number"]),
                first["status"],
                nhs.redact(first["reason"]),
            )
            for record in dead:
                yield pvalue.TaggedOutput(WriteConsents.DEAD_LETTER, record)
        yield outcome

    def _provenance_of(self, consents: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        assert self._provenance is not None
        return self._provenance.build([consent_reference(c, self._upsert) for c in consents])

    def _record_provenance(self, written: list[Mapping[str, Any]]) -> None:
        """One Provenance over the Consents this bundle stored: already in the transaction that stored them
        all, else ``PUT Provenance/<id>`` now, over exactly those that succeeded (a re-run replaces it)."""
        assert self._session is not None
        carried = self._stored_in_transaction
        if carried is not None and len(carried["target"]) == len(written):
            self.provenances.inc()
            self.provenance_targets.inc(len(written))
            return
        provenance = self._provenance_of(written)
        code, reason = put_provenance(self._session, self._config.base_url, provenance)
        if 200 <= code < 300:
            self.provenances.inc()
            self.provenance_targets.inc(len(written))
            return
        self.provenance_failed.inc()
        _LOGGER.error("Provenance %s over %d Consents not written: HTTP %d: %s", provenance["id"], len(written),
                      code, nhs.redact(reason))

    def _post(self, consents: list[Mapping[str, Any]]) -> Iterator[tuple[int, str, Mapping[str, Any]]]:
        """Yield (status, reason, consent) once per Consent, retrying what the server may accept later."""
        assert self._session is not None, "setup() opens the session"
        bundle_type = self._bundle_type
        pending = consents
        attempt = 0
        while pending:
            answer = self._post_once(pending, bundle_type)
            if answer is None:  # a transaction refused as a whole: the same entries as a batch, once
                bundle_type = "batch"
                continue
            results, per_entry = answer
            retry = []
            for (code, reason), consent in zip(results, pending):
                # A whole-request 429/5xx has had the session's retries already; only retry entries here.
                if per_entry and code in RETRY_STATUSES and attempt < self._config.max_retries:
                    retry.append(consent)
                else:
                    yield code, reason, consent
            if retry:
                attempt += 1
                delay = backoff_seconds(attempt, self._config.backoff)
                _LOGGER.warning(
                    "%d of %d entries of a %s bundle answered 429/5xx; retry %d of %d in %.1f s",
                    len(retry), len(pending), bundle_type, attempt, self._config.max_retries, delay,
                )
                time.sleep(delay)
            pending = retry

    def _post_once(
        self, consents: list[Mapping[str, Any]], bundle_type: str
    ) -> tuple[list[tuple[int, str]], bool] | None:
        """((status, reason) per entry, whether those came per entry); None for a transaction refused whole."""
        assert self._session is not None
        bundle = build_bundle(consents, bundle_type, self._upsert)
        carried = None
        if bundle_type == "transaction" and self._provenance is not None:  # stored with them, or not at all
            carried = self._provenance_of(consents)
            bundle["entry"].append(transaction_entry(carried))
        try:
            response = post_bundle(self._session, self._config.base_url, bundle)
        except requests.RequestException as exc:
            # The session already retried timeouts and refused connections (connect_retries times).
            self._check_reachable(exc, len(consents))
            reason = (f"no answer from the FHIR server after {self._config.no_answer_retries} retries: "
                      f"{type(exc).__name__}")
            return [(STATUS_NO_ANSWER, reason)] * len(consents), False
        self._timeouts_in_a_row = 0
        self.bundles.inc()
        with response:
            if 200 <= response.status_code < 300:
                try:
                    body: Any = response.json()
                except ValueError:
                    body = None
                problem = answer_problem(response.status_code, body, bundle_type, len(bundle["entry"]))
                if problem is not None:  # retried like a 502 (an invalid answer), then dead letters
                    _LOGGER.warning("%d Consents not counted as written: %s", len(consents), problem)
                    return [(STATUS_BAD_ANSWER, f"{problem}: not counted as written")] * len(consents), True
                results = read_entries(body, len(consents))
                if carried is not None and all(200 <= code < 300 for code, _ in results):
                    self._stored_in_transaction = carried
                return results, True
            reason = response_reason(response)
            if bundle_type == "transaction" and 400 <= response.status_code < 500 and response.status_code != 429:
                _LOGGER.warning(
                    "transaction of %d Consents refused whole (HTTP %d: %s); posting them again as a batch",
                    len(consents), response.status_code, nhs.redact(reason),
                )
                return None
            # The session's retries are spent (5xx/429), or the server refused the bundle itself.
            return [(response.status_code, reason)] * len(consents), False

    def _check_reachable(self, exc: requests.RequestException, count: int) -> None:
        """Raise FhirUnreachableError when no answer means the server is gone, not one slow bundle."""
        if is_timeout(exc):
            self._timeouts_in_a_row += 1
            if self._timeouts_in_a_row < UNREACHABLE_AFTER_TIMEOUTS:
                return
            why = f"{self._timeouts_in_a_row} bundles in a row timed out"
        elif isinstance(exc, requests.ConnectionError):
            why = f"connection refused or reset ({type(exc).__name__})"
        else:
            return
        _LOGGER.error("FHIR server %s unreachable: %s; stopping the writes (%d Consents of this bundle unwritten)",
                      self._config.base_url, why, count)
        raise FhirUnreachableError(
            f"the FHIR server {self._config.base_url} is unreachable: {why}, after "
            f"{self._config.no_answer_retries} retries each; stopped writing: the run fails, nothing is acknowledged"
        )


class SpreadWrites(beam.PTransform):
    """Bundle-sized ``(status, int64 array)`` chunks (``DecideShard``'s), redistributed for the writes.

    No cap (``max_writers=0``): a ``Reshuffle``, so BuildConsent and PostBundles (fused behind it) run on every
    worker the runner has, and a retried work item rewrites a chunk, not a join shard. With ``max_writers=N``:
    each chunk is keyed to one of N writer slots (the join's hash, :func:`transforms.shards.shard_of`, on its first
    number) and grouped by slot, so at most N work items, each posting its slot's chunks one bundle at a time,
    are in flight to the store whatever the runner's parallelism (a FHIR store's write quota).
    (A plain ``GroupByKey``: Prism 2.77 lost and re-posted Consents behind ``GroupIntoBatches`` here.)
    Where the slots run is the runner's choice, by a hash of the key's encoding: two slots on one worker are posted
    one after the other, so fewer than N may write at once. The slot key is declared ``int`` (a varint the runner
    reads, not pickled bytes); on Flink 1.19 that put N=2 and N=3 slots at parallelism 4 on distinct workers, where
    the pickled key put them on one (docs/distributed.md). A placement, not a promise: N stays an upper bound only.
    """

    def __init__(self, max_writers: int = 0) -> None:
        super().__init__()
        if max_writers < 0:
            raise ValueError(f"max_writers must be 0 (no cap) or more, not {max_writers}")
        self._max_writers = max_writers

    def expand(self, chunks: pvalue.PCollection) -> pvalue.PCollection:
        if not self._max_writers:
            return chunks | "Redistribute" >> beam.Reshuffle()
        return (
            chunks
            | "KeyByWriterSlot" >> beam.Map(writer_slot, self._max_writers).with_output_types(tuple[int, Any])
            | "GroupByWriterSlot" >> beam.GroupByKey()
            | "SlotChunks" >> beam.FlatMap(_slot_chunks)
        )


def writer_slot(chunk: tuple[str, np.ndarray], writers: int) -> tuple[int, tuple[str, np.ndarray]]:
    """``(slot, chunk)``: the chunk's writer slot in ``[0, writers)``, the same on every worker and run."""
    return int(shard_of(chunk[1][:1], writers)[0]), chunk


def _slot_chunks(grouped: tuple[int, Iterable[tuple[str, np.ndarray]]]) -> Iterable[tuple[str, np.ndarray]]:
    return grouped[1]


class WriteConsents(beam.PTransform):
    """Upsert Consent dicts into the FHIR store; outputs per-bundle counts and dead letters.

    Input elements: Consent resources (dicts) with a deterministic ``id``, ``identifier[0]`` (system and
    value: the business key) and ``patient.identifier.value`` (the NHS number).

    Returns ``.with_outputs``: ``result.main`` (one ``{"created", "updated", "failed", "refused"}`` dict
    per bundle) and ``result[WriteConsents.DEAD_LETTER]`` (one dict per Consent that could not be written:
    ``nhs_number``, ``consent_id``, ``status`` (0 when no HTTP answer), ``reason``, ``at``).

    With ``provenance`` every bundle also stores one R4 Provenance over the Consents it wrote
    (transforms/provenance.py): inside a transaction, or after a batch over those that succeeded.
    """

    DEAD_LETTER = "dead_letter"

    def __init__(
        self,
        config: FhirClientConfig,
        batch_size: int = DEFAULT_BATCH_SIZE,
        bundle_type: str = "batch",
        upsert: str = "id",
        integrity_errors: pvalue.PCollection | None = None,
        label: str | None = None,
        provenance: ProvenanceSettings | None = None,
        hooks: WorkerHooks = NO_HOOKS,
    ) -> None:
        super().__init__(label)
        if bundle_type not in BUNDLE_TYPES:
            raise ValueError(f"bundle_type must be one of {BUNDLE_TYPES}, not {bundle_type!r}")
        if upsert not in UPSERT_MODES:
            raise ValueError(f"upsert must be one of {UPSERT_MODES}, not {upsert!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self._config = config
        self._batch_size = batch_size
        self._bundle_type = bundle_type
        self._upsert = upsert
        self._integrity_errors = integrity_errors
        self._provenance = provenance
        self._hooks = hooks

    def expand(self, consents: pvalue.PCollection) -> pvalue.DoOutputsTuple:
        side_inputs: dict[str, Any] = {}
        if self._integrity_errors is not None:
            side_inputs["integrity_errors"] = pvalue.AsSingleton(self._integrity_errors)
        return (
            consents
            | "BatchConsents"
            >> beam.BatchElements(min_batch_size=self._batch_size, max_batch_size=self._batch_size)
            | "PostBundles"
            >> beam.ParDo(_PostBundlesFn(self._config, self._bundle_type, self._upsert, self._provenance, self._hooks),
                          **side_inputs).with_outputs(
                self.DEAD_LETTER, main="main"
            )
        )
