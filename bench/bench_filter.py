"""What ``ndop filter`` costs against pyarrow's own anti-join on the same files, and a streaming rate.

Generates (once, under ``--dir``) a ledger of ``--patients`` synthetic patients (``--opted-out`` of them opted out,
checked today; ``ledger.json`` as a run writes it) and a ``--rows``-row Parquet dataset (an ``nhs_number`` text
column, 95% of rows drawn from the ledger's patients, 5% never checked, and a payload column). Then alternates,
``--runs`` times, each in its own process (peak RSS from ``wait4``):

- (a) ``ndop filter --ledger DIR --input data.parquet --output out.parquet`` on the local runner (FnApiRunner);
- (b) the baseline: pyarrow alone, the same rule: read both, ``is_in`` against the ledger's not-opted-out numbers,
  write the kept rows as Parquet.

Prints per-run figures, the medians, the ratio a / b, and checks both outputs hold the same rows. ``--stream N``
also times N records through ``ApplyOptOuts`` per element on Beam's Python direct runner in streaming mode
(``TestStream``, the ledger as a side input refreshed by ticks), records/s.

    .venv/bin/python bench/bench_filter.py [--rows 10000000] [--patients 10000000] [--runs 3] [--stream 20000]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline.core import nhs  # noqa: E402
from transforms.ledger_join import SCHEMA, STATUS_CODES  # noqa: E402

ROW_GROUP = 1_000_000


def generate(folder: Path, patients: int, rows: int, opted_out: float) -> None:
    ledger = folder / "ledger"
    if (ledger / "ledger.json").exists() and (folder / "data.parquet").exists():
        return
    started = time.monotonic()
    ledger.mkdir(parents=True, exist_ok=True)
    numbers = nhs.synthetic_numbers(patients + rows // 20 + 1, seed=23, prefix="9")
    known = nhs.to_int64(numbers.slice(0, patients))
    rng = np.random.default_rng(23)
    status = (rng.random(patients) < opted_out).astype(np.int8)
    now = int(datetime.now(timezone.utc).timestamp())
    ts = pa.array(np.full(patients, now, np.int64)).cast(pa.timestamp("s", tz="UTC"))
    table = pa.table({
        "nhs_number": pa.array(known, pa.int64()),
        "status": pa.DictionaryArray.from_arrays(pa.array(status, pa.int8()), pa.array(STATUS_CODES)),
        "status_since": ts, "checked_at": ts, "written_at": ts,
        "consent_id": pa.array(np.full(patients, "c", object), pa.string()),
        "request_id": pa.DictionaryArray.from_arrays(pa.array(np.zeros(patients, np.int32)), pa.array(["BENCH"])),
    }, schema=SCHEMA)
    pq.write_table(table, ledger / "part-00000.parquet", row_group_size=262_144, compression="zstd")
    (ledger / "ledger.json").write_text(json.dumps({
        "fhir_base_url": "http://bench/fhir", "request_id": "BENCH",
        "checked_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "rows": patients,
        "files": ["part-00000.parquet"]}))
    from_ledger = rng.integers(0, patients, rows - rows // 20)
    unknown = np.arange(patients, patients + rows // 20)
    picks = np.concatenate([from_ledger, unknown])
    rng.shuffle(picks)
    data = pa.table({"nhs_number": numbers.take(pa.array(picks)), "payload": pa.array(np.arange(rows), pa.int64())})
    pq.write_table(data, folder / "data.parquet", row_group_size=ROW_GROUP, compression="zstd")
    print(f"generated {patients} ledger rows and {rows} data rows in {time.monotonic() - started:.1f} s", flush=True)


BASELINE = r"""
import sys, time
import numpy as np, pyarrow as pa, pyarrow.compute as pc, pyarrow.parquet as pq
from pipeline.core import nhs
folder, out = sys.argv[1], sys.argv[2]
ledger = pq.read_table(f"{folder}/ledger/part-00000.parquet", columns=["nhs_number", "status"])
allowed = pc.filter(ledger.column("nhs_number"), pc.equal(ledger.column("status").cast(pa.string()), "inactive"))
data = pq.read_table(f"{folder}/data.parquet")
keys = pa.array(nhs.to_int64(data.column("nhs_number").combine_chunks()))
pq.write_table(data.filter(pc.is_in(keys, value_set=allowed.combine_chunks())), out, compression="zstd")
"""


def timed(cmd: list[str]) -> tuple[float, float]:
    """Seconds and peak RSS (GiB) of one child process."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - started
    if status != 0:
        raise SystemExit(f"{cmd[:4]} failed: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
    return seconds, usage.ru_maxrss / (1 << 20)


def stream_rate(count: int) -> float:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.transforms.window import TimestampedValue

    from transforms.apply_opt_outs import ApplyOptOuts, LedgerSource

    folder = Path(os.environ["BENCH_FILTER_LEDGER"])
    numbers = nhs.synthetic_numbers(count, seed=23, prefix="9").to_pylist()
    t0 = int(time.time())
    stream = TestStream().add_elements([TimestampedValue(t0, t0)], tag="ticks")
    for start in range(0, count, 1000):
        stream = stream.add_elements([TimestampedValue({"nhs": n}, t0 + 1) for n in numbers[start:start + 1000]],
                                     tag="main")
    stream = stream.advance_watermark_to_infinity(tag="main").advance_watermark_to_infinity(tag="ticks")
    started = time.monotonic()
    options = PipelineOptions(["--runner=BundleBasedDirectRunner", "--streaming"])
    with TestPipeline(options=options) as pipeline:
        streams = pipeline | stream
        result = streams["main"] | ApplyOptOuts(_nhs, source=LedgerSource(str(folder)), refresh_seconds=3600,
                                                ticks=streams["ticks"])
        _ = result[ApplyOptOuts.COUNTS] | beam.Map(print)
    return count / (time.monotonic() - started)


def _nhs(record: dict) -> str:
    return record["nhs"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--patients", type=int, default=10_000_000)
    parser.add_argument("--opted-out", type=float, default=0.05)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--stream", type=int, default=0, help="records for the streaming rate (0: skip)")
    parser.add_argument("--dir", default="/tmp/bench-filter", help="where the generated files are kept")
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = Path(args.dir) / f"{args.patients}-{args.rows}"
    folder.mkdir(parents=True, exist_ok=True)
    if args.generate_only:
        generate(folder, args.patients, args.rows, args.opted_out)
        return 0
    # Generated in a child: Linux keeps a process's peak RSS across fork and exec, so a parent that held the
    # generated tables would lend every measured child its own peak.
    subprocess.run([sys.executable, __file__, "--generate-only", "--rows", str(args.rows), "--patients",
                    str(args.patients), "--opted-out", str(args.opted_out), "--dir", args.dir], check=True)
    ours, theirs = [], []
    work = folder / "work"
    for run in range(args.runs):
        for out in (folder / "out.parquet", folder / "base.parquet"):
            out.unlink(missing_ok=True)
        a = timed([sys.executable, "-m", "pipeline.cli", "filter", "--work-dir", str(work), "--ledger",
                   str(folder / "ledger"), "--input", str(folder / "data.parquet"), "--output",
                   str(folder / "out.parquet"), "--runner=FnApiRunner"])
        b = timed([sys.executable, "-c", BASELINE, str(folder), str(folder / "base.parquet")])
        ours.append(a)
        theirs.append(b)
        print(f"run {run + 1}: ndop filter {a[0]:.1f} s, {a[1]:.2f} GiB peak; "
              f"pyarrow is_in {b[0]:.1f} s, {b[1]:.2f} GiB peak", flush=True)
    kept = pq.read_table(folder / "out.parquet", columns=["payload"]).column("payload").to_numpy()
    base = pq.read_table(folder / "base.parquet", columns=["payload"]).column("payload").to_numpy()
    assert np.array_equal(np.sort(kept), np.sort(base)), "ndop filter and the baseline kept different rows"
    manifest = json.loads((folder / "out.parquet.manifest.json").read_text())
    a_s = statistics.median(x[0] for x in ours)
    b_s = statistics.median(x[0] for x in theirs)
    print(f"rows in {manifest['rows_in']}, kept {manifest['kept']}, opted out {manifest['removed_opted_out']}, "
          f"unknown {manifest['removed_unknown']} (same rows as the baseline)")
    print(f"median of {args.runs}: ndop filter {a_s:.1f} s (peak {max(x[1] for x in ours):.2f} GiB), "
          f"pyarrow is_in {b_s:.1f} s (peak {max(x[1] for x in theirs):.2f} GiB), ratio {a_s / b_s:.2f}")
    if args.stream:
        os.environ["BENCH_FILTER_LEDGER"] = str(folder / "ledger")
        print(f"streaming, per element, direct runner: {stream_rate(args.stream):.0f} records/s "
              f"({args.stream} records, ledger of {args.patients})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
