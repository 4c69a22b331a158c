"""A worker's connection to the server's data plane (see proto/v1/data.proto): its gradients go
out and the parameters come in on one socket, a Unix socket when the worker shares the server's
host and network namespace, TCP otherwise. Blocking sockets: the worker is a plain process
whose training loop waits for its parameters anyway.

On the Unix socket of a server that offers shared memory, a CPU model's payloads go through a
region both map (``gradhub.proto.shm``): a push writes its gradient there (converted to the
wire dtype in the same copy) and the pulled parameters are copied out of it into the model's
(in ps-sync from the job's region, which the server writes once a version for all of its
workers on the host), while the socket carries the frames' headers alone. Elsewhere, and for a
GPU model, payloads are sent from the tensors' own memory and received with ``recv_into``
straight into the model's flat parameters (CPU, float32), or through a staging buffer (pinned
for a GPU model; the wire dtype when the job compresses).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl

import torch

from gradhub.proto import frames, shm
from gradhub.proto.channels import SYSTEM_TRUST, tls_context, widen_buffers
from gradhub.proto.codec import Layout, as_bytes, payload_dtype, torch_dtype
from gradhub.proto.contract.errors import ProtocolError, ResourceExhaustedError
from gradhub.proto.v1 import data_pb2, ps_pb2

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
# a reply may wait for the other workers up to the server's 60 s, then the payload's transfer
SOCKET_TIMEOUT_S = 90.0
READ_AHEAD_BYTES = 64 << 10  # reads of less than a quarter of this take what else has arrived too


class ServerWaitTimeout(Exception):
    """The server's wait for the other workers ran out (after a minute): ask again."""


class DataClosed(ConnectionError):
    """The server closed the data-plane connection (or it broke) before the reply was whole."""


