"""The process pipeline on a second runner, Prism (built by dev/build_prism.sh), against the real FHIR server.

Runner-dependent behaviour seen before (DaskRunner) is what these tests look for: outputs lost from
``finish_bundle``, tagged outputs merged, side inputs recomputed so bundles are posted twice, no metrics.
Marked ``prism``: they need the Prism binary, which ``dev/setup_env.sh`` builds unless NDOP_WITH_PRISM=0
(then run ``./run_tests.sh -m "not prism"``).
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import pytest
from apache_beam.runners.portability.prism_runner import PrismRunner

from dev.prism import prism_args
from pipeline.beam.options import NdopOptions
from apache_beam.options.pipeline_options import PortableOptions

from pipeline.beam.graph import DEAD_LETTERS, JOB_SERVER_TIMEOUT, counters, pipeline_options, run, summarise
from tests.helpers import consents_for_patient as _consents_of
from tests.test_process_pipeline import T1, T2, _inputs, _numbers
from tests.helpers import consent_id

FNAPI = ["--runner=FnApiRunner"]
# Summary counts that depend neither on what the FHIR store held before the run nor on how the runner
# cut bundles (BatchElements batches within a bundle: Flink at parallelism 2 posts 8 Bundles for 45 where
# FnApiRunner posts 7; every Consent still once, which the versionId checks show).
_INPUT_COUNTS = ("requested", "replied", "opted_out", "not_opted_out", "manifest_rows", "manifest_duplicates",
                 "reply_rows", "consents_built", "failed", "refused", "integrity_errors", "written", "dead_letters")


@pytest.fixture(scope="module")
def prism() -> Iterator[list[str]]:
    try:
        args = prism_args()
    except FileNotFoundError as err:  # a missing build is a failure, not a skip
        pytest.fail(str(err))
    yield args
    stop_prism_job_server()


def stop_prism_job_server() -> None:
    """Stop the Prism job server Beam keeps for the whole process (``PrismRunner.shared_handle``) now, while
    pytest still captures its log; otherwise Beam stops it at exit and its "Really destroying service" warning
    lands after pytest's summary."""
    server = PrismRunner.shared_handle.acquire(lambda: None)  # the running one; None (nothing started) else
    if server is not None:
        server.stop()


def _process(folder: Path, fhir_url: str, runner: list[str], checked_at: str) -> dict:
    return run([
        *runner, f"--manifest={folder / 'manifest.parquet'}", f"--reply={folder / 'reply.dat'}",
        f"--checked_at={checked_at}", f"--output_dir={folder}", f"--fhir_url={fhir_url}", "--fhir_auth=none",
        "--batch_size=7", "--shards=4", "--provenance_org=X26ABC1",
    ])


def _store(fhir_url: str, numbers: list[str]) -> dict[str, tuple[str, str, str, str]]:
    """number -> (id, status, dateTime, versionId) of its one Consent."""
    found = {}
    for number in numbers:
        consents = _consents_of(fhir_url, number)
        assert len(consents) == 1, f"{len(consents)} Consents for ...{number[-4:]}"
        c = consents[0]
        found[number] = (c["id"], c["status"], c["dateTime"][:19], c["meta"]["versionId"])
    return found


