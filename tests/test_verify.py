"""``ndop verify`` (issue 19 item 5): drift made behind the tool's back (Consents deleted or changed in the real FHIR
store directly) is found, queued for the next process step or repaired now."""
from __future__ import annotations

import pytest

import json

import requests
from prometheus_client.parser import text_string_to_metric_families

from pipeline.core import nhs
from tests.helpers import cli
from tests.test_run import ndop_run, statuses
from tests.helpers import consent_id


@pytest.mark.slow  # stage 2 of the test command (run_tests.sh --all)
def test_drift_is_found_queued_and_repaired(tmp_path, work_dir, mesh, fhir_server) -> None:
    numbers = nhs.synthetic_numbers(40, seed=9951).to_pylist()
    cohort = tmp_path / "cohort.txt"
    cohort.write_text("\n".join(numbers) + "\n")
    opted = tmp_path / "opted-out.txt"
    opted.write_text("\n".join(numbers[:4]) + "\n")
    mesh.plugin(opted_out_file=str(opted))
    env = {**mesh.env(), "FHIR_URL": fhir_server}
    verify = ["verify", "--work-dir", str(work_dir.root)]
    assert ndop_run(work_dir, env, "--cohort", str(cohort)).returncode == 0
    clean = cli(*verify, env=env)
    assert clean.returncode == 0 and "verified 40 Consents: 0 differ" in clean.stdout, clean.stderr

    for number in numbers[10:15]:  # deleted behind the tool's back
        assert requests.delete(f"{fhir_server}/Consent/{consent_id(number)}", timeout=30).status_code < 300
    for number in numbers[20:25]:  # status flipped behind its back
        url = f"{fhir_server}/Consent/{consent_id(number)}"
        consent = requests.get(url, timeout=30).json()
        consent["status"] = "active"
        assert requests.put(url, json=consent, timeout=30).status_code < 300
    found = cli(*verify, env=env)
    assert found.returncode == 1, found.stdout + found.stderr
    assert "40 Consents: 10 differ from the ledger (5 missing, 5 status, 0 dateTime)" in found.stdout
    assert "10 queued" in found.stdout and not any(n in found.stdout + found.stderr for n in numbers)

    again = ndop_run(work_dir, env, "--cohort", str(cohort), "--new-request")  # the next process step
    assert again.returncode == 0, again.stderr
    report = json.loads((work_dir.request_dir(work_dir.all()[-1]["request_id"]) / "report.json").read_text())
    assert report["changes"]["new_patients"] == 10 and report["changes"]["to_write"] == 10
    assert statuses(fhir_server, numbers) == {n: ["active" if n in numbers[:4] else "inactive"] for n in numbers}
    assert "0 differ" in cli(*verify, env=env).stdout

    for number in numbers[30:33]:
        requests.delete(f"{fhir_server}/Consent/{consent_id(number)}", timeout=30)
    repaired = cli(*verify, "--repair", env=env)
    assert repaired.returncode == 0 and "3 differ" in repaired.stdout and "3 repaired" in repaired.stdout
    assert cli(*verify, "--sample", "20", env=env).stdout.startswith("verified 20 Consents: 0 differ")
    assert statuses(fhir_server, numbers) == {n: ["active" if n in numbers[:4] else "inactive"] for n in numbers}

    # `ndop run --verify-sample`: a run whose sample meets drift says so and exits 1; the next run repairs it
    url = f"{fhir_server}/Consent/{consent_id(numbers[35])}"
    consent = requests.get(url, timeout=30).json()
    consent["status"] = "active"
    requests.put(url, json=consent, timeout=30)
    metrics = tmp_path / "ndop.prom"
    drifted = ndop_run(work_dir, env, "--cohort", str(cohort), "--new-request", "--verify-sample", "40",
                       "--metrics-file", str(metrics))
    assert drifted.returncode == 1 and "1 Consents of a sample differ from the ledger" in drifted.stderr
    assert "verified: 40 Consents read back from the store, 1 differ" in drifted.stdout
    gauges = {s.name: s.value for f in text_string_to_metric_families(metrics.read_text()) for s in f.samples}
    assert gauges["ndop_verified_consents"] == 40 and gauges["ndop_verify_mismatches"] == 1
    assert ndop_run(work_dir, env, "--cohort", str(cohort), "--new-request").returncode == 0  # written again
    assert statuses(fhir_server, numbers) == {n: ["active" if n in numbers[:4] else "inactive"] for n in numbers}
