"""An event loop in a thread of its own, for the gRPC server (grpc.aio): a call that waits or
streams for long (a pull, a push session, a watch) is a coroutine on it and holds no thread.
Blocking work goes to thread pools from there: plain (sync) RPC handlers to the gRPC server's,
the JobService's to its own, a large model's updates to the store pool (``gradhub.server.waits``)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, Self, TypeVar

T = TypeVar("T")


class IOLoop:
    """``start()`` runs the loop; ``run(coro)`` runs a coroutine on it from another thread and
    returns its result; ``stop()`` ends the loop once what is scheduled on it has run."""

    def __init__(self, name: str = "gradhub-io") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
