"""The process pipeline on Beam's Prism runner vs the in-process FnApiRunner, measured in the same run.

    PYTHONPATH=. python -m bench.bench_runners [--patients 1000000] [--fhir-patients 100000]
        [--runs 3] [--fhir-runs 1] [--shards 32] [--skip-fhir]

(a) read + CoGroupByKey + classification of ``--patients`` on each runner; (b) the whole pipeline of
``--fhir-patients`` into a fresh local FHIR server (sekmet) on each runner. Every trial runs in its own
process (``bench.bench_process.run_trial``); figures are medians and the ratio is Prism / FnApiRunner.
Prism is the binary ``dev/build_prism.sh`` built (LOOPBACK harness: the SDK worker runs in the trial's
process, Prism's own process plans and moves the data between stages).
"""
from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    runners = {"FnApiRunner": FNAPI, "PrismRunner": prism_args()}

    manifest, reply = generate(OUT / str(args.patients), args.patients)
    print(f"inputs: {args.patients:,} patients, 5% opted out; {args.runs} runs each; shards={args.shards}")
    joins = {name: [run_trial("join", manifest, reply, args.shards, argv) for _ in range(args.runs)]
             for name, argv in runners.items()}
    outcome = {name: (t[0]["opted_out"], t[0]["not_opted_out"]) for name, t in joins.items()}
    assert len(set(outcome.values())) == 1, outcome
    tf, tp = _median(joins["FnApiRunner"]), _median(joins["PrismRunner"])
    print(f"(a) join+classify of {args.patients:,}: FnApiRunner median {tf:.2f}s, PrismRunner median {tp:.2f}s; "
          f"ratio Prism/FnApi {tp / tf:.2f}x; same counts on both ({outcome['FnApiRunner'][0]:,} opted out)")

    if args.skip_fhir:
        return
    from dev.fhir_server import FhirServer

    fmanifest, freply = generate(OUT / str(args.fhir_patients), args.fhir_patients)
    piped: dict[str, list[dict]] = {name: [] for name in runners}
    for _ in range(args.fhir_runs):
        for name, argv in runners.items():
            with tempfile.TemporaryDirectory(dir=OUT) as data, FhirServer(Path(data) / "fhir") as server:
                piped[name].append(run_trial("write", fmanifest, freply, args.shards, [
                    *argv, f"--fhir_url={server.base_url}", "--fhir_auth=none", f"--output_dir={Path(data) / 'out'}",
                    f"--batch_size={args.batch_size}", "--bundle_type=batch", "--upsert=id"]))
    for name, trials in piped.items():
        assert all(t["ok"] and t["created"] == args.fhir_patients for t in trials), (name, trials)
        assert all(t["bundles_posted"] == -(-args.fhir_patients // args.batch_size) for t in trials), (name, trials)
    tf, tp = _median(piped["FnApiRunner"]), _median(piped["PrismRunner"])
    n = args.fhir_patients
    print(f"(b) whole pipeline -> FHIR, {n:,} creates: FnApiRunner median {tf:.1f}s ({n / tf:,.0f}/s), "
          f"PrismRunner median {tp:.1f}s ({n / tp:,.0f}/s); ratio Prism/FnApi {tp / tf:.2f}x; "
          f"{piped['PrismRunner'][0]['bundles_posted']} bundles posted on each, none twice")


if __name__ == "__main__":
    main()
