"""Allreduce-mode benchmark: the all-reduce inside a job against plain Gloo, and allreduce
against ps-sync on the same job.

(a) A real 2-worker allreduce job (in-process server, local Ray, 1 CPU per worker) trains an
    MLP of about ``--mb`` MB of float32 parameters with little compute (batch 8). Its
    ``allreduce_s`` metric (per step, from the first DDP bucket's launch to the last bucket's
    completion, averaged over each report window) is compared with plain torch.distributed Gloo
    ``all_reduce`` of the same bytes measured in the same run (``gloo_allreduce_seconds``):
    ratio = Gloo / job, target >= 0.9. Closer references, to tell gradhub's cost from what the
    metric's span holds: the same bytes in DDP's own buckets and in 25 MiB pieces, launched
    back to back with the hook's division; and plain torch DDP (no gradhub, no Ray) in two
    spawned processes, same model, batch and optimizer, its hook timed the same way.
(b) The same small job (digits, 2 workers of 1 CPU) in ps-sync and allreduce modes, for a
    small CNN and a larger MLP: the whole run's samples/s (``avg_samples_per_s``) of each.

    python tests/bench/bench_allreduce.py [--mb 100] [--steps 30] [--repeats 3] [--out DIR]

Every figure is the median of ``--repeats`` runs; references and jobs alternate within a run,
so a noisy neighbour weighs on both.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from baselines import (  # the script's own folder is on sys.path
    TIMEOUT_S,
    _expect,
    _reap,
    _Results,
    _spawn,
    _start,
    free_port,
    gloo_allreduce_seconds,
)
from report import print_table, write_json

NAME = "allreduce"
WORKERS = 2
IN_FEATURES, OUT_FEATURES = 64, 10  # the synthetic set's features and classes
BATCH = 8  # per worker: little compute beside the all-reduce
LR = 1e-6
DDP_BUCKET_MIB = 25  # DistributedDataParallel's default bucket_cap_mb
JOB_TIMEOUT_S = 600.0
COLUMNS_A = ["measure", "all-reduce s", "Gloo / this", "step s"]
COLUMNS_B = ["model", "params", "ps-sync samples/s", "allreduce samples/s", "allreduce / ps-sync"]


# --------------------------------------------------------------------------- the model


def mlp_params(hidden: int) -> int:
    """Parameters of ``mlp(IN_FEATURES, [hidden, hidden], OUT_FEATURES)``."""
    return (IN_FEATURES + 1) * hidden + (hidden + 1) * hidden + (hidden + 1) * OUT_FEATURES


def cnn_params() -> int:
    """Parameters of the built-in ``cnn()``."""
    from gradhub.worker.models import cnn

    return sum(p.numel() for p in cnn().parameters())


def hidden_for(mb: float) -> int:
    """The width H whose ``mlp(64, [H, H], 10)`` comes closest to ``mb * 2**20`` bytes."""
    target = mb * 2**20 / 4
    # mlp_params(H) = a H² + b H + c
    a, b, c = 1, IN_FEATURES + OUT_FEATURES + 2, OUT_FEATURES - target
    h = max(1, round((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)))
    return min((h - 1, h, h + 1), key=lambda w: abs(mlp_params(max(w, 1)) - target))


# --------------------------------------------------------------------------- plain torch DDP


class _SpanTimer:
    """Plain copy of what the job's hook measures: per step, from the first bucket's launch to
    the last bucket's completion; each bucket is divided by the world size (untimed), then
    all-reduced."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.bucket_numels: list[int] = []
        self._lock = threading.Lock()
        self._first: float | None = None
        self._last = 0.0

    # No annotations: DDP compares a hook's annotations with the real types, and this module's
    # are strings (from __future__ import annotations).
    def hook(self, group, bucket):
        import torch.distributed as dist

        buffer = bucket.buffer()
        buffer.div_(self.world_size)
        start = time.perf_counter()  # as the job's hook: the all-reduce, not the division
        with self._lock:
            if self._first is None:
                self._first = start
                self.bucket_numels = []
        self.bucket_numels.append(buffer.numel())
        fut = dist.all_reduce(buffer, group=group, async_op=True).get_future()

        def done(f):
            with self._lock:
                self._last = max(self._last, time.perf_counter())
            return f.value()[0]

        return fut.then(done)

    def take(self) -> float:
        with self._lock:
            first, last = self._first, self._last
            self._first, self._last = None, 0.0
        return 0.0 if first is None else max(last - first, 0.0)


