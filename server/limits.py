"""Bounds on what clients can hold open on the server: long-lived streams (watches, followed logs,
uploads, push sessions) are counted per client (its host) and in total, and one over a limit is
refused with RESOURCE_EXHAUSTED and a message that names it; an upload whose next chunk does
not come within ``STALL_S`` is cut. No gRPC in here."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeVar

from gradhub.proto.codec import Receiver
from gradhub.proto.contract.errors import ProtocolError, ResourceExhaustedError

T = TypeVar("T")

MAX_STREAMS_PER_CLIENT = 1024
MAX_STREAMS = 8192
STALL_S = 60.0  # seconds an upload may wait for its next chunk


def client_of(peer: str) -> str:
    """The client's host from a gRPC peer (``ipv4:10.0.0.5:41234`` -> ``10.0.0.5``)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer or "unknown"


class StreamLimits:
    """Open streams by client and in total, under a lock of its own."""

    def __init__(self, per_client: int | None = None, total: int | None = None) -> None:
        self.per_client = MAX_STREAMS_PER_CLIENT if per_client is None else per_client
        self.total = MAX_STREAMS if total is None else total
        self._lock = threading.Lock()
        self._open: Counter[str] = Counter()
        self._total = 0

    @contextlib.contextmanager
    def hold(self, kind: str, peer: str) -> Iterator[None]:
        """Count one stream of ``kind`` from ``peer`` while the block runs; ResourceExhaustedError
        (and nothing counted) over a limit."""
        client = client_of(peer)
        with self._lock:
            if self._total >= self.total:
                raise ResourceExhaustedError(f"streams: the server holds {self.total} open streams, its limit; "
                                             f"{kind} refused (try again when some have closed)")
            if self._open[client] >= self.per_client:
                raise ResourceExhaustedError(f"streams: {self.per_client} open from {client}, the limit per "
                                             f"client; {kind} refused (close some first)")
            self._open[client] += 1
            self._total += 1
        try:
            yield
        finally:
            with self._lock:
                self._open[client] -= 1
                self._total -= 1
                if not self._open[client]:
                    del self._open[client]

    def open_streams(self) -> int:
        with self._lock:
            return self._total


async def next_within(stream: AsyncIterator[T], what: str) -> T | None:
    """The stream's next message (None at its end), which must come within STALL_S: TimeoutError
    (DEADLINE_EXCEEDED on the wire) saying ``what`` did not come."""
    try:
        async with asyncio.timeout(STALL_S):
            return await anext(stream, None)
    except TimeoutError:
        raise TimeoutError(f"{what}: none came for {STALL_S:g} s; the call was cut") from None


async def receive(chunks: AsyncIterator[Any], receiver: Receiver, to_end: bool = True) -> None:
    """Fill ``receiver`` from an upload's chunks. ``to_end``: the stream must end right after the
    expected bytes (ProtocolError otherwise); else stop there (a session may carry more). A stream
    cut short is reported by the receiver, which names the byte counts; one that stalls (no chunk
    for STALL_S) is cut with TimeoutError."""
    try:
        if await receiver.afill(chunks, STALL_S) and to_end:
            async with asyncio.timeout(STALL_S):  # the end of the stream must come too
                extra = await anext(chunks, None)
            if extra is not None:
                raise ProtocolError(f"byte count: stream carries more than the expected {receiver.expected} bytes")
    except TimeoutError:
        raise TimeoutError(f"chunks: none came for {STALL_S:g} s; the upload was cut") from None
