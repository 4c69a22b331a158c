"""Waiting without a thread: the server's event loop learns of changes to a parameter store or to
the job list from their listeners (called in whichever thread made the change), and its
coroutines wait on a ``Signal`` instead of holding a thread on a condition.

``StoreCalls`` is how coroutines use a ``ParameterStore``: a small model's calls run on the loop
(a thread hop would cost more than the work), a large one's on a small fixed pool, and a pull
waits for the mode's condition on the store's signal.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, Protocol, TypeVar

from gradhub.server.store import ParameterStore, Snapshot

T = TypeVar("T")

# a model up to this size is updated on the loop (its update takes microseconds); larger ones
# on the pool
INLINE_BYTES = 1 << 20
# a pull waits at most this long for the mode's condition, then the worker is told to ask again
# (both tensor paths: the data plane and the gRPC fallback)
MAX_PULL_WAIT_S = 60.0


class Listened(Protocol):
    def add_listener(self, listener: Callable[[], None]) -> None: ...


class Signal:
    """Wakes the coroutines waiting for a change: ``fire`` completes the current event and starts
    the next. A waiter takes ``event`` before it looks at the state, so no change is missed."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def fire(self) -> None:
        self.event.set()
        self.event = asyncio.Event()

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        """Until ``event`` (taken earlier from ``self.event``) is set, at most ``timeout`` s."""
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                await event.wait()
        except TimeoutError:
            pass


async def follow(signal: Signal, read: Callable[[], Awaitable[T]], ended: Callable[[T], bool],
                 refresh_s: float) -> AsyncIterator[T]:
    """What ``read()`` gives now and after each change ``signal`` tells of (at least every
    ``refresh_s``), until ``ended`` says it is over (a watch: WatchJob, WatchSweep)."""
    while True:
        changed = signal.event  # taken before the read: a change after it sets this event
        value = await read()
        yield value
        if ended(value):
            return
        await signal.wait(changed, refresh_s)


def listen(source: Listened, loop: asyncio.AbstractEventLoop) -> Signal:
    """A signal that fires on the loop after each change ``source`` reports (call on the loop)."""
    signal = Signal()
    loop_thread = threading.get_ident()

    def changed() -> None:  # called in whichever thread changed the source
        if threading.get_ident() == loop_thread:
            signal.fire()
            return
        try:
            loop.call_soon_threadsafe(signal.fire)
        except RuntimeError:
            pass  # the loop is closed: the server stopped

    source.add_listener(changed)
    return signal


class StoreCalls:
    """A loop's way to call parameter stores (one per loop; use it on that loop only)."""

    def __init__(self, pool: Executor) -> None:
        self._pool = pool
        self._signals: weakref.WeakKeyDictionary[ParameterStore, Signal] = weakref.WeakKeyDictionary()

    def signal(self, store: ParameterStore) -> Signal:
        signal = self._signals.get(store)
        if signal is None:
            signal = self._signals[store] = listen(store, asyncio.get_running_loop())
        return signal

    async def call(self, store: ParameterStore, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``: on the loop for a small model, else on the pool."""
        layout = store.layout
        if layout is not None and layout.numel * 4 <= INLINE_BYTES:
            return fn(*args)
        return await self.run(fn, *args)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the pool (blocking work, however small)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    async def pull(self, store: ParameterStore, rank: int, step: int, wire_dtype: int, max_wait: float,
                   part: tuple[int, int] = (0, 0), ahead: bool = False) -> Snapshot:
        """The parameters for worker ``rank``'s ``step`` (of the tensors ``part``, as (first,
        count); (0, 0) is the whole model) once the mode allows (``ahead``: a bucket's once it
        is applied, ``ParameterStore.try_pull``); TimeoutError (saying what it waits for) after
        ``max_wait`` seconds."""
        return await self.until(store, functools.partial(store.try_pull, rank, step, wire_dtype, *part, ahead),
                                functools.partial(store.waiting_for, step), max_wait)

    async def until(self, store: ParameterStore, ready: Callable[[], T | None], waiting: Callable[[], str],
                    max_wait: float) -> T:
        """What ``ready()`` gives once it is not None (asked again after each change of
        ``store``); TimeoutError(``waiting()``: what it waits for) after ``max_wait`` seconds."""
        loop = asyncio.get_running_loop()
        signal = self.signal(store)
        deadline = loop.time() + max_wait
        while True:
            changed = signal.event  # taken before the check: a change after it sets this event
            value = await self.call(store, ready)
            if value is not None:
                return value
            if loop.time() >= deadline:
                raise TimeoutError(await self.call(store, waiting))
            await signal.wait(changed, deadline - loop.time())