def _bucketed_seconds(numels: list[int], world_size: int, iters: int) -> float:
    """Median seconds of all-reducing tensors of ``numels``, each divided by the world size and
    launched asynchronously back to back (as DDP's hook does), then all waited for."""
    import torch
    import torch.distributed as dist

    tensors = [torch.ones(n) for n in numels]  # x / world summed over world stays 1: no overflow

    def once() -> None:
        works = [dist.all_reduce(t.div_(world_size), async_op=True) for t in tensors]
        for work in works:
            work.wait()

    for _ in range(2):
        once()
    seconds = []
    for _ in range(iters):
        dist.barrier()
        start = time.perf_counter()
        once()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def _ddp_rank(results: _Results, rank: int, world_size: int, port: int, hidden: int, steps: int,
              iters: int) -> None:
    """One rank of plain DDP: train ``steps`` steps, then time plain all-reduces of its buckets."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from gradhub.worker.models import mlp

    torch.set_num_threads(1)  # as a Ray actor of 1 CPU (Ray sets OMP_NUM_THREADS=1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        torch.manual_seed(0)
        model = mlp(IN_FEATURES, [hidden, hidden], OUT_FEATURES)
        ddp = DistributedDataParallel(model, gradient_as_bucket_view=True)  # as the job's workers
        timer = _SpanTimer(world_size)
        ddp.register_comm_hook(None, timer.hook)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(BATCH, IN_FEATURES, generator=g)
        y = torch.randint(0, OUT_FEATURES, (BATCH,), generator=g)
        spans, step_seconds = [], []
        for _ in range(steps):
            start = time.perf_counter()
            optimizer.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            optimizer.step()
            step_seconds.append(time.perf_counter() - start)
            spans.append(timer.take())
        buckets = list(timer.bucket_numels)  # the last step's, after DDP rebuilt its buckets
        total = sum(buckets)
        piece = DDP_BUCKET_MIB * 2**20 // 4
        pieces = [min(piece, total - i) for i in range(0, total, piece)]
        out = {"spans": spans, "step_seconds": step_seconds, "bucket_numels": buckets,
               "buckets_s": _bucketed_seconds(buckets, world_size, iters),
               "pieces_s": _bucketed_seconds(pieces, world_size, iters)}
        results.put(("rank", (rank, out)))
    finally:
        dist.destroy_process_group()


def plain_ddp(hidden: int, steps: int, iters: int) -> dict[str, Any]:
    """Plain torch DDP in ``WORKERS`` spawned processes; per-rank results by rank."""
    ctx = _spawn()
    results: _Results = ctx.Queue()
    port = free_port()
    procs = []
    clean = False
    try:
        for rank in range(WORKERS):
            procs.append(_start(ctx, _ddp_rank, results, rank, WORKERS, port, hidden, steps, iters))
        ranks = dict(_expect(results, "rank", procs, "plain DDP") for _ in procs)
        clean = True
        return ranks
    finally:
        _reap(procs, TIMEOUT_S if clean else 2.0)
        results.close()
        results.join_thread()


def summarize_ddp(ranks: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The reference's spans after a warm-up quarter: the mean over ranks and steps (what the
    job reports); per step, the larger span (the rank that launched first and waited for its
    peer's backward) and the smaller (the later rank, which waits for no one)."""
    per_rank = [ranks[r]["spans"] for r in sorted(ranks)]
    skip = max(1, len(per_rank[0]) // 4)
    spans = [s for rank_spans in per_rank for s in rank_spans[skip:]]
    by_step = list(zip(*(rs[skip:] for rs in per_rank), strict=True))
    step_s = [sum(ranks[r]["step_seconds"]) / len(ranks[r]["step_seconds"]) for r in ranks]
    return {"span_mean_s": statistics.mean(spans),
            "earlier_rank_span_s": statistics.median(max(step) for step in by_step),
            "later_rank_span_s": statistics.median(min(step) for step in by_step),
            "step_s": statistics.mean(step_s), "bucket_numels": ranks[0]["bucket_numels"],
            "buckets_s": ranks[0]["buckets_s"], "pieces_s": ranks[0]["pieces_s"]}


# --------------------------------------------------------------------------- gradhub jobs


def _run(client: Any, spec: dict[str, Any]) -> tuple[Any, list[tuple[int, float]]]:
    """Submit ``spec`` and follow it to its end; returns the final JobInfo and every distinct
    ``allreduce_s`` the server published, with the step it came with."""
    job = client.submit(spec)
    windows: list[tuple[int, float]] = []
    info = None
    for info in client.watch(job.id, timeout=JOB_TIMEOUT_S):
        value = info.metrics.get("allreduce_s")
        if value is not None and (not windows or windows[-1][1] != value):
            windows.append((info.step, value))
    if info is None or info.state != "SUCCEEDED":
        state = "unknown" if info is None else f"{info.state}: {info.reason}"
        raise RuntimeError(f"benchmark job {spec['name']} did not succeed ({state})")
    return info, windows


def job_allreduce(client: Any, hidden: int, steps: int) -> dict[str, Any]:
    """A 2-worker allreduce job on the big MLP: its final and steady-state ``allreduce_s``."""
    spec = {"name": "bench-allreduce", "mode": "allreduce", "workers": WORKERS,
            "resources": {"cpus": 1},
            "model": {"name": "mlp", "args": {"in_features": IN_FEATURES,
                                              "hidden": [hidden, hidden],
                                              "out_features": OUT_FEATURES}},
            "dataset": {"name": "synthetic", "args": {"n": 1024, "features": IN_FEATURES,
                                                      "classes": OUT_FEATURES}},
            "optimizer": {"name": "sgd", "lr": LR}, "batch_size": BATCH, "steps": steps,
            "checkpoint_every": 0, "eval_every": 0}
    info, windows = _run(client, spec)
    late = [v for step, v in windows if step > steps // 2] or [v for _, v in windows]
    return {"final_s": info.metrics["allreduce_s"], "windows_median_s": statistics.median(late),
            "windows": windows, "step_s": WORKERS * BATCH / info.metrics["avg_samples_per_s"]}


def job_samples_per_second(client: Any, mode: str, model: dict[str, Any], batch: int,
                           steps: int) -> float:
    """The whole run's samples/s, summed over the 2 workers, of a digits job in ``mode``."""
    spec = {"name": f"bench-{mode}", "mode": mode, "workers": WORKERS, "resources": {"cpus": 1},
            "model": model, "dataset": "digits", "optimizer": {"name": "sgd", "lr": 0.05},
            "batch_size": batch, "steps": steps, "checkpoint_every": 0, "eval_every": 0}
    info, _ = _run(client, spec)
    return float(info.metrics["avg_samples_per_s"])


# --------------------------------------------------------------------------- the tables


def part_a(client: Any, args: argparse.Namespace) -> dict[str, Any]:
    hidden = hidden_for(args.mb)
    nbytes = 4 * mlp_params(hidden)
    runs: list[dict[str, Any]] = []
    for _ in range(args.repeats):
        gloo = gloo_allreduce_seconds(nbytes, world_size=WORKERS, iters=args.iters)
        ddp = summarize_ddp(plain_ddp(hidden, args.steps, args.iters))
        job = job_allreduce(client, hidden, args.steps)
        runs.append({"gloo_s": gloo, "ddp": ddp, "job": job})

    def med(get: Any) -> float:
        return statistics.median(get(run) for run in runs)

    gloo = med(lambda r: r["gloo_s"])
    mib = nbytes / 2**20
    buckets = [round(n * 4 / 2**20, 1) for n in runs[-1]["ddp"]["bucket_numels"]]
    ddp_step = med(lambda r: r["ddp"]["step_s"])
    job_step = med(lambda r: r["job"]["step_s"])
    figures = [  # labels fit an 80-column table; README.md spells them out
        (f"Gloo all_reduce, 1 call of {mib:.0f} MiB (ref)", gloo, None),
        (f"Gloo, DDP's buckets {buckets} MiB, +div", med(lambda r: r["ddp"]["buckets_s"]), None),
        (f"Gloo, {DDP_BUCKET_MIB} MiB pieces, +div", med(lambda r: r["ddp"]["pieces_s"]), None),
        ("torch DDP hook span, mean", med(lambda r: r["ddp"]["span_mean_s"]), ddp_step),
        ("torch DDP hook span, earlier rank", med(lambda r: r["ddp"]["earlier_rank_span_s"]),
         ddp_step),
        ("torch DDP hook span, later rank", med(lambda r: r["ddp"]["later_rank_span_s"]), ddp_step),
        ("gradhub job allreduce_s, final", med(lambda r: r["job"]["final_s"]), job_step),
        ("gradhub job allreduce_s, windows", med(lambda r: r["job"]["windows_median_s"]), job_step),
    ]
    rows = [{"measure": m, "all-reduce s": s, "Gloo / this": gloo / s, "step s": step}
            for m, s, step in figures]
    print_table(f"(a) all-reduce of a {args.mb} MB MLP (hidden {hidden}x{hidden}, batch {BATCH}), "
                f"{WORKERS} workers, median of {args.repeats}", rows, COLUMNS_A)
    job_final = med(lambda r: r["job"]["final_s"])
    job_windows = med(lambda r: r["job"]["windows_median_s"])
    ddp_mean = med(lambda r: r["ddp"]["span_mean_s"])
    print(f"Gloo / job: {gloo / job_final:.2f} on the final allreduce_s (the issue's figure, "
          f"target >= 0.9), {gloo / job_windows:.2f} on the windows' median; plain DDP / job "
          f"(windows): "
          f"{ddp_mean / job_windows:.2f} (1.0: gradhub adds nothing to DDP)")
    return {"mb": args.mb, "hidden": hidden, "nbytes": nbytes, "steps": args.steps, "batch": BATCH,
            "rows": rows, "ratio_gloo_to_job_final": gloo / job_final,
            "ratio_gloo_to_job_windows": gloo / job_windows,
            "ratio_ddp_to_job_windows": ddp_mean / job_windows, "runs": runs}


def part_b(client: Any, args: argparse.Namespace) -> dict[str, Any]:
    models = [
        ("cnn", {"name": "cnn"}, cnn_params()),
        ("mlp [1024, 1024]", {"name": "mlp", "args": {"hidden": [1024, 1024]}}, mlp_params(1024)),
    ]
    rows = []
    for label, model, params in models:
        rates: dict[str, list[float]] = {"ps-sync": [], "allreduce": []}
        for _ in range(args.repeats):
            for mode, runs in rates.items():
                runs.append(job_samples_per_second(client, mode, model, args.batch, args.job_steps))
        ps, ar = statistics.median(rates["ps-sync"]), statistics.median(rates["allreduce"])
        rows.append({"model": label, "params": f"{params:,}", "ps-sync samples/s": ps,
                     "allreduce samples/s": ar, "allreduce / ps-sync": ar / ps, "runs": rates})
    print_table(f"(b) digits, {WORKERS} workers of 1 CPU, batch {args.batch} each, "
                f"{args.job_steps} steps, median of {args.repeats}", rows, COLUMNS_B)
    return {"batch": args.batch, "steps": args.job_steps, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100, help="(a) model size, MB (2**20 bytes)")
    parser.add_argument("--steps", type=int, default=30, help="(a) steps of job and plain DDP")
    parser.add_argument("--iters", type=int, default=10, help="(a) timed calls per Gloo reference")
    parser.add_argument("--batch", type=int, default=32, help="(b) batch size per worker")
    parser.add_argument("--job-steps", type=int, default=200, help="(b) training steps per job")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (median kept)")
    parser.add_argument("--skip", choices=["a", "b"], default=None, help="leave out one part")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from gradhub.client.client import Client
    from gradhub.server.app import Server
    from gradhub.server.config import ServerConfig

    start = time.perf_counter()
    payload: dict[str, Any] = {"command": " ".join(sys.argv)}
    with (tempfile.TemporaryDirectory() as tmp,
          Server(ServerConfig(port=0, data_dir=Path(tmp))) as server,
          Client(server.address) as client):
        if args.skip != "a":
            payload["a_allreduce"] = part_a(client, args)
        if args.skip != "b":
            payload["b_modes"] = part_b(client, args)
    payload["wall_s"] = time.perf_counter() - start
    path = write_json(NAME, payload, args.out)
    print(f"wrote {path} ({payload['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
