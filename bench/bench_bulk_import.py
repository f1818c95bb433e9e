"""A first load into HAPI: the batched PUT writer against HAPI's bulk ``$import`` (pipeline/fhir/bulk_import.py).

    NDOP_HAPI_CACHE=/tmp/hapi-scale PYTHONPATH=. python -m bench.bench_bulk_import [--patients 2000]

One HAPI 8.8 (dev/hapi, with ``$import`` registered; ``NDOP_HAPI_CACHE`` names its build), two disjoint cohorts
of ``--patients``: (a) ``pipeline.beam.graph`` on FnApiRunner, PUTs in batch Bundles of 500 (no Provenance, to
compare like with like); (b) the same Consents built, written as NDJSON, served from a loopback HTTP server and
imported with ``$import``, polled until HAPI's job report accounts for every one. Wall time of each, one run.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import requests

from dev.hapi_server import HapiServer
from pipeline.request import datfile
from pipeline.core import nhs
from pipeline.fhir.bulk_import import HapiImport, ServeFolder, write_ndjson
from pipeline.beam.graph import run
from bench.generate import bench_key
from transforms.build_consent import build_consent

CHECKED_AT = "2026-03-01T10:00:00Z"
BENCH_KEY = bench_key()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--files", type=int, default=4, help="NDJSON files the bulk load is cut into")
    args = parser.parse_args()
    n = args.patients
    numbers = nhs.synthetic_numbers(2 * n, seed=8801).to_pylist()
    put_numbers, bulk_numbers = numbers[:n], numbers[n:]
    with tempfile.TemporaryDirectory(prefix="bench-bulk-") as tmp:
        folder = Path(tmp)
        server = HapiServer(folder / "hapi").launch().wait_ready()
        try:
            pq.write_table(pa.table({"nhs_number": pa.array(put_numbers)}), folder / "manifest.parquet")
            (folder / "reply.dat").write_bytes(datfile.encode(pa.array(put_numbers[::2]), "crlf"))
            started = time.perf_counter()
            summary = run(["--runner=FnApiRunner", f"--manifest={folder / 'manifest.parquet'}",
                           f"--reply={folder / 'reply.dat'}", f"--checked_at={CHECKED_AT}", f"--output_dir={folder}",
                           f"--fhir_url={server.base_url}", "--fhir_auth=none", "--batch_size=500",
                           "--no_provenance"])
            put_seconds = time.perf_counter() - started
            assert summary["ok"] and summary["counts"]["written"] == n, summary["problems"]

            started = time.perf_counter()
            load = folder / "load"
            load.mkdir(mode=0o700)
            replied = set(bulk_numbers[::2])
            consents = [build_consent(x, "inactive" if x in replied else "active", CHECKED_AT,
                                      consent_id=BENCH_KEY.consent_id(x)) for x in bulk_numbers]
            step = -(-n // args.files)
            names = []
            for index in range(0, n, step):
                names.append(f"Consent-{index // step}.ndjson")
                write_ndjson(consents[index:index + step], str(load / names[-1]))
            with ServeFolder(load) as served, requests.Session() as session:
                job = HapiImport(session, server.base_url, poll_seconds=1.0, timeout=3600)
                urls = [served.url(name) for name in names]
                result = job.wait(job.start({"Consent": urls}, served.credential),
                                  {url: len(consents[i * step:(i + 1) * step]) for i, url in enumerate(urls)})
            bulk_seconds = time.perf_counter() - started
            assert result.problem is None, result.problem
        finally:
            server.stop()
    print(f"{n:,} Consents into HAPI 8.8 (H2, validating), one run each on a shared, loaded machine:\n"
          f"(a) batched PUT writer (FnApiRunner, Bundles of 500): {put_seconds:.1f}s ({n / put_seconds:,.0f}/s)\n"
          f"(b) NDJSON + $import ({args.files} files, polled 1 s): {bulk_seconds:.1f}s ({n / bulk_seconds:,.0f}/s); "
          f"ratio (a)/(b) {put_seconds / bulk_seconds:.2f}x")


if __name__ == "__main__":
    main()
