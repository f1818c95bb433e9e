"""Issue 24 bench (c): how the FHIR writes spread on Flink at parallelism 2 and 4, up to 1M Consents.

    PYTHONPATH=. python -m bench.bench_spread [--patients 20000] [--parallelism 2 4] [--shards 2]
        [--batch-size 100] [--hold 0] [--max-writers 2] [--baseline /work/main]
        [--timeline docs/img/flink_spread.json] [--plot docs/img/flink_spread.svg]

A 4-slot local Flink session cluster (dev/flink.py) and, per job, a fresh local FHIR server (sekmet, so every
job writes into an empty store) behind the counting proxy of tests/fixtures/fhir_proxy.py; each job is
``python -m pipeline.beam.graph`` (a first load: every Consent created) run by ``.venv-flink`` from this
checkout and, with ``--baseline``, from that checkout (e.g. main before a change), on fresh numbers each time.
Jobs: each checkout at each ``--parallelism``; then, for each ``--max-writers N``, each checkout at the
largest parallelism with ``--max_writers=N`` (``--max-writers`` with no number: none).

Per job: wall time, Consents/s, the most Bundle POSTs in flight at once and their mean over the writes (the
spread); what the proxy itself costs (its CPU share of one core, and its own time per bundle on top of the
store's answer), so a slow proxy would show; the peak memory (VmHWM) of sekmet, the Flink TaskManager and the
job's Python process (LOOPBACK: the SDK workers run in it). ``--timeline`` keeps every Bundle POST's
(arrival, answer) in seconds from the job's first POST; ``--plot`` draws Bundles in flight over time from it.
More than 900,000 patients do not fit the 999 range: the numbers are then drawn from 9000000000-9999999999
(never issued), as bench/generate.py does.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import requests

from bench.generate import bench_key
from dev.fhir_server import FhirServer
from dev.service import exit_on_termination
from dev.flink import FLINK_PYTHON, FOUR_SLOTS, FlinkCluster, flink_args
from pipeline.request import datfile
from pipeline.core import nhs
from pipeline.core.files import private_dir, write_bytes
from tests.fixtures.fhir_proxy import FaultProxy

REPO_ROOT = Path(__file__).resolve().parent.parent
PROGRESS_EVERY = 60.0  # seconds between progress lines on stderr
SAMPLE_EVERY = 2.0  # seconds between memory samples
# At 300k the 4-slot TaskManager of dev/flink.py died 10-40 s into the writes (a Task's Error went unreported: "FATAL -
# exception in resource cleanup", IllegalStateException in Task.notifyFinalState), twice out of three starts; its direct
# memory is only the network buffers plus 128m of framework off-heap, which Beam's gRPC data plane shares. Task
# off-heap memory of its own (and a little more heap), as a deployment would give a Beam job:
BENCH_TASKMANAGER = {**FOUR_SLOTS, "taskmanager.memory.process.size": "3328m",
                     "taskmanager.memory.task.off-heap.size": "512m"}


def inputs(folder: Path, patients: int, seed: int) -> None:
    folder = private_dir(folder)
    numbers = nhs.synthetic_numbers(patients, seed=seed, prefix="999" if patients <= 900_000 else "9")
    pq.write_table(pa.table({"nhs_number": numbers}), folder / "manifest.parquet")
    os.chmod(folder / "manifest.parquet", 0o600)
    write_bytes(folder / "reply.dat", datfile.encode(numbers.slice(0, patients * 19 // 20), "crlf"))


class TimedProxy(FaultProxy):
    """The counting proxy, also keeping each Bundle POST's (arrival, answer) and the time spent waiting on the
    store, so the proxy's own cost per bundle (handling minus upstream) can be told apart from the store's."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.events: list[tuple[float, float]] = []
        self.upstream_seconds = 0.0

    def __enter__(self) -> "TimedProxy":
        super().__enter__()
        return self

    def forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> requests.Response:
        started = time.monotonic()
        try:
            return super().forward(method, path, headers, body)
        finally:
            if method == "POST":
                with self._lock:
                    self.upstream_seconds += time.monotonic() - started

    def _answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[
            int, dict[str, str], bytes]:
        arrived = time.monotonic()
        try:
            return super()._answer(method, path, headers, body)
        finally:
            if method == "POST" and path.split("?")[0].rstrip("/") == self._base_path:
                with self._lock:
                    self.events.append((arrived, time.monotonic()))


