"""Issue 21 item 5: ``ndop purge`` leaves nothing behind: a killed request's ``.building-*``, ledger ``.pending-*``
folders never swapped in, requests that never finish, and ledger rows of patients who left the cohort. Each with
its own age rule, listed by ``--dry-run`` and counted in the audit log."""
from __future__ import annotations

import pytest

import json
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.lifecycle import audit
from pipeline.core import nhs
from pipeline.ledger import versions as ledger_dirs
from pipeline.core.faults import FAULT_ENV
from pipeline.privacy.purge import format_purge, purge_leftovers
from pipeline.request.build import RequestSettings, build_request
from pipeline.core.clock import isoformat, utcnow
from pipeline.lifecycle.state import ACCEPTED, ACKNOWLEDGED, FAILED, REPLIED, SENT, WorkDir
from tests.helpers import cli, force_state
from tests.test_run import ndop_run, statuses

NUMBERS = nhs.synthetic_numbers(8, seed=2105).to_pylist()


def _request(tmp_path: Path, work_dir: WorkDir, name: str = "cohort.txt") -> str:
    cohort = tmp_path / name
    cohort.write_text("\n".join(NUMBERS) + "\n")
    return build_request(str(cohort), work_dir, RequestSettings(mailbox="X26ABC1"))["request_id"]


def _holds_numbers(folder: Path) -> bool:
    return any(n.encode() in p.read_bytes() for p in folder.rglob("*") if p.is_file() for n in NUMBERS)


def _leftover_events(work_dir: WorkDir) -> list[dict]:
    return [e for e in audit.read_events(work_dir.root) if e["event"] == "purge" and e.get("leftover")]


def test_a_killed_request_build_is_listed_then_removed(tmp_path, work_dir) -> None:
    cohort = tmp_path / "cohort.txt"
    cohort.write_text("\n".join(NUMBERS) + "\n")
    killed = cli("request", "--work-dir", str(work_dir.root), "--cohort", str(cohort), "--mailbox", "X26ABC1",
                 env={FAULT_ENV: "request-building"})
    assert killed.returncode == 86, killed.stderr  # os._exit mid-build: no cleanup ran
    [building] = list(work_dir.requests.glob(".building-*"))
    assert _holds_numbers(building) and work_dir.all() == []

    dry = cli("purge", "--work-dir", str(work_dir.root), "--dry-run")  # the default 30 days: any age for this
    assert dry.returncode == 0 and f"building requests/{building.name}" in dry.stdout, dry.stdout + dry.stderr
    assert "would remove" in dry.stdout and ".dat" in dry.stdout and building.exists()
    done = cli("purge", "--work-dir", str(work_dir.root))
    assert done.returncode == 0 and "removed" in done.stdout and not building.exists(), done.stdout + done.stderr
    [event] = _leftover_events(work_dir)
    assert event["leftover"] == "building" and event["rows"] == len(NUMBERS)
    assert not any(n in json.dumps(event) for n in NUMBERS)
    assert cli("purge", "--work-dir", str(work_dir.root)).stdout.strip() == "nothing to purge"


def _pending_with_rows(work_dir: WorkDir, version: str) -> Path:
    """A ledger pending folder as a run leaves it when killed before the swap (the real code path)."""
    folder = ledger_dirs.pending_folder(work_dir, version)
    ledger_dirs.write_part(folder, "part-00000.parquet",
                           pa.table({"nhs_number": pa.array([int(n) for n in NUMBERS], pa.int64())}))
    return folder


def test_pending_ledgers_of_finished_or_unknown_requests_go_those_still_to_process_stay(tmp_path, work_dir) -> None:
    waiting, done = _request(tmp_path, work_dir), _request(tmp_path, work_dir, "cohort2.txt")
    force_state(work_dir, waiting, REPLIED)
    force_state(work_dir, done, ACKNOWLEDGED)
    kept, finished = _pending_with_rows(work_dir, waiting), _pending_with_rows(work_dir, done)
    orphan = _pending_with_rows(work_dir, "verify-20260101T000000")  # an ndop verify killed before its swap

    listed = purge_leftovers(work_dir, 30, dry_run=True)
    assert sorted(i.name for i in listed) == sorted(f"ledger/{p.name}" for p in (finished, orphan))
    assert finished.exists() and orphan.exists() and _leftover_events(work_dir) == []
    removed = purge_leftovers(work_dir, 30)
    assert [i.kind for i in removed] == ["pending", "pending"]
    assert not finished.exists() and not orphan.exists() and kept.exists()  # a replied request may still run
    assert [e["rows"] for e in _leftover_events(work_dir)] == [len(NUMBERS), len(NUMBERS)]


def _last_change(work_dir: WorkDir, rid: str, days_ago: float) -> None:
    record = work_dir.load(rid)
    record["history"][-1]["at"] = isoformat(utcnow() - timedelta(days=days_ago))
    work_dir.save(record)


