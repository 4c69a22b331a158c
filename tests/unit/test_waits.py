"""Coroutines wait on a parameter store without a thread: a pull waits for the mode's condition,
is woken by a change made in another thread, and times out saying what it waits for."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import StateError
from gradhub.server.store import ParameterStore, StoreConfig
from gradhub.server.waits import StoreCalls

LAYOUT = Layout(("w",), ((4,),))


def _store() -> ParameterStore:
    store = ParameterStore(StoreConfig(job_id="j", mode="ps-sync", world_size=2, lr=1.0))
    store.register(0)
    store.register(1)
    store.set_total_steps(10)
    store.initialize(LAYOUT, torch.zeros(4))
    return store


def test_a_pull_waits_for_the_step_and_is_woken_by_a_push_from_another_thread() -> None:
    store = _store()

    async def main() -> int:
        with ThreadPoolExecutor(2) as pool:
            calls = StoreCalls(pool)
            pulling = asyncio.create_task(calls.pull(store, 0, 1, 1, max_wait=30))
            await asyncio.sleep(0)  # the pull has looked and waits
            assert not pulling.done()
            store.push(0, 0, 0, torch.ones(4))  # on this thread: one of two workers, not applied yet
            for _ in range(3):  # the pull wakes, looks again, and waits again
                await asyncio.sleep(0)
            assert not pulling.done()
            pusher = threading.Thread(target=store.push, args=(1, 0, 0, torch.ones(4)))
            pusher.start()  # the step is applied in another thread, which wakes the loop
            snapshot = await asyncio.wait_for(pulling, 10)
            pusher.join()
            return snapshot.version

    assert asyncio.run(main()) == 1


def test_a_pull_that_waits_too_long_says_for_whom() -> None:
    store = _store()

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            await StoreCalls(pool).pull(store, 0, 1, 1, max_wait=0.05)

    with pytest.raises(TimeoutError, match=r"waiting at step 1 for workers \[0, 1\]"):
        asyncio.run(main())


def test_a_closed_job_ends_the_wait() -> None:
    store = _store()

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            pulling = asyncio.create_task(StoreCalls(pool).pull(store, 0, 1, 1, max_wait=30))
            await asyncio.sleep(0)
            threading.Thread(target=store.close, args=("cancelled",)).start()
            await asyncio.wait_for(pulling, 10)

    with pytest.raises(StateError, match="is over: cancelled"):
        asyncio.run(main())
