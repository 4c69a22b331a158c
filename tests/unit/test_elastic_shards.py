"""An elastic job over a sharded parameter server (``ps_shards: K``), as plain stores: the
control store decides the size and each shard follows it (``ParameterStore.follow``, and in
ps-sync the ``world_size`` each push names), so the shards together take the unsharded
store's steps bit for bit however the job is scaled: at step boundaries, at once when a
worker's node dies, and in the asynchronous modes with workers leaving and joining. Each
test drives the stores as the workers and the server's control plane do (``PSRuntime``,
``WorkerCalls.register_on_shards``, ``ShardedLink``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import ReleasedError
from gradhub.proto.shards import shards_of
from gradhub.proto.v1.tensor_pb2 import FLOAT32
from gradhub.server.shard_set import merge_states
from gradhub.server.store import CheckpointState, ParameterStore, StoreConfig

LAYOUT = Layout(("w", "b", "v"), ((3, 4), (3,), (5,)))
LARGEST, STEPS = 3, 10


def _grad(step: int, rank: int, size: int) -> torch.Tensor:
    """Worker ``rank``'s gradient of ``step`` in a job of ``size`` workers (its slice of the
    global batch depends on the size)."""
    return torch.randn(LAYOUT.numel, generator=torch.Generator().manual_seed(1000 * step + 10 * rank + size))


def _stores(mode: str, count: int, size: int = LARGEST, every: int = 0,
            kept: list[list[CheckpointState]] | None = None) -> list[ParameterStore]:
    """The control store and ``count - 1`` shards of an elastic job of up to LARGEST workers
    that starts on ``size`` (one store: the unsharded job), every worker registered; with a
    checkpoint ``every`` so many steps, each store's in ``kept``."""
    config = StoreConfig("job", mode, LARGEST, staleness=1 if mode == "ps-ssp" else 0, optimizer="adam", lr=0.01,
                         elastic=True, checkpoint_every=every)
    init = torch.randn(LAYOUT.numel, generator=torch.Generator().manual_seed(0))
    if kept is not None:
        kept.extend([] for _ in range(count))
    stores = [ParameterStore(dataclasses.replace(config, shard=k, shards=count),
                             on_checkpoint=None if kept is None else kept[k].append) for k in range(count)]
    _start_with(stores, size)
    cuts = shards_of(LAYOUT, count)
    for k, store in enumerate(stores):
        store.set_total_steps(STEPS)
        assert store.initialize(LAYOUT, init[cuts[k].lo:cuts[k].hi] if count > 1 else init)
    for rank in range(size):
        _register(stores, rank)
    return stores


def _start_with(stores: list[ParameterStore], size: int) -> None:
    """``PSRuntime.start_with``."""
    stores[0].start_with(size)
    _follow(stores, size)


def _follow(stores: list[ParameterStore], size: int, at_once: bool = False) -> list[int]:
    """``PSRuntime.resize``'s calls on the shards after the control store's: their versions."""
    control = stores[0]
    if control.config.mode == "ps-sync" and not at_once:
        return []
    clocks = [w.clock for w in control.workers()]
    return [s.follow(size, clocks, at_once) for s in stores[1:]]


def _register(stores: list[ParameterStore], rank: int) -> int:
    """``Register``: the control store, then every shard (an async worker at least at its step
    on the control store); the step it starts at."""
    control = stores[0]
    steps = [control.register(rank)[1]]
    at_least = steps[0] if control.config.pushes_control_first else None
    steps += [s.register(rank, at_least=at_least)[1] for s in stores[1:]]
    return min(steps)


def _pull(stores: list[ParameterStore], rank: int, step: int) -> int | None:
    """A worker's pull of ``step`` from every store: the job's size from the control store's,
    None while a store says wait."""
    snaps = [s.try_pull(rank, step, FLOAT32) for s in stores]
    return None if any(s is None for s in snaps) else snaps[0].world_size  # type: ignore[union-attr]


