"""The parameter server's data plane: gradients in and parameters out on plain sockets (TCP, and
a Unix socket for workers on this host, whose payloads may lie in shared memory instead:
``gradhub.proto.shm``, ``gradhub.server.shared_params``), framed as proto/v1/data.proto says,
beside the gRPC control plane.

One asyncio event loop, in a thread of its own, serves every connection: no thread per worker,
per waiting pull or per stalled upload (and a storm of pushes never delays the gRPC server's
loop). Payloads are received with ``recv_into`` straight into
the buffer the store keeps, and parameters are sent from the store's snapshot without a copy.
A pull that must wait is a coroutine woken by the store's listener, not a thread. The store's
work for a large model (applying an update, encoding a snapshot) runs on a small fixed pool
so that the loop goes on receiving meanwhile; for a small one it runs on the loop itself,
where a thread hop would cost more than the work (``gradhub.server.waits``).

    with DataPlane(manager, "127.0.0.1", max_model_bytes=1 << 30, pool=store_pool) as plane:
        endpoint = plane.endpoint(credential)   # what a worker gets in RegisterResponse.data
"""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
import socket
import ssl
import tempfile
import threading
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Self, TypeVar

import torch

from gradhub.proto import frames, shm
from gradhub.proto.channels import widen_buffers
from gradhub.proto.codec import as_bytes, from_bytes, payload_dtype, torch_dtype
from gradhub.proto.contract.errors import GradhubError, ProtocolError, ResourceExhaustedError
from gradhub.proto.v1 import data_pb2, ps_pb2, tensor_pb2
from gradhub.server.data_connections import READ_AHEAD_BYTES, Connection, TLSConnection
from gradhub.server.ps_requests import (
    init_request,
    pull_part_after,
    push_buffers,
    push_bytes,
    take_clip_total,
    take_push,
)
from gradhub.server.rpc import status_for
from gradhub.server.shared_params import SharedParams
from gradhub.server.store import ParameterStore, Snapshot
from gradhub.server.waits import MAX_PULL_WAIT_S, StoreCalls

log = logging.getLogger(__name__)
T = TypeVar("T")

HELLO_TIMEOUT_S = 10.0  # a connection must authenticate this soon
IDLE_TIMEOUT_S = 120.0  # a frame whose bytes stop coming (either way) for this long ends its connection
MAX_CONNECTIONS = 16384
TLS_READ_BUFFER = 4 << 20  # decrypted bytes a TLS connection buffers before it stops reading


class Stores(Protocol):
    def store(self, job_id: str) -> ParameterStore: ...


class _Closed(Exception):
    """The peer closed the connection, or stopped sending mid-frame."""


