"""What ``ndop verify`` costs, against the store's own paged read of the same Consents, and what ``ndop run
--verify-sample`` adds to a daily run.

Starts its own sekmet server, writes N Consents and a ledger describing them (the pipeline's own builder and
``decide()``), then alternates, ``--runs`` times: (a) ``verify()`` of the whole ledger (batch Bundles of GETs by id,
compared with the ledger), (b) the baseline, a paged search reading the same Consents (``_count=1000``), and
(c) ``verify(sample=100)``, the default sample of a run. Prints per-run figures, the medians and the ratio a / b.

    .venv/bin/python bench/bench_verify.py [--count 20000] [--runs 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402

from dev.fhir_server import FhirServer  # noqa: E402
from pipeline.ledger import versions as ledger_dirs  # noqa: E402
from pipeline.core import nhs  # noqa: E402
from pipeline.fhir.config import FhirClientConfig  # noqa: E402
from pipeline.fhir.search import iter_search, post_bundle  # noqa: E402
from pipeline.fhir.sessions import open_session  # noqa: E402
from pipeline.lifecycle.state import WorkDir  # noqa: E402
from pipeline.ledger.verify import verify  # noqa: E402
from transforms import ledger_join as ledger
from transforms import shards  # noqa: E402
from bench.generate import bench_key  # noqa: E402
from transforms.build_consent import build_consent  # noqa: E402
from transforms.join import classify  # noqa: E402
from transforms.vocabulary import NOT_OPTED_OUT  # noqa: E402
from transforms.write_consents import build_bundle  # noqa: E402

CHECKED_AT = "2026-12-01T06:00:00Z"
BENCH_KEY = bench_key()


def load(base_url: str, work_dir: WorkDir, count: int) -> None:
    numbers = nhs.synthetic_numbers(count, seed=77).to_pylist()
    with open_session(FhirClientConfig(base_url)) as session:
        for start in range(0, count, 500):
            consents = [build_consent(n, NOT_OPTED_OUT, CHECKED_AT, consent_id=BENCH_KEY.consent_id(n))
                        for n in numbers[start:start + 500]]
            post_bundle(session, base_url, build_bundle(consents, "batch", "id")).raise_for_status()
    ints = shards.to_int64(pa.array(numbers, pa.string()))
    decided = ledger.decide(classify(ints, ints), ledger.empty_ledger(), CHECKED_AT, "BENCH", BENCH_KEY, refresh_days=0)
    pending = ledger_dirs.pending_folder(work_dir, "BENCH")
    ledger_dirs.write_part(pending, "part-00000.parquet", decided.ledger)
    ledger_dirs.finish(str(pending), {"request_id": "BENCH", "checked_at": CHECKED_AT,
                                      "counts": {"ledger_rows": count}}, base_url, BENCH_KEY.fingerprint)
    ledger_dirs.promote(work_dir, "BENCH")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, FhirServer(Path(tmp) / "fhir") as server:
        work_dir = WorkDir(Path(tmp) / "work").ensure()
        started = time.monotonic()
        load(server.base_url, work_dir, args.count)
        print(f"loaded {args.count:,} Consents and their ledger in {time.monotonic() - started:.1f} s")
        config = FhirClientConfig(server.base_url)
        full, paged, sample = [], [], []
        for run in range(1, args.runs + 1):
            started = time.monotonic()
            result = verify(work_dir, config)
            full.append(time.monotonic() - started)
            assert result.checked == args.count and not result.mismatches, result.counts()
            started = time.monotonic()
            with open_session(config) as session:
                read = sum(1 for _ in iter_search(session, server.base_url, "Consent", {"_count": 1000}))
            paged.append(time.monotonic() - started)
            assert read >= args.count
            started = time.monotonic()
            verify(work_dir, config, sample=100)
            sample.append(time.monotonic() - started)
            print(f"run {run}: verify all {full[-1]:.2f} s ({args.count / full[-1]:,.0f}/s); paged read "
                  f"{paged[-1]:.2f} s ({args.count / paged[-1]:,.0f}/s); verify --sample 100: {sample[-1]:.3f} s")
        a, b, c = statistics.median(full), statistics.median(paged), statistics.median(sample)
        print(f"medians of {args.runs}: verify {a:.2f} s vs paged read {b:.2f} s: ratio {a / b:.2f}; "
              f"a run's --verify-sample 100 adds {c:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
