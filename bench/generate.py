"""Synthetic inputs for the process bench: a manifest of N patients and an NDOP reply without 5% of them.

    python -m bench.generate --patients 1000000 --out bench/out/1000000
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.request import datfile
from pipeline.core import nhs
from pipeline.core.files import private_dir, write_bytes
from transforms.consent_ids import KEY_ENV, IdKey, configured_source, generate_key, read_source

MANIFEST = "manifest.parquet"
REPLY = "reply.dat"


def bench_key() -> IdKey:
    """The Consent id key a bench uses: the environment's, else a fresh one put into ``NDOP_ID_KEY`` (so the
    pipelines and trial processes it starts read the same key)."""
    if not configured_source():
        os.environ[KEY_ENV] = generate_key()
    return read_source(configured_source() or "")


def generate(out: Path, patients: int, opted_out: float = 0.05, seed: int = 20241126) -> tuple[Path, Path]:
    """Write (once; reused when present) ``manifest.parquet`` and ``reply.dat`` under ``out``."""
    out = private_dir(out)
    manifest, reply = out / MANIFEST, out / REPLY
    if manifest.exists() and reply.exists():
        return manifest, reply
    # the 999 range holds about 909,000 numbers; bigger runs use 9000000000-9999999999 (never issued)
    numbers = nhs.synthetic_numbers(patients, seed=seed, prefix="999" if patients <= 900_000 else "9")
    keep = np.random.default_rng(seed).random(patients) >= opted_out
    pq.write_table(pa.table({"nhs_number": numbers}), manifest)
    write_bytes(reply, datfile.encode(numbers.filter(pa.array(keep)), "crlf"))
    return manifest, reply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patients", type=int, default=1_000_000)
    parser.add_argument("--opted-out", type=float, default=0.05)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(*generate(args.out, args.patients, args.opted_out))


if __name__ == "__main__":
    main()
