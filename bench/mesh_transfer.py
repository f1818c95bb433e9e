"""Send a 1M-number request through a local mesh-sandbox playing NDOP and time each leg.

mesh-client always asks for gzip on download; the sandbox answers by gzipping a stored plain body
at level 9 on every download. The NDOP stand-in therefore stores its reply gzipped (level 1) by
default. This prints, in one run, the median reply download both ways (baseline: stored plain),
plus one send and one full ``poll`` (notice + reply, including the stand-in's work) for scale.

    PYTHONPATH=. .venv/bin/python bench/mesh_transfer.py [--count 1000000] [--runs 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from dev.mesh_sandbox import MeshSandbox
from pipeline.core import nhs
from pipeline.mesh.config import MeshConfig
from pipeline.mesh.driver import MeshDriver
from pipeline.mesh.transport import make_client
from pipeline.request.build import RequestSettings, build_request
from pipeline.lifecycle.state import WorkDir


def download(config: MeshConfig, message_id: str) -> float:
    client = make_client(config)
    start = time.perf_counter()
    message = client.retrieve_message(message_id)
    while message.read(1 << 20):
        pass
    message.close()
    client.close()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-mesh-"))
    cohort = tmp / "cohort.txt"
    cohort.write_text("\n".join(nhs.synthetic_numbers(args.count, seed=1, prefix="9").to_pylist()) + "\n")
    plugin_config = tmp / "plugin.json"
    with MeshSandbox(store_dir=tmp / "store", mailboxes=("X26HC065", "X26ABC1"),
                     plugin_env={"NDOP_SANDBOX_CONFIG": str(plugin_config)}) as sandbox:
        work = WorkDir(tmp / "work")
        config = MeshConfig(url=sandbox.url, mailbox="X26ABC1", password=sandbox.password,
                            shared_key=sandbox.shared_key)
        medians = {}
        for compress in ("0", "1"):
            plugin_config.write_text(json.dumps({"opt_out_fraction": 0.05, "compress_reply": compress}))
            record = build_request(cohort, work, RequestSettings(mailbox="X26ABC1"))
            with MeshDriver(config, work) as driver:
                start = time.perf_counter()
                driver.send(request_id=record["request_id"])
                send = time.perf_counter() - start
                start = time.perf_counter()
                driver.poll(wait=300, interval=0.2)
                poll = time.perf_counter() - start
            saved = work.load(record["request_id"])
            times = [download(config, saved["reply_message_id"]) for _ in range(args.runs)]
            medians[compress] = statistics.median(times)
            print(f"compress_reply={compress}: {args.count} numbers, request {record['dat_bytes'] / 1e6:.1f} MB, "
                  f"reply {saved['reply_bytes'] / 1e6:.1f} MB; send {send:.2f} s; poll until replied {poll:.2f} s; "
                  f"reply download median of {args.runs}: {medians[compress]:.2f} s")
        print(f"download ratio, sandbox gzips per download (baseline) / reply stored gzipped: "
              f"{medians['0'] / medians['1']:.1f}x")


if __name__ == "__main__":
    main()
