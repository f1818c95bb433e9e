"""ApplyOptOuts: the rule without Beam (decide), then the composite on the local runner over a ledger folder."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that, equal_to

from pipeline.core import nhs
from tests.beam_util import local_pipeline
from transforms import apply_opt_outs as apply
from transforms.apply_opt_outs import ApplyOptOuts, LedgerSource, OptOutIndex, Rule
from transforms.ledger_join import SCHEMA, STATUS_CODES

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def _numbers(count: int, seed: int) -> list[str]:
    return nhs.synthetic_numbers(count, seed=seed).to_pylist()


def ledger_table(rows: list[tuple[str, bool, datetime, datetime]]) -> pa.Table:
    """Ledger rows ``(number, opted_out, status_since, checked_at)`` in the ledger's own schema."""
    ts = pa.timestamp("s", tz="UTC")
    return pa.table({
        "nhs_number": pa.array([int(r[0]) for r in rows], pa.int64()),
        "status": pa.DictionaryArray.from_arrays(pa.array([int(r[1]) for r in rows], pa.int8()),
                                                 pa.array(STATUS_CODES)),
        "status_since": pa.array([r[2] for r in rows], ts),
        "checked_at": pa.array([r[3] for r in rows], ts),
        "written_at": pa.array([r[3] for r in rows], ts),
        "consent_id": pa.array(["c"] * len(rows), pa.string()),
        "request_id": pa.array(["R1"] * len(rows), pa.string()).dictionary_encode(),
    }, schema=SCHEMA)


def write_ledger(folder: Path, table: pa.Table, checked_at: datetime, fhir: str = "http://fhir.test/fhir") -> Path:
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-00000.parquet")
    (folder / "ledger.json").write_text(json.dumps({
        "fhir_base_url": fhir, "request_id": "R1", "checked_at": checked_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "rows": table.num_rows, "files": ["part-00000.parquet"], "written_at": "x"}))
    return folder


def _int(numbers: list[str]) -> np.ndarray:
    return np.array([int(n) for n in numbers], np.int64)


# -- decide(): the rule ---------------------------------------------------------------------------------


def test_decide_removes_opted_out_unknown_stale_and_invalid() -> None:
    p = _numbers(6, seed=2301)
    old = NOW - timedelta(days=40)
    index = OptOutIndex.from_table(ledger_table([
        (p[0], False, old, NOW), (p[1], True, old, NOW), (p[2], False, old, old), (p[3], True, old, old)]))
    asked = _int(p[:5]) .tolist() + [-1]
    reasons = apply.decide(index, np.array(asked, np.int64), Rule(max_age_days=21), now=int(NOW.timestamp()))
    assert [apply.REASONS[r] for r in reasons] == ["kept", "opted_out", "stale", "opted_out", "unknown", "invalid"]

    keep_unknown = apply.decide(index, np.array(asked, np.int64), Rule(unknown="keep"), now=int(NOW.timestamp()))
    assert [apply.REASONS[r] for r in keep_unknown] == ["kept", "opted_out", "kept", "opted_out", "kept", "invalid"]

    exempt = apply.decide(index, np.array(asked, np.int64), Rule(exempt=True), now=int(NOW.timestamp()))
    assert [apply.REASONS[r] for r in exempt] == ["kept", "kept_exempt", "kept", "kept_exempt", "kept", "invalid"]


def test_as_of_sees_the_status_held_then() -> None:
    p = _numbers(3, seed=2302)
    day = timedelta(days=1)
    index = OptOutIndex.from_table(ledger_table([
        (p[0], True, NOW - 10 * day, NOW),   # opted out 10 days ago
        (p[1], False, NOW - 30 * day, NOW),  # not opted out for 30 days
        (p[2], True, NOW - 30 * day, NOW)]))
    at = int((NOW - 20 * day).timestamp())
    reasons = apply.decide(index, _int(p), Rule(as_of=at))
    # 20 days ago p[0]'s status is not known from the ledger alone: removed (fail closed)
    assert [apply.REASONS[r] for r in reasons] == ["unknown", "kept", "opted_out"]


