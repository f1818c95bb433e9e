"""The process pipeline on Beam's Prism runner vs the in-process FnApiRunner, measured in the same run.

    PYTHONPATH=. python -m bench.bench_runners [--patients 1000000] [--fhir-patients 100000]
        [--runs 3] [--fhir-runs 1] [--shards 32] [--skip-fhir] [--flink]

(a) read + CoGroupByKey + classification of ``--patients`` on each runner; (b) the whole pipeline of
``--fhir-patients`` into a fresh local FHIR server (sekmet) on each runner. Every trial runs in its own
process (``bench.bench_process.run_trial``); figures are medians and the ratio is Prism / FnApiRunner.
Prism is the binary ``dev/build_prism.sh`` built (LOOPBACK harness: the SDK worker runs in the trial's
process, Prism's own process plans and moves the data between stages).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

from bench.bench_process import OUT, _median, run_trial
from bench.generate import generate
from dev.prism import prism_args

FNAPI = ["--runner=FnApiRunner"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=1_000_000)
    parser.add_argument("--fhir-patients", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--fhir-runs", type=int, default=1)
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--skip-fhir", action="store_true")
    parser.add_argument("--flink", action="store_true",
                        help="also FlinkRunner (built by dev/setup_env.sh unless NDOP_WITH_FLINK=0)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        runners = {"FnApiRunner": (FNAPI, sys.executable), "PrismRunner": (prism_args(), sys.executable)}
        if args.flink:
            from dev.flink import FLINK_PYTHON, FlinkCluster, flink_args

            OUT.mkdir(parents=True, exist_ok=True)
            cluster = stack.enter_context(FlinkCluster(tempfile.mkdtemp(dir=OUT)))
            runners["FlinkRunner"] = (flink_args(cluster), str(FLINK_PYTHON))
        bench(args, runners)


def _ratios(medians: dict[str, float]) -> str:
    base = medians["FnApiRunner"]
    return ", ".join(f"{name} median {t:.2f}s ({t / base:.2f}x)" for name, t in medians.items())


def bench(args: argparse.Namespace, runners: dict[str, tuple[list[str], str]]) -> None:

    manifest, reply = generate(OUT / str(args.patients), args.patients)
    print(f"inputs: {args.patients:,} patients, 5% opted out; {args.runs} runs each; shards={args.shards}")
    joins = {name: [run_trial("join", manifest, reply, args.shards, argv, python) for _ in range(args.runs)]
             for name, (argv, python) in runners.items()}
    outcome = {name: (t[0]["opted_out"], t[0]["not_opted_out"]) for name, t in joins.items()}
    assert len(set(outcome.values())) == 1, outcome
    print(f"(a) join+classify of {args.patients:,} (ratio vs FnApiRunner): "
          f"{_ratios({name: _median(t) for name, t in joins.items()})}; "
          f"same counts on all ({outcome['FnApiRunner'][0]:,} opted out)")

    if args.skip_fhir:
        return
    from dev.fhir_server import FhirServer

    fmanifest, freply = generate(OUT / str(args.fhir_patients), args.fhir_patients)
    piped: dict[str, list[dict]] = {name: [] for name in runners}
    for _ in range(args.fhir_runs):
        for name, (argv, python) in runners.items():
            with tempfile.TemporaryDirectory(dir=OUT) as data, FhirServer(Path(data) / "fhir") as server:
                piped[name].append(run_trial("write", fmanifest, freply, args.shards, [
                    *argv, f"--fhir_url={server.base_url}", "--fhir_auth=none", f"--output_dir={Path(data) / 'out'}",
                    f"--batch_size={args.batch_size}", "--bundle_type=batch", "--upsert=id"], python))
    for name, trials in piped.items():  # a fresh store each time: every Consent a create, none twice
        assert all(t["ok"] and t["created"] == args.fhir_patients and t["updated"] == 0 for t in trials), (name, trials)
    n = args.fhir_patients
    print(f"(b) whole pipeline -> FHIR, {n:,} creates (ratio vs FnApiRunner): "
          f"{_ratios({name: _median(t) for name, t in piped.items()})}; bundles posted: "
          + ", ".join(f"{name} {t[0]['bundles_posted']}" for name, t in piped.items()))


if __name__ == "__main__":
    main()
