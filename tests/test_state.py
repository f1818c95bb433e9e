"""pipeline/lifecycle/state.py: the transition table, compare-and-set, request ids, the work-dir lock; and the
two-runs-at-once cases with real concurrent ``ndop`` processes against the real mesh-sandbox and FHIR server."""
from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from pipeline.core.errors import EXIT_BAD_INPUT, EXIT_BUSY
from pipeline.core.clock import utcnow
from pipeline.lifecycle.state import (
    ACKNOWLEDGED,
    CREATED,
    FINAL,
    MARKERS,
    PROCESSED,
    REPLIED,
    STATES,
    TRANSITIONS,
    IllegalTransition,
    StateConflict,
    WorkDir,
    WorkDirBusy,
    check_request_id,
    check_transition,
    initial_state,
    marker,
)
from tests.fixtures.mesh import OUR_MAILBOX, Mesh
from tests.helpers import REPO_ROOT, cli, cli_command, cli_env, consents_of, force_state
from tests.test_run_crash import PATIENTS, assert_completed_exactly_once, make_cohort, ndop_run_command, ndop_env

RID = "X26ABC1-021226-0001"


def _record(work_dir: WorkDir, state: str = CREATED, request_id: str = RID) -> None:
    work_dir.ensure()
    work_dir.request_dir(request_id).mkdir(mode=0o700)
    work_dir.save({"request_id": request_id, "created_at": "2026-12-02T10:00:00Z", **initial_state(utcnow())})
    if state != CREATED:
        force_state(work_dir, request_id, state)


# -- the transition table ---------------------------------------------------------------------------

def test_every_state_is_in_the_table_and_only_final_states_have_no_way_out() -> None:
    assert set(TRANSITIONS) == set(STATES)
    assert all(after <= set(STATES) for after in TRANSITIONS.values())
    assert set(FINAL) == {ACKNOWLEDGED, "rejected", "failed"}
    # every state is reachable from created, and every non-final state can reach a final one
    reachable, frontier = {CREATED}, [CREATED]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()]:
            if nxt not in reachable:
                reachable.add(nxt)
                frontier.append(nxt)
    assert reachable == set(STATES)
    assert REPLIED not in TRANSITIONS[PROCESSED] and PROCESSED not in TRANSITIONS[ACKNOWLEDGED]  # never backwards


@pytest.mark.parametrize("current", STATES)
def test_update_walks_the_table_from_every_state(tmp_path: Path, current: str) -> None:
    for new in STATES:
        work_dir = WorkDir(tmp_path / f"{current}-{new}")
        _record(work_dir, current)
        allowed = new == current or new in TRANSITIONS[current]
        if allowed:
            record = work_dir.update(RID, state=new, note="x")
            assert record["state"] == new and record["note"] == "x"
            moves = [h["state"] for h in record["history"]]
            assert moves[-1] == new and (len(moves) == (1 if current == CREATED else 2) + (new != current))
        else:
            with pytest.raises(IllegalTransition, match=f"from '{current}' to '{new}'"):
                work_dir.update(RID, state=new)
            assert work_dir.load(RID)["state"] == current  # nothing written


def test_unknown_state_and_unknown_marker_are_refused() -> None:
    with pytest.raises(IllegalTransition, match="unknown state"):
        check_transition(CREATED, "done")
    with pytest.raises(ValueError):
        marker("sending_now", 1)
    assert set(MARKERS) == {"sending", "ctl_sending", "acknowledging"}


def test_update_with_expect_is_compare_and_set(work_dir: WorkDir) -> None:
    _record(work_dir, REPLIED)
    work_dir.update(RID, state=PROCESSED, expect=REPLIED)
    with pytest.raises(StateConflict, match="is 'processed', expected replied"):
        work_dir.update(RID, state=PROCESSED, expect=REPLIED, processed_at="again")
    assert "processed_at" not in work_dir.load(RID)
    assert work_dir.update(RID, expect=(PROCESSED, ACKNOWLEDGED), note="ok")["note"] == "ok"


