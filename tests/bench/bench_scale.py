"""Parameter server v2, figure (f): many workers on one server. A ps-async job of ``--workers``
simulated workers (lightweight protocol clients, ``tests/swarm.py``, in ``--processes``
processes) pushes and pulls a small model while the benchmark calls GetJob every 20 ms:
updates per second, and GetJob's latency (median, p99, max). The same run with
``--reference-workers`` (default 64) is the reference: how much the server slows down with
many workers rather than few.

    python tests/bench/bench_scale.py [--workers 512] [--processes 4] [--steps 20] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from report import print_table, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: tests.swarm
from tests.swarm import start_swarm

TIMEOUT_S = 600


def measure(workers: int, processes: int, steps: int, numel: int) -> dict[str, Any]:
    from gradhub.client.client import Client
    from gradhub.server.app import Server
    from gradhub.server.config import ServerConfig
    from gradhub.server.launcher import ExternalLauncher

    with (tempfile.TemporaryDirectory() as tmp,
          Server(ServerConfig(port=0, data_dir=Path(tmp)), launcher=ExternalLauncher({"CPU": 4096})) as server,
          Client(server.address) as client):
        job = client.submit({"name": "scale", "mode": "ps-async", "workers": workers, "resources": {"cpus": 1},
                             "model": "mlp", "dataset": "digits", "steps": steps,
                             "optimizer": {"name": "sgd", "lr": 1e-3}})
        deadline = time.monotonic() + 60
        while client.get_job(job.id).state != "RUNNING":
            if time.monotonic() > deadline:
                raise TimeoutError("the job did not start")
            time.sleep(0.05)
        started = time.perf_counter()
        procs, results = start_swarm(server.address, job.id, workers, processes, steps, numel,
                                     server.manager.job_credential(job.id))
        latencies, paced = [], threading.Event()
        while any(p.is_alive() for p in procs):
            if time.perf_counter() - started > TIMEOUT_S:
                raise TimeoutError("the swarm did not finish")
            t0 = time.perf_counter()
            client.get_job(job.id)
            latencies.append(time.perf_counter() - t0)
            paced.wait(0.02)
        stats = [results.get(timeout=30) for _ in procs]
        failed = sum(s["failed"] for s in stats)
        if failed:
            raise RuntimeError(f"{failed} workers failed: {[e for s in stats for e in s['errors']]}")
        # from the swarm's first answered push to its last (process start-up left out)
        seconds = max(s["last_push_at"] for s in stats) - min(s["first_push_at"] for s in stats)
        version = server.manager.store(job.id).version
        return {"workers": workers, "updates": version, "seconds": seconds, "updates_per_s": version / seconds,
                "heartbeats": sum(s["heartbeats"] for s in stats), "getjob_calls": len(latencies),
                "getjob_p50_s": statistics.median(latencies),
                "getjob_p99_s": statistics.quantiles(latencies, n=100)[98], "getjob_max_s": max(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=512)
    parser.add_argument("--reference-workers", type=int, default=64)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--numel", type=int, default=1000, help="the model's parameters (float32)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows, figures = [], []
    for n in (args.reference_workers, args.workers):
        f = measure(n, min(args.processes, n), args.steps, args.numel)
        figures.append(f)
        rows.append({"workers": n, "updates/s": f"{f['updates_per_s']:,.0f}",
                     "GetJob p50 ms": f"{f['getjob_p50_s'] * 1000:.1f}",
                     "GetJob p99 ms": f"{f['getjob_p99_s'] * 1000:.1f}",
                     "GetJob max ms": f"{f['getjob_max_s'] * 1000:.1f}", "heartbeats": f["heartbeats"]})
    print_table(f"(f) one ps-async job of simulated workers, {args.numel} parameters, {args.steps} steps each",
                rows, ["workers", "updates/s", "GetJob p50 ms", "GetJob p99 ms", "GetJob max ms", "heartbeats"])
    path = write_json("scale", {"command": " ".join(sys.argv), "runs": figures}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
