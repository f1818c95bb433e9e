"""WriteNdjson: the Consents (and their Provenance) as NDJSON files for a FHIR store's bulk import.

The bulk first load's half inside the pipeline (the store-facing half: pipeline/fhir/bulk_import.py; the launcher
that runs the import and reads its report: pipeline/beam/bulk_load.py). In place of ``WriteConsents``' PUTs:

- ``<folder>/Consent-SSSSS-of-NNNNN.ndjson``: one Consent a line, through ``beam.io.WriteToText`` (so through
  ``FileSystems``: a local folder, ``gs://``, ...);
- ``<folder>/Provenance-SSSSS-of-NNNNN.ndjson``: one Provenance per ``batch_size`` Consents naming them, the same
  shape the PUT writer stores beside each bundle (transforms/provenance.py).

Integrity gate: given ``integrity_errors`` (a PCollection of one int), nothing is written when it is above zero and
every Consent counts as ``consents_refused``, as with the PUT writer. Nothing is stored by this transform: a Consent
counts as written only when the store's import job reports it stored.
"""
from __future__ import annotations

import json
from typing import Any, Iterator, Mapping, Sequence

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.provenance import ProvenanceSettings, consent_reference
from transforms.vocabulary import METRICS_NAMESPACE, Counter

CONSENT_FILES = "Consent"
PROVENANCE_FILES = "Provenance"
SUFFIX = ".ndjson"
SHARD_TEMPLATE = "-SSSSS-of-NNNNN"


def ndjson_line(resource: Mapping[str, Any]) -> str:
    """One resource as one compact NDJSON line (no newline: WriteToText adds it)."""
    return json.dumps(resource, separators=(",", ":"))


class _IntegrityGateFn(beam.DoFn):
    """Passes every Consent on, or none when the reply had integrity errors (each then counted as refused)."""

    def __init__(self) -> None:
        self.refused = Metrics.counter(METRICS_NAMESPACE, Counter.CONSENTS_REFUSED)
        self.staged = Metrics.counter(METRICS_NAMESPACE, Counter.CONSENTS_STAGED)

    def process(self, consent: dict[str, Any], integrity_errors: int = 0) -> Iterator[dict[str, Any]]:
        if integrity_errors:
            self.refused.inc()
            return
        self.staged.inc()
        yield consent


class _ProvenanceFn(beam.DoFn):
    """One Provenance over a batch of Consents (the targets a bundle of PUTs would have named)."""

    def __init__(self, settings: ProvenanceSettings) -> None:
        self._settings = settings
        self.staged = Metrics.counter(METRICS_NAMESPACE, Counter.PROVENANCES_STAGED)

    def process(self, batch: Sequence[Mapping[str, Any]]) -> Iterator[str]:
        self.staged.inc()
        yield ndjson_line(self._settings.build([consent_reference(consent, "id") for consent in batch]))


class WriteNdjson(beam.PTransform):
    """Consent dicts -> ``Consent-*.ndjson`` (and ``Provenance-*.ndjson``) in ``folder``; returns the written file
    names (a PCollection of paths)."""

    def __init__(self, folder: str, batch_size: int, integrity_errors: pvalue.PCollection | None = None,
                 provenance: ProvenanceSettings | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self._folder = folder
        self._batch_size = batch_size
        self._integrity_errors = integrity_errors
        self._provenance = provenance

    def _files(self, lines: pvalue.PCollection, name: str) -> pvalue.PCollection:
        return lines | f"Write{name}Ndjson" >> beam.io.WriteToText(
            FileSystems.join(self._folder, name), file_name_suffix=SUFFIX, shard_name_template=SHARD_TEMPLATE)

    def expand(self, consents: pvalue.PCollection) -> pvalue.PCollection:
        side_inputs: dict[str, Any] = {}
        if self._integrity_errors is not None:
            side_inputs["integrity_errors"] = pvalue.AsSingleton(self._integrity_errors)
        gated = consents | "IntegrityGate" >> beam.ParDo(_IntegrityGateFn(), **side_inputs)
        files = [self._files(gated | "ConsentLines" >> beam.Map(ndjson_line), CONSENT_FILES)]
        if self._provenance is not None:
            provenance = (
                gated
                | "BatchForProvenance" >> beam.BatchElements(min_batch_size=self._batch_size,
                                                             max_batch_size=self._batch_size)
                | "BuildProvenance" >> beam.ParDo(_ProvenanceFn(self._provenance))
            )
            files.append(self._files(provenance, PROVENANCE_FILES))
        return tuple(files) | "AllNdjsonFiles" >> beam.Flatten()
