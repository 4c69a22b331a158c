"""local-sgd (DiLoCo) against ps-sync and allreduce: bytes on the wire and wall time to a target
validation accuracy (issue 14, point 3).

    python tests/bench/bench_local_sgd.py [--tasks digits,synthetic] [--workers 2,4] [--out DIR]
    python tests/bench/bench_local_sgd.py --slow-links [--rate 100mbit]     # as root: see below

(a) digits, MLP 64-128-10 (9,610 parameters), target 0.95; (b) ``synthetic`` with an MLP
32-2048-1024-10 (2.18 M parameters, 8.7 MB), target 0.80: the same task, optimizer (the inner one
in local-sgd; Adam), per-worker batch 32 and seed in ``ps-sync``, ``allreduce`` and ``local-sgd``
with H = 10 and 50 (the default outer optimizer: SGD, Nesterov 0.9, lr 0.7), for each N of
``--workers``. One in-process server (port 0, its own local Ray of 2 CPUs; N = 4 runs at
``cpus: 0.5``) runs every job, one at a time; each job is stopped at its first evaluation that
reaches the target (``eval_every`` 5 and 10 steps; local-sgd evaluates at round boundaries).

Figures: **time to target**, from the job's ``started_at`` to that evaluation's arrival, both on
the server's clock (worker start-up included: the same for every mode); **steps** to it (inner
steps in local-sgd); **bytes** a worker sends plus receives per exchange (a step; a round in
local-sgd), *measured* from the server's /metrics counters (``gradhub_worker_pushed_bytes``, the
pull being the same size) for ps-sync and local-sgd, and *computed* for allreduce, whose bytes
no gradhub counter sees: a ring all-reduce sends and receives 2(N-1)/N of the model each
(4(N-1)/N in all); and the bytes per worker to the target (per exchange times exchanges). Each
row's ratios are against ps-sync's of the same N in the same run.

(c) ``--slow-links``: the docker-compose topology in network namespaces (tests/multihost: a head
with the server, two worker hosts with one worker each), every link shaped with
``tc ... tbf rate --rate`` both ways, the synthetic task in every mode; bytes are the worker
hosts' interface counters (tx + rx) from the job's start to the target. Needs root and ``ip``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from report import print_table, write_json  # the script's own folder is on sys.path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # tests.multihost.slow_links: the helper shared with the multihost test

from tests.multihost.slow_links import (
    DIGITS,
    MODES,
    Mode,
    Outcome,
    Task,
    bytes_per_exchange,
    run_to_target,
    synthetic_task,
)

NAME = "local_sgd"
RAY_CPUS = 2
COLUMNS = ["task", "N", "mode", "to target s", "speed-up", "from 1st step s", "speed-up 1st", "steps", "MB/exch", "bytes", "MB to target",
           "bytes ratio", "best acc"]
MB = 1e6


def _cpus(workers: int) -> float:
    return min(1.0, RAY_CPUS / workers)


def row_for(task: Task, workers: int, mode: Mode, outcome: Outcome, model_bytes: int) -> dict[str, Any]:
    measured = bytes_per_exchange(outcome)
    if outcome.mode == "allreduce":
        per_exchange, source = 4 * (workers - 1) / workers * model_bytes, "computed"
    elif measured is not None:
        per_exchange, source = measured, "measured"
    else:  # the job ended between scrapes: what the protocol moves
        per_exchange, source = 2 * model_bytes, "computed"
    exchanges = None if outcome.step is None else mode.exchanges(outcome.step)
    reported = outcome.info.metrics.get("bytes_per_round")
    return {
        "task": task.name, "N": workers, "mode": mode.label, "to target s": outcome.seconds,
        "from 1st step s": outcome.training_s,
        "steps": outcome.step, "MB/exch": per_exchange / MB, "bytes": source,
        "MB to target": per_exchange * exchanges / MB if exchanges is not None else None,
        "best acc": outcome.best, "reached": outcome.reached, "wall s": outcome.wall_s,
        "bytes_per_round reported": reported, "outcome": outcome.as_row(),
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Speed-up (ps-sync's time / this) and bytes (this / ps-sync's), per task and N."""
    for row in rows:
        ref = next((r for r in rows if r["task"] == row["task"] and r["N"] == row["N"] and r["mode"] == "ps-sync"),
                   None)
        if ref is None:  # ps-sync was not among the modes run
            continue
        t, t_ref = row["to target s"], ref["to target s"]
        row["speed-up"] = t_ref / t if t and t_ref else None
        t, t_ref = row["from 1st step s"], ref["from 1st step s"]
        row["speed-up 1st"] = t_ref / t if t and t_ref else None
        b, b_ref = row["MB to target"], ref["MB to target"]
        row["bytes ratio"] = b / b_ref if b is not None and b_ref else None


