"""ParameterStore as a plain class: update rules per mode compared with plain torch.optim,
exactly-once pushes, pull barriers, compression, bad input and checkpoint/resume."""

from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
import torch

from gradhub.proto.codec import CHUNK_BYTES, Layout, data_of_chunk
from gradhub.proto.contract.errors import NotFoundError, ProtocolError, SpecError, StateError
from gradhub.proto.contract.optim import build_optimizer, build_scheduler
from gradhub.proto.v1.tensor_pb2 import BFLOAT16, FLOAT16, FLOAT32
from gradhub.server.store import CheckpointState, ParameterStore, Snapshot, StoreConfig

LAYOUT = Layout(names=("weight", "bias"), shapes=((3, 4), (3,)))
NUMEL = LAYOUT.numel  # 15
WAIT = 5.0  # bound on every wait for a background thread; never reached when the test passes

OPTIMIZERS: dict[str, tuple[str, float, dict[str, Any]]] = {
    "sgd-momentum": ("sgd", 0.1, {"momentum": 0.9}),
    "adam": ("adam", 0.01, {"betas": [0.9, 0.99]}),
    "adamw": ("adamw", 0.01, {"weight_decay": 0.05}),
}


# ----------------------------------------------------------------- helpers
def _initial(layout: Layout = LAYOUT) -> torch.Tensor:
    return torch.randn(layout.numel, generator=torch.Generator().manual_seed(7))


def _grad(rank: int, step: int, numel: int = NUMEL) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(1000 * step + rank))