class _Refused(Exception):
    """A request that could not be read whole: answered with ``error``, then the connection ends."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class _Session:
    store: ParameterStore
    job_id: str
    rank: int
    registration: int


class DataPlane:
    """Listens on ``host``:``port`` (TCP; 0: any free port) and, when ``unix_socket``, on a Unix
    socket in a private temporary folder, where ``shared_memory`` offers workers regions to put
    their payloads in (``gradhub.proto.shm``); with ``tls``, TCP connections are TLS.
    ``start()`` binds and starts the loop; ``stop()`` ends every connection. A large model's
    store work runs on ``pool``."""

    def __init__(self, stores: Stores, host: str, port: int = 0, *, max_model_bytes: int, pool: Executor,
                 unix_socket: bool = True, shared_memory: bool = True, tls: ssl.SSLContext | None = None) -> None:
        self._stores = stores
        self._tls = tls  # the TCP port's TLS (the Unix socket is private to this host and user)
        self._host, self._port = host, port
        self._max_model_bytes = max_model_bytes
        self._unix = unix_socket
        self._shared_memory = shared_memory and shm.available()
        self._listeners: list[tuple[socket.socket, str]] = []
        self._unix_dir: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._calls = StoreCalls(pool)
        self._shared = SharedParams()
        self._stopping: asyncio.Event | None = None
        self._done: threading.Event = threading.Event()
        self._started = threading.Event()
        self.port = 0
        self.unix_path = ""
        self.host_id = frames.host_id()

    # -------------------------------------------------------------- lifecycle
    def start(self) -> Self:
        host = self._host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        dualstack = host == "::" and socket.has_dualstack_ipv6()  # like gRPC's [::]: IPv4 too
        tcp = socket.create_server((host, self._port), family=family, backlog=1024, dualstack_ipv6=dualstack)
        tcp.setblocking(False)
        self._listeners.append((tcp, "tcp"))
        self.port = tcp.getsockname()[1]
        if self._unix and self.host_id:
            self._unix_dir = tempfile.mkdtemp(prefix="gradhub-data-")  # mode 0700: this user only
            path = str(Path(self._unix_dir) / "s")
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            unix.bind(path)
            unix.listen(1024)
            unix.setblocking(False)
            self._listeners.append((unix, "unix"))
            self.unix_path = path
        self._thread = threading.Thread(target=self._run, name="gradhub-data-plane", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("data plane: its loop did not start")
        log.info("data plane on %s:%d%s", self._host, self.port, f" and {self.unix_path}" if self.unix_path else "")
        return self

    def stop(self, grace: float = 5.0) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stopping.set)
            self._done.wait(grace + 5)
        if self._thread is not None:
            self._thread.join(grace + 5)
        for sock, _ in self._listeners:
            sock.close()
        if self._unix_dir is not None:
            shutil.rmtree(self._unix_dir, ignore_errors=True)
        self._listeners, self._thread, self._unix_dir, self._loop = [], None, None, None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def endpoint(self, credential: str, tcp_host: str = "") -> ps_pb2.DataEndpoint:
        """What a worker needs to connect (RegisterResponse.data)."""
        return ps_pb2.DataEndpoint(protocol=frames.DATA_PROTOCOL, tcp_host=tcp_host, tcp_port=self.port,
                                   unix_path=self.unix_path, host_id=self.host_id if self.unix_path else "",
                                   credential=credential, tls=self._tls is not None,
                                   shared_memory=bool(self.unix_path) and self._shared_memory)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        connections: set[asyncio.Task[None]] = set()
        accepting = [asyncio.create_task(self._accept(sock, kind, connections)) for sock, kind in self._listeners
                     if not (kind == "tcp" and self._tls)]
        tls_server = None
        if self._tls is not None:
            tcp = next(sock for sock, kind in self._listeners if kind == "tcp")
            tls_server = await asyncio.start_server(
                lambda r, w: self._serve_tls(r, w, connections), sock=tcp, ssl=self._tls,
                ssl_handshake_timeout=HELLO_TIMEOUT_S, limit=TLS_READ_BUFFER)
        self._started.set()
        try:
            await self._stopping.wait()
            if tls_server is not None:
                tls_server.close()
            for task in accepting + list(connections):
                task.cancel()
            await asyncio.gather(*accepting, *connections, return_exceptions=True)
        finally:
            self._done.set()

    async def _accept(self, listener: socket.socket, kind: str, connections: set[asyncio.Task[None]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(listener)
            if len(connections) >= MAX_CONNECTIONS:
                log.warning("data plane: refusing a connection over the limit of %d", MAX_CONNECTIONS)
                sock.close()
                continue
            sock.setblocking(False)
            if kind == "tcp":
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                widen_buffers(sock)
            task = asyncio.create_task(self._serve(Connection(sock, kind)))
            connections.add(task)
            task.add_done_callback(connections.discard)

    async def _serve_tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         connections: set[asyncio.Task[None]]) -> None:
        """A TLS connection, its handshake done (asyncio's server runs this as a task)."""
        if len(connections) >= MAX_CONNECTIONS:
            log.warning("data plane: refusing a connection over the limit of %d", MAX_CONNECTIONS)
            writer.close()
            return
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.current_task()
        assert task is not None
        connections.add(task)
        try:
            await self._serve(TLSConnection(reader, writer))
        finally:
            connections.discard(task)

    # -------------------------------------------------------------- one connection
    async def _serve(self, conn: Connection) -> None:
        try:
            try:
                session = await self._hello(conn)
                while (frame := await self._read_frame(conn, frames.MAX_HEADER_BYTES, None)) is not None:
                    await self._request(conn, session, frame)
            except _Refused as refused:
                await self._send_error(conn, refused.error)
        except (_Closed, ConnectionError, TimeoutError, ssl.SSLError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("data plane: unexpected error on a connection")
        finally:
            conn.close()

    async def _hello(self, conn: Connection) -> _Session:
        frame = await self._read_frame(conn, frames.MAX_HELLO_BYTES, HELLO_TIMEOUT_S)
        if frame is None:
            raise _Closed
        try:
            if frame.WhichOneof("kind") != "hello" or frame.payload_bytes:
                raise ProtocolError("hello: a connection must start with a DataHello (and no payload)")
            hello = frame.hello
            if hello.protocol != frames.DATA_PROTOCOL:
                raise ProtocolError(f"hello.protocol: version {hello.protocol} is not the server's "
                                    f"{frames.DATA_PROTOCOL}")
            calls = self._calls
            store = await calls.run(self._stores.store, hello.job_id)
            registration = await calls.run(store.open_session, hello.rank, hello.credential, conn.transport)
        except GradhubError as e:
            raise _Refused(e) from e
        calls.signal(store)  # from now on the store wakes this loop's waiting pulls
        await self._send(conn, frames.frame_head(data_pb2.DataFrame(
            reply=data_pb2.DataReply(accepted=True, version=store.version))))
        return _Session(store, hello.job_id, hello.rank, registration)

    async def _request(self, conn: Connection, session: _Session, frame: data_pb2.DataFrame) -> None:
        kind = frame.WhichOneof("kind")
        try:
            session.store.check_session(session.rank, session.registration)
            if frame.in_region:
                _check_in_region(conn, frame, kind)
            if kind == "region":
                if frame.payload_bytes:
                    raise ProtocolError("payload_bytes: a region request carries no payload")
            elif kind in ("push", "init"):
                header = getattr(frame, kind)
                _check_worker(session, header.job_id, header.rank, kind)
                if frame.pull_next and session.store.config.clips_across_shards:
                    raise ProtocolError("pull_next: a job that clips its gradient over shards pulls with "
                                        "clip_total_sq once every shard's part is in")
            elif kind == "pull":
                _check_worker(session, frame.pull.job_id, frame.pull.rank, kind)
                if frame.payload_bytes:
                    raise ProtocolError("payload_bytes: a pull carries no payload")
                torch_dtype(frame.pull.dtype)  # a dtype the wire knows
            else:
                raise ProtocolError(f"kind: a worker sends init, push, pull or region, not {kind or 'nothing'}")
        except GradhubError as e:
            raise _Refused(e) from e
        reply_to = frame.reply_offset if frame.in_region else None
        if kind == "region":
            await self._region(conn, session, frame.region.bytes)
        elif kind == "push":
            await self._push(conn, session, frame)
        elif kind == "init":
            await self._init(conn, session, frame)
        else:
            if frame.pull.HasField("clip_total_sq"):  # no call (nor thread hop) for the others' pulls
                try:
                    await self._calls.call(session.store, take_clip_total, session.store, frame.pull)
                except Exception as e:  # noqa: BLE001 - any error goes back to the worker
                    await self._send_error(conn, e)
                    return
            await self._pull(conn, session, frame.pull.step, frame.pull.dtype or tensor_pb2.FLOAT32,
                             part=(frame.pull.first_tensor, frame.pull.tensor_count), ahead=True, reply_to=reply_to)

    async def _push(self, conn: Connection, session: _Session, frame: data_pb2.DataFrame) -> None:
        store, header = session.store, frame.push
        try:
            nbytes = push_bytes(store, header)
            if frame.payload_bytes != nbytes:
                raise ProtocolError(f"payload_bytes: {frame.payload_bytes}, the job's gradient has {nbytes}")
            buffers = push_buffers(header)
        except GradhubError as e:
            raise _Refused(e) from e
        if frame.in_region:  # read where the worker wrote it (the store may hold it till the step is applied)
            try:
                payload = _in_region(conn, frame.region_offset, nbytes, "region_offset")
            except GradhubError as e:
                raise _Refused(e) from e
        else:
            payload = memoryview(conn.gradient_buffer(nbytes, store.version))
            await self._recv_into(conn, payload, IDLE_TIMEOUT_S)
        wire_dtype = store.config.params_dtype  # of the parameters this push may pull
        grad = from_bytes(payload, payload_dtype(store.config.wire_dtype))
        pull_step = header.step + 1 if frame.pull_next else None
        try:
            accepted, version, snapshot, whole = await self._calls.call(
                store, _push_then_try_pull, store, header, grad, buffers, pull_step, wire_dtype)
        except Exception as e:  # noqa: BLE001 - any error goes back to the worker (as gRPC's handler does)
            if not frame.in_region:
                conn.buffer = None  # the store may hold it
            await self._send_error(conn, e)
            return
        if not frame.in_region:  # ps-sync keeps the gradient until every worker's is in (version step + 1)
            conn.free_at = header.step + 1 if accepted and store.config.mode == "ps-sync" else 0
        if pull_step is not None:
            await self._pull(conn, session, pull_step, wire_dtype, snapshot, pull_part_after(store, header),
                             reply_to=frame.reply_offset if frame.in_region else None)
            return
        reply = data_pb2.DataReply(accepted=accepted, version=version)
        if whole:  # a job that clips over shards: with this shard's part of the norm, once it has it
            # (a bucket that leaves the worker's slice of the step incomplete is answered at once)
            try:
                reply.clip_part_sq = await self._calls.until(
                    store, functools.partial(store.clip_part, header.step),
                    functools.partial(store.waiting_for, header.step + 1), MAX_PULL_WAIT_S)
            except Exception as e:  # noqa: BLE001 - any error goes back to the worker
                await self._send_error(conn, e)
                return
        await self._send(conn, frames.frame_head(data_pb2.DataFrame(reply=reply)))

    async def _init(self, conn: Connection, session: _Session, frame: data_pb2.DataFrame) -> None:
        try:
            config = session.store.config
            init = init_request(frame.init, self._max_model_bytes, (config.shard, config.shards))
            if frame.payload_bytes != init.payload_bytes:
                raise ProtocolError(f"payload_bytes: {frame.payload_bytes}, the tensors listed hold "
                                    f"{init.payload_bytes}")
        except GradhubError as e:
            raise _Refused(e) from e
        buffer = bytearray(init.payload_bytes)
        await self._recv_into(conn, memoryview(buffer), IDLE_TIMEOUT_S)
        flat = from_bytes(buffer, torch.float32)  # none for a sharded job's control store (but frozen ones)
        try:
            accepted = await self._calls.run(init.take, session.store, flat)
        except Exception as e:  # noqa: BLE001 - any error goes back to the worker (as gRPC's handler does)
            await self._send_error(conn, e)
            return
        await self._send(conn, frames.frame_head(data_pb2.DataFrame(
            reply=data_pb2.DataReply(accepted=accepted, version=session.store.version))))

    async def _pull(self, conn: Connection, session: _Session, step: int, wire_dtype: int,
                    snapshot: Snapshot | None = None, part: tuple[int, int] = (0, 0), ahead: bool = False,
                    reply_to: int | None = None) -> None:
        """Send the parameters of ``part`` for ``step`` (``snapshot`` when the caller already has
        them) once the mode allows (``ahead``: a bucket's as soon as it is applied), or write
        them in the connection's region from ``reply_to``; after MAX_PULL_WAIT_S, a
        DEADLINE_EXCEEDED error (the worker asks again)."""
        store = session.store
        if snapshot is None:
            try:
                snapshot = await self._calls.pull(store, session.rank, step, wire_dtype, MAX_PULL_WAIT_S, part,
                                                  ahead)
            except Exception as e:  # noqa: BLE001 - any error goes back to the worker
                await self._send_error(conn, e)
                return
        data = as_bytes(snapshot.data)
        reply = data_pb2.DataFrame(
            reply=data_pb2.DataReply(version=snapshot.version, params=ps_pb2.PullHeader(
                version=snapshot.version, tensors=snapshot.layout.metas(wire_dtype), buffers=snapshot.buffers,
                world_size=snapshot.world_size)),
            payload_bytes=len(data))
        if reply_to is None:
            await self._send(conn, frames.frame_head(reply), data)
            return
        fds: list[int] = []
        try:
            region = await self._shared_region(store, part, snapshot, data)
            if region is not None:  # written once for all of the job's workers here
                reply.shared, reply_to = True, 0
                if conn.job_region is not region:
                    fds, reply.reply.region_bytes = [region.fd], region.size
                    conn.job_region = region
            else:
                await self._calls.call(store, _copy, _in_region(conn, reply_to, len(data), "reply_offset"), data)
        except Exception as e:  # noqa: BLE001 - any error goes back to the worker
            await self._send_error(conn, e)
            return
        reply.in_region, reply.region_offset = True, reply_to
        await self._send(conn, frames.frame_head(reply), fds=fds)

    async def _shared_region(self, store: ParameterStore, part: tuple[int, int], snapshot: Snapshot,
                             data: memoryview) -> shm.Region | None:
        """The job's region with ``snapshot`` in it, when the job's pulls of ``part`` share one
        (None: the pull's own region takes the parameters, as when no shared one can be made)."""
        if not SharedParams.applies(store, part):
            return None
        try:
            return await self._shared.publish(store, snapshot, data,
                                              lambda to, bytes_: self._calls.call(store, _copy, to, bytes_))
        except OSError as e:
            log.warning("data plane: job %s's parameters go into each worker's region: no shared region (%s)",
                        store.config.job_id, e)
            return None

    async def _region(self, conn: Connection, session: _Session, nbytes: int) -> None:
        """A new shared-memory region for ``conn`` (its memfd goes with the reply), replacing
        the one it had."""
        limit = 2 * (self._max_model_bytes + shm.ALIGN)  # a gradient and the parameters, each aligned
        try:
            if conn.transport != "unix" or not self._shared_memory:
                raise ProtocolError("region: shared memory is offered on this server's Unix socket only "
                                    "(DataEndpoint.shared_memory)")
            if not 0 < nbytes <= limit:
                raise ProtocolError(f"region.bytes: {nbytes}; a region holds 1 to {limit} bytes (a gradient and the "
                                    "parameters of a model at the server's maximum model size)")
        except GradhubError as e:
            raise _Refused(e) from e
        conn.region = None
        try:
            region = shm.Region.create(nbytes)
        except OSError as e:
            await self._send_error(conn, ResourceExhaustedError(f"region: {nbytes} bytes of shared memory: {e}"))
            return
        try:
            await self._send(conn, frames.frame_head(data_pb2.DataFrame(
                reply=data_pb2.DataReply(accepted=True, region_bytes=nbytes))), fds=[region.fd])
        finally:
            region.close_fd()  # the worker has its own; the mapping stays
        conn.region = region
        session.store.note_transport(session.rank, "shm")

    # -------------------------------------------------------------- plumbing
    async def _read_frame(self, conn: Connection, limit: int, timeout: float | None) -> data_pb2.DataFrame | None:
        """The next frame's header (its payload is the caller's to read); None when the peer
        closed the connection between frames."""
        try:
            await self._recv_into(conn, memoryview(conn.prefix), timeout)
        except _Closed as closed:
            if closed.args and closed.args[0] == 0:
                return None
            raise
        try:
            length = frames.header_length(conn.prefix, limit)
        except ProtocolError as e:
            raise _Refused(e) from e
        raw = bytearray(length)
        await self._recv_into(conn, memoryview(raw), IDLE_TIMEOUT_S if timeout is None else timeout)
        try:
            return frames.parse_header(raw)
        except ProtocolError as e:
            raise _Refused(e) from e

    async def _recv_into(self, conn: Connection, view: memoryview, timeout: float | None) -> None:
        """Fill ``view``; _Closed(bytes received) when the peer closes first or sends nothing
        for ``timeout`` seconds (None: wait as long as it takes, for the first byte only).
        Small reads go through the read-ahead buffer; large ones land in ``view`` directly."""
        total = len(view)
        pos = min(conn.end - conn.start, total)
        view[:pos] = conn.ahead[conn.start : conn.start + pos]
        conn.start += pos
        while pos < total:
            wait = timeout if pos == 0 else IDLE_TIMEOUT_S
            if total - pos < READ_AHEAD_BYTES // 4:
                got = await self._recv_some(conn, conn.ahead, wait, pos)
                take = min(got, total - pos)
                view[pos : pos + take] = conn.ahead[:take]
                conn.start, conn.end = take, got
            else:
                take = await self._recv_some(conn, view[pos:], wait, pos)
            pos += take

    async def _recv_some(self, conn: Connection, into: memoryview, timeout: float | None, pos: int) -> int:
        """One receive into ``into`` (at least a byte); _Closed(pos) when the peer closes or
        sends nothing for ``timeout`` seconds."""
        try:
            got = await conn.recv_some(into, timeout)
        except TimeoutError:
            raise _Closed(pos) from None
        if got == 0:
            raise _Closed(pos)
        return got

    async def _send(self, conn: Connection, head: bytes, payload: memoryview | None = None,
                    fds: list[int] | None = None) -> None:
        """Write a frame (a reader that stalls is dropped), with ``fds`` (a Unix socket's)."""
        parts = [memoryview(head)] if payload is None or not len(payload) else [memoryview(head), payload]
        await conn.send(parts, IDLE_TIMEOUT_S + sum(len(p) for p in parts) / 10e6, fds or ())

    async def _send_error(self, conn: Connection, exc: BaseException) -> None:
        code = status_for(exc)
        if not isinstance(exc, GradhubError | TimeoutError):
            log.error("data plane: unexpected error", exc_info=exc)
        await self._send(conn, frames.frame_head(frames.error_reply(exc, code.name)))


def _push_then_try_pull(store: ParameterStore, header: ps_pb2.PushHeader, grad: torch.Tensor,
                        buffers: dict[str, torch.Tensor] | None, pull_step: int | None, wire_dtype: int,
                        ) -> tuple[bool, int, Snapshot | None, bool]:
    """A push (decoded when quantised), and (``pull_step``) the parameters for the next step
    when they are ready already; last, for a job that clips over shards, whether the worker's
    whole gradient of the step is in (a bucket may leave some of it to come; False for others)."""
    accepted, version = take_push(store, header, grad, buffers)
    snapshot = None if pull_step is None else store.try_pull(header.rank, pull_step, wire_dtype,
                                                              *pull_part_after(store, header))
    whole = store.config.clips_across_shards and store.pushed(header.rank, header.step)
    return accepted, version, snapshot, whole


def _check_in_region(conn: Connection, frame: data_pb2.DataFrame, kind: str | None) -> None:
    if kind not in ("push", "pull"):
        raise ProtocolError(f"in_region: only a push's and a pull's payloads go in the region, not a "
                            f"{kind or 'frame without a kind'}'s")
    if conn.region is None:
        raise ProtocolError("in_region: this connection has no region (ask for one with a RegionRequest)")
    for field in ("region_offset", "reply_offset"):
        if getattr(frame, field) % shm.ALIGN:
            raise ProtocolError(f"{field}: {getattr(frame, field)} is not a multiple of {shm.ALIGN}")


def _in_region(conn: Connection, offset: int, nbytes: int, field: str) -> memoryview:
    """Bytes [offset, offset + nbytes) of the region of a request that ``_check_in_region`` passed."""
    region = conn.region
    assert region is not None  # _check_in_region: the connection has one, the offset is aligned
    if offset + nbytes > region.size:
        raise ProtocolError(f"{field}: {nbytes} bytes from offset {offset} must lie in the region's {region.size}")
    return region.view(offset, nbytes)


_PARALLEL_COPY_BYTES = 4 << 20
"""Copies from this size on take torch's threads; smaller ones are one ``memcpy``. A small model's
copy split over OpenMP threads left them spinning beside a worker's compute on the same cores: a
25k-parameter push + pull took 4.0 ms instead of 0.5 ms."""


def _copy(target: memoryview, data: memoryview) -> None:
    """``data`` into ``target``: one ``memcpy`` below ``_PARALLEL_COPY_BYTES``, torch's threads above."""
    if len(data) < _PARALLEL_COPY_BYTES:
        target[:] = data
    else:
        torch.frombuffer(target, dtype=torch.uint8).copy_(torch.frombuffer(data, dtype=torch.uint8))


def _check_worker(session: _Session, job_id: str, rank: int, kind: str) -> None:
    if job_id != session.job_id or rank != session.rank:
        raise ProtocolError(f"{kind}: job {job_id!r} rank {rank} is not this connection's worker "
                            f"(job {session.job_id!r} rank {session.rank})")