def test_numbers_of_column_reads_text_and_integers() -> None:
    p = _numbers(2, seed=2303)
    text = apply.numbers_of_column(pa.array([p[0], f" {p[1][:3]} {p[1][3:6]} {p[1][6:]} ", "12345", None, ""]))
    assert text.tolist() == [int(p[0]), int(p[1]), -1, -1, -1]
    ints = apply.numbers_of_column(pa.array([int(p[0]), 1234567890], pa.int64()))
    assert ints.tolist() == [int(p[0]), -1]
    assert apply.number_of(p[0]) == int(p[0]) and apply.number_of(None) == -1 and apply.number_of(3.5) == -1


# -- the composite ----------------------------------------------------------------------------------------


def test_composite_keeps_only_who_may_leave(tmp_path: Path) -> None:
    p = _numbers(8, seed=2304)
    now = datetime.now(timezone.utc)
    week = now - timedelta(days=7)
    folder = write_ledger(tmp_path / "ledger", ledger_table(
        [(n, i % 3 == 0, week, now) for i, n in enumerate(p[:6])]), now)
    records = [{"id": i, "nhs": n} for i, n in enumerate(p)] + [{"id": 98, "nhs": "not a number"}, {"id": 99}]
    with local_pipeline() as pipeline:
        result = (pipeline | beam_create(records)
                  | ApplyOptOuts(_nhs, source=LedgerSource(str(folder)), invalid="dead_letter",
                                 fhir_base_url="http://fhir.test/fhir/"))
        assert_that(result[ApplyOptOuts.KEPT] | "Ids" >> _map(_id), equal_to([1, 2, 4, 5]))
        assert_that(result[ApplyOptOuts.COUNTS], equal_to([("kept", 4), ("opted_out", 2), ("unknown", 2),
                                                           ("invalid", 2)]), label="Counts")
        assert_that(result[ApplyOptOuts.INVALID] | "InvalidIds" >> _map(_dead_id), equal_to([98, 99]),
                    label="Invalid")


def test_composite_on_arrow_batches(tmp_path: Path) -> None:
    p = _numbers(6, seed=2305)
    now = datetime.now(timezone.utc)
    folder = write_ledger(tmp_path / "ledger", ledger_table([(n, i == 0, now, now) for i, n in enumerate(p[:4])]),
                          now)
    batch = pa.RecordBatch.from_pydict({"nhs_number": p + ["999"], "x": list(range(7))})
    with local_pipeline() as pipeline:
        result = (pipeline | beam_create([batch])
                  | ApplyOptOuts(column="nhs_number", source=str(folder)))
        assert_that(result[ApplyOptOuts.KEPT] | "Rows" >> _flat(_xs), equal_to([1, 2, 3]))
        assert_that(result[ApplyOptOuts.COUNTS], equal_to([("kept", 3), ("opted_out", 1), ("unknown", 2),
                                                           ("invalid", 1)]), label="Counts")


def test_another_store_or_an_old_ledger_stops_the_job(tmp_path: Path) -> None:
    now = datetime.now(timezone.utc)
    folder = write_ledger(tmp_path / "ledger", ledger_table([]), now - timedelta(days=30))
    version = LedgerSource(str(folder)).version()
    with pytest.raises(apply.LedgerRefused, match="not http://other"):
        apply.check_version(version, fhir_base_url="http://other/fhir", max_age_days=21)
    with pytest.raises(apply.LedgerRefused, match="more than the limit of 21 days"):
        apply.check_version(version, fhir_base_url=None, max_age_days=21)
    assert apply.check_version(version, fhir_base_url=None, max_age_days=45) is version


def _nhs(record: dict) -> str:
    return record["nhs"]


def _id(record: dict) -> int:
    return record["id"]


def _dead_id(dead: dict) -> int:
    return dead["element"]["id"]


def _xs(batch: pa.RecordBatch) -> list[int]:
    return batch.column("x").to_pylist()


def beam_create(items: list):
    import apache_beam as beam

    return "Create" >> beam.Create(items, reshuffle=False)


def _map(fn):
    import apache_beam as beam

    return beam.Map(fn)


def _flat(fn):
    import apache_beam as beam

    return beam.FlatMap(fn)


# -- unbounded: the ledger as a side input refreshed on a schedule ----------------------------------------

