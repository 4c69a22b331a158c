"""An elastic job's size in the parameter store and the group tracker, as plain classes: when a
change of size takes effect in each mode, who joins and who leaves, and the record of changes."""

from __future__ import annotations

import pytest
import torch

from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import ReleasedError, StateError
from gradhub.proto.v1.tensor_pb2 import FLOAT32
from gradhub.server.store import ParameterStore, StoreConfig
from gradhub.server.tracker import GroupConfig, GroupTracker

LAYOUT = Layout(names=("weight", "bias"), shapes=((3, 4), (3,)))
NUMEL = LAYOUT.numel
STEPS = 8


def _grad(rank: int, step: int) -> torch.Tensor:
    return torch.randn(NUMEL, generator=torch.Generator().manual_seed(1000 * step + rank))


def _store(mode: str, largest: int, size: int) -> ParameterStore:
    """A store for up to ``largest`` workers, running on ``size`` (all registered, initialized)."""
    store = ParameterStore(StoreConfig("job", mode, largest, optimizer="sgd", lr=0.1))
    store.start_with(size)
    store.set_total_steps(STEPS)
    for rank in range(size):
        store.register(rank)
    assert store.initialize(LAYOUT, torch.zeros(NUMEL))
    return store


def _step(store: ParameterStore, step: int, ranks: range, world_size: int = 0) -> None:
    for rank in ranks:
        assert store.push(rank, step, step, _grad(rank, step), world_size=world_size)[0]


# --------------------------------------------------------------- ps-sync
def test_ps_sync_grows_at_the_first_step_boundary_after_the_new_worker_registered() -> None:
    store = _store("ps-sync", 3, 2)
    store.resize(3)
    _step(store, 0, range(2))
    assert store.size == 2, "nobody waits for a worker that is still starting"
    assert store.register(2) == (1, 1, False)
    assert store.try_pull(2, 1, FLOAT32) is None, "it joins at the next boundary, not now"
    _step(store, 1, range(2))
    assert store.size == 3 and store.size_changes() == [(2, 3)]
    snap = store.try_pull(2, 1, FLOAT32)
    assert snap is not None and snap.version == 2 and snap.world_size == 3, "its first step is step 2"
    _step(store, 2, range(3))
    assert store.version == 3 and store.step() == 3


def test_ps_sync_shrinks_at_a_step_boundary_and_the_worker_above_leaves() -> None:
    store = _store("ps-sync", 3, 3)
    _step(store, 0, range(2))
    store.resize(2)
    assert store.size == 3, "step 0 is in flight: it ends with the three workers"
    _step(store, 0, range(2, 3))
    assert store.size == 2 and store.size_changes() == [(1, 2)]
    assert store.try_pull(0, 1, FLOAT32).world_size == 2  # type: ignore[union-attr]
    with pytest.raises(ReleasedError, match="runs on 2 workers now; worker 2 leaves"):
        store.try_pull(2, 1, FLOAT32)
    with pytest.raises(ReleasedError):
        store.register(2)
    _step(store, 1, range(2))
    assert store.version == 2 and store.step() == 2


def test_ps_sync_a_shrink_at_once_drops_the_step_in_flight_which_is_done_again() -> None:
    store = _store("ps-sync", 3, 3)
    before = store.parameters()
    _step(store, 0, range(2), world_size=3)  # worker 2's node dies before its push
    store.resize(2, at_once=True)
    assert store.size == 2 and store.version == 0 and store.size_changes() == [(0, 2)]
    assert all(torch.equal(before[k], v) for k, v in store.parameters().items()), "nothing applied"
    redo = store.try_pull(0, 1, FLOAT32)
    assert redo is not None and redo.version == 0 and redo.world_size == 2, "step 0 again, at size 2"
    assert store.push(1, 0, 0, _grad(1, 0), world_size=3) == (False, 0), "computed for size 3: dropped"
    _step(store, 0, range(2), world_size=2)
    assert store.version == 1


