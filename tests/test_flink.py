"""The process pipeline on a real local Flink 1.19 session cluster (JobManager + TaskManager processes,
parallelism 2, LOOPBACK SDK harness) vs FnApiRunner, against the real FHIR server.

The Flink side runs ``python -m pipeline.beam.graph`` (the same entry point as Dataflow's) under
``.venv-flink`` (Python Beam 2.62.0, matching the job server); see dev/flink.py for why that version.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from dev.flink import FLINK_PYTHON, FlinkCluster, flink_args
from pipeline.beam.graph import DEAD_LETTERS, SUMMARY
from tests.helpers import consents_for_patient as _consents_of
from tests.test_process_pipeline import T1, T2, _inputs, _numbers
from tests.test_runners import FNAPI, _INPUT_COUNTS, _process, _store
from tests.helpers import consent_id

pytestmark = pytest.mark.flink
REPO_ROOT = Path(__file__).resolve().parent.parent


def _on_flink(cluster: FlinkCluster, folder: Path, fhir_url: str, checked_at: str) -> tuple[int, dict, str]:
    """Run the pipeline as a job on ``cluster``; (exit code, summary.json, stderr tail)."""
    argv = [
        *flink_args(cluster), f"--manifest={folder / 'manifest.parquet'}", f"--reply={folder / 'reply.dat'}",
        f"--checked_at={checked_at}", f"--output_dir={folder}", f"--fhir_url={fhir_url}", "--fhir_auth=none",
        "--batch_size=7", "--shards=4", "--provenance_org=X26ABC1",
    ]
    done = subprocess.run([str(FLINK_PYTHON), "-m", "pipeline.beam.graph", *argv], cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True, timeout=600)
    summary = json.loads((folder / SUMMARY).read_text()) if (folder / SUMMARY).exists() else {}
    return done.returncode, summary, done.stderr[-2000:]


def test_flink_writes_what_fnapi_writes(tmp_path, fhir_server, flink_cluster):
    numbers = _numbers(45, seed=9501)
    opted_out = set(numbers[::5])
    _inputs(tmp_path, numbers + numbers[:3], [n for n in numbers if n not in opted_out])

    on_fnapi = _process(tmp_path, fhir_server, FNAPI, T1)
    after_fnapi = _store(fhir_server, numbers)
    code, on_flink, stderr = _on_flink(flink_cluster, tmp_path, fhir_server, T2)
    assert code == 0, stderr
    after_flink = _store(fhir_server, numbers)

    assert on_flink["ok"] and on_flink["metrics_available"], on_flink["problems"]
    assert {k: on_flink["counts"][k] for k in _INPUT_COUNTS} == {k: on_fnapi["counts"][k] for k in _INPUT_COUNTS}
    assert (on_fnapi["counts"]["created"], on_flink["counts"]["updated"]) == (45, 45)
    assert on_fnapi["counts"]["bundles_posted"] == 7
    assert 7 <= on_flink["counts"]["bundles_posted"] <= 14  # batches are cut per bundle on each of 2 workers
    for number in numbers:
        fid, fstatus, fdate, fversion = after_fnapi[number]
        kid, kstatus, kdate, kversion = after_flink[number]
        assert fid == kid == consent_id(number)
        assert fstatus == kstatus == ("active" if number in opted_out else "inactive")
        assert (fdate, kdate) == (T1[:19], T2[:19])
        assert int(kversion) == int(fversion) + 1, "a Consent was written more than once on Flink"
    finished = [job for job in flink_cluster.jobs() if job["state"] == "FINISHED"]
    assert finished, flink_cluster.jobs()  # it did run as a job on the cluster


def test_integrity_gate_holds_on_flink(tmp_path, fhir_server, flink_cluster):
    numbers = _numbers(10, seed=9502)
    manifest, stranger = numbers[:8], numbers[8:]
    _inputs(tmp_path, manifest, manifest[3:] + stranger)
    code, summary, _ = _on_flink(flink_cluster, tmp_path, fhir_server, T1)
    c = summary["counts"]
    assert code == 1 and not summary["ok"] and summary["metrics_available"]
    assert (c["integrity_errors"], c["reply_only"], c["written"], c["refused"], c["bundles_posted"]) == (2, 2, 0, 8, 0)
    assert all(_consents_of(fhir_server, n) == [] for n in manifest)
    letters = [json.loads(line) for line in (tmp_path / DEAD_LETTERS).read_text().splitlines()]
    assert {r["consent_id"] for r in letters} == {None}  # no id derived from a number NDOP alone sent
