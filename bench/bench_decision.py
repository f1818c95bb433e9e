"""The daily decision at national scale: the pipeline's against a pyarrow-only implementation of the same decision.

    PYTHONPATH=. python -m bench.bench_decision [--patients 10000000] [--changed 1000] [--runs 1]

Inputs (bench/bench_delta.py's ``prepare``, under ``bench/out/``): a cohort of ``--patients``, the ledger day 0's
run left, day 1's reply with ``--changed`` statuses flipped. Each trial runs in its own process, which reports its
wall time and peak memory (VmHWM):

(a) the pipeline (FnApiRunner, ``--shards 32``): read the manifest, the reply and the previous ledger, the
    three-way join, :func:`transforms.ledger_join.decide` per shard, build the changed Consents, write the new
    ledger (bench_delta's ``nofhir`` trial, ``--refresh_days 0``);
(b) the baseline written here with pyarrow alone (no Beam, no shards): read the same three inputs into
    tables, ``is_in`` for the NDOP rule, a hash join with the ledger, the to-write set and the new ledger
    (one Parquet file). It decides what (a) decides for these inputs (no refresh, no newer answers in the
    ledger) and checks the same to-write count and ledger rows.

Medians of ``--runs``; ratio (a)/(b). Goal (issue 24): within 2x, peak under 2 GiB.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def pyarrow_decision(manifest: Path, reply: Path, ledger_dir: Path, out: Path, checked_at: str,
                     request_id: str) -> dict[str, Any]:
    """The same decision with pyarrow only: (to-write count, new-ledger rows)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as csv
    import pyarrow.parquet as pq

    from transforms.ledger_join import SCHEMA, epoch_seconds
    from bench.generate import bench_key

    consent_id = bench_key().consent_id

    requested = pc.unique(pq.read_table(manifest, columns=["nhs_number"]).column("nhs_number")
                          .combine_chunks().cast(pa.int64()))
    replied = csv.read_csv(reply, read_options=csv.ReadOptions(column_names=["n", "x"]),
                           convert_options=csv.ConvertOptions(column_types={"n": pa.int64()},
                                                              include_columns=["n"])).column("n")
    opted_out = pc.invert(pc.is_in(requested, value_set=replied.combine_chunks()))
    now = pa.scalar(epoch_seconds(checked_at), pa.int64()).cast(SCHEMA.field("checked_at").type)
    current = pa.table({"nhs_number": requested, "new_code": pc.cast(opted_out, pa.int8())})
    old = pq.read_table(sorted(str(p) for p in ledger_dir.glob("*.parquet")))
    old = old.set_column(old.schema.get_field_index("status"), "status",
                         pc.equal(old.column("status").cast(pa.string()), "active").cast(pa.int8()))
    old = old.set_column(old.schema.get_field_index("request_id"), "request_id",
                         old.column("request_id").cast(pa.string()))
    joined = current.join(old, keys="nhs_number", join_type="left outer")
    known = pc.is_valid(joined.column("status"))
    changed = pc.and_(known, pc.not_equal(joined.column("status"), joined.column("new_code")))
    write = pc.or_(pc.invert(known), changed)
    new_numbers = pc.filter(joined.column("nhs_number"), pc.invert(known))
    fresh_ids = pa.array([consent_id(f"{n:010d}") for n in new_numbers.to_pylist()], pa.string())
    ids = joined.column("consent_id").combine_chunks()
    if len(fresh_ids):
        ids = pc.replace_with_mask(ids, pc.invert(known), fresh_ids)
    keep_since = pc.and_(known, pc.invert(changed))
    request = pa.scalar(request_id, pa.string())
    status = pc.if_else(pc.equal(joined.column("new_code"), 1), "active", "inactive")
    current_rows = pa.table({
        "nhs_number": joined.column("nhs_number"),
        "status": status.dictionary_encode(),
        "status_since": pc.if_else(keep_since, joined.column("status_since"), now),
        "checked_at": pc.fill_null(pa.nulls(joined.num_rows, now.type), now),
        "written_at": pc.if_else(write, now, joined.column("written_at")),
        "consent_id": ids,
        "request_id": pc.if_else(write, request, joined.column("request_id")).dictionary_encode(),
    })
    left = old.filter(pc.invert(pc.is_in(old.column("nhs_number"), value_set=requested)))
    left = left.set_column(left.schema.get_field_index("status"), "status",
                           pc.if_else(pc.equal(left.column("status"), 1), "active", "inactive").dictionary_encode())
    left = left.set_column(left.schema.get_field_index("request_id"), "request_id",
                           left.column("request_id").dictionary_encode())
    new_ledger = pa.concat_tables([current_rows, left.select(current_rows.column_names)], promote_options="permissive")
    pq.write_table(new_ledger, out, compression="zstd")
    return {"to_write": int(pc.sum(write).as_py() or 0), "ledger_rows": new_ledger.num_rows}


