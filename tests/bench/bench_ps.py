"""Parameter-server benchmark (issue: parameter server v2, point 5).

(a) one worker exchanging a 100 MB model with the server (push gradient + pull parameters, one
    round trip), in GB/s, on each transport (the data plane's Unix socket with shared memory and
    without, TCP, and the gRPC fallback), against raw TCP loopback measured in the same run
    (interleaved pairs, as in (c); plain gRPC streaming once, for the old path's ceiling);
(b) ps-sync step communication time with 2 workers against torch.distributed Gloo
    all_reduce of the same bytes (interleaved pairs), with the parameter server in one shard and
    in K (``--shards``: K Ray actors on a local Ray, as a cluster runs them, and the server's
    control store);
(c) a 1-worker ps-sync job (real server, real Ray worker) against a plain PyTorch loop on
    the same model, data and batch: samples/s;
(d) a 2-worker ps-sync job against the same job in allreduce mode: samples/s (interleaved pairs, as in (c));
(e) the server process's CPU seconds per GB moved and its peak RSS, for (a) and (b);
(g) overlap (point 4): a 2-worker ps-sync job, MLP 64-1024-1024-1024-10 (2.2 M parameters), with
    the gradient pushed in one piece after backward (``bucket_mb: 0``) and in 1 MB buckets while
    backward runs: step time against the one-piece job's compute time + communication time (the
    workers' ``compute_s`` and ``comm_s``: the time after backward until the next parameters are in).

    python tests/bench/bench_ps.py [--mb 100] [--iters 6] [--figures a b c d g] [--device cuda] [--out DIR]

``--device cuda``: (a)'s worker keeps its gradient and parameters on the GPU (they travel through
pinned host buffers), (c)'s job trains on a GPU (``resources.gpus: 1``) and (g)'s two workers
share one (their buckets' parameters come back beside the pushes, as GPU workers' do).

Server and workers run in separate processes (as deployed), so nobody shares a GIL.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from baselines import (  # the script's own folder is on sys.path
    gloo_allreduce_seconds,
    grpc_stream_throughput,
    plain_training_samples_per_second,
    raw_tcp_throughput,
)
from report import interleaved, print_table, write_json

TIMEOUT_S = 300


def _serve(port_queue: Any, stop: Any, data_dir: str, asks: Any, credentials: Any,
           tls: tuple[str, str] | None = None, ray_shards: bool = False) -> None:
    """The gradhub server in its own process, with workers that the benchmark runs itself (it
    answers each job id put on ``asks`` with the job's worker credential, as a launcher would);
    ``tls``: (certificate, key) files to serve TLS with; ``ray_shards``: a sharded job's
    shards are Ray actors (a local Ray), each a process of its own."""
    import queue

    from gradhub.server.app import Server
    from gradhub.server.config import ServerConfig
    from gradhub.server.launcher import ExternalLauncher

    launcher = ExternalLauncher()
    if ray_shards:
        import ray

        from gradhub.server.shard_actors import RayShards

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")

        class _RayShardsLauncher(ExternalLauncher):
            def start_shards(self, config: Any, count: int, max_model_bytes: int, tls: Any = None) -> Any:
                return RayShards(config, count, max_model_bytes=max_model_bytes, tls=tls)
        launcher = _RayShardsLauncher()
    config = ServerConfig(port=0, data_dir=Path(data_dir), tls_cert=tls[0] if tls else None,
                          tls_key=tls[1] if tls else None)
    with Server(config, launcher=launcher) as server:
        port_queue.put(server.port)
        deadline = time.monotonic() + TIMEOUT_S
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                credentials.put(server.manager.job_credential(asks.get(timeout=0.5)))
            except queue.Empty:
                continue


def _worker(address: str, job_id: str, rank: int, numel: int, iters: int, transport: str, device: str,
            credential: str, out: Any, tls_ca: bytes | None = None) -> None:
    """Push a gradient and receive the next parameters ``iters`` times (one round trip each, as
    a training worker does); reports each exchange's seconds."""
    from gradhub.proto import frames
    from gradhub.proto.alloc import tune_for_streaming
    from gradhub.proto.codec import Layout
    from gradhub.worker.server_link import ServerLink

    tune_for_streaming()  # as the worker actor does
    if transport in ("tcp", "tls"):
        frames.host_id = lambda: ""  # as a worker on another host: the data plane's TCP port
    layout = Layout(("weight",), ((numel,),))
    params = torch.zeros(numel, device=device)
    grads = torch.full((numel,), 1e-3, device=device)
    with ServerLink(address, job_id, rank, transport="grpc" if transport == "grpc" else "auto",
                    credential=credential, tls_ca=tls_ca, shared_memory=transport == "shm") as ps:
        reg = ps.register("bench", 0, total_steps=iters + 1, train_size=1)
        if ps.transport.split(" ")[0] != ("tcp" if transport == "tls" else transport):
            raise RuntimeError(f"worker {rank} uses {ps.transport}, not {transport}")
        if reg.needs_init:
            ps.init_parameters(layout, params)
        version = ps.pull(layout, 0, params).version
        times = []
        for step in range(iters):
            t0 = time.perf_counter()
            version = ps.push_pull(layout, step, version, grads, params).version
            times.append(time.perf_counter() - t0)
        out.put((rank, times))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def exchange_seconds(workers: int, nbytes: int, iters: int, transport: str = "shm", device: str = "cpu",
                     shards: int = 1) -> tuple[list[float], dict]:
    """Per-step push+pull seconds of rank 0 in a ps-sync job of ``workers`` external workers
    (the parameter server in ``shards`` shards), and the server's CPU seconds per GB moved and
    peak RSS (MB) over the exchanges (the server process's alone: with shards, the control store's)."""
    from gradhub.client.client import Client

    ctx = mp.get_context("spawn")
    ports, stop, out, asks, credentials = ctx.Queue(), ctx.Event(), ctx.Queue(), ctx.Queue(), ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        tls, ca = None, None
        if transport == "tls":  # TCP under TLS, with a throwaway CA's certificate
            import trustme

            authority = trustme.CA()
            cert = authority.issue_cert("127.0.0.1")
            cert.private_key_pem.write_to_path(f"{tmp}/key.pem")
            Path(f"{tmp}/cert.pem").write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
            tls, ca = (f"{tmp}/cert.pem", f"{tmp}/key.pem"), authority.cert_pem.bytes()
        server = ctx.Process(target=_serve, args=(ports, stop, f"{tmp}/data", asks, credentials, tls, shards > 1),
                             daemon=True)
        server.start()
        try:
            address = f"127.0.0.1:{ports.get(timeout=TIMEOUT_S)}"
            with Client(address, tls_ca=ca) as client:
                job = client.submit({"name": "bench", "workers": workers, "model": "mlp", "dataset": "digits",
                                     "steps": iters + 1, "optimizer": {"name": "sgd", "lr": 1e-6},
                                     "ps_shards": shards})
                deadline = time.monotonic() + 60
                while (info := client.get_job(job.id)).state != "RUNNING":
                    if info.state in ("FAILED", "CANCELLED"):
                        raise RuntimeError(f"the benchmark job {info.state}: {info.reason}")
                    if time.monotonic() > deadline:
                        raise TimeoutError("the benchmark job did not start")
                    time.sleep(0.05)
            asks.put(job.id)
            credential = credentials.get(timeout=TIMEOUT_S)
            assert server.pid is not None
            cpu0 = _cpu_seconds(server.pid)
            procs = [ctx.Process(target=_worker, args=(address, job.id, r, nbytes // 4, iters, transport, device,
                                                       credential, out, ca), daemon=True) for r in range(workers)]
            for p in procs:
                p.start()
            results = dict(out.get(timeout=TIMEOUT_S) for _ in procs)
            moved_gb = 2 * nbytes * workers * (iters + 1) / 1e9  # init and first pull included
            server_use = {"cpu_s_per_gb": (_cpu_seconds(server.pid) - cpu0) / moved_gb,
                          "peak_rss_mb": _peak_rss_mb(server.pid)}
            for p in procs:
                p.join(timeout=30)
            return results[0][1:], server_use  # the first exchange warms up
        finally:
            stop.set()
            server.join(timeout=30)
            if server.is_alive():
                server.terminate()


def job_samples_per_second(model: Any, batch: int, steps: int, workers: int = 1, mode: str = "ps-sync",
                           gpus: float = 0) -> float:
    """A real job (in-process server, local Ray): its workers' summed average rate."""
    return job_metrics(model, batch, steps, workers, mode, gpus)["avg_samples_per_s"]


def job_metrics(model: Any, batch: int, steps: int, workers: int = 1, mode: str = "ps-sync", gpus: float = 0,
                **extra: Any) -> dict[str, float]:
    """A real job's final metrics (in-process server, local Ray); ``extra`` goes into its spec.
    With it, ``compute_s`` and ``comm_s``: a step's seconds as the workers report them, the
    median of the server's /metrics scraped every half second while the job runs."""
    from gradhub.client.client import Client
    from gradhub.server.app import Server
    from gradhub.server.config import ServerConfig

    with (tempfile.TemporaryDirectory() as tmp,
          Server(ServerConfig(port=0, data_dir=Path(tmp), http_port=0 if extra else None)) as server,
          Client(server.address) as client):
            cpus = max(torch.get_num_threads() // workers, 1)
            spec = {"name": "bench-job", "mode": mode, "workers": workers, "resources": {"cpus": cpus, "gpus": gpus},
                    "model": model, "dataset": "digits", "optimizer": {"name": "sgd", "lr": 0.05},
                    "batch_size": batch, "steps": steps, **extra}
            job = client.submit(spec)
            seconds: list[tuple[float, float]] = []
            deadline = time.monotonic() + TIMEOUT_S
            while extra and not (info := client.get_job(job.id)).done and time.monotonic() < deadline:
                seconds += _step_seconds(f"http://127.0.0.1:{server.http_port}/metrics", job.id)
                time.sleep(0.5)  # a sampling interval, not a synchronization
            info = job.wait(timeout=TIMEOUT_S)
            if info.state != "SUCCEEDED":
                raise RuntimeError(f"benchmark job {info.state}: {info.reason}")
            out = dict(info.metrics)
            if seconds:
                out["compute_s"] = statistics.median(c for c, _ in seconds)
                out["comm_s"] = statistics.median(m for _, m in seconds)
            return out


def _step_seconds(url: str, job_id: str) -> list[tuple[float, float]]:
    """(compute, communication) seconds of a step, per worker of ``job_id``, from /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    values: dict[str, dict[str, float]] = {"gradhub_worker_compute_seconds": {},
                                           "gradhub_worker_communication_seconds": {}}
    for family in text_string_to_metric_families(text):
        if family.name in values:
            for sample in family.samples:
                if sample.labels.get("job") == job_id:
                    values[family.name][sample.labels["rank"]] = sample.value
    compute, comm = values.values()
    return [(compute[r], comm[r]) for r in compute if r in comm]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="model size in MB (2**20 bytes) for (a) and (b)")
    parser.add_argument("--iters", type=int, default=6, help="exchanges per measurement (first is warm-up)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps for (c)")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128, 512], help="batch sizes for (c)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per figure in (a), (b), (c) and (d), interleaved with the reference; the "
                        "median of each pair's ratio is kept")
    parser.add_argument("--transports", nargs="+", default=["shm", "unix", "tcp", "grpc"],
                        choices=["shm", "unix", "tcp", "tls", "grpc"],
                        help="transports for (a) and (b) (shm: the Unix socket with shared memory, unix: "
                             "without; tls: the data plane's TCP port under TLS)")
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2],
                        help="parameter-server shards (ps_shards) for (b)")
    parser.add_argument("--figures", nargs="+", default=["a", "b", "c", "d", "g"], choices=["a", "b", "c", "d", "g"],
                        help="which figures to measure ((e) comes with (a) and (b))")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    figures: dict[str, Any] = {"command": " ".join(sys.argv)}
    nbytes = args.mb * 2**20

    e_rows: list[dict[str, Any]] = []
    if "a" in args.figures:
        figures["a_exchange"] = figure_a(args, nbytes, e_rows)
    if "b" in args.figures:
        figures["b_sync_step"] = figure_b(args, nbytes, e_rows)
    if e_rows:
        print_table("(e) the server process (CPU over the whole exchange, both directions)", e_rows,
                    ["run", "server CPU s/GB", "server peak RSS MB"])
    if "c" in args.figures:
        figures["c_training"] = figure_c(args)
    if "d" in args.figures:
        figures["d_vs_allreduce"] = figure_d(args)
    if "g" in args.figures:
        figures["g_overlap"] = figure_g(args)
    path = write_json("ps", figures, args.out)
    print(f"wrote {path}")


def figure_a(args: argparse.Namespace, nbytes: int, e_rows: list[dict[str, Any]]) -> dict[str, Any]:
    tcps: list[float] = []

    def tcp() -> float:
        tcps.append(raw_tcp_throughput(nbytes))
        return tcps[-1]

    rows_a, a_figures = [], {}
    for transport in args.transports:
        uses: list[dict[str, float]] = []
        runs: list[list[float]] = []

        def gradhub(transport: str = transport, uses: list = uses, runs: list = runs) -> float:
            one, use = exchange_seconds(1, nbytes, args.iters, transport, args.device)
            uses.append(use)
            runs.append(one)
            return 2 * nbytes / statistics.median(one) / 1e9

        ref, got, ratio = interleaved(tcp, gradhub, args.repeats, "{:.2f}")
        use = server_use(uses)
        a_figures[transport] = {"raw_tcp_gbs": ref, "gbs": got, **ratio, "exchange_seconds": runs, **use}
        rows_a.append({"measure": f"gradhub push+pull, {args.mb} MB, 1 worker, {transport}, {args.device}",
                       "raw TCP GB/s": ref, "GB/s": got, **ratio})
        e_rows.append({"run": f"(a) {transport}", "server CPU s/GB": f"{use['cpu_s_per_gb']:.2f}",
                       "server peak RSS MB": f"{use['peak_rss_mb']:,.0f}"})
    grpc_plain = grpc_stream_throughput(nbytes)  # the old path's ceiling, against the raw runs' median
    rows_a.append({"measure": "plain gRPC stream, 1 MiB chunks", "raw TCP GB/s": f"{statistics.median(tcps):.2f}",
                   "GB/s": f"{grpc_plain:.2f}", "ratio": f"{grpc_plain / statistics.median(tcps):.2f}",
                   "ratio range": "(one run)"})
    print_table(f"(a) exchanging a {args.mb} MB model vs raw TCP loopback (push+pull; medians of interleaved pairs)",
                rows_a, ["measure", "raw TCP GB/s", "GB/s", "ratio", "ratio range"])
    return {"mb": args.mb, "raw_tcp_gbs": tcps, "plain_grpc_gbs": grpc_plain, "device": args.device,
            "gradhub": a_figures}


def figure_b(args: argparse.Namespace, nbytes: int, e_rows: list[dict[str, Any]]) -> dict[str, Any]:
    rows_b, b_figures = [], {}
    for shards in args.shards:
        for transport in args.transports:
            if shards > 1 and transport in ("grpc", "tls"):
                continue  # a sharded job's shards serve the data plane only (and no TLS yet)
            uses: list[dict[str, float]] = []
            runs: list[list[float]] = []

            def gradhub(transport: str = transport, shards: int = shards, uses: list = uses,
                        runs: list = runs) -> float:
                two, use = exchange_seconds(2, nbytes, args.iters, transport, shards=shards)
                uses.append(use)
                runs.append(two)
                return statistics.median(two)

            gloo, step_s, ratio = interleaved(partial(gloo_allreduce_seconds, nbytes, world_size=2, iters=args.iters),
                                              gradhub, args.repeats, "{:.3f}")
            use = server_use(uses)
            key = transport if shards == 1 else f"{transport}, K={shards}"
            b_figures[key] = {"gloo_s": gloo, "step_s": step_s, **ratio, "step_seconds": runs, **use}
            rows_b.append({"measure": f"gradhub ps-sync push+pull, {args.mb} MB, 2 workers, {transport}, "
                                      f"K = {shards}", "Gloo all_reduce s": gloo, "seconds/step": step_s, **ratio})
            e_rows.append({"run": f"(b) {key}", "server CPU s/GB": f"{use['cpu_s_per_gb']:.2f}",
                           "server peak RSS MB": f"{use['peak_rss_mb']:,.0f}"})
    print_table("(b) ps-sync step communication vs Gloo all_reduce of the same bytes, 2 ranks (medians of "
                "interleaved pairs; ratio: the step's time over Gloo's)", rows_b,
                ["measure", "Gloo all_reduce s", "seconds/step", "ratio", "ratio range"])
    return {"mb": args.mb, "gradhub": b_figures}


def server_use(uses: list[dict[str, float]]) -> dict[str, float]:
    """(e) over several runs: the median CPU seconds per GB, the highest peak RSS."""
    return {"cpu_s_per_gb": statistics.median(u["cpu_s_per_gb"] for u in uses),
            "peak_rss_mb": max(u["peak_rss_mb"] for u in uses)}


def figure_c(args: argparse.Namespace) -> list[dict[str, Any]]:
    from gradhub.worker.data import digits
    from gradhub.worker.models import cnn

    train, _ = digits()
    x, y = train.tensors  # type: ignore[attr-defined]
    rows_c = []
    dev = args.device  # the reference trains where the job does
    gpus = 1 if args.device == "cuda" else 0
    for batch in args.batches:
        plain, job, ratio = interleaved(
            partial(plain_training_samples_per_second, lambda: cnn().to(dev), x.to(dev), y.to(dev),
                    batch_size=batch, steps=args.steps, lr=0.05),
            partial(job_samples_per_second, "cnn", batch, args.steps, gpus=gpus), args.repeats)
        rows_c.append({"model": "cnn (digits)", "batch": batch, "plain PyTorch samples/s": plain,
                       "gradhub 1-worker ps-sync samples/s": job, **ratio})
    print_table("(c) 1-worker ps-sync job vs plain PyTorch (medians of interleaved pairs)", rows_c,
                ["model", "batch", "plain PyTorch samples/s", "gradhub 1-worker ps-sync samples/s", "ratio",
                 "ratio range"])
    return rows_c


def figure_d(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows_d = []
    models = {"cnn": "cnn", "mlp 1024x1024": {"name": "mlp", "args": {"hidden": [1024, 1024]}}}
    for label, model in models.items():
        ar, ps, ratio = interleaved(partial(job_samples_per_second, model, 32, args.steps, 2, "allreduce"),
                                    partial(job_samples_per_second, model, 32, args.steps, 2, "ps-sync"), args.repeats)
        rows_d.append({"model": label, "batch": 32, "allreduce samples/s": ar, "ps-sync samples/s": ps, **ratio})
    print_table("(d) 2-worker ps-sync job vs the same job in allreduce mode (medians of interleaved pairs)", rows_d,
                ["model", "batch", "allreduce samples/s", "ps-sync samples/s", "ratio", "ratio range"])
    return rows_d


def figure_g(args: argparse.Namespace) -> list[dict[str, Any]]:
    model = {"name": "mlp", "args": {"hidden": [1024, 1024, 1024]}}
    batch, steps, workers = 32, min(args.steps, 300), 2
    runs: dict[float, list[dict[str, float]]] = {0.0: [], 1.0: []}
    gpus = 0.5 if args.device == "cuda" else 0  # both workers on the one GPU
    for _ in range(args.repeats):  # interleaved: the VM's noise falls on both alike
        for mb, out in runs.items():
            out.append(job_metrics(model, batch, steps, workers, gpus=gpus, bucket_mb=mb))

    def med(mb: float, key: str) -> float:
        return statistics.median(m[key] for m in runs[mb])

    def step_s(mb: float) -> float:  # a worker's step: the job's samples/s are summed over its workers
        return batch * workers / med(mb, "avg_samples_per_s")

    reference = med(0.0, "compute_s") + med(0.0, "comm_s")
    rows_g = [{"bucket_mb": f"{mb:g}", "samples/s": f"{med(mb, 'avg_samples_per_s'):,.0f}",
               "step s": f"{step_s(mb):.4f}", "compute s": f"{med(mb, 'compute_s'):.4f}",
               "comm after backward s": f"{med(mb, 'comm_s'):.4f}",
               "step / (compute + comm of one piece)": f"{step_s(mb) / reference:.2f}"} for mb in runs]
    print_table("(g) pushing buckets while backward runs: 2-worker ps-sync, MLP 3x1024", rows_g, list(rows_g[0]))
    return rows_g


if __name__ == "__main__":
    main()
