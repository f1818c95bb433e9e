"""``./run_local.sh`` itself, as a new user runs it (with a small cohort), twice in a row."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import cli_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # stage 2 of the test command (run_tests.sh --all)
def test_run_local_twice(tmp_path) -> None:
    def run_local(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["./run_local.sh", "--size", "300", "--state-dir", str(tmp_path / "state"), *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)

    first = run_local()
    assert first.returncode == 0, first.stdout + first.stderr
    assert re.search(r"the FHIR store holds 300 Consents: \d+ active", first.stdout)
    assert "Changes (counted by the Consent ledger join)" in first.stdout
    assert "| 300 | 300 | 0 | 0 | 0 | 0 | 0 |" in first.stdout  # a first load: everybody new, written
    second = run_local("--seed", "9")
    assert second.returncode == 0, second.stdout + second.stderr
    assert re.search(r"the FHIR store holds 300 Consents", second.stdout)  # updated, not duplicated
    assert re.search(r"\| (\d+) \| 0 \| \d+ \| \d+ \| 0 \| \d+ \| 0 \|", second.stdout)  # only changes written
    assert not re.search(r"\b999\d{7}\b", first.stdout + first.stderr + second.stdout + second.stderr)
    assert "[send]" in first.stderr and "[poll]" in first.stderr and "[process]" in first.stderr
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""  # the servers it started are gone


def test_run_local_refuses_sizes_and_fractions_out_of_range() -> None:
    """Issue 22 item 5: ``--size 0`` crashed (UnboundLocalError) and ``--opt-out 1.5`` was accepted."""
    for args, named in ((["--size", "0"], "--size"), (["--opt-out", "1.5"], "--opt-out"), (["--size", "nan"], "--size")):
        done = subprocess.run([sys.executable, "-m", "dev.local_run", *args], cwd=ROOT, env=cli_env(),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and named in done.stderr, done.stderr


def test_run_local_needs_no_java_maven_or_go(tmp_path) -> None:
    """Issue 22 item 5: the local default never builds HAPI (Java, Maven), Prism (Go) or Flink."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("mvn", "java", "go"):
        (fake / tool).write_text(f"#!/bin/sh\necho '{tool} was called' >&2\nexit 1\n")
        (fake / tool).chmod(0o755)
    env = {**cli_env(), "PATH": f"{fake}:{os.environ['PATH']}"}
    done = subprocess.run(["./run_local.sh", "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "--size" in done.stdout, done.stderr
    assert "was called" not in done.stderr


@pytest.mark.parametrize("when", ["during the run", "while kept running"])
def test_sigterm_to_run_local_stops_the_servers_it_started(tmp_path, when: str) -> None:
    """Issue 22 item 5: SIGTERM to ``run_local.sh`` orphaned the MESH and FHIR servers (each runs in its own
    session, so only an orderly stop reaches them)."""
    state = tmp_path / "state"
    args = ["--size", "300", "--state-dir", str(state)] + (["--keep-running"] if when == "while kept running" else [])
    wait_for = "[local] ndop run" if when == "during the run" else "[local] servers stay up"
    local = subprocess.Popen(["./run_local.sh", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        seen = ""
        deadline = time.monotonic() + 240
        assert local.stdout is not None
        while wait_for not in seen and time.monotonic() < deadline and local.poll() is None:
            seen += local.stdout.readline()
        assert wait_for in seen, seen
        servers = _processes_under(tmp_path)
        assert len(servers) >= 2, servers  # mesh-sandbox and the FHIR server are up (and maybe ndop run)
        local.send_signal(signal.SIGTERM)  # to run_local.sh alone, as `kill PID` or a supervisor does
        out, err = local.communicate(timeout=60)
        assert _processes_under(tmp_path) == [], err  # nothing it started outlives it
        assert local.returncode == 128 + signal.SIGTERM, seen + out + err
        assert "stopped by SIGTERM; servers stopped" in err
    finally:
        if local.poll() is None:
            os.killpg(local.pid, signal.SIGKILL)
        for pid in _processes_under(tmp_path):  # a failed test leaves no server behind either
            os.killpg(os.getpgid(pid), signal.SIGKILL)


def _processes_under(folder: Path) -> list[int]:
    """Processes whose command line names ``folder`` (the servers take their data dirs under it)."""
    found = subprocess.run(["pgrep", "-f", str(folder)], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]
