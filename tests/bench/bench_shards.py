"""A sharded parameter server across hosts (issue: parameter server v2, point 3; figure (b) past
one machine): the docker-compose topology in network namespaces (tests/multihost: a head with
the server, two worker hosts with one worker each), every link shaped with ``tc ... tbf rate``
both ways, and the same 2-worker job (the synthetic task's MLP, 8.7 MB of parameters) in
``ps-sync`` with one shard (every byte through the head's link), ``ps-sync`` with
``ps_shards: auto`` (two: one on each worker host, beside the workers; the head, with no
CPUs, keeps the server's control store) and ``allreduce`` (Gloo between the worker hosts, no server in the data path). Figure: a step's seconds once the job
trains (the steps between two reports of the job's step, from the second report on), and the
ratio to ``allreduce``'s, measured in the same run. Needs root and ``ip``.

    python tests/bench/bench_shards.py [--rate 200mbit] [--steps 30] [--repeats 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from report import print_table, write_json  # the script's own folder is on sys.path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # tests.multihost: the namespace topology

from tests.multihost.slow_links import synthetic_task

RUNS = {"ps-sync, 1 shard": {"mode": "ps-sync"}, "ps-sync, ps_shards auto (2)": {"mode": "ps-sync", "ps_shards": "auto"},
        "allreduce": {"mode": "allreduce"}}
TIMEOUT_S = 600.0


def step_seconds(client: Any, spec: dict[str, Any]) -> float:
    """Seconds per step while the job trains: from the time its step first moves past 2 to its
    end (the server's clock: ``finished_at``), over the steps in between."""
    job = client.submit(spec)
    deadline = time.monotonic() + TIMEOUT_S
    start: tuple[float, int] | None = None
    while True:
        info = client.get_job(job.id)
        if info.done:
            break
        if start is None and info.step >= 2:
            start = (time.time(), info.step)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{spec['name']} did not finish in {TIMEOUT_S:.0f} s")
        time.sleep(0.05)  # polling the job's step, not a synchronization
    if info.state != "SUCCEEDED" or start is None:
        raise RuntimeError(f"{spec['name']}: {info.state} {info.reason}")
    assert info.finished_at is not None
    return (info.finished_at - start[0]) / (info.total_steps - start[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default="200mbit", help="tc tbf rate of every link")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each job, interleaved; the median is kept")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from gradhub.client.client import Client
    from tests.multihost.netns import check_prerequisites
    from tests.multihost.slow_links import throttle
    from tests.multihost.test_compose_topology import SERVER, running_cluster

    problem = check_prerequisites()
    if problem is not None:
        raise SystemExit(problem)
    task = synthetic_task()
    seconds: dict[str, list[float]] = {label: [] for label in RUNS}
    with tempfile.TemporaryDirectory(prefix="gradhub-bench-shards-") as tmp, running_cluster(Path(tmp)) as cluster:
        throttle(cluster.net, args.rate)
        with Client(SERVER, token=cluster.token) as client:
            for _ in range(args.repeats):
                for label, extra in RUNS.items():
                    spec = {**task.spec(extra["mode"], 2, 1.0), "steps": args.steps, "eval_every": 0,
                            "name": f"shards-{extra['mode']}-{extra.get('ps_shards', 1)}", **extra}
                    seconds[label].append(step_seconds(client, spec))
                    print(f"{label}: {seconds[label][-1]:.3f} s/step", flush=True)
    reference = statistics.median(seconds["allreduce"])
    rows = [{"job (2 workers on 2 hosts)": label, "s/step": f"{statistics.median(s):.3f}",
             "ratio to allreduce": f"{statistics.median(s) / reference:.2f}",
             "runs": ", ".join(f"{x:.3f}" for x in s)} for label, s in seconds.items()]
    print_table(f"ps-sync with one shard and with one per host, against allreduce: links at {args.rate}, "
                f"{task.params():,} parameters", rows, list(rows[0]))
    path = write_json("shards", {"args": vars(args) | {"out": str(args.out)}, "rows": rows,
                                 "seconds": seconds}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
