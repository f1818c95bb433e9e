"""``ndop run`` killed at every step, then run again: the second run finishes the job, exactly once.

The contract is stated in pipeline/lifecycle/state.py's module docstring; its invariants, checked after each crash and re-run against the real mesh-sandbox (playing
NDOP) and the real FHIR server:

1. one request in the work dir, ``acknowledged`` (the re-run carried it on; no second request);
2. NDOP received one data message for it (no duplicate send);
3. one Consent per patient, with the right status and ``dateTime`` (none lost, none duplicated);
4. our inbox is empty and the reply was acknowledged once, after the Consents were stored.

The crash is either a fault point (``NDOP_FAULT``: ``os._exit`` at a named step, no cleanup) or a
real SIGKILL while the run polls for NDOP's reply.
"""
from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest

from dev.mesh_sandbox import NDOP_MAILBOX
from pipeline.core import nhs
from pipeline.core.faults import EXIT_CODE, FAULT_ENV
from pipeline.lifecycle.state import ACCEPTED, ACKNOWLEDGED, PROCESSED, REPLIED, WorkDir
from tests.helpers import REPO_ROOT, cli_command, cli_env, consents_of
from tests.fixtures.mesh import OUR_MAILBOX, Mesh

PATIENTS = 24
BATCH_SIZE = 5  # several bundles, so after-first-bundle really stops part-way through the writes


@dataclass
class Cohort:
    file: Path
    numbers: list[str]
    opted_out: set[str]


def make_cohort(mesh: Mesh, tmp_path: Path, seed: int, **plugin: object) -> Cohort:
    """A cohort file, and the sandbox's NDOP told which of it has opted out (every fourth patient)."""
    numbers = nhs.synthetic_numbers(PATIENTS, seed=seed).to_pylist()
    opted_out = set(numbers[::4])
    (tmp_path / "cohort.txt").write_text("\n".join(numbers) + "\n")
    (tmp_path / "opted-out.txt").write_text("\n".join(sorted(opted_out)) + "\n")
    mesh.plugin(opted_out_file=str(tmp_path / "opted-out.txt"), **plugin)
    return Cohort(tmp_path / "cohort.txt", numbers, opted_out)


def ndop_run_command(work_dir: WorkDir, cohort: Cohort, fhir_url: str) -> list[str]:
    return [*cli_command("run"), "--work-dir", str(work_dir.root), "--cohort", str(cohort.file),
            "--fhir-url", fhir_url, "--wait", "20", "--interval", "0.2", "--runner=FnApiRunner",
            f"--batch_size={BATCH_SIZE}"]


def ndop_env(mesh: Mesh, fault: str | None = None) -> dict[str, str]:
    return cli_env({**mesh.env(), **({FAULT_ENV: fault} if fault else {})}, drop_fhir=True)


def ndop_run(work_dir: WorkDir, cohort: Cohort, mesh: Mesh, fhir_url: str,
             fault: str | None = None) -> subprocess.CompletedProcess[str]:
    """The real CLI, this checkout's code, in a process of its own (so a fault can end it)."""
    return subprocess.run(ndop_run_command(work_dir, cohort, fhir_url), cwd=REPO_ROOT, env=ndop_env(mesh, fault),
                          capture_output=True, text=True, timeout=120)


def the_request(work_dir: WorkDir) -> dict:
    records = work_dir.all()
    assert len(records) == 1, [r["request_id"] for r in records]  # never a second request for the cohort
    return records[0]


def _utc(value: str) -> datetime:
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


