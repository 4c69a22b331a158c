"""A swarm of simulated ps workers: lightweight protocol clients, many per process, that register
and heartbeat on the control plane (grpc.aio) and push and pull a small model on the data plane
(asyncio sockets), as real workers would but without torch models or Ray. Used by the scale test
and the scale benchmark.

    run_swarm(address, job_id, ranks=range(0, 128), steps=20, numel=1000, results=queue, credential=cred)
"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any

CONNECT_TIMEOUT_S = 60.0


async def _read_reply(reader: asyncio.StreamReader) -> tuple[Any, bytes]:
    from gradhub.proto import frames

    prefix = await reader.readexactly(frames.PREFIX.size)
    frame = frames.parse_header(await reader.readexactly(frames.header_length(prefix, frames.MAX_HEADER_BYTES)))
    payload = await reader.readexactly(frame.payload_bytes) if frame.payload_bytes else b""
    if frame.reply.HasField("error"):
        raise frames.reply_error(frame.reply.error)
    return frame.reply, payload


async def _worker(control: Any, job_id: str, rank: int, steps: int, numel: int, stats: dict[str, Any],
                  metadata: Any) -> None:
    from gradhub.proto import frames
    from gradhub.proto.codec import Layout
    from gradhub.proto.v1 import data_pb2, ps_pb2, tensor_pb2

    layout = Layout(("w",), ((numel,),))
    reg = await control.Register(ps_pb2.RegisterRequest(job_id=job_id, rank=rank, host="swarm", pid=rank,
                                                        total_steps=steps, train_size=1), timeout=CONNECT_TIMEOUT_S,
                                  metadata=metadata)
    e = reg.data
    if e.unix_path and e.host_id == frames.host_id():
        reader, writer = await asyncio.open_unix_connection(e.unix_path)
    else:
        reader, writer = await asyncio.open_connection(e.tcp_host or "127.0.0.1", e.tcp_port)
    stop = asyncio.Event()

    async def beat() -> None:
        while not stop.is_set():
            await control.Heartbeat(ps_pb2.HeartbeatRequest(job_id=job_id, rank=rank), timeout=30, metadata=metadata)
            stats["heartbeats"] += 1
            try:
                async with asyncio.timeout(reg.heartbeat_interval_s):
                    await stop.wait()
            except TimeoutError:
                pass

    beating = asyncio.create_task(beat())
    try:
        async def call(frame: data_pb2.DataFrame, payload: bytes = b"") -> tuple[Any, bytes]:
            writer.write(frames.frame_head(frame) + payload)
            await writer.drain()
            return await _read_reply(reader)

        await call(data_pb2.DataFrame(hello=data_pb2.DataHello(protocol=frames.DATA_PROTOCOL, job_id=job_id,
                                                               rank=rank, credential=e.credential)))
        metas = layout.metas(tensor_pb2.FLOAT32)
        zeros = bytes(4 * numel)
        if reg.needs_init:
            await call(data_pb2.DataFrame(init=ps_pb2.PushHeader(job_id=job_id, rank=rank, tensors=metas),
                                          payload_bytes=len(zeros)), zeros)
        reply, _ = await call(data_pb2.DataFrame(pull=ps_pb2.PullRequest(job_id=job_id, rank=rank, step=0,
                                                                         dtype=tensor_pb2.FLOAT32)))
        version = reply.version
        grad = struct.pack(f"<{numel}f", *([1e-3] * numel))
        for step in range(reg.next_step, steps):
            header = ps_pb2.PushHeader(job_id=job_id, rank=rank, step=step, base_version=version, tensors=metas)
            last = step + 1 == steps
            reply, params = await call(data_pb2.DataFrame(push=header, pull_next=not last, payload_bytes=len(grad)),
                                       grad)
            if not last and len(params) != len(grad):
                raise AssertionError(f"worker {rank}: {len(params)} bytes of parameters, expected {len(grad)}")
            version = reply.version
            stats["pushes"] += 1
            now = time.time()  # wall clock: comparable across the swarm's processes
            stats["first_push_at"] = min(stats["first_push_at"], now)
            stats["last_push_at"] = max(stats["last_push_at"], now)
        stats["done"] += 1
    finally:
        stop.set()
        await beating
        writer.close()


async def _swarm(address: str, job_id: str, ranks: range, steps: int, numel: int, credential: str) -> dict[str, Any]:
    import grpc.aio

    from gradhub.proto.contract.errors import JOB_CREDENTIAL_KEY
    from gradhub.proto.v1 import ps_pb2_grpc

    stats: dict[str, Any] = {"pushes": 0, "heartbeats": 0, "done": 0, "first_push_at": float("inf"),
                             "last_push_at": 0.0}
    async with grpc.aio.insecure_channel(address) as channel:
        control = ps_pb2_grpc.WorkerControlStub(channel)
        started = time.perf_counter()
        metadata = ((JOB_CREDENTIAL_KEY, credential),)
        results = await asyncio.gather(*(_worker(control, job_id, r, steps, numel, stats, metadata) for r in ranks),
                                       return_exceptions=True)
        stats["seconds"] = time.perf_counter() - started
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    stats["errors"] = errors[:5]
    stats["failed"] = len(errors)
    return stats


def run_swarm(address: str, job_id: str, ranks: range, steps: int, numel: int, results: Any,
              credential: str) -> None:
    """A process's share of the swarm: workers ``ranks`` of ``job_id`` (whose worker credential is
    ``credential``); puts its stats on ``results``."""
    try:
        results.put(asyncio.run(_swarm(address, job_id, ranks, steps, numel, credential)))
    except BaseException as e:
        results.put({"failed": len(ranks), "errors": [repr(e)], "pushes": 0, "done": 0})
        raise


def start_swarm(address: str, job_id: str, workers: int, processes: int, steps: int, numel: int,
                credential: str) -> tuple[list[Any], Any]:
    """``workers`` simulated workers of ``job_id`` spread over ``processes`` spawned processes,
    started; returns the processes and the queue each puts its stats on when done."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=run_swarm, args=(address, job_id, range(i, workers, processes), steps, numel,
                                                 results, credential), daemon=True) for i in range(processes)]
    for p in procs:
        p.start()
    return procs, results