T0 = 1_790_000_000  # the schedule's first tick (epoch seconds)
EVERY = 10
PEOPLE = _numbers(3, seed=2306)


class TickSource(apply.Source):
    """A source whose version changes with the tick that resolves it: at T0 nobody has opted out; from the second
    tick on, PEOPLE[0] has. (A real LedgerSource re-reads ledger.json instead.)"""

    def version(self, tick: float | None = None) -> apply.SourceVersion:
        return apply.SourceVersion(token=f"v{int(tick or T0) - T0}")

    def load(self, version: apply.SourceVersion) -> OptOutIndex:
        now = datetime.now(timezone.utc)
        opted = version.token != "v0"
        return OptOutIndex.from_table(ledger_table([(PEOPLE[0], opted, now, now), (PEOPLE[1], False, now, now)]))


def _stream(ticks: bool):
    """The main input (tag ``main``) and, for the local runner, the schedule (tag ``ticks``) as one TestStream."""
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.transforms.window import TimestampedValue

    def at(value, offset):
        return TimestampedValue(value, T0 + offset)

    stream = TestStream()
    if ticks:
        stream = stream.add_elements([at(T0 + i * EVERY, i * EVERY) for i in range(3)], tag="ticks")
    stream = (stream
              .add_elements([at({"id": 1, "nhs": PEOPLE[0]}, 1), at({"id": 2, "nhs": PEOPLE[1]}, 2),
                             at({"id": 3, "nhs": PEOPLE[2]}, 3)], tag="main")
              .advance_watermark_to(T0 + 11, tag="main")
              .add_elements([at({"id": 4, "nhs": PEOPLE[0]}, 12), at({"id": 5, "nhs": PEOPLE[1]}, 13)], tag="main")
              .advance_watermark_to_infinity(tag="main"))
    return stream.advance_watermark_to_infinity(tag="ticks") if ticks else stream


def _streaming_apply(pipeline, main, ticks) -> dict:
    import apache_beam as beam

    result = main | ApplyOptOuts(_nhs, source=TickSource(), max_age_days=None, refresh_seconds=EVERY, ticks=ticks)
    assert_that(result[ApplyOptOuts.KEPT] | "Ids" >> beam.Map(_id), equal_to([1, 2, 5]))
    counts = result[ApplyOptOuts.COUNTS] | "WithWindow" >> beam.ParDo(_with_window_start())
    assert_that(counts, equal_to([(0, "kept", 2), (0, "unknown", 1), (10, "kept", 1), (10, "opted_out", 1)]),
                label="CountsPerWindow")
    return result


def _with_window_start():
    import apache_beam as beam

    class WithWindowStart(beam.DoFn):
        def process(self, element, w=beam.DoFn.WindowParam):
            yield int(w.start) - T0, element[0], element[1]

    return WithWindowStart()


def test_streaming_side_input_refreshes_on_the_local_runner() -> None:
    """Beam's Python direct runner in streaming mode (it cannot run PeriodicImpulse: the schedule is ticks)."""
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.test_pipeline import TestPipeline

    options = PipelineOptions(["--runner=BundleBasedDirectRunner", "--streaming"])
    with TestPipeline(options=options) as pipeline:
        streams = pipeline | _stream(ticks=True)
        _streaming_apply(pipeline, streams["main"], streams["ticks"])


@pytest.mark.prism
def test_streaming_side_input_refreshes_on_prism() -> None:
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.transforms.periodicsequence import PeriodicImpulse

    from dev.prism import prism_args

    options = PipelineOptions([*prism_args(), "--streaming"])
    with TestPipeline(options=options) as pipeline:
        main = pipeline | "Main" >> _stream(ticks=False)
        ticks = pipeline | "Ticks" >> PeriodicImpulse(start_timestamp=T0, stop_timestamp=T0 + 3 * EVERY,
                                                      fire_interval=EVERY)
        _streaming_apply(pipeline, main["main"], ticks)


def test_sort_order_is_argsort() -> None:
    rng = np.random.default_rng(2307)
    for numbers in (rng.integers(0, 9_999_999_999, 5000), np.array([5, 5, 1, 0, 5]), np.zeros(0, np.int64),
                    np.array([7])):
        assert np.array_equal(apply.sort_order(numbers), np.argsort(numbers, kind="stable"))