class DataLink:
    """One worker's data-plane connection; ``connect()`` opens and authenticates it."""

    def __init__(self, endpoint: ps_pb2.DataEndpoint, job_id: str, rank: int, control_host: str,
                 tls_ca: bytes | None = None, shared_memory: bool = True) -> None:
        """``control_host``: the host this worker reaches the server's gRPC port at (the TCP
        port's default host, and the name a TLS certificate is checked against); ``tls_ca``:
        what verifies the server when its TCP port speaks TLS (None: the system's CAs);
        ``shared_memory``: use the server's shared memory when it offers it (Unix socket)."""
        self.endpoint, self.job_id, self.rank = endpoint, job_id, rank
        self._control_host = control_host
        self._tls_ca = tls_ca
        self._tcp_host = endpoint.tcp_host or control_host
        self._sock: socket.socket | None = None
        self.kind = ""  # "shm" (the Unix socket with shared memory), "unix" or "tcp" once connected
        self._shared_memory = shared_memory and endpoint.shared_memory and shm.available()
        self._region: shm.Region | None = None  # this connection's: gradients out (and parameters in)
        self._job_region: shm.Region | None = None  # a ps-sync job's parameters, shared by its workers here
        self._prefix = bytearray(frames.PREFIX.size)
        self._ahead = memoryview(bytearray(READ_AHEAD_BYTES))
        self._start = self._end = 0
        self._staging: dict[tuple[str, torch.dtype, bool], torch.Tensor] = {}

    @property
    def where(self) -> str:
        return (f"{self.kind}:{self.endpoint.unix_path}" if self.kind in ("unix", "shm")
                else f"tcp:{self._tcp_host}:{self.endpoint.tcp_port}")

    def connect(self) -> None:
        """Open the connection (the Unix socket when this host is the server's, else TCP) and
        say who this worker is; raises OSError when unreachable, the server's error (AuthError,
        NotFoundError, ...) when it refuses."""
        self.close()
        e = self.endpoint
        if e.protocol != frames.DATA_PROTOCOL:
            raise ProtocolError(f"data.protocol: the server speaks version {e.protocol}, this worker "
                                f"{frames.DATA_PROTOCOL}")
        sock = None
        if e.unix_path and e.host_id and e.host_id == frames.host_id():
            with contextlib.suppress(OSError):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                widen_buffers(sock)
                sock.settimeout(CONNECT_TIMEOUT_S)
                sock.connect(e.unix_path)
                self.kind = "unix"
        if self.kind != "unix":
            if sock is not None:
                sock.close()
            sock = socket.create_connection((self._tcp_host, e.tcp_port), timeout=CONNECT_TIMEOUT_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if e.tls:
                try:
                    sock = tls_context(self._tls_ca or SYSTEM_TRUST).wrap_socket(
                        sock, server_hostname=self._control_host)
                except BaseException:
                    sock.close()
                    raise
            self.kind = "tcp"
        assert sock is not None
        self._sock = sock
        try:
            hello = data_pb2.DataHello(protocol=frames.DATA_PROTOCOL, job_id=self.job_id, rank=self.rank,
                                       credential=e.credential)
            self._exchange(data_pb2.DataFrame(hello=hello))
            sock.settimeout(SOCKET_TIMEOUT_S)
            if self.kind == "unix" and self._shared_memory:
                self.kind = "shm"  # its region comes with the first payload (whose size it takes)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.kind = ""
        for region in (self._region, self._job_region):
            if region is not None:
                region.close()
        self._region = self._job_region = None
        self._start = self._end = 0  # what was read ahead belonged to that connection

    @property
    def connected(self) -> bool:
        return self._sock is not None

    # ------------------------------------------------------------------ requests
    def init(self, header: ps_pb2.PushHeader, flat: torch.Tensor) -> data_pb2.DataReply:
        data = self._outgoing(flat, torch.float32)
        return self._exchange(data_pb2.DataFrame(init=header, payload_bytes=len(data)), data)

    def push(self, header: ps_pb2.PushHeader, grads: torch.Tensor, wire_dtype: int,
             then_pull: tuple[Layout, torch.Tensor] | None = None, params_dtype: int | None = None,
             ) -> data_pb2.DataReply:
        """Send a gradient (a quantised push: its payload, uint8); with ``then_pull`` (layout,
        params) the reply brings the parameters for the next step into ``params``, in
        ``params_dtype`` (by default ``wire_dtype``)."""
        pulled_dtype = wire_dtype if params_dtype is None else params_dtype
        frame = data_pb2.DataFrame(push=header, pull_next=then_pull is not None)
        dtype = payload_dtype(wire_dtype)
        nbytes = grads.numel() * dtype.itemsize
        pulled = 0 if then_pull is None else then_pull[0].numel * torch_dtype(pulled_dtype).itemsize
        tensors = (grads,) if then_pull is None else (grads, then_pull[1])
        # the gradient in the region, then the parameters
        region = self._region_of(shm.aligned(nbytes) + pulled) if self._in_region(nbytes + pulled, *tensors) else None
        if region is not None:
            region.tensor(0, grads.numel(), dtype).copy_(grads.detach().reshape(-1))
            frame.payload_bytes, frame.in_region, frame.reply_offset = nbytes, True, shm.aligned(nbytes)
            data = None
        else:
            data = self._outgoing(grads, dtype)
            frame.payload_bytes = len(data)
        into = None if then_pull is None else self._params_target(*then_pull, pulled_dtype, frame.in_region)
        return self._exchange(frame, data, into)

    def pull(self, request: ps_pb2.PullRequest, layout: Layout, params: torch.Tensor) -> data_pb2.DataReply:
        frame = data_pb2.DataFrame(pull=request)
        nbytes = layout.numel * torch_dtype(request.dtype).itemsize
        if self._in_region(nbytes, params):  # (room for a gradient of the same size too: a push and pull come next)
            frame.in_region = self._region_of(nbytes, shm.aligned(nbytes) + nbytes) is not None
        return self._exchange(frame, None, self._params_target(layout, params, request.dtype, frame.in_region))

    def _in_region(self, size: int, *tensors: torch.Tensor) -> bool:
        """Whether these tensors' payloads go through shared memory: CPU tensors on a link that
        has it, when there are any (``size``; a sharded job's control store holds no value).
        (A GPU model's go on the socket through pinned staging buffers, whose copies to and
        from the device are the fast ones; a region is not pinned memory.)"""
        return self.kind == "shm" and size > 0 and all(t.device.type == "cpu" for t in tensors)

    # ------------------------------------------------------------------ plumbing
    def _outgoing(self, flat: torch.Tensor, dtype: torch.dtype) -> memoryview:
        flat = flat.detach()
        if flat.device.type == "cpu" and flat.dtype == dtype and flat.is_contiguous():
            return as_bytes(flat)
        staging = self._buffer(dtype, flat.numel(), pinned=flat.device.type == "cuda", key="out")
        staging.copy_(flat.reshape(-1))
        return as_bytes(staging)

    def _region_of(self, nbytes: int, room: int = 0) -> shm.Region | None:
        """This connection's region, asked for (``room`` bytes, or ``nbytes``; a larger one
        replaces it) when it holds less than ``nbytes``; None when the server cannot give
        one: then this link goes on with payloads on the Unix socket (reconnected), as said
        in a warning."""
        if self._region is not None and self._region.size >= nbytes:
            return self._region
        if self._region is not None:
            self._region.close()
            self._region = None
        nbytes, where = max(nbytes, room), self.where
        fds: list[int] = []
        try:
            reply = self._exchange(data_pb2.DataFrame(region=data_pb2.RegionRequest(bytes=nbytes)), fds=fds)
            if reply.region_bytes != nbytes or len(fds) != 1:
                raise ProtocolError(f"region: the server answered with {len(fds)} descriptors for "
                                    f"{reply.region_bytes} bytes, not one for {nbytes}")
            try:
                self._region = shm.Region.attach(fds.pop(), nbytes)
            except ValueError as e:
                raise ProtocolError(str(e)) from None
        except (ResourceExhaustedError, ProtocolError) as e:  # the server has no region for it, or a bad one
            log.warning("worker %d: no shared memory from the data plane at %s (%s: %s); payloads go on the "
                        "Unix socket instead", self.rank, where, type(e).__name__, e)
            self._shared_memory = False
            self.connect()  # (a refusal ends the connection)
            return None
        except BaseException:
            self.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)
        return self._region

    def _params_target(self, layout: Layout, params: torch.Tensor, wire_dtype: int,
                       in_region: bool = False) -> _ParamsTarget:
        """Where a reply's parameters go (``in_region``: copied from the region into ``params``)."""
        dtype = torch_dtype(wire_dtype)
        direct = in_region or (params.device.type == "cpu" and params.dtype == dtype and params.is_contiguous())
        staging = None if direct else self._buffer(dtype, layout.numel, pinned=params.device.type == "cuda", key="in")
        return _ParamsTarget(layout, params, wire_dtype, staging)

    def _buffer(self, dtype: torch.dtype, numel: int, pinned: bool, key: str) -> torch.Tensor:
        k = (key, dtype, pinned)
        buf = self._staging.get(k)
        if buf is None or buf.numel() < numel:  # the largest yet: a fragment takes the front of it
            buf = torch.empty(numel, dtype=dtype, pin_memory=pinned and torch.cuda.is_available())
            self._staging[k] = buf
        return buf[:numel]

    def _exchange(self, frame: data_pb2.DataFrame, payload: memoryview | None = None,
                  into: _ParamsTarget | None = None, fds: list[int] | None = None) -> data_pb2.DataReply:
        """Send one request and read its reply (its payload into ``into``, from the region
        when the reply says so; descriptors passed with it into ``fds``); raises the server's
        error for an error reply, OSError (DataClosed) when the connection breaks."""
        sock = self._sock
        if sock is None:
            raise DataClosed("data plane: not connected")
        passed = fds if fds is not None else [] if self.kind == "shm" else None  # (the job's region may come)
        try:
            _send_all(sock, frames.frame_head(frame), payload)
            self._recv_into(sock, memoryview(self._prefix), passed)
            raw = bytearray(frames.header_length(self._prefix, frames.MAX_HEADER_BYTES))
            self._recv_into(sock, memoryview(raw))
            reply_frame = frames.parse_header(raw)
            if reply_frame.WhichOneof("kind") != "reply":
                raise ProtocolError("data plane: the server answered with something else than a reply")
            reply, nbytes = reply_frame.reply, reply_frame.payload_bytes
            if reply.HasField("error"):
                if nbytes:
                    raise ProtocolError("data plane: an error reply with a payload")
            elif reply_frame.in_region:
                region = self._reply_region(reply_frame, passed)
                if into is None or region is None or \
                        (not reply_frame.shared and reply_frame.region_offset != frame.reply_offset):
                    raise ProtocolError("data plane: a reply in a region this request gave it no place in")
                try:
                    view = region.view(reply_frame.region_offset, nbytes)
                except IndexError as e:
                    raise ProtocolError(f"data plane: a reply's payload outside its region ({e})") from None
                into.take(reply, nbytes, view)
                into = None
            elif into is not None:  # (none at all from a sharded job's control store: it holds no value)
                self._recv_into(sock, into.buffer(reply, nbytes))
            elif nbytes:
                raise ProtocolError(f"data plane: a reply with {nbytes} unexpected bytes")
        except (OSError, ProtocolError):
            self.close()  # a connection whose framing is in doubt is not used again
            raise
        finally:
            if fds is None and passed:  # descriptors nobody asked for
                for fd in passed:
                    os.close(fd)
        if reply.HasField("error"):
            error = frames.reply_error(reply.error)
            if isinstance(error, TimeoutError):  # the connection stays good
                raise ServerWaitTimeout(str(error))
            self.close()  # the server ends the connection after other errors
            raise error
        if into is not None:
            into.land()
        return reply

    def _reply_region(self, reply_frame: data_pb2.DataFrame, fds: list[int] | None) -> shm.Region | None:
        """The region a reply's payload is in: this connection's, or the job's shared one (a
        new one when its descriptor came with the reply)."""
        if not reply_frame.shared:
            return self._region
        if fds:
            try:
                region = shm.Region.attach(fds.pop(0), reply_frame.reply.region_bytes)
            except ValueError as e:
                raise ProtocolError(str(e)) from None
            if self._job_region is not None:
                self._job_region.close()
            self._job_region = region
        return self._job_region

    def _recv_into(self, sock: socket.socket, view: memoryview, fds: list[int] | None = None) -> None:
        """Fill ``view``: small reads through the read-ahead buffer (a reply's prefix, header
        and small payload come in one read), large ones straight into ``view``; with ``fds``,
        the descriptors that come with the bytes are added to it."""
        total = len(view)
        pos = min(self._end - self._start, total)
        view[:pos] = self._ahead[self._start : self._start + pos]
        self._start += pos
        while pos < total:
            small = total - pos < READ_AHEAD_BYTES // 4
            if small and fds is not None:
                got, ancdata, _, _ = sock.recvmsg_into([self._ahead], shm.FDS_SPACE)
                fds += shm.received_fds(ancdata)
            else:
                got = sock.recv_into(self._ahead if small else view[pos:])
            if got == 0:
                raise DataClosed(f"data plane: the server closed the connection ({pos} of {total} bytes)")
            if small:
                take = min(got, total - pos)
                view[pos : pos + take] = self._ahead[:take]
                self._start, self._end = take, got
                got = take
            pos += got


