"""Damaged request records and the CLI's small edges (issue 20 items 4 and 5), through the real CLI."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pipeline.core import nhs
from pipeline.lifecycle.state import WorkDir
from tests.helpers import cli, cli_command, cli_env


def one_request(tmp_path: Path, work: Path) -> str:
    cohort = tmp_path / "cohort.txt"
    cohort.write_text("\n".join(nhs.synthetic_numbers(5, seed=2002).to_pylist()) + "\n")
    made = cli("request", "--cohort", str(cohort), "--mailbox", "X26ABC1", "--work-dir", str(work))
    assert made.returncode == 0, made.stderr
    return WorkDir(work).all()[-1]["request_id"]


@pytest.mark.parametrize("damage", [{}, [], "drop:state", "counts:[]", "state:exploded"])
def test_a_damaged_record_is_named_skipped_by_status_and_refused_by_commands(tmp_path: Path, damage) -> None:
    work = tmp_path / "work"
    good = one_request(tmp_path, work)
    bad = one_request(tmp_path, work)
    path = WorkDir(work).request_dir(bad) / "request.json"
    record = json.loads(path.read_text())
    if isinstance(damage, str) and ":" in damage:
        key, _, value = damage.partition(":")
        if key == "drop":
            del record[value]
        else:
            record[key] = json.loads(value) if value[0] in "[{" else value
        path.write_text(json.dumps(record))
    else:
        path.write_text(json.dumps(damage))

    status = cli("status", "--work-dir", str(work))
    assert status.returncode == 1 and "Traceback" not in status.stderr
    assert status.stderr.count("\n") == 1 and str(path) in status.stderr, status.stderr
    assert good in status.stdout and bad not in status.stdout  # the good request is still shown
    as_json = json.loads(cli("status", "--work-dir", str(work), "--json").stdout)
    assert [r["request_id"] for r in as_json["requests"]] == [good] and len(as_json["damaged"]) == 1

    for args in (["send", "--request-id", bad], ["report"]):
        refused = cli(*args, "--work-dir", str(work), env={"MESH_URL": "http://127.0.0.1:9", "MESH_MAILBOX": "X",
                                                              "MESH_PASSWORD": "p"})
        assert refused.returncode == 2, (args, refused.stderr)
        assert refused.stderr.count("\n") == 1 and str(path) in refused.stderr and "Traceback" not in refused.stderr


def test_status_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    work = tmp_path / "work"
    one_request(tmp_path, work)
    proc = subprocess.Popen(cli_command("status", "--work-dir", str(work)), env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before ndop writes a line (as `ndop status | head -0`)
    _, err = proc.communicate(timeout=60)
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception ignored" not in err, err


def test_run_help_lists_every_exit_status_and_line_ending_has_help() -> None:
    run_help = " ".join(cli("run", "--help").stdout.split())
    assert all(words in run_help for words in ("Exit 0 done", "3 still waiting", "1 failed", "2 bad input",
                                               "4 another ndop command holds the work dir"))
    assert "line ending of the .dat" in " ".join(cli("request", "--help").stdout.split())


def test_a_failed_request_leaves_no_work_dir_and_status_names_the_folder(tmp_path: Path) -> None:
    work = tmp_path / "fresh"
    failed = cli("request", "--cohort", str(tmp_path / "missing.txt"), "--mailbox", "X26ABC1",
                 "--work-dir", str(work))
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1
    assert not work.exists()  # no folder, no audit.jsonl, for a command that did nothing
    status = cli("status", "--work-dir", str(work))
    assert status.returncode == 0 and f"no work dir at {work}" in status.stdout
    one_request(tmp_path, work)
    failed_again = cli("request", "--cohort", str(tmp_path / "missing.txt"), "--mailbox", "X26ABC1",
                       "--work-dir", str(work))
    assert failed_again.returncode == 2
    audit = [json.loads(line) for line in (work / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["event"] == "command" and audit[-1]["exit_status"] == 2  # an existing work dir still audits
