"""Dead letters (integrity errors and refused or failed writes) as one JSON-lines file."""
from __future__ import annotations

import json
from typing import Any, Iterator

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.vocabulary import METRICS_NAMESPACE, Counter

DEAD_LETTERS = "dead_letters.jsonl"


class ToJsonLineFn(beam.DoFn):
    """One dead letter as a JSON line, counted (``ndop/dead_letters``) for the run summary."""

    def __init__(self) -> None:
        self._count = Metrics.counter(METRICS_NAMESPACE, Counter.DEAD_LETTERS)

    def process(self, record: dict[str, Any]) -> Iterator[str]:
        self._count.inc()
        yield json.dumps(record, sort_keys=True)


class WriteDeadLetters(beam.PTransform):
    """Write dead-letter dicts to exactly ``path`` (one file, even when empty, so a run always has one).

    The file holds NHS numbers: ``pipeline.beam.graph`` runs local pipelines under a private umask
    and makes the file 0600; on a bucket, access is the bucket's IAM.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = path

    def expand(self, records: pvalue.PCollection) -> pvalue.PCollection:
        return (
            records
            | "ToJsonLines" >> beam.ParDo(ToJsonLineFn())
            | "WriteJsonLines" >> beam.io.WriteToText(self._path, shard_name_template="", num_shards=1)
        )


def file_level_reasons(path: str, limit: int = 3) -> list[str]:
    """The first ``limit`` reasons of dead letters about the reply itself (no NHS number: a bad line, a
    header and no number), for the run summary: they say why nothing was written, and hold no number."""
    reasons: list[str] = []
    if not FileSystems.exists(path):
        return reasons
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("nhs_number") is None and record.get("reason"):
                reasons.append(str(record["reason"]))
                if len(reasons) >= limit:
                    break
    return reasons
