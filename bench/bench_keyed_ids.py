"""What keyed Consent ids cost: a million ids (and a million Consents built) under the key, against the old unkeyed
UUIDv5 rule, alternated in the same run.

    PYTHONPATH=. .venv/bin/python -m bench.bench_keyed_ids --count 1000000 --runs 5
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

from pipeline.core import nhs
from transforms.build_consent import build_consent
from transforms.consent_ids import generate_key, parse_key, unkeyed_consent_id
from transforms.vocabulary import NOT_OPTED_OUT

CHECKED_AT = "2026-12-01T06:00:00Z"


def timed(numbers: list[str], rule: Callable[[str], str], build: bool) -> float:
    start = time.perf_counter()
    if build:
        for number in numbers:
            build_consent(number, NOT_OPTED_OUT, CHECKED_AT, consent_id=rule(number))
    else:
        for number in numbers:
            rule(number)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    numbers = nhs.synthetic_numbers(args.count, seed=2112, prefix="9").to_pylist()
    key = parse_key(generate_key(), "bench")
    for build in (False, True):
        keyed, unkeyed = [], []
        for _ in range(args.runs):
            unkeyed.append(timed(numbers, unkeyed_consent_id, build))
            keyed.append(timed(numbers, key.consent_id, build))
        k, u = statistics.median(keyed), statistics.median(unkeyed)
        what = "Consents built" if build else "ids alone"
        print(f"{what}, {args.count:,} ({args.runs} runs, medians): keyed {k:.2f}s, unkeyed UUIDv5 {u:.2f}s; "
              f"ratio {k / u:.2f}x; keyed costs {(k - u) / args.count * 1e6:.2f} s more per million")


if __name__ == "__main__":
    main()
