"""Which transport should the parameter server's data plane use (issue: parameter server v2,
point 1)? One worker pushes a gradient and pulls the parameters, ``--mb`` MB each way, between
two spawned processes, over each candidate:

- framed TCP: a length-prefixed protobuf header (job, rank, step, layout, byte count), validated
  before a byte of payload is read, then the raw bytes, received with ``recv_into`` straight into
  a preallocated tensor and sent from the tensor's own memory (tensors over bytearrays, and,
  for comparison, tensors from ``torch.empty``);
- the same framing over a Unix-domain socket (worker and server on one host);
- shared memory: gradient and parameters in a /dev/shm region both processes map, a small
  header over a Unix socket says when each side has written (one copy in, one copy out);
- a torch.distributed Gloo group of the two processes, ``send`` / ``recv`` of the tensor
  (the design of torchft's ParameterServer prototype).

Reported as GB/s of ``2 * mb`` moved per round trip (best of ``--repeats`` after a warm-up)
and as a ratio to raw TCP loopback measured in the same run.

    python tests/bench/bench_transport.py [--mb 100] [--repeats 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from baselines import (  # the script's own folder is on sys.path
    TIMEOUT_S,
    _client_server,
    _recv_exact,
    free_port,
    raw_tcp_throughput,
)
from report import print_table, write_json

NAME = "bench_transport"
_LEN = struct.Struct("<I")
_MAX_HEADER = 1 << 16
JOB = "j-bench"


# ----------------------------------------------------------------------------- framing


def _header(step: int, numel: int) -> bytes:
    from gradhub.proto.v1 import ps_pb2, tensor_pb2

    meta = tensor_pb2.TensorMeta(name="flat", dtype=tensor_pb2.FLOAT32, shape=[numel])
    raw = ps_pb2.PushHeader(job_id=JOB, rank=0, step=step, tensors=[meta]).SerializeToString()
    return _LEN.pack(len(raw)) + raw


def _read_header(sock: socket.socket, limit: int) -> int:
    """Read and check one frame's header; returns the payload's byte count (0: end of stream)."""
    from gradhub.proto.v1 import ps_pb2

    size = bytearray(_LEN.size)
    if not _recv_exact(sock, memoryview(size), _LEN.size):
        return 0
    (n,) = _LEN.unpack(size)
    if n > _MAX_HEADER:
        raise ValueError(f"header: {n} bytes, over the {_MAX_HEADER} limit")
    raw = bytearray(n)
    _recv_exact(sock, memoryview(raw), n)
    header = ps_pb2.PushHeader.FromString(bytes(raw))
    if header.job_id != JOB or len(header.tensors) != 1:
        raise ValueError("header: not this job's layout")
    nbytes = 4 * int(header.tensors[0].shape[0])
    if nbytes > limit:
        raise ValueError(f"byte count: {nbytes} over the model size {limit}")
    return nbytes


def _view(t: Any) -> memoryview:
    return memoryview(t.numpy()).cast("B")


CHUNK = 1 << 20  # bytes per recv_into / send call (one call for 100 MB is slower on loopback TCP)


def _send(sock: socket.socket, t: Any) -> None:
    view = _view(t)
    for start in range(0, len(view), CHUNK):
        sock.sendall(view[start:start + CHUNK])


def _tensors(nbytes: int, alloc: str) -> tuple[Any, Any]:
    """(a buffer to receive into, a filled one to send): ``torch.empty`` memory, or a bytearray's
    seen as a tensor (``torch.frombuffer``)."""
    import torch

    if alloc == "torch":
        return torch.empty(nbytes // 4), torch.full((nbytes // 4,), 0.5)
    return (torch.frombuffer(bytearray(nbytes), dtype=torch.float32),
            torch.frombuffer(bytearray(b"\x5a") * nbytes, dtype=torch.float32))


def _recv_into(sock: socket.socket, t: Any) -> None:
    view, got = _view(t), 0
    while got < len(view):
        n = sock.recv_into(view[got:], min(CHUNK, len(view) - got))
        if n == 0:
            raise ConnectionError(f"peer closed after {got} of {len(view)} bytes")
        got += n


# ------------------------------------------------------------------ framed stream sockets


def _framed_server(results: Any, nbytes: int, family: str, path: str, alloc: str) -> None:
    listener = (socket.create_server(("127.0.0.1", 0)) if family == "tcp"
                else socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    with listener:
        if family == "unix":
            listener.bind(path)
            listener.listen(1)
        listener.settimeout(TIMEOUT_S)
        results.put(("port", listener.getsockname()[1] if family == "tcp" else path))
        conn, _ = listener.accept()
    grads, params = _tensors(nbytes, alloc)
    with conn:
        conn.settimeout(TIMEOUT_S)
        step = 0
        while (n := _read_header(conn, nbytes)) > 0:
            _recv_into(conn, grads[: n // 4])  # the push, straight into the server's buffer
            conn.sendall(_header(step, params.numel()))  # the pull: header, then the parameters
            _send(conn, params)
            step += 1


def _framed_client(results: Any, address: Any, nbytes: int, rounds: int, family: str, alloc: str) -> None:
    params, grads = _tensors(nbytes, alloc)
    sock = (socket.create_connection(("127.0.0.1", address), timeout=TIMEOUT_S) if family == "tcp"
            else socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    with sock:
        if family == "unix":
            sock.settimeout(TIMEOUT_S)
            sock.connect(address)
        seconds = []
        for step in range(rounds):
            start = time.perf_counter()
            sock.sendall(_header(step, grads.numel()))
            _send(sock, grads)
            if _read_header(sock, nbytes) != nbytes:
                raise ConnectionError("the pull's header does not match")
            _recv_into(sock, params)
            seconds.append(time.perf_counter() - start)
    results.put(("seconds", seconds))


def framed(family: str, nbytes: int, repeats: int, alloc: str = "bytes") -> float:
    path = os.path.join(tempfile.mkdtemp(prefix="gh-bench-"), "sock")
    seconds = _client_server(f"framed {family}", _framed_server, (nbytes, family, path, alloc),
                             _framed_client, (nbytes, repeats + 1, family, alloc))
    return 2 * nbytes / min(seconds[1:]) / 1e9


# ------------------------------------------------------------------------ shared memory


def _shm_server(results: Any, nbytes: int, path: str, region: str) -> None:
    import torch

    numel = nbytes // 4
    shared = torch.from_file(region, shared=True, size=2 * numel, dtype=torch.float32)
    shm_grads, shm_params = shared[:numel], shared[numel:]
    grads, params = torch.empty(numel), torch.full((numel,), 0.5)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(TIMEOUT_S)
        results.put(("port", path))
        conn, _ = listener.accept()
    with conn:
        conn.settimeout(TIMEOUT_S)
        step = 0
        while (n := _read_header(conn, nbytes)) > 0:
            grads[: n // 4].copy_(shm_grads[: n // 4])  # the push: out of the shared region
            shm_params.copy_(params)  # the pull: into it
            conn.sendall(_header(step, numel))
            step += 1


def _shm_client(results: Any, path: str, nbytes: int, rounds: int, region: str) -> None:
    import torch

    numel = nbytes // 4
    shared = torch.from_file(region, shared=True, size=2 * numel, dtype=torch.float32)
    shm_grads, shm_params = shared[:numel], shared[numel:]
    grads, params = torch.full((numel,), 0.25), torch.empty(numel)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT_S)
        sock.connect(path)
        seconds = []
        for step in range(rounds):
            start = time.perf_counter()
            shm_grads.copy_(grads)
            sock.sendall(_header(step, numel))
            if _read_header(sock, nbytes) != nbytes:
                raise ConnectionError("the pull's header does not match")
            params.copy_(shm_params)
            seconds.append(time.perf_counter() - start)
    results.put(("seconds", seconds))


def shared_memory(nbytes: int, repeats: int) -> float:
    folder = tempfile.mkdtemp(prefix="gh-bench-")
    region = f"/dev/shm/gh-bench-{os.getpid()}"
    try:
        seconds = _client_server("shared memory", _shm_server, (nbytes, os.path.join(folder, "sock"), region),
                                 _shm_client, (nbytes, repeats + 1, region))
    finally:
        Path(region).unlink(missing_ok=True)
    return 2 * nbytes / min(seconds[1:]) / 1e9


# ------------------------------------------------------------------------- Gloo p2p


def _gloo_side(results: Any, rank: int, port: int, nbytes: int, rounds: int) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        numel = nbytes // 4
        if rank == 1:  # the server
            grads, params = torch.empty(numel), torch.full((numel,), 0.5)
            for _ in range(rounds):
                dist.recv(grads, 0)
                dist.send(params, 0)
            return
        grads, params = torch.full((numel,), 0.25), torch.empty(numel)
        seconds = []
        for _ in range(rounds):
            start = time.perf_counter()
            dist.send(grads, 1)
            dist.recv(params, 1)
            seconds.append(time.perf_counter() - start)
        results.put(("seconds", seconds))
    finally:
        dist.destroy_process_group()


def gloo_p2p(nbytes: int, repeats: int) -> float:
    from baselines import _expect, _reap, _spawn, _start

    ctx = _spawn()
    results = ctx.Queue()
    port = free_port()
    procs = [_start(ctx, _gloo_side, results, rank, port, nbytes, repeats + 1) for rank in (0, 1)]
    clean = False
    try:
        seconds = _expect(results, "seconds", procs, "Gloo send/recv")
        clean = True
    finally:
        _reap(procs, TIMEOUT_S if clean else 2.0)
        results.close()
        results.join_thread()
    return 2 * nbytes / min(seconds[1:]) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="MB each way (the model's float32 bytes)")
    parser.add_argument("--repeats", type=int, default=5, help="timed round trips (the best is kept)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    nbytes = args.mb * 10**6 // 4 * 4
    start = time.perf_counter()
    raw = raw_tcp_throughput(nbytes, repeats=args.repeats)
    figures = {
        "raw TCP loopback (reference)": raw,
        "framed TCP, recv_into tensors over bytearrays": framed("tcp", nbytes, args.repeats),
        "framed TCP, recv_into torch.empty tensors": framed("tcp", nbytes, args.repeats, "torch"),
        "framed Unix socket, recv_into tensors over bytearrays": framed("unix", nbytes, args.repeats),
        "shared memory (/dev/shm) + Unix-socket headers": shared_memory(nbytes, args.repeats),
        "torch.distributed Gloo send / recv": gloo_p2p(nbytes, args.repeats),
    }
    rows = [{"transport": k, "GB/s": v, "of raw TCP": v / raw} for k, v in figures.items()]
    print_table(f"push + pull of {args.mb} MB each way, one worker, best of {args.repeats}", rows,
                ["transport", "GB/s", "of raw TCP"])
    payload = {"command": " ".join(sys.argv), "rows": rows, "wall_s": time.perf_counter() - start}
    path = write_json(NAME, payload, args.out)
    print(f"wrote {path} ({payload['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
