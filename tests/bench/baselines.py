"""Reference measurements that the gradhub benchmarks are compared against.

Each function measures what the machine can do without gradhub: raw TCP, plain gRPC, a Gloo
all_reduce and a plain single-process PyTorch loop. Multi-process measurements run every side in
its own spawned process, bound their waits, and always reap their children.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import socket
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from torch import Tensor, nn

_Results: TypeAlias = "Queue[tuple[str, Any]]"
"""Children send tagged messages: ("port" | "seconds" | "median" | "error", value)."""

TIMEOUT_S = 120.0
"""Upper bound for any single wait: a queue get, a join, a socket operation, an RPC."""

_WARMUP_ROUNDS = 1
_GRPC_METHOD = "/gradhub.bench.v1.Echo/Exchange"


# --------------------------------------------------------------------------- process plumbing


def _spawn() -> Any:
    return mp.get_context("spawn")


def _report_errors(target: Callable[..., None], results: _Results, *args: Any) -> None:
    """Run ``target`` in a child; an exception is sent as ("error", traceback), then re-raised."""
    try:
        target(results, *args)
    except BaseException:
        results.put(("error", traceback.format_exc()))
        raise


def _start(ctx: Any, target: Callable[..., None], results: _Results, *args: Any) -> BaseProcess:
    proc: BaseProcess = ctx.Process(
        target=_report_errors, args=(target, results, *args), daemon=True
    )
    proc.start()
    return proc


def _expect(results: _Results, kind: str, procs: list[BaseProcess], what: str) -> Any:
    """Wait up to TIMEOUT_S for a ``kind`` message; fail early if a child reports or dies."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            got_kind, value = results.get(timeout=0.2)
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                _raise_reported(results, what)
                raise RuntimeError(
                    f"{what}: child {dead[0].name} exited with code {dead[0].exitcode}"
                ) from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: no {kind!r} within {TIMEOUT_S:.0f} s") from None
            continue
        if got_kind == "error":
            raise RuntimeError(f"{what} failed in a child process:\n{value}")
        if got_kind != kind:
            raise RuntimeError(f"{what}: expected a {kind!r} message, got {got_kind!r}")
        return value


def _raise_reported(results: _Results, what: str) -> None:
    """Raise the traceback a dying child may have sent just before it exited, if any."""
    try:
        got_kind, value = results.get(timeout=1.0)
    except queue.Empty:
        return
    if got_kind == "error":
        raise RuntimeError(f"{what} failed in a child process:\n{value}")


