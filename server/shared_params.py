"""A ps-sync job's parameters in one shared-memory region for all of its workers on the server's
host (``gradhub.proto.shm``): each version is written there once, by the first of its pulls,
and every worker copies it out, instead of the server writing it into each worker's region.

This is safe in ps-sync only: every worker pulls the same version, and the next version exists
only once every worker has pushed its gradient of the step, which it computed on the
parameters it had copied out already. (A worker that an elastic job drops mid-step may read a
version being overwritten; its gradient is refused for its size anyway.) The data plane's
event loop calls this, one coroutine per pull.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gradhub.proto import shm
from gradhub.server.store import ParameterStore, Snapshot


@dataclass
class _Published:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    region: shm.Region | None = None
    snapshot: weakref.ref[Snapshot] | None = None  # what the region holds now


class SharedParams:
    """The region of each ps-sync store whose local workers pull through shared memory."""

    def __init__(self) -> None:
        self._published: weakref.WeakKeyDictionary[ParameterStore, _Published] = weakref.WeakKeyDictionary()

    @staticmethod
    def applies(store: ParameterStore, part: tuple[int, int]) -> bool:
        """Whether a pull of ``part`` from ``store`` is answered from the job's region."""
        return store.config.mode == "ps-sync" and part == (0, 0) and store.config.fragments <= 1

    async def publish(self, store: ParameterStore, snapshot: Snapshot, data: memoryview,
                      copy: Callable[[memoryview, memoryview], Awaitable[None]]) -> shm.Region:
        """The region that holds ``snapshot``'s ``data`` (written with ``copy`` unless it holds
        it already; a region of another size is replaced by a new one)."""
        published = self._published.get(store)
        if published is None:
            published = self._published[store] = _Published()
        async with published.lock:
            region = published.region
            if region is None or region.size != max(len(data), 1):
                published.region = region = shm.Region.create(max(len(data), 1))  # the old one: unmapped when unused
                published.snapshot = None
            if published.snapshot is None or published.snapshot() is not snapshot:
                published.snapshot = None  # (a copy cut short leaves the region holding no version)
                await copy(region.view(0, len(data)), data)
                published.snapshot = weakref.ref(snapshot)
            return region
