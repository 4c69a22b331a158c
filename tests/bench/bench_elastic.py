"""Elastic jobs against fixed-size restarts, on the namespace topology of tests/multihost (a head
and two worker hosts of one CPU each, joined by a bridge; root only):

- a worker host dies (every process on it killed) and is started again at once, or after
  ``--down-s``: seconds from the kill to the next training step, for an elastic job
  (``workers: {min: 1, max: 2}``: it goes on with the worker left once Ray has marked the node
  dead) and for the same job of fixed size (``workers: 2``, ``max_restarts``: it waits until
  Ray restarts the lost worker on the host that came back); and, for the elastic job, seconds
  from the host's start to the job running on two workers again;
- a worker added to a running job: seconds from ``gradhub scale`` (``Client.scale``) to the job
  training on two workers, against a fixed-size job getting a worker back after its process is
  SIGKILLed (Ray restarts it on the same live host).

"Training" is the job's step moving (polled every 20 ms): in ps-sync the step is the version of
the parameters, so it moves only when every worker of the job's size pushed. Each figure is
the median of ``--repeats`` events. The ratio is elastic / fixed-size.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from report import print_table, write_json

NAME = "bench_elastic"
POLL_S = 0.02
SETTLE_S = 2.0  # after a kill: longer than a heartbeat interval
TIMEOUT_S = 120.0
COLUMNS = ["mode", "event", "elastic s", "fixed size s", "elastic / fixed", "grow back s"]


def _spec(mode: str, workers: Any, steps: int) -> dict[str, Any]:
    return {"name": f"bench-elastic-{mode}", "mode": mode, "workers": workers, "resources": {"cpus": 1},
            "model": {"name": "mlp", "args": {"hidden": [64]}}, "dataset": "digits", "batch_size": 16,
            "steps": steps, "optimizer": {"name": "adam", "lr": 0.002}, "max_restarts": 100, "seed": 1}


def _until(client: Any, job_id: str, ok: Callable[[Any], bool], what: str) -> Any:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        info = client.get_job(job_id)
        if ok(info):
            return info
        if info.state not in ("QUEUED", "RUNNING") or time.monotonic() > deadline:
            log = "\n".join(client.logs(job_id))
            raise RuntimeError(f"{what}: the job is {info.state} ({info.reason}) after "
                               f"{TIMEOUT_S:.0f} s at most; its log:\n{log}")
        time.sleep(POLL_S)


def _steps_again(client: Any, job_id: str, since: float, at: int | None = None) -> float:
    """Seconds from ``since`` until the job trains: its step moves two past ``at`` (default:
    where it is now). Two, because the step in flight at an event may still complete without
    the worker it concerns (that worker had pushed it)."""
    at = client.get_job(job_id).step if at is None else at
    _until(client, job_id, lambda i: i.step > at + 1, "the next training steps")
    return time.monotonic() - since


def _running_on(n: int) -> Callable[[Any], bool]:
    return lambda i: i.state == "RUNNING" and sum(w.state == "running" for w in i.workers) == n and i.step > 0


def host_death(cluster: Any, client: Any, mode: str, elastic: bool, steps: int,
               down_s: float = 0.0) -> dict[str, float]:
    """Kill worker host 2 mid-job and start it again after ``down_s``; seconds from the kill to
    the next step (none within ``down_s``: NaN), and, elastic, from the host's start to the
    job running on two workers again."""
    job = client.submit(_spec(mode, {"min": 1, "max": 2} if elastic else 2, steps))
    _until(client, job.id, _running_on(2), "the job on two workers")
    host = cluster.workers[1]
    killed = time.monotonic()
    cluster.net.kill_host(host)
    # where the job stopped, once the step it reports has caught up (allreduce's comes with the
    # workers' heartbeats, a second apart); nothing resumes this soon (Ray takes longer to
    # mark a node dead, or to restart a worker)
    time.sleep(SETTLE_S)
    at = client.get_job(job.id).step
    out = {"resume": float("nan")}
    while time.monotonic() - killed < down_s:  # the host stays down: does the job train meanwhile?
        if out["resume"] != out["resume"] and client.get_job(job.id).step > at + 1:
            out["resume"] = time.monotonic() - killed
        time.sleep(POLL_S)
    cluster.start_worker(host)
    started = time.monotonic()
    if out["resume"] != out["resume"]:  # not trained yet
        out["resume"] = _steps_again(client, job.id, killed, at)
    if elastic:
        _until(client, job.id, lambda i: i.size == 2 and _running_on(2)(i), "the job on two workers again")
        out["grow"] = time.monotonic() - started
    client.cancel(job.id)
    _until(client, job.id, lambda i: i.state == "CANCELLED", "the cancel")
    cluster.wait_for_cpus(len(cluster.workers))
    return out


def worker_added(client: Any, mode: str, elastic: bool, steps: int) -> float:
    """Elastic: a job running on one worker is scaled to two; fixed size: worker 1's process is
    SIGKILLed and Ray restarts it. Seconds until the job trains on two workers."""
    if elastic:
        job = client.submit(_spec(mode, {"min": 1, "max": 2}, steps))
        _until(client, job.id, _running_on(2), "the job on two workers")
        client.scale(job.id, 1)
        _until(client, job.id, lambda i: i.size == 1 and [w.state for w in i.workers] == ["running", "idle"],
               "worker 1 to leave")
        since = time.monotonic()
        client.scale(job.id, 2)
        _until(client, job.id, lambda i: i.size == 2, "the job to grow")
    else:
        job = client.submit(_spec(mode, 2, steps))
        info = _until(client, job.id, _running_on(2), "the job on two workers")
        since = time.monotonic()
        os.kill(info.workers[1].pid, signal.SIGKILL)  # network namespaces share this machine's pids
        _until(client, job.id, lambda i: i.workers[1].restarts == 1 and i.workers[1].state == "running",
               "the worker to come back")
    seconds = _steps_again(client, job.id, since)
    client.cancel(job.id)
    _until(client, job.id, lambda i: i.state == "CANCELLED", "the cancel")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["ps-sync", "allreduce"])
    parser.add_argument("--repeats", type=int, default=1, help="events of each kind (the median is kept)")
    parser.add_argument("--steps", type=int, default=1_000_000, help="steps of each job (cancelled when measured)")
    parser.add_argument("--down-s", type=float, default=30.0, help="how long the host stays down in the second event")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from gradhub.client.client import Client
    from tests.multihost.netns import check_prerequisites
    from tests.multihost.test_compose_topology import SERVER, running_cluster

    problem = check_prerequisites()
    if problem is not None:
        raise SystemExit(problem)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gradhub-bench-elastic-") as tmp, \
            running_cluster(Path(tmp)) as cluster, Client(SERVER, token=cluster.token) as client:
        for mode in args.modes:
            elastic = [host_death(cluster, client, mode, True, args.steps) for _ in range(args.repeats)]
            fixed = [host_death(cluster, client, mode, False, args.steps)["resume"] for _ in range(args.repeats)]
            e = statistics.median(r["resume"] for r in elastic)
            f = statistics.median(fixed)
            rows.append({"mode": mode, "event": "worker host killed, started again", "elastic s": e,
                         "fixed size s": f, "elastic / fixed": e / f,
                         "grow back s": statistics.median(r["grow"] for r in elastic), "runs": [elastic, fixed]})
            print(rows[-1], flush=True)
            e_down = host_death(cluster, client, mode, True, args.steps, args.down_s)
            f_down = host_death(cluster, client, mode, False, args.steps, args.down_s)
            rows.append({"mode": mode, "event": f"worker host killed, started again {args.down_s:.0f} s later",
                         "elastic s": e_down["resume"], "fixed size s": f_down["resume"],
                         "elastic / fixed": e_down["resume"] / f_down["resume"], "grow back s": e_down["grow"],
                         "runs": [e_down, f_down]})
            print(rows[-1], flush=True)
            e_add = [worker_added(client, mode, True, args.steps) for _ in range(args.repeats)]
            f_add = [worker_added(client, mode, False, args.steps) for _ in range(args.repeats)]
            e, f = statistics.median(e_add), statistics.median(f_add)
            rows.append({"mode": mode, "event": "a worker added (scale) / restarted (SIGKILL)", "elastic s": e,
                         "fixed size s": f, "elastic / fixed": e / f, "runs": [e_add, f_add]})
            print(rows[-1], flush=True)
    print_table(f"elastic against fixed-size recovery, 2 worker hosts (median of {args.repeats})", rows, COLUMNS)
    payload = {"command": " ".join(sys.argv), "rows": rows, "wall_s": time.perf_counter() - start}
    path = write_json(NAME, payload, args.out)
    print(f"wrote {path} ({payload['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