def _mean(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The rank-ordered average, summed exactly the way a ps-sync step is documented to."""
    total = grads[0].clone()
    for g in grads[1:]:
        total += g
    return total / len(grads)


def _store(
    mode: str = "ps-sync",
    world_size: int = 1,
    *,
    total_steps: int = 6,
    init: bool = True,
    on_checkpoint: Callable[[CheckpointState], None] | None = None,
    **config: Any,
) -> ParameterStore:
    """A store with every worker registered and (unless ``init=False``) the initial parameters."""
    store = ParameterStore(StoreConfig("job", mode, world_size, **config), on_checkpoint)
    for rank in range(world_size):
        store.set_total_steps(total_steps)
        store.register(rank, host="h", pid=100 + rank)
    if init:
        assert store.initialize(LAYOUT, _initial())
    return store


def _flat(store: ParameterStore) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in store.parameters().values()])


def _decode(snap: Snapshot, dtype: torch.dtype) -> torch.Tensor:
    return torch.frombuffer(bytearray(b"".join(bytes(data_of_chunk(c)) for c in snap.chunks)), dtype=dtype)


class _Reference:
    """The same optimizer (and schedule) in plain PyTorch over the same two tensors."""

    def __init__(self, name: str, lr: float, hyper: dict[str, Any],
                 schedule: dict[str, Any] | None = None, updates: int = 1) -> None:
        self.params = [torch.nn.Parameter(t.clone()) for t in LAYOUT.split(_initial()).values()]
        self.opt = build_optimizer(self.params, name, lr, hyper)
        self.sched = build_scheduler(self.opt, schedule, updates)

    def step(self, flat_grad: torch.Tensor) -> None:
        for p, g in zip(self.params, LAYOUT.split(flat_grad).values(), strict=True):
            p.grad = g.clone()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])


class _WaitSignal(threading.Condition):
    """A Condition that counts the times a thread starts waiting on it, so a test knows a
    pull is really blocked (and not merely not yet started) before it acts."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Semaphore(0)

    def wait(self, timeout: float | None = None) -> bool:
        self.entered.release()  # still holding the lock: no notify can slip in before the wait
        return super().wait(timeout)


def _watch(store: ParameterStore) -> _WaitSignal:
    cond = _WaitSignal()
    store._cond = cond  # before any thread uses the store
    return cond


def _blocked(cond: _WaitSignal, fut: Future[Any]) -> bool:
    """True once the background call is waiting on the store (bounded by WAIT)."""
    return cond.entered.acquire(timeout=WAIT) and not fut.done()


@pytest.fixture
def background() -> Iterator[Callable[..., Future[Any]]]:
    """Run a call on a thread; at teardown close its store so no thread outlives the test."""
    pool = ThreadPoolExecutor(max_workers=4)
    stores: list[ParameterStore] = []

    def submit(store: ParameterStore, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        stores.append(store)
        return pool.submit(fn, *args)

    yield submit
    for s in stores:
        s.close("test finished")
    pool.shutdown(wait=True)


# ------------------------------------------------------------ setup, config
def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="compression"):
        StoreConfig("j", "ps-sync", 1, compression="int2")
    with pytest.raises(ValueError, match="mode"):
        StoreConfig("j", "ddp", 1)
    with pytest.raises(SpecError, match="workers: must be >= 1"):
        StoreConfig("j", "ps-sync", 0)
    assert StoreConfig("j", "ps-sync", 1, compression="fp16").wire_dtype == FLOAT16


def test_register_reports_version_next_step_and_who_sends_the_parameters() -> None:
    store = ParameterStore(StoreConfig("j", "ps-sync", 2))
    store.set_total_steps(3)
    assert store.register(1) == (0, 0, False)
    assert store.register(0, "host", 42) == (0, 0, True)
    assert store.initialize(LAYOUT, _initial())
    assert store.register(0) == (0, 0, False)  # a restarted rank 0 does not resend
    w = store.workers()[0]
    assert (w.alive, w.host, w.pid, w.registrations) == (True, "", 0, 2)


def test_initialize_once_and_validates() -> None:
    store = ParameterStore(StoreConfig("j", "ps-sync", 1))
    with pytest.raises(StateError, match="total_steps"):
        store.initialize(LAYOUT, _initial())
    store.set_total_steps(3)
    with pytest.raises(ProtocolError, match="byte count"):
        store.initialize(LAYOUT, torch.zeros(NUMEL + 1))
    assert not store.initialized
    assert store.initialize(LAYOUT, _initial().double())
    assert not store.initialize(LAYOUT, torch.zeros(NUMEL))  # second one changes nothing
    assert torch.equal(_flat(store), _initial())
    assert all(t.dtype == torch.float32 for t in store.parameters().values())
    assert store.layout == LAYOUT and store.total_steps == 3


def test_initialize_copies_the_callers_tensor() -> None:
    init = _initial()
    store = _store(init=False)
    store.initialize(LAYOUT, init)
    init.zero_()
    assert torch.equal(_flat(store), _initial())


def test_total_steps_must_agree() -> None:
    store = ParameterStore(StoreConfig("j", "ps-sync", 2))
    store.set_total_steps(5)
    store.set_total_steps(5)
    with pytest.raises(ProtocolError, match="total_steps: worker computed 4, the job has 5"):
        store.set_total_steps(4)


# ----------------------------------------------------- 1. ps-sync exactness
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("n", [1, 2, 4])
def test_sync_applies_one_step_with_the_rank_ordered_average(n: int, opt: str) -> None:
    name, lr, hyper = OPTIMIZERS[opt]
    store = _store("ps-sync", n, optimizer=name, lr=lr, hyper=hyper)
    ref = _Reference(name, lr, hyper)
    for step in range(3):
        before = _flat(store)
        order = [(r + step) % n for r in range(n)][::-1]  # a different arrival order each step
        for i, rank in enumerate(order):
            accepted, version = store.push(rank, step, step, _grad(rank, step))
            assert accepted
            if i < n - 1:  # nothing moves until the last worker's push
                assert version == store.version == step
                assert torch.equal(_flat(store), before)
        assert version == store.version == step + 1
        ref.step(_mean([_grad(r, step) for r in range(n)]))
        assert torch.equal(_flat(store), ref.flat())
    assert store.step() == 3 and [w.clock for w in store.workers()] == [3] * n


def test_sync_result_does_not_depend_on_arrival_order() -> None:
    results = []
    for order in itertools.permutations(range(4)):
        store = _store("ps-sync", 4, optimizer="adam", lr=0.01)
        for step in range(2):
            for rank in order:
                store.push(rank, step, step, _grad(rank, step) * (rank + 1) ** 3)
        results.append(_flat(store))
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_a_gradient_buffer_reused_from_step_to_step_gives_the_steps_of_fresh_tensors() -> None:
    # the data plane receives each push into the same buffer; the store keeps its views of a
    # small one from step to step (store_params._grad_views), and must read the new values
    fresh, reused = _store(total_steps=6, optimizer="adam", lr=0.01), _store(total_steps=6, optimizer="adam", lr=0.01)
    buffer = torch.empty(NUMEL)
    for step in range(6):
        assert fresh.push(0, step, step, _grad(0, step)) == (True, step + 1)
        buffer.copy_(_grad(0, step))
        assert reused.push(0, step, step, buffer) == (True, step + 1)
        assert torch.equal(_flat(reused), _flat(fresh))
    assert not torch.equal(_flat(reused), _initial())


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_the_store_steps_its_flat_vector_until_a_push_leaves_a_tensor_out(opt: str) -> None:
    # (gradhub.server.flat_optimizer) the same steps and the same checkpoint either way
    name, lr, hyper = OPTIMIZERS[opt]
    store = _store(total_steps=6, optimizer=name, lr=lr, hyper=hyper)
    ref = _Reference(name, lr, hyper)
    for step in range(6):
        unused = [1] if step == 3 else []
        store.push(0, step, step, _grad(0, step), unused=unused)
        assert store.steps_flat == (step < 3)
        grads = list(LAYOUT.split(_grad(0, step)).values())
        for i, (p, g) in enumerate(zip(ref.params, grads, strict=True)):
            p.grad = None if i in unused else g.clone()
        ref.opt.step()
        assert torch.equal(_flat(store), ref.flat())
        state = store.checkpoint_state().optimizer_state
        expected = ref.opt.state_dict()
        assert state["param_groups"][0]["params"] == expected["param_groups"][0]["params"] == [0, 1]
        for i, tensor_state in expected["state"].items():
            for key, value in tensor_state.items():
                got = state["state"][i][key]
                assert torch.equal(got, value) if torch.is_tensor(value) else got == value, (step, i, key)


# ------------------------------------------------------------ 2. exactly-once
def test_sync_duplicate_push_while_pending_is_ignored() -> None:
    store = _store("ps-sync", 2, optimizer="sgd", lr=0.1, hyper={"momentum": 0.9})
    ref = _Reference("sgd", 0.1, {"momentum": 0.9})
    assert store.push(0, 0, 0, _grad(0, 0)) == (True, 0)
    assert store.push(0, 0, 0, torch.full((NUMEL,), 100.0)) == (False, 0)
    assert store.push(1, 0, 0, _grad(1, 0)) == (True, 1)
    ref.step(_mean([_grad(0, 0), _grad(1, 0)]))
    assert torch.equal(_flat(store), ref.flat())


def test_sync_duplicate_push_after_the_step_is_ignored() -> None:
    store = _store("ps-sync", 2)
    store.push(0, 0, 0, _grad(0, 0))
    store.push(1, 0, 0, _grad(1, 0))
    after = _flat(store)
    assert store.push(1, 0, 0, _grad(1, 0)) == (False, 1)
    assert store.push(0, 0, 0, _grad(0, 0)) == (False, 1)
    assert torch.equal(_flat(store), after)
    assert [w.clock for w in store.workers()] == [1, 1]
    assert store.push(0, 1, 1, _grad(0, 1)) == (True, 1)  # and the next step still works


def test_async_duplicate_push_is_ignored() -> None:
    store = _store("ps-async", 2)
    assert store.push(0, 0, 0, _grad(0, 0)) == (True, 1)
    after = _flat(store)
    assert store.push(0, 0, 0, _grad(0, 0)) == (False, 1)
    assert torch.equal(_flat(store), after)
    assert store.workers()[0].clock == 1


def test_push_ahead_of_the_clock_or_past_the_end_is_refused() -> None:
    store = _store("ps-async", 1, total_steps=2)
    with pytest.raises(StateError, match="pushed step 1 but its next step is 0"):
        store.push(0, 1, 0, _grad(0, 1))
    store.push(0, 0, 0, _grad(0, 0))
    store.push(0, 1, 1, _grad(0, 1))
    with pytest.raises(StateError, match="past the job's last step 1"):
        store.push(0, 2, 2, _grad(0, 2))
    assert store.version == 2 and store.finished()


# ------------------------------------------------------------- 3. pull waits
def test_sync_pull_blocks_until_the_version(background: Callable[..., Future[Any]]) -> None:
    store = _store("ps-sync", 2)
    cond = _watch(store)
    store.push(0, 0, 0, _grad(0, 0))
    assert store.pull(0, 0, FLOAT32, timeout=0).version == 0  # step 0 needs version 0
    fut = background(store, store.pull, 0, 1, FLOAT32, WAIT)
    assert _blocked(cond, fut)
    store.push(1, 0, 0, _grad(1, 0))
    snap = fut.result(timeout=WAIT)
    assert snap.version == 1
    assert torch.equal(_decode(snap, torch.float32), _flat(store))


def test_sync_pull_timeout_names_the_workers_it_waits_for() -> None:
    store = _store("ps-sync", 3)
    store.push(1, 0, 0, _grad(1, 0))
    with pytest.raises(TimeoutError, match=r"at step 1 for workers \[0, 2\] \(version 0\)"):
        store.pull(1, 1, FLOAT32, timeout=0)
    with pytest.raises(TimeoutError, match=r"workers \[0, 2\]"):
        store.pull(1, 1, FLOAT32, timeout=0.02)  # a real (short) wait on the condition


def test_pull_before_initialize_blocks_until_initialize(
    background: Callable[..., Future[Any]],
) -> None:
    store = _store("ps-sync", 2, init=False)
    cond = _watch(store)
    with pytest.raises(TimeoutError, match="initial parameters from worker 0"):
        store.pull(1, 0, FLOAT32, timeout=0)
    fut = background(store, store.pull, 1, 0, FLOAT32, WAIT)
    assert _blocked(cond, fut)
    store.initialize(LAYOUT, _initial())
    assert torch.equal(_decode(fut.result(timeout=WAIT), torch.float32), _initial())


def test_close_wakes_a_blocked_pull(background: Callable[..., Future[Any]]) -> None:
    store = _store("ps-sync", 2)
    cond = _watch(store)
    fut = background(store, store.pull, 0, 1, FLOAT32, WAIT)
    assert _blocked(cond, fut)
    store.close("cancelled by the user")
    with pytest.raises(StateError, match="cancelled by the user"):
        fut.result(timeout=WAIT)
    assert store.closed == "cancelled by the user"
    assert store.heartbeat(0) == "cancelled by the user"
    for call in (lambda: store.push(0, 0, 0, _grad(0, 0)), lambda: store.register(1),
                 lambda: store.pull(0, 0, FLOAT32, timeout=0)):
        with pytest.raises(StateError, match="'job' is over: cancelled by the user"):
            call()
    store.close("a later reason")  # the first reason stays
    assert store.closed == "cancelled by the user"


def test_pull_past_the_last_step_waits_for_every_worker(
    background: Callable[..., Future[Any]],
) -> None:
    store = _store("ps-async", 2, total_steps=1)
    cond = _watch(store)
    store.push(0, 0, 0, _grad(0, 0))
    fut = background(store, store.pull, 0, 1, FLOAT32, WAIT)
    assert _blocked(cond, fut)
    with pytest.raises(TimeoutError, match=r"at step 5 for workers \[1\]"):
        store.pull(0, 5, FLOAT32, timeout=0)
    store.push(1, 0, 1, _grad(1, 0))
    assert fut.result(timeout=WAIT).version == 2
    assert store.finished()


# ----------------------------------------------------------------- 4. async
def test_async_applies_each_push_and_records_staleness() -> None:
    store = _store("ps-async", 2, optimizer="sgd", lr=0.1, hyper={"momentum": 0.9})
    ref = _Reference("sgd", 0.1, {"momentum": 0.9})
    # both pulled version 0; rank 0 pushes first, rank 1's gradient is then one update old
    for rank, step, base, staleness in [(0, 0, 0, 0), (1, 0, 0, 1), (0, 1, 1, 1), (1, 1, 3, 0)]:
        version = store.version
        assert store.pull(rank, step, FLOAT32, timeout=0).version == version  # never waits
        assert store.push(rank, step, base, _grad(rank, step)) == (True, version + 1)
        ref.step(_grad(rank, step))
        assert torch.equal(_flat(store), ref.flat())
        assert store.workers()[rank].staleness == staleness
    assert [(w.staleness, w.max_staleness) for w in store.workers()] == [(1, 1), (0, 1)]


def test_async_refuses_a_base_version_from_the_future() -> None:
    store = _store("ps-async", 1)
    with pytest.raises(ProtocolError, match="base_version: 3 is ahead of the server's version 0"):
        store.push(0, 0, 3, _grad(0, 0))
    assert store.workers()[0].clock == 0


# ------------------------------------------------------------------- 5. SSP
def test_ssp_waits_for_the_slowest_live_worker(background: Callable[..., Future[Any]]) -> None:
    store = _store("ps-ssp", 3, staleness=1)
    cond = _watch(store)
    for step in range(2):  # rank 0 runs up to s steps ahead without waiting
        store.pull(0, step, FLOAT32, timeout=0)
        store.push(0, step, store.version, _grad(0, step))
    fut = background(store, store.pull, 0, 2, FLOAT32, WAIT)  # needs every clock >= 1
    assert _blocked(cond, fut)
    store.push(1, 0, 0, _grad(1, 0))
    assert _blocked(cond, fut)  # woken, rank 2 still at 0: waits again
    store.push(2, 0, 0, _grad(2, 0))
    assert fut.result(timeout=WAIT).version == 4
    assert store.version == 4  # ssp applies on arrival


def test_ssp_does_not_wait_for_a_dead_worker(background: Callable[..., Future[Any]]) -> None:
    store = _store("ps-ssp", 2, staleness=0)
    cond = _watch(store)
    store.push(0, 0, 0, _grad(0, 0))
    fut = background(store, store.pull, 0, 1, FLOAT32, WAIT)
    assert _blocked(cond, fut)
    store.mark_dead(1)
    assert fut.result(timeout=WAIT).version == 1
    store.register(1)  # back again: waited for again
    store.push(0, 1, 1, _grad(0, 1))
    with pytest.raises(TimeoutError, match=r"at step 2 for workers \[1\]"):
        store.pull(0, 2, FLOAT32, timeout=0)


def test_ssp_timeout_names_only_the_workers_that_block() -> None:
    store = _store("ps-ssp", 4, staleness=1)
    for step in range(3):
        store.push(0, step, store.version, _grad(0, step))
    store.push(1, 0, store.version, _grad(1, 0))
    store.push(1, 1, store.version, _grad(1, 1))
    store.push(2, 0, store.version, _grad(2, 0))
    store.mark_dead(3)
    # clocks [3, 2, 1, 0]; step 3 needs live clocks >= 2: only rank 2 holds it back
    with pytest.raises(TimeoutError, match=r"at step 3 for workers \[2\]"):
        store.pull(0, 3, FLOAT32, timeout=0)


# ----------------------------------------------------------- 6. compression
@pytest.mark.parametrize(("wire", "dtype"), [(FLOAT16, torch.float16), (BFLOAT16, torch.bfloat16)])
def test_pull_converts_to_the_wire_dtype(wire: int, dtype: torch.dtype) -> None:
    store = _store("ps-async", 1)
    store.push(0, 0, 0, _grad(0, 0))
    snap = store.pull(0, 1, wire, timeout=0)
    assert (snap.version, snap.wire_dtype) == (1, wire)
    assert torch.equal(_decode(snap, dtype), _flat(store).to(dtype))
    assert all(t.dtype == torch.float32 for t in store.parameters().values())
    assert torch.equal(_decode(store.pull(0, 1, FLOAT32, timeout=0), torch.float32), _flat(store))


def test_snapshots_are_cached_per_version_and_cut_into_chunks() -> None:
    big = Layout(("w",), ((CHUNK_BYTES // 4 + 10,),))
    store = ParameterStore(StoreConfig("j", "ps-async", 1))
    store.set_total_steps(2)
    store.register(0)
    store.initialize(big, _initial(big))
    snap = store.pull(0, 0, FLOAT32, timeout=0)
    assert [len(data_of_chunk(c)) for c in snap.chunks] == [CHUNK_BYTES, 40]
    assert store.pull(0, 0, FLOAT32, timeout=0) is snap
    assert len(store.pull(0, 0, FLOAT16, timeout=0).chunks) == 1
    store.push(0, 0, 0, _grad(0, 0, big.numel))
    new = store.pull(0, 1, FLOAT32, timeout=0)
    assert new.version == 1 and new is not snap
    assert torch.equal(_decode(snap, torch.float32), _initial(big))  # old snapshot untouched


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradient_is_applied_in_float32(dtype: torch.dtype) -> None:
    store = _store("ps-sync", 2, optimizer="adam", lr=0.01)
    ref = _Reference("adam", 0.01, {})
    grads = [_grad(r, 0).to(dtype) for r in range(2)]
    for rank, g in enumerate(grads):
        store.push(rank, 0, 0, g)
    ref.step(_mean([g.float() for g in grads]))
    assert torch.equal(_flat(store), ref.flat())
    assert all(t.dtype == torch.float32 for t in store.parameters().values())


# ------------------------------------------------------------- 7. bad input
@pytest.mark.parametrize(("index", "name"), [(0, "weight"), (11, "weight"), (12, "bias")])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_gradient_names_the_tensor_and_changes_nothing(
    index: int, name: str, bad: float,
) -> None:
    store = _store("ps-sync", 2, optimizer="sgd", lr=0.1, hyper={"momentum": 0.9})
    ref = _Reference("sgd", 0.1, {"momentum": 0.9})
    store.push(0, 0, 0, _grad(0, 0))
    before = _flat(store)
    g = _grad(1, 0)
    g[index] = bad
    with pytest.raises(ProtocolError, match=f"non-finite value .* in tensor '{name}'"):
        store.push(1, 0, 0, g)
    assert torch.equal(_flat(store), before)
    assert store.version == 0 and [w.clock for w in store.workers()] == [1, 0]
    assert store.push(1, 0, 0, _grad(1, 0)) == (True, 1)  # the retry is not a duplicate
    ref.step(_mean([_grad(0, 0), _grad(1, 0)]))
    assert torch.equal(_flat(store), ref.flat())


def test_gradient_that_overflows_float32_is_refused() -> None:
    store = _store("ps-async", 1)
    g = _grad(0, 0).double()
    g[13] = 1e300  # finite in float64, inf once converted to the store's float32
    with pytest.raises(ProtocolError, match="in tensor 'bias'"):
        store.push(0, 0, 0, g)
    assert torch.equal(_flat(store), _initial()) and store.version == 0


def test_wrong_numel_and_uninitialized_push() -> None:
    store = _store("ps-sync", 2, init=False)
    with pytest.raises(StateError, match="no parameters yet"):
        store.push(0, 0, 0, _grad(0, 0))
    with pytest.raises(StateError, match="no parameters yet"):
        store.parameters()
    with pytest.raises(StateError, match="no parameters yet"):
        store.checkpoint_state()
    store.initialize(LAYOUT, _initial())
    with pytest.raises(ProtocolError, match="byte count: 14 values, expected 15"):
        store.push(0, 0, 0, torch.zeros(NUMEL - 1))
    assert store.workers()[0].clock == 0 and store.version == 0


@pytest.mark.parametrize("rank", [-1, 2])
def test_unknown_rank_is_not_found(rank: int) -> None:
    store = _store("ps-sync", 2)
    calls: list[Callable[[], object]] = [
        lambda: store.push(rank, 0, 0, _grad(0, 0)),
        lambda: store.register(rank),
        lambda: store.pull(rank, 0, FLOAT32, timeout=0),
        lambda: store.mark_dead(rank),
        lambda: store.heartbeat(rank),
    ]
    for call in calls:
        with pytest.raises(NotFoundError, match=rf"worker {rank} is not in job 'job'"):
            call()


def test_liveness_bookkeeping_uses_the_injected_clock() -> None:
    now = [100.0]
    store = ParameterStore(StoreConfig("j", "ps-async", 2), clock=lambda: now[0])
    store.set_total_steps(1)
    store.register(0)
    store.register(1)
    now[0] = 103.0
    assert store.heartbeat(1, step=0) is None
    now[0] = 110.0
    assert store.seconds_since_seen() == [10.0, 7.0]
    store.mark_dead(0)
    assert store.seconds_since_seen() == [0.0, 7.0]
    assert not store.workers()[0].alive


# ------------------------------------------------------------ 8. checkpoints
def test_sync_checkpoint_callback_at_every_k_steps() -> None:
    saved: list[CheckpointState] = []
    store = _store("ps-sync", 2, total_steps=7, checkpoint_every=2, on_checkpoint=saved.append)
    snapshots = {}
    for step in range(7):
        for rank in (1, 0):
            store.push(rank, step, step, _grad(rank, step))
        snapshots[step + 1] = store.parameters()
    assert [(s.step, s.version, s.clocks) for s in saved] == [
        (2, 2, (2, 2)), (4, 4, (4, 4)), (6, 6, (6, 6))
    ]
    for s in saved:
        assert s.params.keys() == snapshots[s.step].keys()
        assert all(torch.equal(s.params[k], snapshots[s.step][k]) for k in s.params)


def test_async_checkpoint_when_the_slowest_worker_crosses_a_boundary() -> None:
    saved: list[CheckpointState] = []
    store = _store("ps-async", 2, total_steps=5, checkpoint_every=2, on_checkpoint=saved.append)
    for rank, step in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (0, 3), (1, 3)]:
        store.push(rank, step, store.version, _grad(rank, step))
    assert [(s.step, s.version, s.clocks) for s in saved] == [(2, 5, (3, 2)), (4, 8, (4, 4))]


def test_a_resumed_async_store_does_not_take_its_resume_step_again() -> None:
    """After a restart from the checkpoint at step 2, the faster worker's next push leaves the
    slowest clock at 2: that checkpoint exists already and must not be written over."""
    saved: list[CheckpointState] = []
    first = _store("ps-async", 2, total_steps=6, checkpoint_every=2, on_checkpoint=saved.append)
    for rank, step in [(0, 0), (1, 0), (0, 1), (1, 1)]:
        first.push(rank, step, first.version, _grad(rank, step))
    [state] = saved
    again: list[CheckpointState] = []
    resumed = _store("ps-async", 2, total_steps=6, init=False, checkpoint_every=2, on_checkpoint=again.append)
    resumed.resume_from(state, total_steps=6)
    assert resumed.initialize(LAYOUT, _initial())
    resumed.push(0, 2, resumed.version, _grad(0, 2))
    assert again == []
    for rank, step in [(0, 3), (1, 2), (1, 3)]:
        resumed.push(rank, step, resumed.version, _grad(rank, step))
    assert [s.step for s in again] == [4]


def _run(store: ParameterStore, steps: range, n: int) -> None:
    for step in steps:
        for rank in range(n):
            store.push(rank, step, store.version, _grad(rank, step))


@pytest.mark.parametrize("opt", ["sgd-momentum", "adam"])
@pytest.mark.parametrize("mode", ["ps-sync", "ps-async"])
def test_resume_continues_bit_identically(opt: str, mode: str) -> None:
    name, lr, hyper = OPTIMIZERS[opt]
    config: dict[str, Any] = {"optimizer": name, "lr": lr, "hyper": hyper,
                              "schedule": {"name": "cosine", "warmup_steps": 2}}
    saved: list[CheckpointState] = []
    full = _store(mode, 2, total_steps=6, checkpoint_every=3, on_checkpoint=saved.append, **config)
    _run(full, range(6), 2)
    [state] = saved  # taken at step 3, then the store went on: the copy must not have moved

    resumed = _store(mode, 2, total_steps=6, init=False, **config)
    resumed.resume_from(state, total_steps=6)
    assert resumed.register(0) == (state.version, 3, True)
    assert resumed.register(1) == (state.version, 3, False)
    assert resumed.initialize(LAYOUT, torch.full((NUMEL,), float("nan")))  # values ignored
    _run(resumed, range(3, 6), 2)
    assert resumed.version == full.version
    assert torch.equal(_flat(resumed), _flat(full))
    a, b = full.checkpoint_state(), resumed.checkpoint_state()
    assert a.scheduler_state == b.scheduler_state
    assert a.optimizer_state["param_groups"] == b.optimizer_state["param_groups"]
    for k, s in a.optimizer_state["state"].items():
        for key, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b.optimizer_state["state"][k][key]))


def test_resume_from_a_manual_checkpoint_state_copy() -> None:
    store = _store("ps-sync", 1, optimizer="adam", lr=0.01, total_steps=4)
    _run(store, range(2), 1)
    state = copy.deepcopy(store.checkpoint_state())
    _run(store, range(2, 4), 1)
    resumed = _store("ps-sync", 1, optimizer="adam", lr=0.01, total_steps=4, init=False)
    resumed.resume_from(state, total_steps=4)
    resumed.initialize(LAYOUT, _initial())
    _run(resumed, range(2, 4), 1)
    assert torch.equal(_flat(resumed), _flat(store))


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (Layout(("weight", "b"), ((3, 4), (3,))), r"missing \['b'\], unexpected \['bias'\]"),
        (Layout(("weight",), ((3, 4),)), r"does not match the model \(missing \[\], unexpected \['bias'\]"),
        (Layout(("weight", "bias", "extra"), ((3, 4), (3,), (1,))), r"missing \['extra'\]"),
        (Layout(("weight", "bias"), ((4, 3), (3,))), r"state: 'weight' is \[4, 3\] in the model but \[3, 4\]"),
    ],
)
def test_resume_with_a_different_model_is_refused(layout: Layout, message: str) -> None:
    store = _store("ps-sync", 1, total_steps=4)
    _run(store, range(2), 1)
    state = store.checkpoint_state()
    resumed = _store("ps-sync", 1, total_steps=4, init=False)
    resumed.resume_from(state, total_steps=4)
    with pytest.raises(ProtocolError, match=message):
        resumed.initialize(layout, torch.zeros(layout.numel))
    assert not resumed.initialized
    assert resumed.initialize(LAYOUT, torch.zeros(NUMEL))  # the right model still resumes
    assert torch.equal(_flat(resumed), _flat(store))


def test_resume_from_is_refused_when_it_cannot_fit() -> None:
    state = _store("ps-sync", 2).checkpoint_state()
    with pytest.raises(StateError, match="checkpoint has 2 workers, job has 1"):
        _store("ps-sync", 1, init=False).resume_from(state, total_steps=6)
    with pytest.raises(StateError, match="already has parameters"):
        _store("ps-sync", 2).resume_from(state, total_steps=6)


def test_staleness_scaling_divides_a_stale_gradient() -> None:
    """Async (local-sgd's outer_sync: false, staleness_scaling): a gradient computed s versions
    ago is applied as gradient / (1 + s)."""
    plain = _store("ps-async", 2, optimizer="sgd", lr=1.0)
    scaled = _store("ps-async", 2, optimizer="sgd", lr=1.0, staleness_scaling=True)
    for store in (plain, scaled):
        store.push(0, 0, 0, torch.ones(NUMEL))  # fresh: staleness 0
        store.push(1, 0, 0, torch.ones(NUMEL))  # computed on version 0, applied at 1: staleness 1
    assert torch.allclose(_flat(plain), _initial() - 2.0)
    assert torch.allclose(_flat(scaled), _initial() - 1.5)
