"""Parameter-server benchmark (issue: parameter-server training end to end, point 8).

(a) one worker exchanging a 100 MB model with the server (push gradient + pull parameters),
    in GB/s, against raw TCP loopback (and plain gRPC streaming) measured in the same run;
(b) ps-sync step communication time with 2 workers against torch.distributed Gloo
    all_reduce of the same bytes;
(c) a 1-worker ps-sync job (real server, real Ray worker) against a plain PyTorch loop on
    the same model, data and batch: samples/s.

    python tests/bench/bench_ps.py [--mb 100] [--iters 5] [--out DIR]

Server and workers run in separate processes (as deployed), so nobody shares a GIL.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from baselines import (  # the script's own folder is on sys.path
    gloo_allreduce_seconds,
    grpc_stream_throughput,
    plain_training_samples_per_second,
    raw_tcp_throughput,
)
from report import print_table, write_json

TIMEOUT_S = 300


def _serve(port_queue: Any, stop: Any, data_dir: str) -> None:
    """The gradhub server in its own process, with workers that the benchmark runs itself."""
    from gradhub.server.app import Server
    from gradhub.server.config import ServerConfig
    from gradhub.server.launcher import ExternalLauncher

    with Server(ServerConfig(port=0, data_dir=Path(data_dir)), launcher=ExternalLauncher()) as server:
        port_queue.put(server.port)
        stop.wait(TIMEOUT_S)


def _worker(address: str, job_id: str, rank: int, numel: int, iters: int, out: Any) -> None:
    """Push a gradient and pull the parameters ``iters`` times; reports each exchange's seconds."""
    from gradhub.proto.alloc import tune_for_streaming
    from gradhub.proto.codec import Layout
    from gradhub.worker.server_link import ServerLink

    tune_for_streaming()  # as the worker actor does
    layout = Layout(("weight",), ((numel,),))
    params = torch.zeros(numel)
    grads = torch.full((numel,), 1e-3)
    with ServerLink(address, job_id, rank) as ps:
        reg = ps.register("bench", 0, total_steps=iters + 1, train_size=1)
        if reg.needs_init:
            ps.init_parameters(layout, params)
        version = ps.pull(layout, 0, params).version
        times = []
        for step in range(iters):
            t0 = time.perf_counter()
            ps.push(layout, step, version, grads)
            version = ps.pull(layout, step + 1, params).version
            times.append(time.perf_counter() - t0)
        out.put((rank, times))


