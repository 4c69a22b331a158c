"""Would shared memory take (b) on one host (issue: parameter server v2, points 1 and 5)? The
exchange of a 2-worker ps-sync step, stripped to its bytes and the server's arithmetic: each
worker pushes ``--mb`` MB of gradient, the server sums them in rank order, takes the mean, checks
it for NaN/Inf and takes an SGD step, and each worker pulls the parameters back. Three
processes (server and two workers) on this host, over:

- Unix-domain sockets: every byte through the kernel, as the data plane moves it today (the
  server receives with ``recv_into`` into buffers it keeps and sends the parameters from their
  own memory): 400 MB through the server's sockets per step at 100 MB;
- shared memory: each worker's gradient in a ``memfd`` region of its own, the parameters in one
  region both workers map, the fds passed over the Unix socket (``SCM_RIGHTS``: nothing has a
  name another process could open), one-byte messages on the socket for "pushed" and "pulled";
  the server reads the gradients where the workers wrote them and writes the parameters once.

Against Gloo ``all_reduce`` of the same bytes with two ranks, each run paired with a Gloo run
(this VM's noise drifts and falls on both of a pair alike): the median of each transport's step
time and of its pairs' ratios, with their range. Rank 0's step, median of ``--steps`` after a
warm-up. A probe of the design, not gradhub's data plane: it has no framing, checks or Python
event loop, so its socket figure is a floor under what the data plane does today.

    python tests/bench/bench_shm_step.py [--mb 100] [--steps 8] [--repeats 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import mmap
import os
import socket
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from baselines import TIMEOUT_S, _expect, _reap, _recv_exact, _spawn, _start, gloo_allreduce_seconds
from report import interleaved, print_table, write_json

from gradhub.proto.channels import widen_buffers

NAME = "bench_shm_step"
WORKERS = 2


def _recv_all(sock: socket.socket, view: memoryview) -> None:
    if not _recv_exact(sock, view, len(view)):
        raise ConnectionError("the peer closed before the payload")


def _widen(sock: socket.socket) -> None:
    widen_buffers(sock)  # the data plane's Unix socket buffers
    sock.settimeout(TIMEOUT_S)


def _region(fd: int, numel: int) -> Any:
    """A float32 tensor over the ``memfd`` ``fd`` (its mapping lives as long as the tensor)."""
    import torch

    return torch.frombuffer(mmap.mmap(fd, numel * 4), dtype=torch.float32, count=numel)


def _server(results: Any, path: str, numel: int, steps: int, shm: bool) -> None:
    import torch

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(WORKERS)
        listener.settimeout(TIMEOUT_S)
        results.put(("port", path))
        accepted = [listener.accept()[0] for _ in range(WORKERS)]
    by_rank: dict[int, socket.socket] = {}
    for conn in accepted:
        _widen(conn)
        by_rank[conn.recv(1)[0]] = conn
    conns = [by_rank[r] for r in range(WORKERS)]
    params, mean = torch.full((numel,), 0.5), torch.empty(numel)
    if shm:
        fds = [os.memfd_create(f"gh-grad-{r}") for r in range(WORKERS)] + [os.memfd_create("gh-params")]
        for fd in fds:
            os.ftruncate(fd, numel * 4)
        grads = [_region(fd, numel) for fd in fds[:WORKERS]]
        shared_params = _region(fds[-1], numel)
        for r, conn in enumerate(conns):
            socket.send_fds(conn, [b"F"], [fds[r], fds[-1]])
        for fd in fds:
            os.close(fd)  # the mappings and the workers' copies of the fds keep the regions
    else:
        grads = [torch.empty(numel) for _ in range(WORKERS)]
    params_bytes = memoryview(params.numpy()).cast("B")
    for _ in range(steps):
        for r, conn in enumerate(conns):  # the pushes
            if shm:
                if conn.recv(1) != b"P":
                    raise ConnectionError("expected a push")
            else:
                _recv_all(conn, memoryview(grads[r].numpy()).cast("B"))
        torch.add(grads[0], grads[1], out=mean)
        for g in grads[2:]:
            mean += g
        mean /= WORKERS
        if not bool(torch.isfinite(mean.sum())):
            raise ValueError("non-finite gradient")
        params.add_(mean, alpha=-1e-6)
        if shm:
            shared_params.copy_(params)
        for conn in conns:  # the pulls
            conn.sendall(b"R" if shm else params_bytes)
    for conn in conns:
        conn.close()


def _worker(results: Any, path: str, rank: int, numel: int, steps: int, shm: bool) -> None:
    import torch

    torch.manual_seed(rank)
    grad, params = torch.randn(numel), torch.empty(numel)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        _widen(sock)
        sock.sendall(bytes([rank]))
        if shm:
            _, fds, _, _ = socket.recv_fds(sock, 1, 2)
            grad_region, params_region = _region(fds[0], numel), _region(fds[1], numel)
            for fd in fds:
                os.close(fd)
        grad_bytes, params_bytes = memoryview(grad.numpy()).cast("B"), memoryview(params.numpy()).cast("B")
        seconds = []
        for _ in range(steps):
            start = time.perf_counter()
            if shm:
                grad_region.copy_(grad)
                sock.sendall(b"P")
                if sock.recv(1) != b"R":
                    raise ConnectionError("expected the parameters")
                params.copy_(params_region)
            else:
                sock.sendall(grad_bytes)
                _recv_all(sock, params_bytes)
            seconds.append(time.perf_counter() - start)
    results.put((f"seconds {rank}", seconds))


def step_seconds(nbytes: int, steps: int, shm: bool) -> float:
    """Rank 0's median step (after one warm-up step) over shared memory or Unix sockets."""
    ctx = _spawn()
    results = ctx.Queue()
    numel = nbytes // 4
    folder = tempfile.mkdtemp(prefix="gh-bench-")
    procs = [_start(ctx, _server, results, os.path.join(folder, "s"), numel, steps + 1, shm)]
    clean = False
    try:
        path = _expect(results, "port", procs, "the server")
        procs += [_start(ctx, _worker, results, path, r, numel, steps + 1, shm) for r in range(WORKERS)]
        got = dict(results.get(timeout=TIMEOUT_S) for _ in range(WORKERS))
        if "error" in got:
            raise RuntimeError(f"a child failed:\n{got['error']}")
        clean = True
        return statistics.median(got["seconds 0"][1:])
    finally:
        _reap(procs, TIMEOUT_S if clean else 2.0)
        results.close()
        results.join_thread()
        Path(folder, "s").unlink(missing_ok=True)
        os.rmdir(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="MB of float32 gradient (and parameters)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, each paired with a Gloo run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    nbytes = args.mb * 2**20
    gloo = partial(gloo_allreduce_seconds, nbytes, world_size=WORKERS, iters=args.steps)
    rows = []
    for name, shm in (("Unix sockets", False), ("shared memory", True)):
        reference, step, ratio = interleaved(gloo, partial(step_seconds, nbytes, args.steps, shm=shm), args.repeats,
                                             "{:.3f}")
        rows.append({"transport": name, "Gloo all_reduce s": reference, "step s": step, **ratio})
    print_table(f"a 2-worker ps-sync step's exchange of {args.mb} MB vs Gloo all_reduce (medians of pairs)", rows,
                list(rows[0]))
    path = write_json(NAME, {"command": " ".join(sys.argv), "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
