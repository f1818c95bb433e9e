"""A first load into HAPI: the process run's batched PUT writer against its bulk path (``--bulk_import hapi``).

    PYTHONPATH=. python -m bench.bench_bulk_import [--patients 20000] [--runs 1]

One HAPI 8.8 (dev/hapi: H2, validating, ``$import`` registered, batch maintenance every 2 s), and per run two
disjoint cohorts of ``--patients``, each a first load by ``pipeline.beam.graph.run`` on FnApiRunner with Provenance:
(a) PUTs in batch Bundles of 500; (b) ``--bulk_import hapi``: NDJSON, served from a loopback HTTP server, imported
by HAPI (Consents, then Provenance), counted from HAPI's job report. The two alternate within a run. Wall time of
each, medians of ``--runs``, ratio (a)/(b).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dev.hapi_server import HapiServer
from pipeline.beam.graph import run
from pipeline.core import nhs
from pipeline.request import datfile
from bench.generate import bench_key

CHECKED_AT = "2026-03-01T10:00:00Z"


def first_load(folder: Path, numbers: list[str], fhir_url: str, *extra: str) -> float:
    folder.mkdir(mode=0o700)
    pq.write_table(pa.table({"nhs_number": pa.array(numbers)}), folder / "manifest.parquet")
    (folder / "reply.dat").write_bytes(datfile.encode(pa.array(numbers[::2]), "crlf"))
    started = time.perf_counter()
    summary = run(["--runner=FnApiRunner", f"--manifest={folder / 'manifest.parquet'}",
                   f"--reply={folder / 'reply.dat'}", f"--checked_at={CHECKED_AT}", f"--output_dir={folder}",
                   f"--fhir_url={fhir_url}", "--fhir_auth=none", "--batch_size=500", "--provenance_org=X26ABC1",
                   "--request_id=BENCH", *extra])
    seconds = time.perf_counter() - started
    counts = summary["counts"]
    assert summary["ok"] and counts["written"] == len(numbers), summary["problems"]
    assert counts["provenances"] == -(-len(numbers) // 500) or "--bulk_import=hapi" not in extra, counts
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    n = args.patients
    bench_key()  # the Consent id key (NDOP_ID_KEY when none is set)
    numbers = nhs.synthetic_numbers(2 * n * args.runs, seed=8801).to_pylist()
    puts, bulk = [], []
    with tempfile.TemporaryDirectory(prefix="bench-bulk-") as tmp:
        folder = Path(tmp)
        server = HapiServer(folder / "hapi").launch().wait_ready()
        try:
            for index in range(args.runs):
                cohort = numbers[2 * n * index:2 * n * (index + 1)]
                puts.append(first_load(folder / f"put-{index}", cohort[:n], server.base_url))
                bulk.append(first_load(folder / f"bulk-{index}", cohort[n:], server.base_url,
                                       "--bulk_import=hapi", "--bulk_min_patients=1"))
                print(f"run {index + 1}: PUT {puts[-1]:.1f}s, bulk {bulk[-1]:.1f}s", flush=True)
        finally:
            server.stop()
    put, imported = statistics.median(puts), statistics.median(bulk)
    print(f"{n:,}-patient first load into HAPI 8.8 (H2, validating), with Provenance, median of {args.runs}:\n"
          f"(a) PUTs, batch Bundles of 500 (FnApiRunner): {put:.1f}s ({n / put:,.0f}/s)\n"
          f"(b) --bulk_import hapi (NDJSON + two $import jobs): {imported:.1f}s ({n / imported:,.0f}/s)\n"
          f"ratio (a)/(b) {put / imported:.2f}x")


if __name__ == "__main__":
    main()