@pytest.mark.prism
def test_prism_writes_what_fnapi_writes(tmp_path, fhir_server, prism):
    numbers = _numbers(45, seed=9401)
    opted_out = set(numbers[::5])
    reply = [n for n in numbers if n not in opted_out]
    _inputs(tmp_path / "in", numbers + numbers[:3], reply)  # with manifest duplicates

    on_fnapi = _process(tmp_path / "in", fhir_server, FNAPI, T1)
    after_fnapi = _store(fhir_server, numbers)
    on_prism = _process(tmp_path / "in", fhir_server, prism, T2)  # the same store: creates become updates
    after_prism = _store(fhir_server, numbers)

    for summary in (on_fnapi, on_prism):
        assert summary["ok"] and summary["metrics_available"], summary["problems"]
        c = summary["counts"]
        assert (c["requested"], c["opted_out"], c["not_opted_out"], c["manifest_duplicates"]) == (45, 9, 36, 3)
        assert c["created"] + c["updated"] == 45 and c["bundles_posted"] == 7  # 45 Consents in bundles of 7
    assert {k: on_prism["counts"][k] for k in _INPUT_COUNTS} == {k: on_fnapi["counts"][k] for k in _INPUT_COUNTS}
    assert (on_fnapi["counts"]["created"], on_prism["counts"]["updated"]) == (45, 45)

    for number in numbers:
        status = "active" if number in opted_out else "inactive"
        fid, fstatus, fdate, fversion = after_fnapi[number]
        pid, pstatus, pdate, pversion = after_prism[number]
        assert fid == pid == consent_id(number) and fstatus == pstatus == status
        assert (fdate, pdate) == (T1[:19], T2[:19])  # Prism's run did write every one of them
        assert int(pversion) == int(fversion) + 1, "a Consent was written more than once in one run"


@pytest.mark.prism
def test_integrity_gate_holds_on_prism(tmp_path, fhir_server, prism):
    numbers = _numbers(10, seed=9402)
    manifest, stranger = numbers[:8], numbers[8:]
    _inputs(tmp_path, manifest, manifest[3:] + stranger)  # two reply-only numbers
    summary = _process(tmp_path, fhir_server, prism, T1)
    c = summary["counts"]
    assert not summary["ok"] and summary["metrics_available"]
    assert summary["problems"][0].startswith("2 integrity errors")
    assert (c["integrity_errors"], c["reply_only"], c["written"], c["refused"], c["bundles_posted"]) == (2, 2, 0, 8, 0)
    assert all(_consents_of(fhir_server, n) == [] for n in manifest)
    letters = [json.loads(line) for line in (tmp_path / DEAD_LETTERS).read_text().splitlines()]
    assert {r["consent_id"] for r in letters} == {None}  # no id derived from a number NDOP alone sent


class _NoMetricsResult:
    """A pipeline result as DaskRunner gives it: no metrics at all."""

    def metrics(self):
        raise NotImplementedError("DaskRunner does not support metrics")


class _EmptyMetricsResult:
    def metrics(self):
        class _Query:
            def query(self, _filter=None):
                return {"counters": [], "distributions": [], "gauges": []}
        return _Query()


@pytest.mark.parametrize("result", [_NoMetricsResult(), _EmptyMetricsResult()], ids=["raises", "empty"])
def test_no_metrics_is_never_success(result):
    found = counters(result)
    assert found is None
    opts = NdopOptions(["--request_id=R1", f"--checked_at={T1}"])
    summary = summarise(found, opts, datetime.now(timezone.utc), 1.0, "dead_letters.jsonl")
    assert summary["ok"] is False and summary["metrics_available"] is False
    assert summary["problems"] == [
        "the runner returned no metrics: counts unknown, so the run is not reported as a success"]


def test_counters_read_from_a_real_run(tmp_path, fhir_server):
    _inputs(tmp_path, _numbers(4, seed=9403), [])
    summary = _process(tmp_path, fhir_server, FNAPI, T1)
    assert summary["metrics_available"] and summary["ok"] and summary["counts"]["opted_out"] == 4


def test_portable_runs_may_outlast_the_job_server_timeout():
    """Beam uses --job_server_timeout as the deadline of the whole job's state stream on portable runners."""
    timeout = lambda *argv: pipeline_options(list(argv)).view_as(PortableOptions).job_server_timeout  # noqa: E731
    assert timeout("--runner=PrismRunner") == timeout("--runner=FlinkRunner") == JOB_SERVER_TIMEOUT
    assert timeout("--runner=PrismRunner", "--job_server_timeout=60") == 60
    assert timeout("--runner=FnApiRunner") == 300  # Beam's default, unused in process
