"""How fast `ndop request` builds a national-scale request, and how much memory it takes.

Generates a cohort (default 10,000,000 numbers in the never-issued 9xx range, plus 0.1% invalid
entries, 1% duplicates and a few blank lines), then runs the request step in a fresh process
several times and prints the median seconds and peak RSS. The baseline, measured in the same run,
is the I/O floor: pyarrow reading the same file and writing its bytes back out.

    .venv/bin/python bench/bench_request.py [--size N] [--runs K] [--format text|csv]

``--format csv`` writes the cohort as a two-column CSV with a header (read by Python's csv module, as
people's CSV needs); its baseline is pyarrow reading and writing that CSV.

Target (issue 3): under 60 s and under 2 GiB for 10,000,000 numbers on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.request import datfile
from pipeline.core import nhs  # noqa: E402

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child would report the
# parent's peak (the cohort generator's) instead of its own.
_PEAK = """
def peak_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

_CHILD_REQUEST = """
import json, sys, time
sys.path.insert(0, {root!r})
{peak}
from pipeline.request.build import RequestSettings, build_request
from pipeline.lifecycle.state import WorkDir
t = time.perf_counter()
record = build_request({cohort!r}, WorkDir({work!r}), RequestSettings(mailbox="X26ABC1"))
print(json.dumps({{"seconds": time.perf_counter() - t, "peak_mib": peak_mib(),
                  "counts": record["counts"]}}))
"""

_CHILD_BASELINE = """
import json, sys, time
import pyarrow.csv as pacsv
{peak}
t = time.perf_counter()
table = pacsv.read_csv({cohort!r}, read_options=pacsv.ReadOptions(column_names={names!r}),
                       convert_options=pacsv.ConvertOptions(column_types={{{key!r}: "string"}}))
pacsv.write_csv(table, {out!r}, write_options=pacsv.WriteOptions(include_header=False))
print(json.dumps({{"seconds": time.perf_counter() - t, "peak_mib": peak_mib()}}))
"""


def make_cohort(path: Path, size: int, fmt: str = "text") -> None:
    numbers = nhs.synthetic_numbers(size, seed=42, prefix="9" if size > 900_000 else "999")
    rng = np.random.default_rng(1)
    dupes = pc.take(numbers, pa.array(rng.integers(0, size, size // 100)))
    body = datfile.encode(pa.concat_arrays([numbers, dupes]), "lf").replace(b",", b"")
    bad = b"".join(b"%09d\n" % i for i in range(size // 1000)) + b"\n\n"
    if fmt == "csv":
        path.write_bytes(b"nhs_number,flag\n" + (body + bad).replace(b"\n", b",1\n"))
    else:
        path.write_bytes(body + bad)


def child(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--format", choices=("text", "csv"), default="text")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="ndop-bench-request-"))
    try:
        cohort = scratch / ("cohort.csv" if args.format == "csv" else "cohort.txt")
        names = None if args.format == "csv" else ["v"]
        t = time.perf_counter()
        make_cohort(cohort, args.size, args.format)
        print(f"cohort: {args.size:,} numbers (+1% duplicates, 0.1% invalid), {cohort.stat().st_size / 2**20:.0f} MiB, "
              f"generated in {time.perf_counter() - t:.1f} s")
        ours, floor = [], []
        for run in range(args.runs):
            work = scratch / f"work{run}"
            ours.append(child(_CHILD_REQUEST.format(root=str(ROOT), cohort=str(cohort), work=str(work), peak=_PEAK)))
            floor.append(child(_CHILD_BASELINE.format(cohort=str(cohort), out=str(scratch / "copy.csv"), peak=_PEAK,
                                                      names=names, key="v" if names else "nhs_number")))
            shutil.rmtree(work)
        print(f"counts: {ours[-1]['counts']}")
        med = statistics.median(r["seconds"] for r in ours)
        med_floor = statistics.median(r["seconds"] for r in floor)
        peak = max(r["peak_mib"] for r in ours)
        print(f"ndop request : median {med:.2f} s over {args.runs} runs, peak RSS {peak:.0f} MiB")
        print(f"I/O baseline : median {med_floor:.2f} s (pyarrow read + write of the same file), "
              f"peak RSS {max(r['peak_mib'] for r in floor):.0f} MiB")
        print(f"ratio        : {med / med_floor:.1f}x the I/O baseline; target < 60 s and < 2048 MiB: "
              f"{'MET' if med < 60 and peak < 2048 else 'MISSED'}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
