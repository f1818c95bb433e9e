"""The join and classification: every case of the NDOP rule, on numpy and through Beam (the production join,
JoinWithLedger, on a first load: no ledger yet)."""
from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.testing.util import assert_that, equal_to

from pipeline.core import nhs
from tests.beam_util import local_pipeline
from transforms import shards
from tests.helpers import key_source_for_tests
from transforms.join import MANIFEST, REASON_REPLY_ONLY, REPLY, classify, unique_sorted
from transforms.ledger_join import LEDGER, JoinWithLedger
from transforms.vocabulary import NOT_OPTED_OUT, OPTED_OUT

SHARDS = 5


def _ints(numbers: list[str]) -> np.ndarray:
    return shards.to_int64(pa.array(numbers, pa.string()))


def test_classify_every_case():
    a, b, c, d = nhs.synthetic_numbers(4, seed=3).to_pylist()
    # a: in both (twice in the manifest); b: manifest only; c: both (twice in the reply); d: reply only
    result = classify(_ints([a, a, b, c]), _ints([a, c, c, d]))
    assert shards.to_strings(result.opted_out) == [b]
    assert sorted(shards.to_strings(result.not_opted_out)) == sorted([a, c])
    assert shards.to_strings(result.reply_only) == [d]
    assert (result.requested, result.replied, result.manifest_duplicates, result.reply_duplicates) == (3, 3, 1, 1)


def test_unique_sorted_is_np_unique():
    rng = np.random.default_rng(24)
    cases = [np.zeros(0, np.int64), np.array([7], np.int64), np.array([5, 5, 5], np.int64),
             rng.integers(9_000_000_000, 9_000_000_200, 1000, dtype=np.int64), _ints(nhs.synthetic_numbers(50, seed=5))]
    for numbers in cases:
        got = unique_sorted(numbers)
        assert got.dtype == numbers.dtype and np.array_equal(got, np.unique(numbers))


def test_classify_empty_reply_means_everyone_opted_out():
    numbers = nhs.synthetic_numbers(10, seed=4).to_pylist()
    result = classify(_ints(numbers), _ints([]))
    assert sorted(shards.to_strings(result.opted_out)) == sorted(numbers)
    assert len(result.not_opted_out) == 0 and len(result.reply_only) == 0


def _flatten(batch):
    status, numbers = batch
    return [(n, status) for n in shards.to_strings(numbers)]


def _sharded(p, label, numbers):
    blocks = list(shards.split_by_shard(_ints(numbers), SHARDS))
    return p | label >> beam.Create(blocks)


def _join(p, manifest, reply):
    """The production join with an empty ledger: every patient is new, so every one is written."""
    no_ledger = p | "NoLedger" >> beam.Create([]).with_output_types(tuple[int, bytes])
    return {MANIFEST: manifest, REPLY: reply, LEDGER: no_ledger} | JoinWithLedger(
        "2024-11-26T10:15:00Z", "R1", key_source_for_tests(), refresh_days=0)


def test_join_and_classify_through_beam():
    numbers = nhs.synthetic_numbers(200, seed=5).to_pylist()
    manifest, reply_only = numbers[:180], numbers[180:183]
    opted_out = manifest[::10]  # 18 of 180
    reply = [n for n in manifest if n not in opted_out]
    with local_pipeline() as p:
        joined = _join(p, _sharded(p, "Manifest", manifest + manifest[:7]),  # duplicates in one block
                       _sharded(p, "Reply", reply + reply_only))
        expected = [(n, OPTED_OUT) for n in opted_out] + [(n, NOT_OPTED_OUT) for n in reply]
        assert_that(joined.to_write | beam.FlatMap(_flatten), equal_to(expected), label="Statuses")
        errors = joined[JoinWithLedger.INTEGRITY_ERRORS] | beam.Map(
            lambda e: (e["nhs_number"], e["consent_id"], e["status"], e["reason"])
        )
        assert_that(errors, equal_to([(n, None, None, REASON_REPLY_ONLY) for n in reply_only]),
                    label="ReplyOnly")
    counters = {c.key.metric.name: c.committed for c in p.result.metrics().query()["counters"]}
    assert counters["requested"] == 180 and counters["manifest_duplicates"] == 7
    assert counters["opted_out"] == 18 and counters["not_opted_out"] == 162 and counters["reply_only"] == 3


def test_duplicates_split_over_blocks_are_counted_once():
    numbers = nhs.synthetic_numbers(20, seed=6).to_pylist()
    with local_pipeline() as p:
        manifest = (
            _sharded(p, "First", numbers),
            _sharded(p, "Second", numbers[:5]),  # same numbers again, in another block
        ) | beam.Flatten()
        joined = _join(p, manifest, _sharded(p, "Reply", numbers))
        assert_that(joined.to_write | beam.FlatMap(_flatten), equal_to([(n, NOT_OPTED_OUT) for n in numbers]))
    counters = {c.key.metric.name: c.committed for c in p.result.metrics().query()["counters"]}
    assert counters["manifest_duplicates"] == 5