def assert_completed_exactly_once(work_dir: WorkDir, cohort: Cohort, mesh: Mesh, fhir_url: str) -> None:
    # (1) one request, carried to the end
    record = the_request(work_dir)
    states = [h["state"] for h in record["history"]]
    assert record["state"] == ACKNOWLEDGED, states
    assert states.count(ACKNOWLEDGED) == 1 and states.count(PROCESSED) == 1, states

    # (2) NDOP got one data message for it (the stand-in never acknowledges, so its inbox keeps them
    # all), from one outbox POST in all the runs
    received = mesh.inbox(NDOP_MAILBOX)
    assert len(received) == 1, f"NDOP received {len(received)} messages"
    assert mesh.sandbox.message_details(received[0])["local_id"] == record["local_id"]
    assert mesh.requests_to("POST", f"/messageexchange/{OUR_MAILBOX}/outbox") == [202]

    # (3) one Consent per patient, right status, dated
    found = consents_of(fhir_url, cohort.numbers)
    counts = {n: len(c) for n, c in found.items()}
    assert set(counts.values()) == {1}, {nhs.mask(n): c for n, c in counts.items() if c != 1}
    for number, [consent] in found.items():
        assert consent["status"] == ("active" if number in cohort.opted_out else "inactive"), nhs.mask(number)
        assert consent["dateTime"] == record["checked_at"], nhs.mask(number)

    # (4) reply acknowledged (our inbox is empty), once, and only after the Consents were stored
    assert mesh.inbox() == []
    reply_id = record["reply_message_id"]
    assert mesh.requests_to("PUT", f"/messageexchange/{OUR_MAILBOX}/inbox/{reply_id}/status/acknowledged") == [200]
    acked_at = mesh.sandbox.message_details(reply_id).get("download_timestamp")
    assert acked_at
    # sekmet's lastUpdated is truncated to the millisecond, so never later than the write itself
    last_write = max(_utc(c["meta"]["lastUpdated"]) for [c] in found.values())
    assert _utc(acked_at) >= last_write, f"reply acknowledged at {acked_at}, a Consent stored at {last_write}"


# In the order a run reaches them; after-ack (the MESH driver, between the acknowledgement and
# its state write) is the last window in which a kill can leave work for the next run.
FAULT_POINTS = ["after-request", "after-outbox-post", "after-send", "after-reply-download", "after-download",
                "after-first-bundle", "before-ack", "after-ack"]
SEEDS = {point: 9501 + i for i, point in enumerate(FAULT_POINTS)}


@pytest.mark.parametrize("fault", FAULT_POINTS)
def test_a_run_killed_at_a_fault_point_is_finished_by_the_next(fault, mesh, fhir_server, work_dir, tmp_path):
    cohort = make_cohort(mesh, tmp_path, seed=SEEDS[fault])

    crashed = ndop_run(work_dir, cohort, mesh, fhir_server, fault=fault)
    assert crashed.returncode == EXIT_CODE, crashed.stderr[-3000:]
    assert f"fault injection: exiting abruptly at {fault}" in crashed.stderr
    record = the_request(work_dir)
    if fault == "after-ack":
        # Acknowledged in MESH, killed before recording it: the next run must not acknowledge again.
        assert record["state"] == PROCESSED and record["acknowledging"]
        assert mesh.inbox() == []
    if fault in ("after-first-bundle", "before-ack"):
        # Killed during or after the writes: the reply must still wait, unacknowledged, in our inbox.
        assert record["state"] == (PROCESSED if fault == "before-ack" else REPLIED)
        assert mesh.inbox() == [record["reply_message_id"]]
        assert not mesh.sandbox.message_details(record["reply_message_id"]).get("download_timestamp")
        stored = sum(len(c) for c in consents_of(fhir_server, cohort.numbers).values())
        if fault == "after-first-bundle":
            assert 0 < stored < PATIENTS, stored  # really killed part-way through the FHIR writes
        else:
            assert stored == PATIENTS

    again = ndop_run(work_dir, cohort, mesh, fhir_server)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Consents written, MESH reply acknowledged" in again.stdout
    assert "carrying on" in again.stderr  # the unfinished request, not a new one
    assert_completed_exactly_once(work_dir, cohort, mesh, fhir_server)


def test_a_run_killed_by_sigkill_while_polling_is_finished_by_the_next(mesh, fhir_server, work_dir, tmp_path):
    cohort = make_cohort(mesh, tmp_path, seed=9520, delay=4)  # NDOP's notice at once, its reply 4 s later
    run = subprocess.Popen(ndop_run_command(work_dir, cohort, fhir_server), cwd=REPO_ROOT, env=ndop_env(mesh),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (work_dir.all() and work_dir.all()[0]["state"] == ACCEPTED):
            assert run.poll() is None, run.stderr.read() if run.stderr else ""
            assert time.monotonic() < deadline, "the run never got NDOP's notice"
            time.sleep(0.05)
        time.sleep(0.5)  # in the polling loop, waiting for the reply
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=10)
        if run.stderr:
            run.stderr.close()
    assert run.returncode == -signal.SIGKILL
    assert the_request(work_dir)["state"] == ACCEPTED

    mesh.plugin(opted_out_file=str(tmp_path / "opted-out.txt"))  # (the reply is already on its way)
    again = ndop_run(work_dir, cohort, mesh, fhir_server)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "carrying on" in again.stderr
    assert_completed_exactly_once(work_dir, cohort, mesh, fhir_server)
