"""A leak scan (issue 9): ``ndop run -v`` end to end on the local stand-ins (mesh-sandbox playing NDOP, the FHIR
server demanding OAuth2 client credentials), then every log line, report, summary, record, status output,
dead-letter reason and the processes' command lines are searched for any full number of the cohort and for the
secrets in use. Numbers belong only in the data files (``.dat``, manifest, rejects, reply, dead letters' own
``nhs_number`` field), all 0600."""
from __future__ import annotations

import pytest

import json
import stat
import subprocess
import threading
import time
from pathlib import Path

from pipeline.core import nhs
from pipeline.lifecycle.state import ACKNOWLEDGED, REPLIED
from tests.fixtures.fhir import SMART_CLIENT_ID, SMART_CLIENT_SECRET
from tests.helpers import REPO_ROOT, cli_command, cli_env

DATA_FILES = {".dat", ".parquet", ".csv"}  # hold numbers by design; their modes are checked instead


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return found


def _watch_cmdlines(process: subprocess.Popen, seen: set[str]) -> None:
    """Sample the command lines of the run and everything it starts, until it ends."""
    while process.poll() is None:
        for pid in _descendants(process.pid):
            try:
                seen.add(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
        time.sleep(0.05)


def _ndop(args: list[str], env: dict[str, str], cmdlines: set[str]) -> subprocess.CompletedProcess:
    process = subprocess.Popen(cli_command(*args), cwd=REPO_ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watcher = threading.Thread(target=_watch_cmdlines, args=(process, cmdlines), daemon=True)
    watcher.start()
    try:
        out, err = process.communicate(timeout=180)
    finally:
        process.kill()
    watcher.join(timeout=5)
    return subprocess.CompletedProcess(args, process.returncode, out, err)


@pytest.mark.slow  # stage 2 of the test command (run_tests.sh --all)
def test_no_number_and_no_secret_leaks_anywhere(tmp_path, work_dir, mesh, fhir_auth_server) -> None:
    numbers = nhs.synthetic_numbers(30, seed=9801).to_pylist()
    typed = [f"{n[:3]} {n[3:6]} {n[6:]}" for n in numbers[:3]]  # as people type them
    wrong = numbers[29][:9] + str((int(numbers[29][9]) + 1) % 10)  # a full number too, rejected
    cohort = tmp_path / "cohort.csv"
    values = typed + numbers[3:29] + [wrong]
    cohort.write_text("name,nhs_number\n" + "".join(f"p{i},{v}\n" for i, v in enumerate(values)))
    (tmp_path / "opted-out.txt").write_text("\n".join(numbers[:5]) + "\n")
    mesh.plugin(opted_out_file=str(tmp_path / "opted-out.txt"))
    env = cli_env({**mesh.env(), "FHIR_URL": fhir_auth_server.base_url, "FHIR_AUTH": "client-credentials",
                   "FHIR_TOKEN_URL": fhir_auth_server.token_url, "FHIR_CLIENT_ID": SMART_CLIENT_ID,
                   "FHIR_CLIENT_SECRET": SMART_CLIENT_SECRET})
    secrets = [SMART_CLIENT_SECRET, mesh.sandbox.shared_key]
    cmdlines: set[str] = set()
    run = ["run", "-v", "--work-dir", str(work_dir.root), "--wait", "20", "--interval", "0.2", "--runner=FnApiRunner"]

    done = _ndop([*run, "--cohort", str(cohort)], env, cmdlines)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DEBUG" in done.stderr  # -v: the most talkative logs are the ones scanned

    # A second request whose reply is corrupt: dead letters, a failed run, an error report.
    mesh.plugin(mode="silent")
    waiting = _ndop([*run, "--cohort", str(cohort), "--wait", "0"], env, cmdlines)
    assert waiting.returncode == 3, waiting.stderr[-3000:]
    second = [r for r in work_dir.all() if r["state"] != ACKNOWLEDGED][0]
    with mesh.client("X26HC065") as ndop:
        body = "".join(f"{n},\r\n" for n in numbers[5:20]) + f"{numbers[20]};\r\nNHS {numbers[21]}\r\n"
        ndop.send_message("X26ABC1", body.encode(), workflow_id="SPINE_NTT_UPHOLDING", local_id=second["local_id"],
                          subject=second["subject"])
    failed = _ndop(run, env, cmdlines)
    assert failed.returncode == 1 and "integrity error" in failed.stderr
    assert work_dir.load(second["request_id"])["state"] == REPLIED
    status = _ndop(["status", "-v", "--work-dir", str(work_dir.root)], env, cmdlines)
    assert status.returncode == 0 and second["request_id"] in status.stdout

    texts = {f"ndop {c.args[0]} output": c.stdout + c.stderr for c in (done, waiting, failed, status)}
    texts["command lines"] = "\n".join(sorted(cmdlines))
    assert any("pipeline.cli run" in line for line in cmdlines)  # the sampling saw the runs
    dead_letters = 0
    for path in sorted(work_dir.root.rglob("*")):
        if not path.is_file():
            continue
        if path.suffix in DATA_FILES or path.name == "reply.dat":
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            continue
        if path.name == "dead_letters.jsonl":
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            records = [json.loads(line) for line in path.read_text().splitlines()]
            dead_letters += len(records)
            texts[f"{path} (reasons)"] = "\n".join(r["reason"] for r in records)
            assert not any(secret in path.read_text() for secret in secrets), path
            continue
        texts[str(path)] = path.read_text(errors="replace")  # records, summaries, reports, locks
    assert dead_letters >= 2 and any(name.endswith("report.md") for name in texts)

    for where, text in texts.items():
        for number in numbers + [wrong]:
            assert number not in text, f"full NHS number {nhs.mask(number)} in {where}"
        for secret in secrets:
            assert secret not in text, f"a secret in {where}"
