"""Speed and memory of the process pipeline, each figure against a baseline measured in the same run.

    PYTHONPATH=. NDOP_SEKMET=/path/to/sekmet python -m bench.bench_process [--patients 1000000]
        [--fhir-patients 100000] [--runs 3] [--fhir-runs 1] [--shards 32] [--skip-fhir]

(a) read + CoGroupByKey + classification on the local runner (FnApiRunner) vs pyarrow's set
    difference (``is_in``) on the same files; (b) Consent building throughput, in the pipeline
    (join + BuildConsent minus join) and the bare function; (c) the whole pipeline into a fresh local
    FHIR server vs the same server ingesting the same Consents as plain batch bundles of PUTs.
Every trial runs in its own process; peak memory is that process's max RSS. Inputs and server
data go under ``bench/out/`` (gitignored).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT = REPO_ROOT / "bench" / "out"
CHECKED_AT = "2024-11-26T10:15:00Z"

from bench.generate import bench_key  # noqa: E402

BENCH_KEY = bench_key()


def _peak_mb() -> float:
    """This process's own peak RSS (VmHWM): ru_maxrss survives fork and exec, so a trial would
    report its parent's peak when that was higher."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _pipeline_argv(manifest: str, reply: str, shards: int, extra: list[str]) -> list[str]:
    return [f"--manifest={manifest}", f"--reply={reply}", f"--checked_at={CHECKED_AT}", f"--shards={shards}",
            "--provenance_org=X26ABC1", *extra]


def trial(kind: str, manifest: str, reply: str, shards: int, extra: list[str]) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    if kind == "pyarrow":
        import pyarrow.compute as pc
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        start = time.perf_counter()
        requested = pq.read_table(manifest).column("nhs_number")
        replied = pacsv.read_csv(
            reply,
            read_options=pacsv.ReadOptions(column_names=["nhs_number", "empty"]),
            convert_options=pacsv.ConvertOptions(column_types={"nhs_number": "string", "empty": "string"}),
        ).column("nhs_number")
        answered = pc.is_in(requested, value_set=replied.combine_chunks())
        opted_out = pc.filter(requested, pc.invert(answered))
        not_opted_out = pc.filter(requested, answered)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "peak_mb": _peak_mb(), "opted_out": len(opted_out), "not_opted_out": len(not_opted_out)}
    if kind == "build_fn":
        import pyarrow.parquet as pq

        from transforms.build_consent import build_consent

        numbers = pq.read_table(manifest).column("nhs_number").to_pylist()
        start = time.perf_counter()
        for number in numbers:
            build_consent(number, "inactive", CHECKED_AT, consent_id=BENCH_KEY.consent_id(number))
        return {"seconds": time.perf_counter() - start, "peak_mb": _peak_mb(), "consents": len(numbers)}
    if kind == "ingest":
        return _ingest(manifest, extra[0], int(extra[1]))

    import apache_beam as beam

    from pipeline.beam.options import NdopOptions
    from pipeline.beam.graph import build_pipeline, counters, pipeline_options, run

    start = time.perf_counter()
    if kind == "write":
        summary = run(_pipeline_argv(manifest, reply, shards, extra))
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "peak_mb": _peak_mb(), "ok": summary["ok"], **summary["counts"]}
    options = pipeline_options(_pipeline_argv(manifest, reply, shards, extra))
    p = beam.Pipeline(options=options)
    build_pipeline(p, options.view_as(NdopOptions), until=kind)
    result = p.run()
    result.wait_until_finish()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": _peak_mb(), **(counters(result) or {})}


def _ingest(manifest: str, base_url: str, batch_size: int) -> dict[str, Any]:
    """The server's own rate: the same Consents, PUT by id in plain batch bundles, one after another."""
    import pyarrow.parquet as pq
    import requests

    from pipeline.fhir.config import FhirClientConfig
    from pipeline.fhir.sessions import open_session
    from transforms.build_consent import build_consent

    numbers = pq.read_table(manifest).column("nhs_number").to_pylist()
    consents = [build_consent(n, "inactive", CHECKED_AT, consent_id=BENCH_KEY.consent_id(n)) for n in numbers]
    session = open_session(FhirClientConfig.from_env(base_url=base_url, auth="none"))
    start = time.perf_counter()
    for at in range(0, len(consents), batch_size):
        bundle = {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [
                {"resource": c, "request": {"method": "PUT", "url": f"Consent/{c['id']}"}}
                for c in consents[at : at + batch_size]
            ],
        }
        response = session.post(base_url, json=bundle, timeout=300)
        response.raise_for_status()
    seconds = time.perf_counter() - start
    del requests
    return {"seconds": seconds, "peak_mb": _peak_mb(), "consents": len(consents)}