def run_local(tasks: list[Task], workers: list[int], modes: list[Mode], limit_s: float) -> list[dict[str, Any]]:
    from gradhub.client.client import Client
    from gradhub.server.app import Server
    from gradhub.server.config import ServerConfig

    rows = []
    with tempfile.TemporaryDirectory(prefix="gradhub-bench-local-sgd-") as tmp, \
            Server(ServerConfig(port=0, data_dir=Path(tmp), ray_num_cpus=RAY_CPUS, http_port=0)) as server, \
            Client(server.address) as client:
        url = f"http://127.0.0.1:{server.http_port}/metrics"
        for task in tasks:
            model_bytes = 4 * task.params()
            for n in workers:
                for mode in modes:
                    outcome = run_to_target(client, mode.spec(task, n, _cpus(n)), task.target, limit_s=limit_s,
                                            metrics_url=url)
                    rows.append(row_for(task, n, mode, outcome, model_bytes))
                    r = rows[-1]
                    print(f"{task.name} N={n} {mode.label}: {r['to target s']} s, step {r['steps']}, "
                          f"best {r['best acc']}, {r['MB/exch']:.3g} MB/exchange ({r['bytes']})", flush=True)
    add_ratios(rows)
    return rows


def run_slow_links(task: Task, rate: str, modes: list[Mode], limit_s: float) -> list[dict[str, Any]]:
    from gradhub.client.client import Client
    from tests.multihost.netns import check_prerequisites
    from tests.multihost.slow_links import link_bytes, throttle
    from tests.multihost.test_compose_topology import SERVER, running_cluster

    problem = check_prerequisites()
    if problem is not None:
        raise SystemExit(problem)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gradhub-bench-slow-links-") as tmp, \
            running_cluster(Path(tmp)) as cluster:
        net = cluster.net
        throttle(net, rate)
        hosts = [h.role for h in cluster.workers]

        def counters() -> dict[str, int]:
            return {role: link_bytes(net, role) for role in hosts}

        n = len(cluster.workers)
        with Client(SERVER, token=cluster.token) as client:
            for mode in modes:
                outcome = run_to_target(client, mode.spec(task, n, 1.0), task.target, limit_s=limit_s,
                                        counters=counters)
                per_worker = (sum(outcome.link_bytes.values()) / len(hosts)) if outcome.link_bytes else None
                exchanges = None if outcome.step is None else mode.exchanges(outcome.step)
                rows.append({
                    "task": f"{task.name} @ {rate}", "N": n, "mode": mode.label, "to target s": outcome.seconds,
                    "from 1st step s": outcome.training_s,
                    "steps": outcome.step, "bytes": "link counters",
                    "MB/exch": per_worker / exchanges / MB if per_worker and exchanges else None,
                    "MB to target": per_worker / MB if per_worker is not None else None,
                    "best acc": outcome.best, "reached": outcome.reached, "wall s": outcome.wall_s,
                    "outcome": outcome.as_row(),
                })
                print(f"slow links {mode.label}: {outcome.seconds} s, step {outcome.step}, best {outcome.best}, "
                      f"{rows[-1]['MB to target']} MB/worker", flush=True)
    add_ratios(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits,synthetic", help="digits, synthetic, or both")
    parser.add_argument("--workers", default="2,4", help="comma-separated N")
    parser.add_argument("--hidden", default="2048,1024", help="the synthetic task's MLP widths")
    parser.add_argument("--target", type=float, default=None, help="override the tasks' target val_accuracy")
    parser.add_argument("--limit", type=float, default=300.0, help="seconds a job may run before it is stopped")
    parser.add_argument("--slow-links", action="store_true", help="(c) only: the throttled namespace topology")
    parser.add_argument("--rate", default="100mbit", help="(c): tc tbf rate of every link")
    parser.add_argument("--modes", default="", help="comma-separated labels of the modes to run (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file or folder")
    args = parser.parse_args()

    synthetic = synthetic_task(tuple(int(w) for w in args.hidden.split(",")))
    chosen = {"digits": DIGITS, "synthetic": synthetic}
    tasks = [chosen[t.strip()] for t in args.tasks.split(",")]
    if args.target is not None:
        from dataclasses import replace

        tasks = [replace(t, target=args.target) for t in tasks]
        synthetic = replace(synthetic, target=args.target)
    wanted = [m.strip() for m in args.modes.split(",") if m.strip()]
    modes = [m for m in MODES if not wanted or m.label in wanted]
    if not modes:
        raise SystemExit(f"--modes: none of {wanted} is one of {[m.label for m in MODES]}")
    if args.slow_links:
        rows = run_slow_links(synthetic, args.rate, modes, args.limit)
        title = (f"local-sgd on links shaped to {args.rate}: {synthetic.name} ({synthetic.params():,} parameters), "
                 f"target val_accuracy {synthetic.target}")
        name = f"{NAME}_slow_links"
    else:
        rows = run_local(tasks, [int(n) for n in args.workers.split(",")], modes, args.limit)
        title = "local-sgd against ps-sync and allreduce, one host: time and bytes to the target"
        name = NAME
    os.environ.setdefault("COLUMNS", "160")  # rich's width when stdout is not a terminal
    print_table(title, rows, COLUMNS)
    path = write_json(name, {"args": vars(args) | {"out": str(args.out)}, "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
