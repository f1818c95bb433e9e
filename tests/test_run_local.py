"""``./run_local.sh`` itself, as a new user runs it (with a small cohort), twice in a row."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import cli_env

ROOT = Path(__file__).resolve().parents[1]


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
