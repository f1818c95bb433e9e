"""The embedded local default behind ``./run_local.sh``: the whole job against local stand-ins.

Starts mesh-sandbox (with the NDOP plugin answering as the live NDOP mailbox X26HC065) and the local
FHIR R4 server on free loopback ports, makes a synthetic cohort (999-range numbers only), runs
``ndop run`` against them on Beam's local runner, prints the report and how to query the Consents,
and stops what it started, also on Ctrl-C, SIGTERM, SIGHUP or failure. State lives in ``.local-run/`` so a second
run carries on from the first (and its report shows the changes).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from dev.fhir_server import FhirServer
from dev.mesh_sandbox import NDOP_MAILBOX, MeshSandbox
from dev.service import HOST, exit_on_termination, free_port, stop_child
from pipeline.core import nhs
from pipeline.core.errors import InputError
from pipeline.core.files import private_dir, write_bytes
from pipeline.core.settings import Range, number_option

ROOT = Path(__file__).resolve().parent.parent
OUR_MAILBOX = "X26ABC1"


def _cohort(path: Path, size: int, seed: int) -> None:
    numbers = nhs.synthetic_numbers(size, seed=seed, prefix="999" if size <= 900_000 else "9")
    write_bytes(path, ("\n".join(numbers.to_pylist()) + "\n").encode())


def _count(base_url: str, **params: str) -> int:
    answer = requests.get(f"{base_url}/Consent", params={**params, "_summary": "count"}, timeout=30)
    answer.raise_for_status()
    return int(answer.json().get("total", 0))


def _fhir_port(state: Path) -> int:
    """The same FHIR port on every run of a state dir (when still free): the Consent ledger records the
    FHIR base URL it describes, and refuses another one."""
    saved = state / "fhir-port"
    if saved.exists():
        port = int(saved.read_text())
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
                return port
            except OSError:
                pass
    port = free_port()
    saved.write_text(str(port))
    return port


COHORT_SIZE = Range(1, 10_000_000, "patients", whole=True)
FRACTION = Range(0, 1)
SEED = Range(0, 2**32 - 1, "", whole=True)

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run_local.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=number_option("--size", COHORT_SIZE), default=10_000,
                        help="synthetic cohort size, 1 to 10,000,000 (default %(default)s)")
    parser.add_argument("--opt-out", type=number_option("--opt-out", FRACTION), default=0.05,
                        help="fraction NDOP reports opted out, 0 to 1 (default 0.05)")
    parser.add_argument("--seed", type=number_option("--seed", SEED), default=1,
                        help="seed of the opt-outs (change it to see changes)")
    parser.add_argument("--state-dir", default=str(ROOT / ".local-run"), help="where local state is kept")
    parser.add_argument("--fresh", action="store_true", help="forget the state of earlier local runs first")
    parser.add_argument("--keep-running", action="store_true",
                        help="leave the servers up after the run, until Ctrl-C, to query them")
    try:
        args = parser.parse_args(argv)
    except InputError as err:  # a number out of its range (pipeline/core/settings.py): one line, exit 2
        print(f"run_local.sh: error: {err}", file=sys.stderr)
        return err.exit_code

    state = Path(args.state_dir)
    if args.fresh and state.exists():
        import shutil

        shutil.rmtree(state)
    private_dir(state)
    cohort = state / f"cohort-{args.size}.txt"
    if not cohort.exists():
        _cohort(cohort, args.size, seed=20261124)
    started = time.monotonic()
    print(f"[local] cohort: {cohort} ({args.size:,} synthetic 999-range NHS numbers)", flush=True)
    plugin = {"NDOP_SANDBOX_OPT_OUT_FRACTION": str(args.opt_out), "NDOP_SANDBOX_SEED": str(args.seed)}
    with MeshSandbox(store_dir=state / "mesh", mailboxes=(NDOP_MAILBOX, OUR_MAILBOX), plugin_env=plugin,
                     log_file=state / "mesh-sandbox.log") as mesh, FhirServer(state / "fhir", port=_fhir_port(state)) as fhir:
        print(f"[local] MESH sandbox {mesh.url} (NDOP = {NDOP_MAILBOX}, us = {OUR_MAILBOX}); FHIR {fhir.base_url}",
              flush=True)
        env = {
            **os.environ, "PYTHONPATH": str(ROOT), "MESH_URL": mesh.url, "MESH_MAILBOX": OUR_MAILBOX,
            "MESH_PASSWORD": mesh.password, "MESH_SHARED_KEY": mesh.shared_key, "FHIR_URL": fhir.base_url,
            "FHIR_AUTH": "none",
        }
        command = [sys.executable, "-m", "pipeline.cli", "run", "--work-dir", str(state / "work"),
                   "--cohort", str(cohort), "--wait", "120", "--interval", "1", "--runner=FnApiRunner"]
        print(f"[local] ndop run --cohort {cohort.name} --wait 120 --interval 1 --runner=FnApiRunner", flush=True)
        run = subprocess.Popen(command, cwd=ROOT, env=env)
        try:
            code = run.wait()
        except BaseException:  # Ctrl-C, SIGTERM, SIGHUP: the run stops first (a killed run is resumed by the next)
            stop_child(run)
            raise
        if code in (0, 1, 3):
            total, active = _count(fhir.base_url), _count(fhir.base_url, status="active")
            print(f"[local] the FHIR store holds {total:,} Consents: {active:,} active (opted out), "
                  f"{total - active:,} inactive", flush=True)
        print(f"[local] finished in {time.monotonic() - started:.1f}s with exit status {code}", flush=True)
        if args.keep_running:
            print("[local] servers stay up until Ctrl-C; try:\n"
                  f"  curl -s '{fhir.base_url}/Consent?status=active&_summary=count'\n"
                  f"  curl -s '{fhir.base_url}/Consent?_count=1'", flush=True)
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
        else:
            print("[local] servers stopped. To query the Consents later:\n"
                  f"  .venv/bin/python -m dev.fhir_server --port 8092 --data-dir {state / 'fhir'} &\n"
                  "  curl -s 'http://127.0.0.1:8092/fhir/Consent?status=active&_summary=count'\n"
                  "or run ./run_local.sh --keep-running", flush=True)
    return code


if __name__ == "__main__":
    exit_on_termination()  # SIGTERM/SIGHUP unwind like Ctrl-C: the servers' context managers stop them
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("[local] interrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
    except SystemExit as stop:
        if stop.code not in (128 + signal.SIGTERM, 128 + signal.SIGHUP):
            raise
        print(f"[local] stopped by {signal.Signals(int(stop.code) - 128).name}; servers stopped", file=sys.stderr)
        raise