def _reap(procs: list[BaseProcess], timeout: float) -> None:
    """Join every process within ``timeout`` seconds in all; terminate, then kill, stragglers."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(5.0)
        if proc.is_alive():
            proc.kill()
            proc.join(5.0)


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _check_sizes(nbytes: int, chunk: int, repeats: int) -> None:
    if nbytes <= 0:
        raise ValueError(f"nbytes must be positive, got {nbytes}")
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    if repeats <= 0:
        raise ValueError(f"repeats must be positive, got {repeats}")


def _filled(nbytes: int) -> bytearray:
    # Written, not calloc'ed: untouched zero pages would all map to one cache-hot page.
    return bytearray(b"\x5a") * nbytes


# --------------------------------------------------------------------------- raw TCP


def _send_all(sock: socket.socket, view: memoryview, chunk: int) -> None:
    for start in range(0, len(view), chunk):
        sock.sendall(view[start : start + chunk])


def _recv_exact(sock: socket.socket, view: memoryview, chunk: int) -> bool:
    """Fill ``view``; False on a clean end of stream before the first byte."""
    got, total = 0, len(view)
    while got < total:
        n = sock.recv_into(view[got:], min(chunk, total - got))
        if n == 0:
            if got == 0:
                return False
            raise ConnectionError(f"peer closed after {got} of {total} bytes")
        got += n
    return True


def _tcp_server(results: _Results, nbytes: int, chunk: int) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT_S)
        results.put(("port", listener.getsockname()[1]))
        conn, _ = listener.accept()
    with conn:
        conn.settimeout(TIMEOUT_S)
        view = memoryview(bytearray(nbytes))
        while _recv_exact(conn, view, chunk):  # push arrives ...
            _send_all(conn, view, chunk)  # ... and goes back as the pull


def _tcp_client(results: _Results, port: int, nbytes: int, chunk: int, rounds: int) -> None:
    payload = memoryview(_filled(nbytes))
    back = memoryview(bytearray(nbytes))
    seconds = []
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        for _ in range(rounds):
            start = time.perf_counter()
            _send_all(sock, payload, chunk)
            if not _recv_exact(sock, back, chunk):
                raise ConnectionError("server closed the connection before the pull")
            seconds.append(time.perf_counter() - start)
    results.put(("seconds", seconds))


def raw_tcp_throughput(nbytes: int = 100 * 2**20, chunk: int = 1 << 20, repeats: int = 3) -> float:
    """GB/s (1e9 B/s) of a push + pull of ``nbytes`` each way over loopback TCP.

    Client and server are separate spawned processes; the server receives with ``recv_into`` a
    preallocated buffer and sends it back with ``sendall`` of memoryview chunks. Time is taken on
    the client from the first byte sent to the last byte received; best of ``repeats`` after one
    warm-up round, reported as ``2 * nbytes / seconds``.
    """
    _check_sizes(nbytes, chunk, repeats)
    seconds = _client_server(
        "raw TCP",
        _tcp_server,
        (nbytes, chunk),
        _tcp_client,
        (nbytes, chunk, _WARMUP_ROUNDS + repeats),
    )
    return 2 * nbytes / min(seconds[_WARMUP_ROUNDS:]) / 1e9


def _client_server(
    what: str,
    server: Callable[..., None],
    server_args: tuple[Any, ...],
    client: Callable[..., None],
    client_args: tuple[Any, ...],
    stop: Event | None = None,
) -> list[float]:
    """Spawn ``server``, hand its port to a spawned ``client``, return the client's timings."""
    ctx = _spawn()
    results: _Results = ctx.Queue()
    procs: list[BaseProcess] = []
    clean = False
    try:
        procs.append(_start(ctx, server, results, *server_args))
        port = _expect(results, "port", procs, what)
        procs.append(_start(ctx, client, results, port, *client_args))
        seconds: list[float] = _expect(results, "seconds", procs, what)
        clean = True
        return seconds
    finally:
        if stop is not None:
            stop.set()
        _reap(procs, TIMEOUT_S if clean else 2.0)
        results.close()
        results.join_thread()


# --------------------------------------------------------------------------- plain gRPC


def _grpc_options(chunk: int) -> list[tuple[str, int]]:
    limit = max(4 * 2**20, 2 * chunk)
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


def _chunks(data: bytes, chunk: int) -> Iterator[bytes]:
    for start in range(0, len(data), chunk):
        yield data[start : start + chunk]


def _grpc_server(results: _Results, stop: Event, nbytes: int, chunk: int) -> None:
    from concurrent import futures

    import grpc

    data = bytes(_filled(nbytes))

    def exchange(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        got = sum(len(message) for message in requests)  # the push
        if got != nbytes:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"pushed {got} bytes, want {nbytes}")
        yield from _chunks(data, chunk)  # the pull

    # None (de)serializers pass the raw bytes through unchanged.
    handler = grpc.method_handlers_generic_handler(
        "gradhub.bench.v1.Echo",
        {"Exchange": grpc.stream_stream_rpc_method_handler(exchange)},
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        handlers=[handler],
        options=_grpc_options(chunk),
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        results.put(("port", port))
        stop.wait(3 * TIMEOUT_S)
    finally:
        server.stop(grace=1.0).wait(5.0)


def _grpc_client(results: _Results, port: int, nbytes: int, chunk: int, rounds: int) -> None:
    import grpc

    data = bytes(_filled(nbytes))
    seconds = []
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=_grpc_options(chunk)) as channel:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT_S)
        exchange = channel.stream_stream(_GRPC_METHOD)
        for _ in range(rounds):
            start = time.perf_counter()
            got = sum(len(message) for message in exchange(_chunks(data, chunk), timeout=TIMEOUT_S))
            seconds.append(time.perf_counter() - start)
            if got != nbytes:
                raise RuntimeError(f"pulled {got} bytes, want {nbytes}")
    results.put(("seconds", seconds))


