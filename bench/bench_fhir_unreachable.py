"""How long a FHIR store that dies in the middle of the writes takes to fail the run (issue 9 item 3).

Each run starts a fresh sekmet server, runs WriteConsents (FnApiRunner) on ``--count`` Consents in bundles of
``--batch-size``, kills the server as soon as the first Consents are stored, and times kill -> pipeline failure
("now": ``connect_retries`` retries, then FhirUnreachableError).

The baseline is the rule before the fix, measured in the same run against the same dead port: one bundle POSTed
through a session with the old retries (urllib3 ``Retry(total=connect=read=status=5, backoff_factor=0.5)``, every
bundle spending its whole budget before it was dead-lettered and the next one tried), times the bundles still
unwritten at the kill. Prints per-run figures, medians and the ratio before / now.

    .venv/bin/python bench/bench_fhir_unreachable.py [--count 5000] [--batch-size 50] [--runs 3]
"""
from __future__ import annotations

import argparse
import logging
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import apache_beam as beam  # noqa: E402
import requests  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402
from requests.adapters import HTTPAdapter  # noqa: E402
from urllib3.util.retry import Retry  # noqa: E402

from bench.bench_fhir_write import consent  # noqa: E402
from dev.fhir_server import FhirServer  # noqa: E402
from pipeline.core import nhs  # noqa: E402
from pipeline.fhir.config import FhirClientConfig  # noqa: E402
from pipeline.fhir.retry import RETRY_STATUSES  # noqa: E402
from transforms.write_consents import WriteConsents  # noqa: E402


def stored(base_url: str) -> int:
    try:
        return int(requests.get(f"{base_url}/Consent", params={"_summary": "count"}, timeout=5).json()["total"])
    except (requests.RequestException, ValueError, KeyError):
        return 0


def kill_when_writing(server: FhirServer, killed: dict) -> None:
    while stored(server.base_url) == 0:
        time.sleep(0.02)
    killed["written"] = stored(server.base_url)
    server.stop()
    killed["at"] = time.perf_counter()


def time_to_fail_now(numbers: list[str], batch_size: int) -> tuple[float, int]:
    """Seconds from the kill to the pipeline's failure, and how many Consents were stored at the kill."""
    with tempfile.TemporaryDirectory() as data:
        server = FhirServer(data).start()
        killed: dict = {}
        watcher = threading.Thread(target=kill_when_writing, args=(server, killed), daemon=True)
        try:
            watcher.start()
            try:
                with beam.Pipeline(options=PipelineOptions(runner="FnApiRunner")) as p:
                    (p | "Numbers" >> beam.Create(numbers, reshuffle=False) | "BuildConsent" >> beam.Map(consent)
                     | WriteConsents(FhirClientConfig(server.base_url), batch_size=batch_size))
            except Exception as err:  # noqa: BLE001 - the failure is what is timed
                failed = time.perf_counter()
                if "unreachable" not in str(err):
                    raise
            else:
                raise AssertionError("the pipeline finished: the server was killed too late (raise --count)")
            watcher.join(timeout=10)
            return failed - killed["at"], killed["written"]
        finally:
            server.stop()


def one_bundle_before(dead_url: str, numbers: list[str]) -> float:
    """One bundle's whole retry budget under the old rule, against a port nobody listens on."""
    old = Retry(total=5, connect=5, read=5, status=5, other=0, backoff_factor=0.5, status_forcelist=RETRY_STATUSES,
                allowed_methods=None, respect_retry_after_header=True, raise_on_status=False)
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": consent(n), "request": {"method": "PUT", "url": f"Consent/{consent(n)['id']}"}} for n in numbers]}
    with requests.Session() as session:
        session.mount("http://", HTTPAdapter(max_retries=old))
        started = time.perf_counter()
        try:
            session.post(dead_url, data=json.dumps(bundle), headers={"Content-Type": "application/fhir+json"},
                         timeout=60)
        except requests.ConnectionError:
            pass
        return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # the retries' warnings and Beam's traceback are expected here
    numbers = nhs.synthetic_numbers(args.count, seed=11).to_pylist()
    bundles = -(-args.count // args.batch_size)
    now, before = [], []
    for run in range(args.runs):
        seconds, written = time_to_fail_now(numbers, args.batch_size)
        from dev.service import free_port

        per_bundle = one_bundle_before(f"http://127.0.0.1:{free_port()}/fhir", numbers[: args.batch_size])
        left = bundles - written // args.batch_size
        now.append(seconds)
        before.append(per_bundle * left)
        print(f"run {run + 1}: killed with {written} stored, {left} bundles left; now fails in {seconds:.2f} s; "
              f"before: {per_bundle:.2f} s a bundle x {left} = {before[-1]:.0f} s")
    now_med, before_med = statistics.median(now), statistics.median(before)
    print(f"median of {args.runs}: time to fail now {now_med:.2f} s, before {before_med:.0f} s "
          f"({before_med / 60:.1f} min); ratio before/now {before_med / now_med:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
