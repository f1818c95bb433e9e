"""How much WriteConsents (Beam, FnApiRunner) costs over posting the same bundles by hand.

Starts its own sekmet server, creates N Consents once (warm-up, plain requests), then alternates
the baseline (one requests.Session, bundles of B PUT-by-id entries, json.dumps) and WriteConsents
(same bundle size and type) on the same Consents, so both measure updates. Both sides start from the
NHS numbers and build the Consent dicts inside the timed part: ``beam.Create`` of 10,000 nested dicts
alone costs about 5-6 s here (type inference and coding of the literal), which a real pipeline never
pays (its Consents come from a Map), so it would measure the test source instead of the writer. Prints per-run rates,
the medians and the ratio WriteConsents / baseline (target: <= 1.5).

    .venv/bin/python bench/bench_fhir_write.py [--server sekmet|hapi] [--count 10000] [--batch-size 500] [--runs 3]

``--server hapi`` runs the same against the HAPI FHIR JPA server (``dev/hapi``, built by setup_env.sh),
with HAPI's validator on every write; its timed runs re-PUT unchanged Consents, which HAPI answers 200
without storing a new version.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import apache_beam as beam  # noqa: E402
import requests  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from dev.fhir_server import FhirServer  # noqa: E402
from dev.hapi_server import HapiServer  # noqa: E402
from pipeline.core import nhs  # noqa: E402
from pipeline.fhir.config import FhirClientConfig  # noqa: E402
from bench.generate import bench_key  # noqa: E402
from transforms.build_consent import build_consent  # noqa: E402
from transforms.vocabulary import OPTED_OUT  # noqa: E402
from transforms.provenance import ProvenanceSettings  # noqa: E402
from transforms.write_consents import WriteConsents  # noqa: E402

BENCH_KEY = bench_key()

CHECKED_AT = "2024-11-26T10:00:00Z"


def consent(number: str) -> dict:
    """The Consent the pipeline writes (transforms/build_consent.py), on both sides of the comparison."""
    return build_consent(number, OPTED_OUT, CHECKED_AT, consent_id=BENCH_KEY.consent_id(number))


def baseline(base_url: str, numbers: list[str], batch_size: int) -> float:
    started = time.perf_counter()
    consents = [consent(n) for n in numbers]
    with requests.Session() as session:
        for start in range(0, len(consents), batch_size):
            chunk = consents[start:start + batch_size]
            bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
                {"resource": c, "request": {"method": "PUT", "url": f"Consent/{c['id']}"}} for c in chunk]}
            response = session.post(base_url, data=json.dumps(bundle),
                                    headers={"Content-Type": "application/fhir+json"}, timeout=120)
            response.raise_for_status()
            bad = [e for e in response.json()["entry"] if not e["response"]["status"].startswith("20")]
            assert not bad, bad[:1]
    return time.perf_counter() - started


PROVENANCE = ProvenanceSettings(organisation="X26ABC1", request_id="X26ABC1-021226-0001", checked_at=CHECKED_AT,
                                reply_message_id="BENCH")


def with_beam(base_url: str, numbers: list[str], batch_size: int, provenance: bool = False) -> float:
    started = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions(runner="FnApiRunner")) as p:
        consents = p | "Numbers" >> beam.Create(numbers, reshuffle=False) | "BuildConsent" >> beam.Map(consent)
        result = consents | WriteConsents(
            FhirClientConfig(base_url, timeout=120), batch_size=batch_size,
            provenance=PROVENANCE if provenance else None)
        result[WriteConsents.DEAD_LETTER] | beam.Map(_no_dead_letters)
    return time.perf_counter() - started


def _no_dead_letters(record: dict) -> None:
    raise AssertionError(f"dead letter: HTTP {record['status']} {record['reason']}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--server", choices=("sekmet", "hapi"), default="sekmet")
    parser.add_argument("--no-validate", action="store_true",
                        help="hapi: without HAPI's validator on write (it costs ~0.1-0.2 s a resource in HAPI 8.8)")
    parser.add_argument("--provenance", action="store_true",
                        help="also time WriteConsents with one Provenance per bundle; ratio vs without")
    args = parser.parse_args()
    server_class = (functools.partial(HapiServer, validate=not args.no_validate) if args.server == "hapi"
                    else FhirServer)
    consents = nhs.synthetic_numbers(args.count, seed=7).to_pylist()
    with tempfile.TemporaryDirectory() as data, server_class(data) as server:
        print(f"server: {args.server}{' (no validator)' if args.no_validate else ''}, {args.count:,} Consents, "
              f"bundles of {args.batch_size}", flush=True)
        warm = baseline(server.base_url, consents, args.batch_size)
        print(f"warm-up (creates): {args.count / warm:,.0f}/s", flush=True)
        plain, piped, proved = [], [], []
        for run in range(args.runs):
            plain.append(baseline(server.base_url, consents, args.batch_size))
            piped.append(with_beam(server.base_url, consents, args.batch_size))
            line = (f"run {run + 1}: baseline {plain[-1]:.2f} s ({args.count / plain[-1]:,.0f}/s), "
                    f"WriteConsents {piped[-1]:.2f} s ({args.count / piped[-1]:,.0f}/s)")
            if args.provenance:
                proved.append(with_beam(server.base_url, consents, args.batch_size, provenance=True))
                line += f", with Provenance {proved[-1]:.2f} s ({args.count / proved[-1]:,.0f}/s)"
            print(line, flush=True)
    base_med, beam_med = statistics.median(plain), statistics.median(piped)
    print(f"median of {args.runs}: baseline {base_med:.2f} s, WriteConsents {beam_med:.2f} s, "
          f"ratio {beam_med / base_med:.2f} (target <= 1.5)")
    if proved:
        prov_med = statistics.median(proved)
        print(f"median of {args.runs}: WriteConsents with Provenance {prov_med:.2f} s, "
              f"ratio {prov_med / beam_med:.2f} vs without")
    return 0


if __name__ == "__main__":
    sys.exit(main())
