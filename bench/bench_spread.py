"""Issue 24 item 1: how the FHIR writes spread on Flink at parallelism 2 and 4, this checkout against another.

    PYTHONPATH=. python -m bench.bench_spread [--patients 20000] [--shards 2] [--batch-size 100]
        [--baseline /work/main]

A 4-slot local Flink session cluster (dev/flink.py) and a fresh local FHIR server (sekmet) behind the
counting proxy of tests/fixtures/fhir_proxy.py; each job is ``python -m pipeline.beam.graph`` (a first load:
every Consent created) run by ``.venv-flink`` from this checkout and, with ``--baseline``, from that checkout
(e.g. main before the change), on fresh numbers each time. Per job: wall time, Consents/s, the most Bundle POSTs
in flight at once and their mean over the writes (the spread). With few join shards (``--shards 2``)
the baseline writes each shard's array in one work item: at most ``shards`` writers whatever the parallelism.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dev.fhir_server import FhirServer
from dev.flink import FLINK_PYTHON, FOUR_SLOTS, FlinkCluster, flink_args
from pipeline.request import datfile
from pipeline.core import nhs
from tests.fixtures.fhir_proxy import FaultProxy

REPO_ROOT = Path(__file__).resolve().parent.parent

def inputs(folder: Path, patients: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    numbers = nhs.synthetic_numbers(patients, seed=seed)
    pq.write_table(pa.table({"nhs_number": numbers}), folder / "manifest.parquet")
    (folder / "reply.dat").write_bytes(datfile.encode(numbers.slice(0, patients * 19 // 20), "crlf"))


def job(cluster: FlinkCluster, code: Path, parallelism: int, folder: Path, fhir_url: str, args: argparse.Namespace,
        extra: list[str]) -> float:
    argv = [*flink_args(cluster, parallelism), f"--manifest={folder / 'manifest.parquet'}",
            f"--reply={folder / 'reply.dat'}", "--checked_at=2026-03-01T10:00:00Z", f"--output_dir={folder}",
            f"--fhir_url={fhir_url}", "--fhir_auth=none", f"--shards={args.shards}",
            f"--batch_size={args.batch_size}", "--no_provenance", *extra]
    started = time.perf_counter()
    done = subprocess.run([str(FLINK_PYTHON), "-m", "pipeline.beam.graph", *argv], cwd=code,
                          env={**os.environ, "PYTHONPATH": str(code)}, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{code} at parallelism {parallelism} failed: {done.stderr[-1500:]}")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["ok"] and summary["counts"]["written"] == args.patients, summary["counts"]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=20_000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--hold", type=float, default=0.0,
                        help="seconds the proxy holds each Bundle POST (a slower store: its latency per bundle)")
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to run the same jobs from")
    args = parser.parse_args()
    codes = {"this": REPO_ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    runs = [(name, p, []) for p in (2, 4) for name in codes]  # interleaved: load drifts during a run
    runs.append(("this", 4, ["--max_writers=2"]))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-spread-") as tmp, \
            FlinkCluster(Path(tmp) / "flink", slots=4, config=FOUR_SLOTS) as cluster, \
            FhirServer(Path(tmp) / "fhir") as server:
        for seed, (name, parallelism, extra) in enumerate(runs, start=7100):
            folder = Path(tmp) / f"{name}-{parallelism}-{len(extra)}"
            inputs(folder, args.patients, seed)
            with FaultProxy(server.base_url) as proxy:
                proxy.delay = args.hold
                seconds = job(cluster, codes[name], parallelism, folder, proxy.url, args,
                              [e for e in extra if name == "this"])
                rows.append({"code": name, "parallelism": parallelism, "extra": " ".join(extra),
                             "seconds": round(seconds, 1), "consents_per_s": round(args.patients / seconds),
                             "max_in_flight": proxy.max_in_flight,
                             "mean_in_flight": round(proxy.mean_in_flight(), 2), "bundles": proxy.bundle_posts})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.patients} Consents, --shards {args.shards}, --batch_size {args.batch_size}, hold {args.hold}s, "
          f"Flink 1.19 (4 slots, LOOPBACK), sekmet; one run each (the machine is shared: wall times are noisy)")
    print(f"{'code':9} {'par':>3} {'extra':16} {'s':>7} {'/s':>6} {'max in flight':>13} {'mean':>5} {'bundles':>7}")
    for r in rows:
        print(f"{r['code']:9} {r['parallelism']:>3} {r['extra']:16} {r['seconds']:>7} {r['consents_per_s']:>6} "
              f"{r['max_in_flight']:>13} {r['mean_in_flight']:>5} {r['bundles']:>7}")


if __name__ == "__main__":
    main()