def trial(argv: list[str]) -> dict[str, Any]:
    from bench.bench_delta import _peak_mb

    manifest, reply, ledger_dir, out, checked_at, request_id = argv
    start = time.perf_counter()
    found = pyarrow_decision(Path(manifest), Path(reply), Path(ledger_dir), Path(out), checked_at, request_id)
    return {"seconds": time.perf_counter() - start, "peak_mb": _peak_mb(), **found}


def main() -> None:
    from bench.bench_delta import DAY1, OUT, _argv, prepare, run_trial

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=10_000_000)
    parser.add_argument("--changed", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--trial", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial:
        print(json.dumps(trial(args.extra)))
        return
    t = time.perf_counter()
    inputs = prepare(args.patients, args.changed, args.shards)
    print(f"inputs: {args.patients:,} patients, a {args.patients:,}-row ledger, {args.changed:,} statuses flipped "
          f"(prepared in {time.perf_counter() - t:.0f}s)", flush=True)
    ours, base = [], []
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        for run in range(args.runs):
            work = Path(tmp) / str(run)
            ours.append(run_trial("nofhir", _argv(inputs, inputs["reply1"], work / "d", args.shards, [
                f"--ledger_in={inputs['ledger0']}", f"--ledger_out={work / 'ledger1'}", "--refresh_days=0"])))
            done = subprocess.run([sys.executable, "-m", "bench.bench_decision", "--trial", "--",
                                   str(inputs["manifest"]), str(inputs["reply1"]), str(inputs["ledger0"]),
                                   str(work / "pyarrow-ledger.parquet"), DAY1, "DAY1"],
                                  cwd=REPO_ROOT, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
            if done.returncode:
                raise SystemExit(f"pyarrow trial failed:\n{done.stderr[-3000:]}")
            base.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"run {run + 1}: pipeline {ours[-1]['seconds']:.1f}s {ours[-1]['peak_mb']:,.0f} MB "
                  f"(to write {ours[-1]['ledger_to_write']:,}); pyarrow {base[-1]['seconds']:.1f}s "
                  f"{base[-1]['peak_mb']:,.0f} MB (to write {base[-1]['to_write']:,}, "
                  f"ledger {base[-1]['ledger_rows']:,} rows)", flush=True)
            assert ours[-1]["ledger_to_write"] == base[-1]["to_write"] == args.changed
            assert base[-1]["ledger_rows"] == args.patients
    a = statistics.median(r["seconds"] for r in ours)
    b = statistics.median(r["seconds"] for r in base)
    am = statistics.median(r["peak_mb"] for r in ours)
    bm = statistics.median(r["peak_mb"] for r in base)
    print(f"median of {args.runs}: (a) pipeline {a:.1f}s, peak {am:,.0f} MB; (b) pyarrow-only {b:.1f}s, peak "
          f"{bm:,.0f} MB; ratio (a)/(b) {a / b:.2f}x time (goal <= 2x), {am / bm:.2f}x memory; "
          f"peak goal < 2048 MB: {'met' if am < 2048 else 'NOT met'}")


if __name__ == "__main__":
    main()