def test_requests_that_never_finish_expire_after_the_mesh_expiry_and_grace(tmp_path, work_dir, monkeypatch) -> None:
    old_sent, old_accepted, young, answered = (_request(tmp_path, work_dir, f"c{i}.txt") for i in range(4))
    for rid, state, days in ((old_sent, SENT, 11), (old_accepted, ACCEPTED, 10.5), (young, SENT, 9),
                             (answered, REPLIED, 40)):
        force_state(work_dir, rid, state)
        _last_change(work_dir, rid, days)

    assert [i.name for i in purge_leftovers(work_dir, 30, dry_run=True)] == [old_sent, old_accepted]
    assert work_dir.load(old_sent)["state"] == SENT and _holds_numbers(work_dir.request_dir(old_sent))
    monkeypatch.setenv("NDOP_UNFINISHED_GRACE_DAYS", "3")  # 5 + 3 days: the young one (9 days) goes too
    assert [i.name for i in purge_leftovers(work_dir, 30, dry_run=True)] == [old_sent, old_accepted, young]
    monkeypatch.delenv("NDOP_UNFINISHED_GRACE_DAYS")

    removed = purge_leftovers(work_dir, 30)
    assert [(i.kind, i.name) for i in removed] == [("unfinished", old_sent), ("unfinished", old_accepted)]
    for rid in (old_sent, old_accepted):
        record = work_dir.load(rid)
        assert record["state"] == FAILED and record["failure"]["code"] == "expired" and record["purged_at"]
        assert not _holds_numbers(work_dir.request_dir(rid)) and (work_dir.request_dir(rid) / "request.json").exists()
    for rid in (young, answered):
        assert _holds_numbers(work_dir.request_dir(rid)) and work_dir.load(rid)["state"] != FAILED
    events = _leftover_events(work_dir)
    assert [e["request_id"] for e in events] == [old_sent, old_accepted] and all(e["rows"] for e in events)
    status = cli("status", "--work-dir", str(work_dir.root))
    assert status.returncode == 0 and "expired" in status.stdout, status.stdout + status.stderr


@pytest.mark.slow  # stage 2 of the test command (run_tests.sh --all)
def test_ledger_rows_of_patients_who_left_the_cohort(tmp_path, work_dir, mesh, fhir_server, monkeypatch) -> None:
    numbers = nhs.synthetic_numbers(30, seed=2106).to_pylist()
    stayed, leaving = numbers[:20], numbers[20:]
    everyone, remaining = tmp_path / "everyone.txt", tmp_path / "remaining.txt"
    everyone.write_text("\n".join(numbers) + "\n")
    remaining.write_text("\n".join(stayed) + "\n")
    mesh.plugin()
    env = {**mesh.env(), "FHIR_URL": fhir_server}
    assert ndop_run(work_dir, env, "--cohort", str(everyone)).returncode == 0
    second = ndop_run(work_dir, env, "--cohort", str(remaining), "--new-request")
    assert second.returncode == 0, second.stderr

    def ledger_numbers() -> set[str]:
        found = ledger_dirs.current(work_dir)
        assert found is not None
        return {str(n) for path in found.resolve().glob("*.parquet")
                for n in pq.read_table(path).column("nhs_number").to_pylist()}

    def numbers_in_ledger_dir() -> set[str]:
        held = set()
        for path in (work_dir.root / "ledger").rglob("*.parquet"):
            held |= {str(n) for n in pq.read_table(path).column("nhs_number").to_pylist()}
        return held

    assert ledger_numbers() == set(numbers)  # who left is kept in the ledger, untouched
    assert purge_leftovers(work_dir, 30, dry_run=True) == []  # left just now: within 30 days
    # a dry run lists what the purge removes: the rows of who left, and then their change-log rows (the history
    # keeps a last status only for patients still in the ledger); one read of the ledger gives both
    read, read_table = [], pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda path, *a, **k: read.append(str(path)) or read_table(path, *a, **k))
    dry = purge_leftovers(work_dir, 0, dry_run=True)
    monkeypatch.undo()
    assert [(d.kind, d.rows) for d in dry] == [("left-cohort", 10), ("history", 10)], dry
    folder = ledger_dirs.current(work_dir).resolve()  # type: ignore[union-attr]
    parts = sorted(str(p) for p in folder.glob("*.parquet"))
    assert sorted(p for p in read if Path(p).resolve().parent == folder) == parts  # each part read once
    assert ledger_numbers() == set(numbers)
    assert format_purge([], True, dry)[0].endswith("would remove 10 ledger rows")

    # a replied request answered before these rows were checked still waits: nothing of them may go
    waiting = _request(tmp_path, work_dir, "waiting.txt")
    force_state(work_dir, waiting, REPLIED, checked_at=isoformat(utcnow() - timedelta(days=1)))
    assert purge_leftovers(work_dir, 0, dry_run=True) == []
    force_state(work_dir, waiting, FAILED)

    done = cli("purge", "--work-dir", str(work_dir.root), "--older-than", "0")
    assert done.returncode == 0 and "removed 10 ledger rows" in done.stdout, done.stdout + done.stderr
    assert "history ledger/history" in done.stdout and "removed 10 history rows" in done.stdout, done.stdout
    assert ledger_numbers() == set(stayed)
    assert not numbers_in_ledger_dir() & set(leaving)  # no earlier ledger version keeps them either
    meta = ledger_dirs.read_meta(str(ledger_dirs.current(work_dir).resolve()))  # type: ignore[union-attr]
    assert meta["rows"] == 20
    [event] = [e for e in _leftover_events(work_dir) if e["leftover"] == "left-cohort"]
    assert event["rows"] == 10 and not any(n in json.dumps(event) for n in numbers)
    verified = cli("verify", "--work-dir", str(work_dir.root), env=env)
    assert verified.returncode == 0 and "verified 20 Consents: 0 differ" in verified.stdout, verified.stderr

    back = ndop_run(work_dir, env, "--cohort", str(everyone), "--new-request")  # they come back: new patients
    assert back.returncode == 0, back.stderr
    report = json.loads((work_dir.request_dir(work_dir.all()[-1]["request_id"]) / "report.json").read_text())
    assert report["changes"]["new_patients"] == 10
    assert ledger_numbers() == set(numbers)
    assert all(len(found) == 1 for found in statuses(fhir_server, numbers).values())  # no duplicate Consent