def test_ps_sync_checkpoints_every_ranks_clock_at_the_step_so_any_size_resumes_there() -> None:
    taken = []
    store = ParameterStore(StoreConfig("job", "ps-sync", 3, optimizer="sgd", lr=0.1, checkpoint_every=2),
                           on_checkpoint=taken.append)
    store.start_with(2)
    store.set_total_steps(STEPS)
    for rank in range(2):
        store.register(rank)
    assert store.initialize(LAYOUT, torch.zeros(NUMEL))
    for step in range(4):
        _step(store, step, range(2))
    assert [(c.step, c.clocks) for c in taken] == [(2, (2, 2, 2)), (4, (4, 4, 4))], "rank 2 too: it may resume"


def test_ps_sync_is_the_mean_over_its_members_whatever_the_size() -> None:
    store = _store("ps-sync", 4, 2)
    start = torch.cat([t.reshape(-1) for t in store.parameters().values()])
    _step(store, 0, range(2))
    after = torch.cat([t.reshape(-1) for t in store.parameters().values()])
    assert torch.allclose(after, start - 0.1 * (_grad(0, 0) + _grad(1, 0)) / 2)


# ---------------------------------------------------------- async modes
@pytest.mark.parametrize("mode", ["ps-async", "ps-ssp"])
def test_async_modes_change_size_at_once_and_a_joiner_starts_at_the_jobs_step(mode: str) -> None:
    store = _store(mode, 3, 2)
    for step in range(3):
        _step(store, step, range(2))
    store.resize(3)
    assert store.size == 3 and store.size_changes() == [(3, 3)]
    assert store.register(2)[1] == 3, "it starts where the others are"
    store.resize(1)
    with pytest.raises(ReleasedError):
        store.push(2, 3, store.version, _grad(2, 3))
    assert store.step() == 3 and store.size_changes()[-1] == (3, 1)


def test_a_size_outside_the_job_is_refused() -> None:
    store = _store("ps-sync", 3, 2)
    with pytest.raises(StateError, match="workers: 4 is outside this job's 1..3"):
        store.resize(4)


# --------------------------------------------------------------- tracker
@pytest.fixture
def tracker() -> GroupTracker:
    t = GroupTracker(GroupConfig("j-1", 3))
    t.start_with(2)
    t.set_total_steps(20)
    for rank in range(2):
        t.register(rank)
    formed = [t.join(0, None), t.join(1, None)]
    assert formed[1] is not None and formed[1].world_size == 2
    assert t.join(0, None) == formed[1]  # rank 0 hears of it
    return t


def test_allreduce_grows_once_the_joiner_waits_and_the_group_re_forms_from_its_state(tracker: GroupTracker) -> None:
    tracker.resize(3)
    assert not tracker.regroup_due(), "the new worker is still starting"
    tracker.register(2)
    assert tracker.join(2, None) is None
    assert tracker.regroup_due(), "now the group should re-form at its next step boundary"
    assert tracker.join(0, 5) is None
    formed = tracker.join(1, 5)
    assert formed is not None and (formed.world_size, formed.step, formed.source) == (3, 5, 0)
    assert tracker.size_changes() == [(5, 3)] and not tracker.regroup_due()


def test_allreduce_shrinks_the_rank_above_is_released(tracker: GroupTracker) -> None:
    tracker.resize(1)
    assert tracker.regroup_due()
    left = tracker.join(1, 4)
    assert left is not None and left.finished and left.released
    formed = tracker.join(0, 4)
    assert formed is not None and (formed.world_size, formed.step) == (1, 4)
    assert tracker.size_changes() == [(4, 1)]


def test_allreduce_a_group_that_re_forms_before_the_joiner_waits_keeps_its_size(tracker: GroupTracker) -> None:
    tracker.resize(3)
    tracker.mark_dead(1)  # a member is lost while the new worker is still starting
    assert tracker.join(0, 6) is None
    formed = tracker.join(1, None)
    assert formed is not None and formed.world_size == 2 and tracker.size_changes() == []