def _send_all(sock: socket.socket, head: bytes, payload: memoryview | None) -> None:
    """Write a frame in gathered writes (no copy to join the header and the payload; under TLS,
    which has no gathered write, one part after the other)."""
    parts = [memoryview(head)] if payload is None or not len(payload) else [memoryview(head), payload]
    if isinstance(sock, ssl.SSLSocket):
        for part in parts:
            sock.sendall(part)
        return
    while parts:
        sent = sock.sendmsg(parts)
        while parts and sent >= len(parts[0]):
            sent -= len(parts.pop(0))
        if parts:
            parts[0] = parts[0][sent:]


class _ParamsTarget:
    """Where the parameters of a reply go: straight into ``params`` when they are CPU tensors of
    the wire dtype, else into ``staging`` (pinned for a GPU model), copied into them once whole."""

    def __init__(self, layout: Layout, params: torch.Tensor, wire_dtype: int, staging: torch.Tensor | None) -> None:
        self.layout, self.params, self.wire_dtype, self.staging = layout, params, wire_dtype, staging
        self.nbytes = layout.numel * torch_dtype(wire_dtype).itemsize

    def buffer(self, reply: data_pb2.DataReply, nbytes: int) -> memoryview:
        self._check(reply, nbytes)
        return as_bytes(self.params if self.staging is None else self.staging)

    def take(self, reply: data_pb2.DataReply, nbytes: int, region: memoryview) -> None:
        """The parameters from the region, into the model's (converted in the same copy)."""
        self._check(reply, nbytes)
        if nbytes:
            self.params.copy_(torch.frombuffer(region, dtype=torch_dtype(self.wire_dtype)))

    def _check(self, reply: data_pb2.DataReply, nbytes: int) -> None:
        if not reply.HasField("params"):
            raise ProtocolError("pull: the server's reply carries no parameters")
        self.layout.check_metas(reply.params.tensors, self.wire_dtype)
        if nbytes != self.nbytes:
            raise ProtocolError(f"pull: {nbytes} bytes for a model of {self.nbytes}")

    def land(self) -> None:
        if self.staging is not None:
            self.params.copy_(self.staging)