def peak_rss_mib(pid: int | None) -> float:
    """The process's peak resident memory so far (VmHWM), in MiB; 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, TypeError):
        pass
    return 0.0


class Progress:
    """While a job runs: a progress line on stderr every minute."""

    def __init__(self, label: str, proxy: TimedProxy) -> None:
        self.label, self.proxy = label, proxy
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(PROGRESS_EVERY):
            print(f"  {self.label}: {time.monotonic() - started:.0f} s, {self.proxy.bundle_posts} bundles posted, "
                  f"{self.proxy.in_flight} in flight", file=sys.stderr, flush=True)

    def __enter__(self) -> "Progress":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def job(cluster: FlinkCluster, code: Path, parallelism: int, folder: Path, fhir_url: str, args: argparse.Namespace,
        extra: list[str], pids: dict[str, int | None]) -> tuple[float, dict[str, float]]:
    argv = [*flink_args(cluster, parallelism), f"--manifest={folder / 'manifest.parquet'}",
            f"--reply={folder / 'reply.dat'}", "--checked_at=2026-03-01T10:00:00Z", f"--output_dir={folder}",
            f"--fhir_url={fhir_url}", "--fhir_auth=none", f"--shards={args.shards}",
            f"--batch_size={args.batch_size}", "--no_provenance", *extra]
    started = time.perf_counter()
    with open(folder / "job.log", "w") as log:
        process = subprocess.Popen([str(FLINK_PYTHON), "-m", "pipeline.beam.graph", *argv], cwd=code,
                                   env={**os.environ, "PYTHONPATH": str(code)}, stdout=log, stderr=subprocess.STDOUT)
        try:
            peaks = {"job": 0.0, **{name: 0.0 for name in pids}}
            while process.poll() is None:
                for name, pid in {"job": process.pid, **pids}.items():
                    peaks[name] = max(peaks[name], peak_rss_mib(pid))
                if time.perf_counter() - started > args.timeout:
                    raise SystemExit(f"{code} at parallelism {parallelism}: no end after {args.timeout:.0f} s")
                time.sleep(SAMPLE_EVERY)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    seconds = time.perf_counter() - started
    if process.returncode:
        kept = Path(tempfile.gettempdir()) / f"bench-spread-failed-p{parallelism}.log"
        kept.write_text((folder / "job.log").read_text())
        shutil.copytree(cluster.folder / "log", kept.with_suffix(".flink"), dirs_exist_ok=True)
        raise SystemExit(f"{code} at parallelism {parallelism} failed (its log: {kept}, Flink's in {kept.stem}.flink): "
                         f"{(folder / 'job.log').read_text()[-1500:]}")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["ok"] and summary["counts"]["written"] == args.patients, summary["counts"]
    return seconds, peaks


def plot(timeline: dict[str, Any], path: Path) -> None:
    """Bundles in flight over time (mean per bin) for each job, one line each, small enough for the docs."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # text as text: a small SVG
    import matplotlib.pyplot as plt

    fig, (ax, done) = plt.subplots(1, 2, figsize=(9, 3.2), gridspec_kw={"width_ratios": [3, 2]})
    for label, events in timeline["jobs"].items():
        end = max(answered for _, answered in events)
        width = max(end / 150, 1.0)  # about 150 points a line
        bins = [0.0] * (int(end / width) + 1)
        for arrived, answered in events:  # seconds each bin had a POST in flight, summed over the POSTs
            first, last = int(arrived / width), int(answered / width)
            for b in range(first, last + 1):
                bins[b] += min(answered, (b + 1) * width) - max(arrived, b * width)
        ax.step([b * width / 60 for b in range(len(bins))], [s / width for s in bins], where="post", label=label,
                linewidth=1.2)
        answers = sorted(answered for _, answered in events)
        step = max(len(answers) // 150, 1)
        done.plot([a / 60 for a in answers[::step]], [100 * i / len(answers) for i in range(0, len(answers), step)],
                  label=label, linewidth=1.2)
    ax.set_xlabel("minutes from the job's first Bundle POST")
    ax.set_ylabel("Bundle POSTs in flight (mean per bin)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower center", fontsize=8)
    done.set_xlabel("minutes from the job's first Bundle POST")
    done.set_ylabel("% of Bundles answered")
    done.grid(alpha=0.3)
    fig.suptitle(timeline["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, metadata={"Date": None} if path.suffix == ".svg" else None)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=20_000)
    parser.add_argument("--parallelism", type=int, nargs="+", default=[2, 4], choices=[1, 2, 3, 4])
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--hold", type=float, default=0.0,
                        help="seconds the proxy holds each Bundle POST (a slower store: its latency per bundle)")
    parser.add_argument("--max-writers", type=int, nargs="*", default=[2],
                        help="a capped job per number, at the largest parallelism (none without a number)")
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to run the same jobs from")
    parser.add_argument("--timeout", type=float, default=4 * 3600.0, help="seconds a job may take")
    parser.add_argument("--timeline", type=Path, default=None, help="JSON file for every job's Bundle POST times")
    parser.add_argument("--plot", type=Path, default=None, help="SVG/PNG of Bundles in flight over time")
    args = parser.parse_args()
    exit_on_termination()  # SIGTERM/SIGHUP: the with blocks stop Flink and sekmet
    bench_key()  # the Consent id key every job reads (NDOP_ID_KEY, made fresh unless set)
    codes = {"this": REPO_ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    runs: list[tuple[str, int, list[str]]] = [(name, p, []) for p in args.parallelism for name in codes]
    runs += [(name, max(args.parallelism), [f"--max_writers={n}"]) for n in args.max_writers for name in codes]
    rows = []
    title = (f"{args.patients:,} Consents, Flink 1.19 local (4 slots, LOOPBACK), sekmet; "
             f"--batch_size {args.batch_size}, hold {args.hold} s")
    timeline: dict[str, Any] = {"title": title, "jobs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-spread-") as tmp, \
            FlinkCluster(Path(tmp) / "flink", slots=4, config=BENCH_TASKMANAGER) as cluster:
        for seed, (name, parallelism, extra) in enumerate(runs, start=7100):
            folder = Path(tmp) / f"{name}-{parallelism}-{len(extra)}"
            inputs(folder, args.patients, seed)
            label = f"{name} p{parallelism}{' ' + ' '.join(extra) if extra else ''}"
            with FhirServer(Path(tmp) / f"fhir-{seed}") as server, TimedProxy(server.base_url) as proxy:
                proxy.delay = args.hold
                pids = {"sekmet": server.pid, "taskmanager": cluster.taskmanager.pid}
                cpu = time.process_time()
                with Progress(label, proxy):
                    seconds, peaks = job(cluster, codes[name], parallelism, folder, proxy.url, args, extra, pids)
                proxy_cpu = time.process_time() - cpu  # this process runs the proxy and little else
                span = proxy.last_answer - proxy.first_post
                overhead = (proxy.busy_seconds - args.hold * proxy.bundle_posts - proxy.upstream_seconds)
                rows.append({"code": name, "parallelism": parallelism, "extra": " ".join(extra),
                             "seconds": round(seconds, 1), "consents_per_s": round(args.patients / seconds),
                             "write_span_s": round(span, 1), "max_in_flight": proxy.max_in_flight,
                             "mean_in_flight": round(proxy.mean_in_flight(), 2), "bundles": proxy.bundle_posts,
                             "proxy_cpu_share": round(proxy_cpu / span, 3) if span > 0 else None,
                             "proxy_ms_per_bundle": round(1000 * overhead / max(proxy.bundle_posts, 1), 1),
                             "store_ms_per_bundle": round(1000 * proxy.upstream_seconds
                                                          / max(proxy.bundle_posts, 1), 1),
                             **{f"peak_mib_{k}": round(v) for k, v in peaks.items()}})
                timeline["jobs"][label] = [(round(a - proxy.first_post, 3), round(b - proxy.first_post, 3))
                                           for a, b in proxy.events]
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{title}; --shards {args.shards}; one run each, a fresh sekmet per job "
          f"(the machine is shared: wall times are noisy)")
    print(f"{'code':9} {'par':>3} {'extra':16} {'s':>7} {'/s':>6} {'max in flight':>13} {'mean':>5} {'bundles':>7} "
          f"{'proxy cpu':>9} {'proxy ms':>8} {'store ms':>8}")
    for r in rows:
        print(f"{r['code']:9} {r['parallelism']:>3} {r['extra']:16} {r['seconds']:>7} {r['consents_per_s']:>6} "
              f"{r['max_in_flight']:>13} {r['mean_in_flight']:>5} {r['bundles']:>7} {r['proxy_cpu_share']:>9} "
              f"{r['proxy_ms_per_bundle']:>8} {r['store_ms_per_bundle']:>8}")
    if args.timeline:
        args.timeline.write_text(json.dumps({**timeline, "rows": rows}))
    if args.plot:
        plot(timeline, args.plot)


if __name__ == "__main__":
    main()