def test_a_damaged_ledger_leaves_its_rows_but_never_stops_the_other_purges(tmp_path, work_dir) -> None:
    rid = _request(tmp_path, work_dir)
    force_state(work_dir, rid, ACKNOWLEDGED, checked_at=isoformat(utcnow() - timedelta(days=2)))
    current = work_dir.root / "ledger" / "current"
    current.mkdir(parents=True)
    (current / "part-00000.parquet").write_bytes(b"not parquet " + NUMBERS[0].encode())
    for meta in (None, {"fhir_base_url": "http://127.0.0.1:9/fhir", "checked_at": isoformat(utcnow())}):
        if meta is not None:
            (current / ledger_dirs.META).write_text(json.dumps(meta))
        (work_dir.requests / ".building-X26ABC1-010126-0009-1").mkdir()
        done = cli("purge", "--work-dir", str(work_dir.root), "--older-than", "0")
        assert done.returncode == 0 and "removed" in done.stdout, done.stdout + done.stderr
        assert "left-cohort" not in done.stdout and "not purged" in done.stderr
        assert not list(work_dir.requests.glob(".building-*")) and (current / "part-00000.parquet").exists()


def test_the_ledger_history_keeps_only_what_the_retention_period_allows(work_dir) -> None:
    """ndop filter's change log (pipeline/ledger/history.py) holds NHS numbers: purge drops the statuses that started
    before the retention period and were no longer held then, and every patient who left the ledger."""
    from pipeline.ledger import history as ledger_history

    a, b, c = (int(n) for n in nhs.synthetic_numbers(3, seed=2111).to_pylist())
    day = 86_400
    t0 = int(utcnow().timestamp()) - 40 * day
    rows = [(a, "active", t0), (a, "inactive", t0 + day), (a, "active", t0 + 35 * day),  # a: three statuses
            (b, "inactive", t0), (c, "active", t0)]  # b: one, still held; c: has left the ledger
    folder = ledger_history.history_folder(work_dir.ensure())
    folder.mkdir(parents=True, mode=0o700)
    table = pa.table({"nhs_number": pa.array([r[0] for r in rows], pa.int64()),
                      "status": pa.array([r[1] for r in rows]),
                      "status_since": pa.array([r[2] for r in rows], pa.int64()).cast(pa.timestamp("s", tz="UTC"))})
    pq.write_table(table.slice(0, 2), folder / "R1.parquet")
    pq.write_table(table.slice(2), folder / "R2.parquet")
    cutoff = t0 + 30 * day
    in_ledger = pa.array([a, b], pa.int64())
    assert ledger_history.compact(work_dir, cutoff, in_ledger, dry_run=True)[0] == 2
    assert len(list(folder.glob("*.parquet"))) == 2  # a dry run removes nothing
    dropped, files = ledger_history.compact(work_dir, cutoff, in_ledger)
    assert dropped == 2 and sorted(files) == ["R1.parquet", "R2.parquet"]
    left = ledger_history.read_history(str(folder))
    kept = sorted(zip(left.column("nhs_number").to_pylist(), left.column("status").to_pylist(),
                      left.column("status_since").cast(pa.timestamp("s", tz="UTC")).cast(pa.int64()).to_pylist()))
    assert kept == sorted([(a, "inactive", t0 + day), (a, "active", t0 + 35 * day), (b, "inactive", t0)])
    assert [p.name for p in folder.glob("*.parquet")] != ["R1.parquet", "R2.parquet"]
    assert ledger_history.compact(work_dir, cutoff, in_ledger)[0] == 0  # nothing more to drop