def grpc_stream_throughput(
    nbytes: int = 100 * 2**20, chunk: int = 1 << 20, repeats: int = 3
) -> float:
    """GB/s of the same push + pull as :func:`raw_tcp_throughput` with plain gRPC.

    One generic stream-stream method with bytes passed through unserialized: the client streams
    ``nbytes`` in ``chunk`` messages, the server counts them and streams ``nbytes`` back. Client
    and server are separate spawned processes; best of ``repeats`` after one warm-up call.
    """
    _check_sizes(nbytes, chunk, repeats)
    stop = _spawn().Event()
    seconds = _client_server(
        "plain gRPC",
        _grpc_server,
        (stop, nbytes, chunk),
        _grpc_client,
        (nbytes, chunk, _WARMUP_ROUNDS + repeats),
        stop=stop,
    )
    return 2 * nbytes / min(seconds[_WARMUP_ROUNDS:]) / 1e9


# --------------------------------------------------------------------------- Gloo all_reduce


def _gloo_rank(
    results: _Results, rank: int, world_size: int, port: int, nbytes: int, iters: int
) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=TIMEOUT_S),
    )
    try:
        tensor = torch.ones(nbytes // 4, dtype=torch.float32)
        for _ in range(2):
            dist.all_reduce(tensor)
        seconds = []
        for _ in range(iters):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(tensor)
            seconds.append(time.perf_counter() - start)
        if rank == 0:
            results.put(("median", statistics.median(seconds)))
    finally:
        dist.destroy_process_group()


def gloo_allreduce_seconds(nbytes: int, world_size: int = 2, iters: int = 10) -> float:
    """Median seconds of one Gloo ``all_reduce`` of a float32 tensor of ``nbytes``.

    ``world_size`` spawned ranks rendezvous on a free 127.0.0.1 port; two warm-up calls, then
    ``iters`` timed calls each preceded by a barrier, timed on rank 0.
    """
    if nbytes < 4:
        raise ValueError(f"nbytes must hold at least one float32, got {nbytes}")
    if world_size < 2:
        raise ValueError(f"world_size must be at least 2, got {world_size}")
    if iters <= 0:
        raise ValueError(f"iters must be positive, got {iters}")
    ctx = _spawn()
    results: _Results = ctx.Queue()
    port = free_port()
    procs: list[BaseProcess] = []
    clean = False
    try:
        for rank in range(world_size):
            procs.append(_start(ctx, _gloo_rank, results, rank, world_size, port, nbytes, iters))
        median: float = _expect(results, "median", procs, "Gloo all_reduce")
        clean = True
        return median
    finally:
        _reap(procs, TIMEOUT_S if clean else 2.0)
        results.close()
        results.join_thread()


# --------------------------------------------------------------------------- plain training


def plain_training_samples_per_second(
    model_factory: Callable[[], nn.Module],
    x: Tensor,
    y: Tensor,
    batch_size: int,
    steps: int,
    lr: float = 0.01,
    optimizer: str = "sgd",
) -> float:
    """Samples/s of a plain single-process loop: forward, cross_entropy, backward, step, zero_grad.

    Batches are consecutive slices of ``x``/``y`` that wrap around the end; five warm-up steps
    are not timed. ``optimizer`` is "sgd", "adam" or "adamw".
    """
    import torch
    import torch.nn.functional as F

    n = len(x)
    if len(y) != n:
        raise ValueError(f"x and y differ in length: {n} != {len(y)}")
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be in 1..{n} (len(x)), got {batch_size}")
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    optimizers = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if optimizer not in optimizers:
        raise ValueError(f"optimizer must be one of {sorted(optimizers)}, got {optimizer!r}")

    model = model_factory()
    model.train()
    opt = optimizers[optimizer](model.parameters(), lr=lr)

    def batch(step: int) -> tuple[Tensor, Tensor]:
        start = step * batch_size % n
        stop = start + batch_size
        if stop <= n:
            return x[start:stop], y[start:stop]
        rest = stop - n
        return torch.cat((x[start:], x[:rest])), torch.cat((y[start:], y[:rest]))

    def train_step(step: int) -> None:
        inputs, targets = batch(step)
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        opt.step()
        opt.zero_grad()

    warmup = 5
    for step in range(warmup):
        train_step(step)
    start = time.perf_counter()
    for step in range(warmup, warmup + steps):
        train_step(step)
    return steps * batch_size / (time.perf_counter() - start)