def run_trial(kind: str, manifest: Path, reply: Path, shards: int, extra: list[str] | None = None,
              python: str = sys.executable) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [python, "-m", "bench.bench_process", "--trial", kind, "--manifest", str(manifest),
           "--reply", str(reply), "--shards", str(shards), "--", *(extra or [])]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"trial {kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median(trials: list[dict[str, Any]]) -> float:
    return statistics.median(t["seconds"] for t in trials)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=1_000_000)
    parser.add_argument("--fhir-patients", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--fhir-runs", type=int, default=1)
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--skip-fhir", action="store_true")
    parser.add_argument("--trial", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--reply", help=argparse.SUPPRESS)
    parser.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial:
        print(json.dumps(trial(args.trial, args.manifest, args.reply, args.shards, args.extra)))
        return

    from bench.generate import generate

    manifest, reply = generate(OUT / str(args.patients), args.patients)
    peaks: dict[str, float] = {}
    print(f"inputs: {args.patients:,} patients, 5% opted out; {args.runs} runs each; shards={args.shards}")

    join = [run_trial("join", manifest, reply, args.shards) for _ in range(args.runs)]
    arrow = [run_trial("pyarrow", manifest, reply, args.shards) for _ in range(args.runs)]
    assert join[0]["opted_out"] == arrow[0]["opted_out"], (join[0], arrow[0])
    tj, ta = _median(join), _median(arrow)
    peaks["join"], peaks["pyarrow"] = max(t["peak_mb"] for t in join), max(t["peak_mb"] for t in arrow)
    print(f"(a) join+classify (Beam, FnApiRunner): median {tj:.2f}s; pyarrow is_in: median {ta:.2f}s; "
          f"ratio {tj / ta:.1f}x (target <= 10x)")

    consents = [run_trial("consents", manifest, reply, args.shards) for _ in range(args.runs)]
    bare = [run_trial("build_fn", manifest, reply, args.shards) for _ in range(args.runs)]
    tc, tb = _median(consents), _median(bare)
    peaks["consents"] = max(t["peak_mb"] for t in consents)
    n = consents[0]["consents_built"]
    print(f"(b) Consent building: join+build median {tc:.2f}s -> {n / max(tc - tj, 1e-9):,.0f} Consents/s in the "
          f"pipeline (build part {tc - tj:.2f}s); bare build_consent(): {n / tb:,.0f}/s; whole read->Consent: "
          f"{n / tc:,.0f}/s")

    if not args.skip_fhir:
        from dev.fhir_server import FhirServer

        fmanifest, freply = generate(OUT / str(args.fhir_patients), args.fhir_patients)
        piped, ingest = [], []
        for _ in range(args.fhir_runs):
            with tempfile.TemporaryDirectory(dir=OUT) as data, FhirServer(Path(data)) as server:
                ingest.append(run_trial("ingest", fmanifest, freply, args.shards, [server.base_url, str(args.batch_size)]))
            with tempfile.TemporaryDirectory(dir=OUT) as data, FhirServer(Path(data) / "fhir") as server:
                out = Path(data) / "out"
                piped.append(run_trial("write", fmanifest, freply, args.shards, [
                    f"--fhir_url={server.base_url}", "--fhir_auth=none", f"--output_dir={out}",
                    f"--batch_size={args.batch_size}", "--bundle_type=batch", "--upsert=id"]))
        assert all(t["ok"] and t["written"] == args.fhir_patients for t in piped), piped
        tp, ti = _median(piped), _median(ingest)
        peaks["pipeline_fhir"] = max(t["peak_mb"] for t in piped)
        print(f"(c) full pipeline -> FHIR ({args.fhir_patients:,} creates, PUT by id, batch bundles of {args.batch_size}): "
              f"median {tp:.1f}s ({args.fhir_patients / tp:,.0f}/s); server ingesting the same bundles: median "
              f"{ti:.1f}s ({args.fhir_patients / ti:,.0f}/s); ratio {tp / ti:.2f}x (target <= 1.5x)")
    print("peak memory (max RSS of each trial's process): "
          + ", ".join(f"{k} {v:,.0f} MB" for k, v in peaks.items()) + " (target < 2048 MB)")


if __name__ == "__main__":
    main()
