"""The Consent ledger's payoff: a process run with a ledger writes only the changes, against a full rewrite.

    PYTHONPATH=. python -m bench.bench_delta [--patients 1000000] [--changed 1000] [--full-patients N]
    PYTHONPATH=. python -m bench.bench_delta --patients 10000000 --no-fhir      # peak memory, 10M ledger

With FHIR: a cohort of ``--patients``, a ledger from the previous run (day 0's answer, as that run wrote
it) and day 1's answer with ``--changed`` statuses flipped. Measured in the same run, each in its own
process against a fresh local FHIR server (sekmet):
(a) ``python -m pipeline.beam.graph`` with ``--ledger_in`` (``--refresh_days 0``): writes and wall time;
(b) the baseline, the same command with ``--full_refresh``: every Consent of the cohort rewritten
    (``--full-patients`` measures the baseline on a smaller cohort when a full 1M rewrite, ~15-20 min
    on sekmet, is too long; its rate is then quoted, not extrapolated into a ratio).
Without FHIR (``--no-fhir``): read manifest, reply and the previous ledger, the three-way join, decide,
build the changed Consents and write the new ledger, with the peak memory (VmHWM) of that process,
against the same join with no ledger (manifest and reply only: JoinWithLedger on a first load).
Inputs go under ``bench/out/`` (gitignored).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT = REPO_ROOT / "bench" / "out"
DAY0 = "2026-03-01T10:00:00Z"
DAY1 = "2026-03-02T10:00:00Z"


def _peak_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def prepare(patients: int, changed: int, shards: int) -> dict[str, Path]:
    """Day 0 inputs, day 1's reply (``changed`` statuses flipped) and the ledger day 0's run left."""
    from bench.generate import bench_key, generate
    from pipeline.request import datfile
    from pipeline.core.files import private_dir
    from transforms import ledger_join as ledger
    from transforms import shards as shardlib
    from transforms.join import classify

    bench_key()  # puts a key into NDOP_ID_KEY for the trial processes, also when every input is cached
    folder = OUT / f"delta-{patients}"
    manifest, reply0 = generate(folder, patients)
    reply1, ledger0 = folder / f"reply-day1-{changed}.dat", folder / f"ledger-day0-{shards}"
    if not reply1.exists():
        numbers = pq.read_table(manifest).column("nhs_number").combine_chunks()
        with open(reply0, "rb") as handle:
            replied = pa.concat_arrays([datfile.parse(block, first_line=line).numbers
                                        for line, block in datfile.iter_line_blocks(handle)])
        in_reply = np.isin(shardlib.to_int64(numbers), shardlib.to_int64(replied))
        flip = np.random.default_rng(11).choice(patients, changed, replace=False)
        in_reply[flip] = ~in_reply[flip]
        tmp = reply1.with_suffix(".tmp")
        tmp.write_bytes(datfile.encode(numbers.filter(pa.array(in_reply)), "crlf"))
        tmp.rename(reply1)
    if not (ledger0 / "done").exists():
        shutil.rmtree(ledger0, ignore_errors=True)
        private_dir(ledger0)
        requested = shardlib.to_int64(pq.read_table(manifest).column("nhs_number"))
        with open(reply0, "rb") as handle:
            replied_numbers = np.concatenate([shardlib.to_int64(datfile.parse(block, first_line=line).numbers)
                                              for line, block in datfile.iter_line_blocks(handle)])
        req_keys, rep_keys = shardlib.shard_of(requested, shards), shardlib.shard_of(replied_numbers, shards)
        for shard in range(shards):
            decision = ledger.decide(classify(requested[req_keys == shard], replied_numbers[rep_keys == shard]),
                                     ledger.empty_ledger(), DAY0, "DAY0", bench_key(), refresh_days=0)
            pq.write_table(decision.ledger, ledger0 / f"part-{shard:05d}.parquet",
                           row_group_size=ledger.ROW_GROUP_ROWS, compression="zstd")
        (ledger0 / "done").write_text("")
    return {"manifest": manifest, "reply0": reply0, "reply1": reply1, "ledger0": ledger0}


def describe(ledger_dir: Path, fhir_base_url: str) -> None:
    from bench.generate import bench_key

    """ledger.json for the bench's ledger, naming this run's server (its port changes every run)."""
    (ledger_dir / "ledger.json").write_text(json.dumps({"fhir_base_url": fhir_base_url, "request_id": "DAY0",
                                                             "id_key_fingerprint": bench_key().fingerprint}))


def trial(kind: str, argv: list[str]) -> dict[str, Any]:
    """One measurement in this (fresh) process: ``process`` (the whole pipeline.beam.graph run) or ``nofhir``."""
    start = time.perf_counter()
    if kind == "process":
        from pipeline.beam.graph import run

        summary = run(argv)
        return {"seconds": time.perf_counter() - start, "peak_mb": _peak_mb(), "ok": summary["ok"],
                **summary["counts"]}
    import apache_beam as beam

    from pipeline.beam.options import LedgerOptions, NdopOptions
    from pipeline.beam.graph import build_pipeline, counters, pipeline_options
    options = pipeline_options(argv)
    opts = options.view_as(NdopOptions)
    p = beam.Pipeline(options=options)
    if kind == "classify":  # the baseline: the production join with no ledger (manifest + reply only: a first load)
        lopts = options.view_as(LedgerOptions)
        lopts.ledger_in = lopts.ledger_out = None
        build_pipeline(p, opts, until="join", ledger_opts=lopts)
    else:
        build_pipeline(p, opts, until="consents", ledger_opts=options.view_as(LedgerOptions))
    result = p.run()
    result.wait_until_finish()
    return {"seconds": time.perf_counter() - start, "peak_mb": _peak_mb(), **counters(result)}


def run_trial(kind: str, argv: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bench.bench_delta", "--trial", kind, "--", *argv],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"trial {kind} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["command_seconds"] = time.perf_counter() - started  # the whole command: interpreter, imports, run
    return result


def _argv(inputs: dict[str, Path], reply: Path, out: Path, shards: int, extra: list[str]) -> list[str]:
    return ["--runner=FnApiRunner", f"--manifest={inputs['manifest']}", f"--reply={reply}", f"--checked_at={DAY1}",
            f"--output_dir={out}", f"--shards={shards}", "--request_id=DAY1", "--provenance_org=X26ABC1", *extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=1_000_000)
    parser.add_argument("--changed", type=int, default=1000)
    parser.add_argument("--full-patients", type=int, default=None, help="cohort of the full-rewrite baseline")
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--no-fhir", action="store_true")
    parser.add_argument("--trial", help=argparse.SUPPRESS)
    parser.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial:
        print(json.dumps(trial(args.trial, args.extra)))
        return

    t = time.perf_counter()
    inputs = prepare(args.patients, args.changed, args.shards)
    print(f"inputs: {args.patients:,} patients, ledger of day 0, {args.changed:,} statuses flipped on day 1; "
          f"shards={args.shards} (prepared in {time.perf_counter() - t:.0f}s)")
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        work = Path(tmp)
        if args.no_fhir:
            delta = run_trial("nofhir", _argv(inputs, inputs["reply1"], work / "d", args.shards, [
                f"--ledger_in={inputs['ledger0']}", f"--ledger_out={work / 'ledger1'}", "--refresh_days=0"]))
            first = run_trial("classify", _argv(inputs, inputs["reply1"], work / "f", args.shards, []))
            rows = sum(pq.ParquetFile(p).metadata.num_rows for p in (work / "ledger1").glob("*.parquet"))
            print(f"(n) no FHIR, {args.patients:,}-row ledger in: read + 3-way join + decide + build "
                  f"{delta['ledger_to_write']:,} Consents + write a {rows:,}-row ledger: {delta['seconds']:.1f}s, "
                  f"peak {delta['peak_mb']:,.0f} MB (target < 3072 MB); baseline, the join without a ledger "
                  f"(read + JoinWithLedger, no ledger): {first['seconds']:.1f}s, peak {first['peak_mb']:,.0f} MB; "
                  f"ratio {delta['seconds'] / first['seconds']:.2f}x time, {delta['peak_mb'] / first['peak_mb']:.2f}x memory")
            assert delta["ledger_to_write"] == args.changed and rows == args.patients, delta
            return

        from dev.fhir_server import FhirServer

        with FhirServer(work / "fhir-delta") as server:
            describe(inputs["ledger0"], server.base_url)
            delta = run_trial("process", _argv(inputs, inputs["reply1"], work / "d", args.shards, [
                f"--fhir_url={server.base_url}", "--fhir_auth=none", f"--batch_size={args.batch_size}",
                f"--ledger_in={inputs['ledger0']}", f"--ledger_out={work / 'ledger1'}", "--refresh_days=0"]))
        assert delta["ok"] and delta["written"] == args.changed, delta
        print(f"(a) with the ledger: {delta['written']:,} Consents written of {args.patients:,}; pipeline "
              f"{delta['seconds']:.1f}s, whole command {delta['command_seconds']:.1f}s (goal < 20 s), "
              f"peak {delta['peak_mb']:,.0f} MB")
        full_n = args.full_patients or args.patients
        base = inputs if full_n == args.patients else prepare(full_n, min(args.changed, full_n), args.shards)
        with FhirServer(work / "fhir-full") as server:
            full = run_trial("process", _argv(base, base["reply1"], work / "f", args.shards, [
                f"--fhir_url={server.base_url}", "--fhir_auth=none", f"--batch_size={args.batch_size}",
                f"--ledger_out={work / 'ledger-full'}", "--full_refresh"]))
        assert full["ok"] and full["written"] == full_n, full
        rate = full["written"] / full["seconds"]
        line = (f"(b) full rewrite: {full['written']:,} Consents written; pipeline {full['seconds']:.1f}s "
                f"({rate:,.0f}/s), whole command {full['command_seconds']:.1f}s")
        if full_n == args.patients:
            line += (f"; ratio full/ledger: {full['command_seconds'] / delta['command_seconds']:.1f}x time, "
                     f"{full['written'] / max(delta['written'], 1):,.0f}x writes")
        else:
            line += f" (baseline cohort {full_n:,}, not {args.patients:,}: no time ratio quoted)"
        print(line)


if __name__ == "__main__":
    main()
