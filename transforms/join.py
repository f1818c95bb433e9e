"""Join the manifest with the reply, shard by shard, and classify every NHS number.

Still a ``CoGroupByKey`` (any runner scales it out by shard), but each key is a hash shard
carrying whole arrays, and the set logic inside a shard is numpy's:

- in the manifest and the reply: not opted out (Consent ``inactive``);
- in the manifest only: opted out (Consent ``active``);
- in the reply only: an integrity error (the reply is not an answer to this request);
- duplicates on either side are counted, and classified once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from transforms import shards as shardlib
from transforms.vocabulary import METRICS_NAMESPACE, integrity_error

_LOGGER = logging.getLogger(__name__)

MANIFEST = "manifest"
REPLY = "reply"
REASON_REPLY_ONLY = "in the reply but not in the request: the reply is not an answer to this request"


@dataclass(frozen=True)
class Classified:
    """The outcome of one shard's join; arrays are sorted int64 NHS numbers."""

    opted_out: np.ndarray
    not_opted_out: np.ndarray
    reply_only: np.ndarray
    requested: int
    replied: int
    manifest_duplicates: int
    reply_duplicates: int


def unique_sorted(numbers: np.ndarray) -> np.ndarray:
    """``np.unique(numbers)`` (the distinct values, sorted) by one sort: numpy 2.4's ``np.unique`` hashes before it
    sorts, about 15x slower on a 10M cohort's shard of int64 (0.37 s against 0.025 s for 312k numbers)."""
    ordered = np.sort(numbers)
    if len(ordered) < 2:
        return ordered
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))]


def classify(manifest: np.ndarray, reply: np.ndarray) -> Classified:
    """Classify one shard's numbers: the whole NDOP rule, without Beam."""
    requested = unique_sorted(manifest)
    replied = unique_sorted(reply)
    answered = np.isin(requested, replied, assume_unique=True)
    return Classified(
        opted_out=requested[~answered],
        not_opted_out=requested[answered],
        reply_only=np.setdiff1d(replied, requested, assume_unique=True),
        requested=len(requested),
        replied=len(replied),
        manifest_duplicates=len(manifest) - len(requested),
        reply_duplicates=len(reply) - len(replied),
    )


class ClassifyShardFn(beam.DoFn):
    """Classify a ``(shard, {manifest: [bytes], reply: [bytes]})`` group.

    Main output: ``(status, int64 array)`` batches; :attr:`INTEGRITY_ERRORS`: one dead-letter
    record per number found only in the reply.
    """

    INTEGRITY_ERRORS = "integrity_errors"

    def __init__(self) -> None:
        self._counters = {
            name: Metrics.counter(METRICS_NAMESPACE, name)
            for name in ("requested", "replied", "opted_out", "not_opted_out", "reply_only",
                         "manifest_duplicates", "reply_duplicates", "integrity_errors")
        }

    def classify_group(self, grouped: dict[str, Any]) -> Classified:
        """Classify one shard's group and count it."""
        result = classify(shardlib.from_bytes(list(grouped[MANIFEST])), shardlib.from_bytes(list(grouped[REPLY])))
        for name in ("requested", "replied", "manifest_duplicates", "reply_duplicates"):
            self._counters[name].inc(getattr(result, name))
        self._counters["opted_out"].inc(len(result.opted_out))
        self._counters["not_opted_out"].inc(len(result.not_opted_out))
        self._counters["reply_only"].inc(len(result.reply_only))
        self._counters["integrity_errors"].inc(len(result.reply_only))
        return result

    def integrity_outputs(self, result: Classified) -> Iterator[Any]:
        """One dead-letter record per number found only in the reply."""
        for number in shardlib.to_strings(result.reply_only):
            yield pvalue.TaggedOutput(
                self.INTEGRITY_ERRORS, integrity_error(REASON_REPLY_ONLY, number)
            )