def exchange_seconds(workers: int, nbytes: int, iters: int) -> list[float]:
    """Per-step push+pull seconds of rank 0 in a ps-sync job of ``workers`` external workers."""
    from gradhub.client.client import Client

    ctx = mp.get_context("spawn")
    ports, stop, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        server = ctx.Process(target=_serve, args=(ports, stop, tmp), daemon=True)
        server.start()
        try:
            address = f"127.0.0.1:{ports.get(timeout=TIMEOUT_S)}"
            with Client(address) as client:
                job = client.submit({"name": "bench", "workers": workers, "model": "mlp", "dataset": "digits",
                                     "steps": iters + 1, "optimizer": {"name": "sgd", "lr": 1e-6}})
                deadline = time.monotonic() + 60
                while client.get_job(job.id).state != "RUNNING":
                    if time.monotonic() > deadline:
                        raise TimeoutError("the benchmark job did not start")
                    time.sleep(0.05)
            procs = [ctx.Process(target=_worker, args=(address, job.id, r, nbytes // 4, iters, out), daemon=True)
                     for r in range(workers)]
            for p in procs:
                p.start()
            results = dict(out.get(timeout=TIMEOUT_S) for _ in procs)
            for p in procs:
                p.join(timeout=30)
            return results[0][1:]  # the first exchange warms up
        finally:
            stop.set()
            server.join(timeout=30)
            if server.is_alive():
                server.terminate()


def job_samples_per_second(model: str, batch: int, steps: int) -> float:
    """A real 1-worker ps-sync job (in-process server, local Ray): the worker's own rate."""
    from gradhub.client.client import Client
    from gradhub.server.app import Server
    from gradhub.server.config import ServerConfig

    with (tempfile.TemporaryDirectory() as tmp, Server(ServerConfig(port=0, data_dir=Path(tmp))) as server,
          Client(server.address) as client):
            spec = {"name": "bench-c", "workers": 1, "resources": {"cpus": torch.get_num_threads()},
                    "model": model, "dataset": "digits", "optimizer": {"name": "sgd", "lr": 0.05},
                    "batch_size": batch, "steps": steps}
            info = client.submit(spec).wait(timeout=TIMEOUT_S)
            return info.metrics["avg_samples_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="model size in MB (2**20 bytes) for (a) and (b)")
    parser.add_argument("--iters", type=int, default=6, help="exchanges per measurement (first is warm-up)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps for (c)")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128, 512], help="batch sizes for (c)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure in (c); the median is kept")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    nbytes = args.mb * 2**20

    tcp = raw_tcp_throughput(nbytes)
    grpc_plain = grpc_stream_throughput(nbytes)
    one = exchange_seconds(1, nbytes, args.iters)
    ps_gbs = 2 * nbytes / statistics.median(one) / 1e9
    rows_a = [
        {"measure": "raw TCP loopback (push+pull)", "GB/s": f"{tcp:.2f}", "ratio to TCP": "1.00"},
        {"measure": "plain gRPC stream, 1 MiB chunks", "GB/s": f"{grpc_plain:.2f}", "ratio to TCP": f"{grpc_plain / tcp:.2f}"},
        {"measure": f"gradhub push+pull, {args.mb} MB, 1 worker", "GB/s": f"{ps_gbs:.2f}", "ratio to TCP": f"{ps_gbs / tcp:.2f}"},
    ]
    print_table(f"(a) exchanging a {args.mb} MB model", rows_a, ["measure", "GB/s", "ratio to TCP"])

    two = exchange_seconds(2, nbytes, args.iters)
    gloo = gloo_allreduce_seconds(nbytes, world_size=2, iters=args.iters)
    ps_step = statistics.median(two)
    rows_b = [
        {"measure": f"Gloo all_reduce, {args.mb} MB, 2 ranks", "seconds/step": f"{gloo:.3f}", "ratio to Gloo": "1.00"},
        {"measure": f"gradhub ps-sync push+pull, {args.mb} MB, 2 workers", "seconds/step": f"{ps_step:.3f}",
         "ratio to Gloo": f"{ps_step / gloo:.2f}"},
    ]
    print_table("(b) ps-sync step communication vs Gloo all_reduce", rows_b, ["measure", "seconds/step", "ratio to Gloo"])

    from gradhub.worker.data import digits
    from gradhub.worker.models import cnn

    train, _ = digits()
    x, y = train.tensors  # type: ignore[attr-defined]
    rows_c = []
    for batch in args.batches:  # medians of --repeats runs: this small VM is noisy
        plain = statistics.median(plain_training_samples_per_second(cnn, x, y, batch_size=batch, steps=args.steps,
                                                                    lr=0.05) for _ in range(args.repeats))
        job = statistics.median(job_samples_per_second("cnn", batch, args.steps) for _ in range(args.repeats))
        rows_c.append({"model": "cnn (digits)", "batch": batch, "plain PyTorch samples/s": f"{plain:,.0f}",
                       "gradhub 1-worker ps-sync samples/s": f"{job:,.0f}", "ratio": f"{job / plain:.2f}"})
    print_table("(c) 1-worker ps-sync job vs plain PyTorch", rows_c,
                ["model", "batch", "plain PyTorch samples/s", "gradhub 1-worker ps-sync samples/s", "ratio"])

    path = write_json("ps", {
        "command": " ".join(sys.argv),
        "a_exchange": {"mb": args.mb, "raw_tcp_gbs": tcp, "plain_grpc_gbs": grpc_plain, "gradhub_gbs": ps_gbs,
                       "ratio_to_tcp": ps_gbs / tcp, "exchange_seconds": one},
        "b_sync_step": {"mb": args.mb, "gloo_allreduce_s": gloo, "gradhub_step_s": ps_step,
                        "ratio_to_gloo": ps_step / gloo, "step_seconds": two},
        "c_training": rows_c,
    }, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