def _push(stores: list[ParameterStore], rank: int, step: int, size: int, only: range | None = None) -> bool:
    """Worker ``rank``'s push of ``step`` (computed for ``size`` workers) to each store (or the
    stores ``only``); in the async modes the control store's first, and none to the shards
    when it refuses (``ShardedLink``'s ``control_first``). Whether the control store took it."""
    cuts = shards_of(LAYOUT, len(stores))
    grad = _grad(step, rank, size)
    taken = True
    for k in only if only is not None else range(len(stores)):
        store = stores[k]
        base = step if store.config.mode == "ps-sync" else store.version
        accepted, _ = store.push(rank, step, base, grad[cuts[k].lo:cuts[k].hi], world_size=size)
        taken = accepted if k == 0 else taken
    return taken


def _whole(stores: list[ParameterStore]) -> CheckpointState:
    own = stores[0].checkpoint_state()
    return own if len(stores) == 1 else merge_states(stores[0], own, [s.checkpoint_state() for s in stores[1:]])


def _assert_same(a: CheckpointState, b: CheckpointState) -> None:
    assert (a.step, a.version, a.clocks) == (b.step, b.version, b.clocks)
    for name in a.params:
        assert torch.equal(a.params[name], b.params[name]), name
    for i, st in a.optimizer_state["state"].items():
        for key, value in st.items():
            assert torch.equal(value, b.optimizer_state["state"][i][key]), (i, key)


# --------------------------------------------------------------- ps-sync
def _scaled_down_and_up(count: int) -> list[ParameterStore]:
    """3 workers; scaled to 1 during step 2 (it leaves at the boundary after it), back to 3
    from step 6 (its workers registered during step 5)."""
    stores = _stores("ps-sync", count)
    for step in range(2):
        for rank in range(3):
            _push(stores, rank, step, _pull(stores, rank, step) or 0)
    stores[0].resize(1)
    assert _follow(stores, 1) == [], "a shard takes a change at a step boundary from the pushes"
    for rank in range(3):
        _push(stores, rank, 2, 3)  # step 2 was pulled at size 3
    assert _pull(stores, 0, 3) == 1
    with pytest.raises(ReleasedError):
        _pull(stores, 2, 3)
    for step in range(3, 5):
        _push(stores, 0, step, _pull(stores, 0, step) or 0)
    if count > 1:
        assert all(s.size == 1 for s in stores), "each shard took the size from rank 0's push of step 3"
        with pytest.raises(ReleasedError):
            stores[1].try_pull(2, 5, FLOAT32)
    stores[0].resize(3)
    for rank in (1, 2):
        assert _register(stores, rank) == 5
        assert _pull(stores, rank, 5) is None, "it joins at the next step boundary"
    _push(stores, 0, 5, _pull(stores, 0, 5) or 0)
    assert stores[0].size == 3 and _pull(stores, 0, 6) == 3
    if count > 1:
        assert stores[1].try_pull(1, 6, FLOAT32) is None, "a shard grows with the first push of step 6"
    _push(stores, 0, 6, 3)
    assert _pull(stores, 1, 6) == 3 and all(s.size == 3 for s in stores)
    for rank in (1, 2):
        _push(stores, rank, 6, 3)
    for step in range(7, STEPS):
        for rank in range(3):
            _push(stores, rank, step, _pull(stores, rank, step) or 0)
    assert all(s.finished() for s in stores)
    return stores


@pytest.mark.parametrize("count", [3, 5], ids=["2-shards", "4-shards"])
def test_ps_sync_shards_scaled_down_and_up_take_the_unsharded_steps_bit_for_bit(count: int) -> None:
    _assert_same(_whole(_scaled_down_and_up(count)), _whole(_scaled_down_and_up(1)))


def _shrunk_at_once(count: int) -> list[ParameterStore]:
    """Worker 2's node dies in step 1, before its push: the job goes on with two at once."""
    stores = _stores("ps-sync", count)
    for rank in range(3):
        _push(stores, rank, 0, 3)
    _push(stores, 0, 1, 3)
    stores[0].resize(2, at_once=True)
    assert _follow(stores, 2, at_once=True) == [1] * (count - 1), "every shard at the control store's version"
    assert not _push(stores, 1, 1, 3), "pushed for size 3 after the shrink: dropped everywhere"
    for rank in range(2):
        assert _pull(stores, rank, 2) == 2 and stores[0].version == 1, "step 1 again, at size 2"
    for step in range(1, STEPS):
        for rank in range(2):
            _push(stores, rank, step, 2)
    return stores


