"""The data plane's connections (``gradhub.server.data_plane``): one worker's socket, plain (TCP
or Unix) or under TLS, read and written on the plane's event loop, and what the connection
keeps between frames (bytes read ahead, its gradient buffer, its shared-memory region)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

from gradhub.proto import frames, shm

READ_AHEAD_BYTES = 64 << 10  # reads of less than a quarter of this take what else has arrived too


class Connection:
    """One worker's connection on a plain socket (TCP or Unix): gathered writes, ``recv_into``
    straight into the caller's buffer."""

    def __init__(self, sock: socket.socket, transport: str) -> None:
        self.sock, self.transport = sock, transport
        self.prefix = bytearray(frames.PREFIX.size)
        # bytes received ahead of need (a small frame's prefix, header and payload come in one read)
        self.ahead = memoryview(bytearray(READ_AHEAD_BYTES))
        self.start = self.end = 0
        # the gradient buffer, reused once the store no longer holds it (version >= free_at)
        self.buffer: bytearray | None = None
        self.free_at = 0
        self.region: shm.Region | None = None  # the worker's shared memory (a Unix socket's, when it asked)
        self.job_region: shm.Region | None = None  # the job's shared parameters, once sent to the worker

    def gradient_buffer(self, nbytes: int, version: int) -> bytearray:
        if self.buffer is None or len(self.buffer) != nbytes or version < self.free_at:
            self.buffer = bytearray(nbytes)
        return self.buffer

    async def recv_some(self, into: memoryview, timeout: float | None) -> int:
        """One receive into ``into`` (0: the peer closed); waits on the loop only when nothing
        has arrived yet. TimeoutError after ``timeout`` seconds without a byte."""
        try:
            return self.sock.recv_into(into)
        except BlockingIOError:
            async with asyncio.timeout(timeout):
                return await asyncio.get_running_loop().sock_recv_into(self.sock, into)

    async def send(self, parts: list[memoryview], timeout: float, fds: Sequence[int] = ()) -> None:
        """Write ``parts``: one gathered write when the socket takes it all (the usual case, which
        arms no timer), else the rest on the loop; ``fds`` (a Unix socket's) go with the first byte."""
        try:
            sent = self.sock.sendmsg(parts, shm.fds_message(list(fds)) if fds else [])
        except BlockingIOError:
            sent = -1
        if sent == sum(len(part) for part in parts):
            return
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while sent < 0:
                if not fds:
                    sent = 0
                    break
                await _writable(loop, self.sock)  # the fds must leave with a byte of this frame
                try:
                    sent = self.sock.sendmsg(parts, shm.fds_message(list(fds)))
                except BlockingIOError:
                    sent = -1
            for part in parts:
                if sent >= len(part):
                    sent -= len(part)
                    continue
                await loop.sock_sendall(self.sock, part[sent:])
                sent = 0

    def close(self) -> None:
        self.region = self.job_region = None  # their mappings go once no tensor of the store's is over them
        self.sock.close()


class TLSConnection(Connection):
    """A TCP connection under TLS (``DataPlane(tls=...)``): asyncio's streams decrypt into their
    buffer, from which a receive copies; a write is encrypted as it is written."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(writer.get_extra_info("socket"), "tcp")
        self.reader, self.writer = reader, writer

    async def recv_some(self, into: memoryview, timeout: float | None) -> int:
        async with asyncio.timeout(timeout):
            data = await self.reader.read(len(into))
        into[: len(data)] = data
        return len(data)

    async def send(self, parts: list[memoryview], timeout: float, fds: Sequence[int] = ()) -> None:
        if fds:
            raise ValueError("a TLS connection passes no descriptors")
        self.writer.writelines(parts)
        async with asyncio.timeout(timeout):
            await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_writer(sock.fileno())
