"""Retention (pipeline/privacy/purge.py, ``ndop purge``) and the audit log (pipeline/lifecycle/audit.py) on real request folders."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from pipeline.lifecycle import audit
from pipeline.core import nhs
from pipeline.privacy.purge import KEEP, purge
from pipeline.request.build import RequestSettings, build_request
from pipeline.core.clock import utcnow
from pipeline.lifecycle.state import ACKNOWLEDGED, FAILED, REPLIED, WorkDir
from tests.helpers import REPO_ROOT, cli, force_state

NUMBERS = nhs.synthetic_numbers(6, seed=9701).to_pylist()


def _request(tmp_path: Path, work_dir: WorkDir, state: str, name: str = "cohort.txt") -> str:
    cohort = tmp_path / name
    cohort.write_text("\n".join(NUMBERS + ["12345"]) + "\n")  # one reject
    record = build_request(str(cohort), work_dir, RequestSettings(mailbox="X26ABC1"))
    rid = record["request_id"]
    folder = work_dir.request_dir(rid)
    (folder / "reply.dat").write_bytes("".join(f"{n},\r\n" for n in NUMBERS[2:]).encode())
    (folder / "dead_letters.jsonl").write_text(json.dumps({"nhs_number": NUMBERS[0]}) + "\n")
    (folder / "summary.json").write_text('{"ok": true}\n')
    (folder / "report.json").write_text('{"request_id": "%s"}\n' % rid)
    (folder / "report.md").write_text("# report\n")
    force_state(work_dir, rid, state, files={**record["files"], "reply": "reply.dat"}, reply_message_id="MSG-1")
    return rid


def _holds_a_number(path: Path) -> bool:
    data = path.read_bytes()
    return any(n.encode() in data for n in NUMBERS)


def test_purge_keeps_the_records_and_removes_every_file_with_numbers(tmp_path, work_dir) -> None:
    done = _request(tmp_path, work_dir, ACKNOWLEDGED)
    waiting = _request(tmp_path, work_dir, REPLIED, "cohort2.txt")  # unfinished: never touched
    ledger = work_dir.root / "ledger" / "current"
    ledger.mkdir(parents=True)
    (ledger / "part-0.parquet").write_bytes(b"".join(n.encode() for n in NUMBERS))
    stage = tmp_path / "stage"
    (stage / done).mkdir(parents=True)
    (stage / done / "reply.dat").write_text(NUMBERS[3] + "\n")
    (stage / done / "ledger" / "in").mkdir(parents=True)
    (stage / done / "ledger" / "in" / "part-0.parquet").write_text(NUMBERS[4] + "\n")
    before_waiting = sorted(p.name for p in work_dir.request_dir(waiting).iterdir())

    dry = purge(work_dir, 0, dry_run=True, stage_dir=str(stage))
    assert [item.request_id for item in dry] == [done] and (stage / done / "reply.dat").exists()
    assert any(_holds_a_number(p) for p in work_dir.request_dir(done).iterdir())

    [item] = purge(work_dir, 0, stage_dir=str(stage))
    folder = work_dir.request_dir(done)
    left = sorted(p.name for p in folder.iterdir())
    assert set(left) <= KEEP | {p for p in left if p.endswith(".ctl")} and "request.json" in left
    assert {"report.json", "report.md", "summary.json"} <= set(left)
    assert not any(_holds_a_number(p) for p in folder.rglob("*") if p.is_file())
    assert item.staged == ["ledger/in/part-0.parquet", "reply.dat"]
    assert not [p for p in stage.rglob("*") if p.is_file()]
    record = work_dir.load(done)
    assert record["state"] == ACKNOWLEDGED and record["purged_at"].endswith("Z")
    removed = {f["name"]: f for f in record["purged"] if not f.get("staged")}
    assert {"manifest.parquet", "reply.dat", "dead_letters.jsonl"} <= set(removed)
    assert removed["manifest.parquet"]["rows"] == len(NUMBERS) and removed["reply.dat"]["rows"] == 4
    assert not any(n in json.dumps(record) for n in NUMBERS)
    # never an unfinished request, never the ledger; a second purge finds nothing
    assert sorted(p.name for p in work_dir.request_dir(waiting).iterdir()) == before_waiting
    assert (ledger / "part-0.parquet").exists()
    assert purge(work_dir, 0) == []
    [event] = [e for e in audit.read_events(work_dir.root) if e["event"] == "purge"]
    assert event["request_id"] == done and "reply.dat" in event["removed"]


def test_purge_respects_the_retention_period(tmp_path, work_dir) -> None:
    rid = _request(tmp_path, work_dir, FAILED)
    assert purge(work_dir, 30) == []  # finished just now
    assert [i.request_id for i in purge(work_dir, 30, now=utcnow() + timedelta(days=31))] == [rid]


def test_ndop_purge_command(tmp_path, work_dir) -> None:
    rid = _request(tmp_path, work_dir, ACKNOWLEDGED)
    dry = cli("purge", "--work-dir", str(work_dir.root), "--older-than", "0", "--dry-run")
    assert dry.returncode == 0 and f"request {rid}" in dry.stdout and "would remove" in dry.stdout
    assert "manifest.parquet" in dry.stdout and (work_dir.request_dir(rid) / "manifest.parquet").exists()
    kept = cli("purge", "--work-dir", str(work_dir.root), env={"NDOP_RETENTION_DAYS": "30"})
    assert kept.returncode == 0 and kept.stdout.strip() == "nothing to purge"
    done = cli("purge", "--work-dir", str(work_dir.root), env={"NDOP_RETENTION_DAYS": "0"})
    assert done.returncode == 0 and "removed" in done.stdout
    assert not (work_dir.request_dir(rid) / "manifest.parquet").exists()
    bad = cli("purge", "--work-dir", str(work_dir.root), env={"NDOP_RETENTION_DAYS": "soon"})
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "NDOP_RETENTION_DAYS" in bad.stderr
    commands = [e for e in audit.read_events(work_dir.root) if e["event"] == "command"]
    assert [(e["command"], e["exit_status"]) for e in commands] == [("purge", 0), ("purge", 0), ("purge", 0),
                                                                    ("purge", 2)]


def test_audit_lines_per_state_change_redacted_private_and_append_only(tmp_path, work_dir) -> None:
    rid = _request(tmp_path, work_dir, REPLIED)
    work_dir.update(rid, state="processed", expect=REPLIED, processing={"counts": {"written": 6}})
    work_dir.update(rid, stage_seconds={"process": 1.0})  # not a state change: no line
    work_dir.update(rid, state=ACKNOWLEDGED)
    path = audit.audit_path(work_dir.root)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    states = [e for e in audit.read_events(work_dir.root) if e["event"] == "state"]
    assert [(e["old_state"], e["new_state"]) for e in states] == [(None, "created"), ("replied", "processed"),
                                                                  ("processed", ACKNOWLEDGED)]
    assert states[1]["processed"] == {"written": 6} and states[2]["mesh_message_ids"] == {"reply_message_id": "MSG-1"}
    assert all(e["request_id"] == rid and e["user"] and e["host"] and e["at"].endswith("Z") for e in states)
    written = audit.append(work_dir.root, "state", reason=f"server said {NUMBERS[0]}", mesh_password="s3cret",
                           nested={"token": "t", "ok": 1}, request_id=NUMBERS[1])
    text = path.read_text()
    assert NUMBERS[0] not in text and nhs.mask(NUMBERS[0]) in text and "s3cret" not in text
    assert NUMBERS[1] not in text  # an id key holding a bare number is masked too
    assert written["nested"] == {"ok": 1}
    # a crash mid-write leaves a torn last line: earlier lines stay whole and readable
    with open(path, "ab") as handle:
        handle.write(b'{"event": "torn')
    assert len(list(audit.read_events(work_dir.root))) == len(text.splitlines())


def test_concurrent_appends_never_interleave(tmp_path) -> None:
    code = ("import sys; from pipeline.lifecycle import audit\n"
            "for i in range(200): audit.append(sys.argv[1], 'command', command='x' * 500, i=i)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO_ROOT,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}) for _ in range(4)]
    assert [p.wait(timeout=60) for p in procs] == [0] * 4
    lines = audit.audit_path(tmp_path).read_bytes().splitlines()
    assert len(lines) == 800 and all(json.loads(line)["command"] == "x" * 500 for line in lines)


def test_status_command_writes_no_work_dir_and_checks_stale_days(tmp_path) -> None:
    missing = tmp_path / "nowhere"
    assert cli("status", "--work-dir", str(missing)).returncode == 0
    assert not missing.exists()
    empty = cli("status", "--work-dir", str(missing), "--json")
    assert empty.returncode == 0 and json.loads(empty.stdout) == {"requests": [], "damaged": [], "ledger": None}
    bad = cli("status", "--work-dir", str(missing), env={"NDOP_STALE_DAYS": "often"})
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "NDOP_STALE_DAYS" in bad.stderr
    negative = cli("status", "--work-dir", str(missing), "--stale-days", "-1")
    assert negative.returncode == 2 and "from 0 to 3650" in negative.stderr and negative.stderr.count("\n") == 1