@pytest.mark.parametrize("count", [3, 5], ids=["2-shards", "4-shards"])
def test_ps_sync_shards_shrunk_at_once_take_the_unsharded_steps_bit_for_bit(count: int) -> None:
    _assert_same(_whole(_shrunk_at_once(count)), _whole(_shrunk_at_once(1)))


def test_a_shard_that_took_the_dead_workers_step_answers_a_version_past_the_control_stores() -> None:
    """Worker 2 died between its pushes of step 1: shard 1 has every push of it and took it,
    the control store and shard 2 wait. A shrink at once cannot make them one step again:
    shard 1's version says so (the server then takes the job back to its latest checkpoint)."""
    stores = _stores("ps-sync", 3)
    for rank in range(3):
        _push(stores, rank, 0, 3)
    for rank in range(2):
        _push(stores, rank, 1, 3)
    _push(stores, 2, 1, 3, only=range(1, 2))
    stores[0].resize(2, at_once=True)
    assert stores[0].version == 1 and _follow(stores, 2, at_once=True) == [2, 1]


# ---------------------------------------------------------- async modes
def _left_and_joined(mode: str, count: int) -> list[ParameterStore]:
    """3 workers; scaled to 1 while workers 1 and 2 compute step 2 (they leave at their push),
    back to 3 once worker 0 is at step 5."""
    stores = _stores(mode, count)
    for step in range(2):
        for rank in range(3):
            _push(stores, rank, step, 3)
    for rank in range(3):
        assert _pull(stores, rank, 2) == 3
    stores[0].resize(1)
    _follow(stores, 1)
    for rank in (1, 2):
        with pytest.raises(ReleasedError):
            _push(stores, rank, 2, 3)  # refused by the control store: nothing reaches a shard
    for step in range(2, 5):
        assert _pull(stores, 0, step) == 1, "nobody who left holds a shard back (ps-ssp waits for members)"
        _push(stores, 0, step, 1)
    stores[0].resize(3)
    _follow(stores, 3)
    for rank in (1, 2):
        assert _register(stores, rank) == 5, "a joining worker starts where worker 0 is, on every store"
    for step in range(5, STEPS):
        for rank in range(3):
            assert _pull(stores, rank, step) == 3
            _push(stores, rank, step, 3)
    return stores


@pytest.mark.parametrize("mode", ["ps-async", "ps-ssp"])
@pytest.mark.parametrize("count", [3, 5], ids=["2-shards", "4-shards"])
def test_async_shards_let_workers_leave_and_join_as_the_unsharded_store_does(mode: str, count: int) -> None:
    sharded = _left_and_joined(mode, count)
    assert [w.clock for w in sharded[0].workers()] == [STEPS, STEPS, STEPS]
    _assert_same(_whole(sharded), _whole(_left_and_joined(mode, 1)))


@pytest.mark.parametrize("mode", ["ps-async", "ps-ssp"])
def test_async_shards_take_a_checkpoint_that_a_change_of_size_makes_due(mode: str) -> None:
    """Checkpoints every 4 steps; workers 1 and 2 are at step 2 and leave, worker 0 is at 3. The
    job shrinks, worker 0's push of step 3 reaches the control store (every member at step 4
    there: it takes the checkpoint) and the shards before they follow the shrink (workers 1 and 2
    still count there): each shard takes that checkpoint as it follows, with the same clocks, so
    the server can merge it (it waits for every shard's part)."""
    kept: list[list[CheckpointState]] = []
    stores = _stores(mode, 3, every=4, kept=kept)
    for step in range(2):
        for rank in range(3):
            _push(stores, rank, step, 3)
    _push(stores, 0, 2, 3)
    stores[0].resize(1)
    _push(stores, 0, 3, 1)
    assert [[c.step for c in k] for k in kept] == [[4], [], []]
    _follow(stores, 1)
    assert [[c.step for c in k] for k in kept] == [[4], [4], [4]]
    merged = merge_states(stores[0], kept[0][0], [k[0] for k in kept[1:]])
    assert merged.clocks == (4, 2, 2)
