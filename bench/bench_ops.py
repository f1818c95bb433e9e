"""What the operator outputs add to every ``ndop run``: runs.jsonl line, report.html, index.html, metrics file.

Each measurement is a fresh Python process (as every ``ndop run`` is), so matplotlib's import is counted.
The work dir holds N earlier runs (synthetic figures, no NHS numbers). Baseline, measured in the same run:
a fresh process importing apache_beam, which every ``ndop run`` that processes a reply already pays.
Prints each repeat, the medians and the ratio outputs / baseline.

    .venv/bin/python bench/bench_ops.py [--runs-in-log 30 365] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.ops.runlog import append_run, run_entry  # noqa: E402
from pipeline.lifecycle.state import WorkDir  # noqa: E402

REQUEST = "X26ABC1-010126-0001"
OUTPUTS = f"""
import sys
from pipeline.ops.outputs import RunOutcome, after_run  # noqa: E402
from pipeline.ops.runlog import load_report  # noqa: E402
from pipeline.lifecycle.state import WorkDir
work = WorkDir(sys.argv[1])
after_run(work, RunOutcome(0, {REQUEST!r}, "done", load_report(work, {REQUEST!r})), "2026-01-01T06:00:00Z", 1.0,
          metrics_file=sys.argv[1] + "/ndop.prom")
"""
BASELINE = "import apache_beam"


def report(i: int) -> dict:
    return {"request_id": REQUEST, "state": "acknowledged", "cohort": {"read": 1_000_000, "sent": 999_000},
            "results": {"requested": 999_000, "opted_out": 50_000 + i, "not_opted_out": 949_000 - i, "written": 999_000,
                        "failed": i % 7 == 0, "refused": 0},
            "changes": {"newly_opted_out": 100 + i % 13, "opt_out_withdrawn": 20 + i % 5},
            "stage_seconds": {"request": 5.5, "send": 1.2, "wait_for_ndop": 3600 + i, "poll": 0.4, "process": 110.0}}


def prepare(root: Path, runs: int) -> WorkDir:
    import json

    work = WorkDir(root)
    work.ensure()
    folder = work.request_dir(REQUEST)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report(runs)))
    for i in range(runs):
        day = f"2026-{1 + i // 28 % 12:02d}-{1 + i % 28:02d}T06:00:00Z"
        append_run(work, run_entry(0 if i % 10 else 3, f"X26ABC1-{i:06d}-0001", "done", report(i), day, day, 120.0))
    return work


def timed(code: str, *args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, check=True, env={"PYTHONPATH": str(ROOT)})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs-in-log", type=int, nargs="+", default=[30, 365])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        baseline = [timed(BASELINE) for _ in range(args.repeats)]
        print(f"baseline (fresh process, import apache_beam): {', '.join(f'{t:.2f}' for t in baseline)} s; "
              f"median {statistics.median(baseline):.2f} s")
        for runs in args.runs_in_log:
            root = Path(tmp) / f"work-{runs}"
            prepare(root, runs)
            times = [timed(OUTPUTS, str(root)) for _ in range(args.repeats)]
            size = (root / "index.html").stat().st_size
            print(f"outputs with {runs} earlier runs (runs.jsonl + report.html + index.html {size // 1024} KiB + metrics): "
                  f"{', '.join(f'{t:.2f}' for t in times)} s; median {statistics.median(times):.2f} s; "
                  f"ratio vs baseline {statistics.median(times) / statistics.median(baseline):.2f}x")


if __name__ == "__main__":
    main()