# -- request ids ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["", " ", "../X26ABC1-021226-0001", "X26ABC1-021226-0001/../X26ABC1-021226-0001",
                                 "/etc/passwd", ".hidden", "a b", "X\n", "é"])
def test_malformed_request_ids_are_bad_input(bad: str, work_dir: WorkDir) -> None:
    with pytest.raises(Exception) as caught:
        check_request_id(bad)
    assert getattr(caught.value, "exit_code", None) == EXIT_BAD_INPUT
    with pytest.raises(Exception):
        work_dir.load(bad)


def test_request_id_shape_of_the_request_step_is_accepted() -> None:
    assert check_request_id(RID) == RID


@pytest.mark.parametrize("request_id", ["", "X26ABC1-021226-0001/../X26ABC1-021226-0001"])
def test_ndop_send_refuses_an_empty_or_path_request_id(tmp_path: Path, request_id: str) -> None:
    work_dir = WorkDir(tmp_path / "work")
    _record(work_dir)
    # No MESH needed: the id is refused before any connection (a URL nobody listens on proves it).
    done = cli("send", "--work-dir", str(work_dir.root), "--request-id", request_id,
               env={"MESH_URL": "http://127.0.0.1:9", "MESH_MAILBOX": "X26ABC1", "MESH_PASSWORD": "p",
                    "MESH_SHARED_KEY": "k"})
    assert done.returncode == EXIT_BAD_INPUT, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ndop send: error: not a request id"), done.stderr
    assert work_dir.load(RID)["state"] == CREATED and not work_dir.load(RID).get("sending")


# -- the lock ---------------------------------------------------------------------------------------

def test_lock_is_reentrant_within_a_process(work_dir: WorkDir) -> None:
    _record(work_dir)
    with work_dir.lock(wait=False):
        with work_dir.lock(wait=False):
            work_dir.update(RID, note="inside")  # update takes the lock too
    assert work_dir.load(RID)["note"] == "inside"


def _hold_lock_in_another_process(work_dir: WorkDir, seconds: float) -> subprocess.Popen[str]:
    code = ("import sys, time; from pipeline.lifecycle.state import WorkDir\n"
            "with WorkDir(sys.argv[1]).lock():\n    print('held', flush=True); time.sleep(float(sys.argv[2]))\n")
    holder = subprocess.Popen([cli_command()[0], "-c", code, str(work_dir.root), str(seconds)], cwd=REPO_ROOT,
                              env=cli_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_process_gets_busy_or_waits(work_dir: WorkDir) -> None:
    _record(work_dir)
    holder = _hold_lock_in_another_process(work_dir, 2.5)
    try:
        with pytest.raises(WorkDirBusy, match="another ndop command"):
            with work_dir.lock(wait=False):
                pass
        busy = cli("poll", "--work-dir", str(work_dir.root), env={"MESH_URL": "http://127.0.0.1:9"})
        assert busy.returncode == EXIT_BUSY, busy.stderr
        assert busy.stderr.strip().count("\n") == 0 and "--wait-lock" in busy.stderr
        started = time.monotonic()
        with work_dir.lock(wait=True):
            waited = time.monotonic() - started
        assert waited > 0.5  # it waited for the holder to finish
    finally:
        holder.kill()
        holder.wait()
    status = cli("status", "--work-dir", str(work_dir.root))  # read-only: never needs the lock
    assert status.returncode == 0 and RID in status.stdout


def test_threads_of_one_process_take_turns(work_dir: WorkDir) -> None:
    _record(work_dir)
    seen: list[int] = []

    def bump() -> None:
        for _ in range(20):
            with work_dir.lock():
                count = int(work_dir.load(RID).get("count", 0))
                seen.append(count)
                work_dir.update(RID, count=count + 1)

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert work_dir.load(RID)["count"] == 80 and sorted(seen) == list(range(80))


# -- two real runs at once --------------------------------------------------------------------------

def test_two_ndop_runs_at_once_send_the_cohort_once(mesh: Mesh, fhir_server: str, work_dir: WorkDir,
                                                  tmp_path: Path) -> None:
    cohort = make_cohort(mesh, tmp_path, seed=9701, delay=3)  # NDOP answers 3 s later: the first run waits
    command = ndop_run_command(work_dir, cohort, fhir_server)
    first = subprocess.Popen(command, cwd=REPO_ROOT, env=ndop_env(mesh), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not work_dir.all():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    second = subprocess.run(command, cwd=REPO_ROOT, env=ndop_env(mesh), capture_output=True, text=True, timeout=120)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == EXIT_BUSY, second.stderr[-3000:]
    assert "ndop run: error:" in second.stderr and "another ndop command" in second.stderr
    assert mesh.requests_to("POST", f"/messageexchange/{OUR_MAILBOX}/outbox") == [202]  # one message sent
    assert_completed_exactly_once(work_dir, cohort, mesh, fhir_server)


def test_two_runs_on_one_replied_request_process_and_acknowledge_it_once(mesh: Mesh, fhir_server: str,
                                                                        work_dir: WorkDir, tmp_path: Path) -> None:
    cohort = make_cohort(mesh, tmp_path, seed=9702)
    crashed = subprocess.run(ndop_run_command(work_dir, cohort, fhir_server), cwd=REPO_ROOT,
                             env=ndop_env(mesh, "after-download"), capture_output=True, text=True, timeout=120)
    assert crashed.returncode != 0
    [record] = work_dir.all()
    assert record["state"] == REPLIED
    rid = record["request_id"]
    command = [*cli_command("process"), "--work-dir", str(work_dir.root), "--request-id", rid, "--fhir-url",
               fhir_server, "--runner=FnApiRunner", "--wait-lock"]
    runs = [subprocess.Popen(command, cwd=REPO_ROOT, env=ndop_env(mesh), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=180), *run.communicate()) for run in runs]
    codes = sorted(code for code, _, _ in results)
    # One processes and acknowledges; the other waited for the lock, then found nothing left to do.
    assert codes == [0, EXIT_BAD_INPUT], results
    assert any("is 'acknowledged'" in err for _, _, err in results)
    saved = work_dir.load(rid)
    states = [h["state"] for h in saved["history"]]
    assert saved["state"] == ACKNOWLEDGED and states.count(PROCESSED) == 1 and states.count(ACKNOWLEDGED) == 1
    assert states.index(PROCESSED) < states.index(ACKNOWLEDGED) == len(states) - 1  # never backwards
    acked = f"/messageexchange/{OUR_MAILBOX}/inbox/{saved['reply_message_id']}/status/acknowledged"
    assert mesh.requests_to("PUT", acked) == [200]
    assert all(len(c) == 1 for c in consents_of(fhir_server, cohort.numbers).values())
    assert len(cohort.numbers) == PATIENTS


def test_a_work_dir_that_cannot_be_created_is_one_line_and_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = cli("poll", "--work-dir", str(blocker / "work"), env={"MESH_URL": "http://127.0.0.1:9"})
    assert done.returncode == EXIT_BAD_INPUT
    assert done.stderr.strip().splitlines() == [f"ndop poll: error: {blocker / 'work'}: cannot create the work dir: "
                                                "Not a directory"]


def test_the_driver_refuses_an_empty_request_id_too(work_dir: WorkDir) -> None:
    from pipeline.mesh.config import MeshConfig
    from pipeline.mesh.driver import MeshDriver

    _record(work_dir)
    config = MeshConfig(url="http://127.0.0.1:9", mailbox="X26ABC1", password="p", shared_key="k")
    with MeshDriver(config, work_dir) as driver, pytest.raises(Exception, match="not a request id"):
        driver.send(request_id="")
    assert work_dir.load(RID)["state"] == CREATED
