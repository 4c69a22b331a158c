"""GroupTracker: an allreduce job's membership, progress, checkpoint checks and end, on a fake clock."""

from __future__ import annotations

import pytest

from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import NotFoundError, ProtocolError, SpecError, StateError
from gradhub.server.tracker import GroupConfig, GroupTracker

LAYOUT = Layout(names=("w", "b"), shapes=((2, 3), (2,)))


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tracker(clock: FakeClock) -> GroupTracker:
    return GroupTracker(GroupConfig("j-1", 2), clock=clock)


@pytest.fixture
def ready(tracker: GroupTracker) -> GroupTracker:
    """Both workers registered, total steps known."""
    tracker.register(0, "h0", 10)
    tracker.register(1, "h1", 11)
    tracker.set_total_steps(10)
    return tracker


def test_config_validates_world_size() -> None:
    assert GroupConfig("j", 1).mode == "allreduce"
    with pytest.raises(SpecError, match="workers: must be >= 1"):
        GroupConfig("j", 0)


def test_register_starts_at_the_start_step_and_marks_alive(tracker: GroupTracker) -> None:
    assert [w.alive for w in tracker.workers()] == [False, False]
    assert tracker.register(1, "node-b", 4242) == (0, 0, False)
    w0, w1 = tracker.workers()
    assert not w0.alive
    assert (w1.alive, w1.host, w1.pid, w1.registrations) == (True, "node-b", 4242, 1)

    tracker.restart(6)
    assert tracker.start_step == 6
    assert tracker.register(1, "node-c", 7) == (6, 6, False)
    w1 = tracker.workers()[1]
    assert (w1.host, w1.pid, w1.clock, w1.registrations) == ("node-c", 7, 6, 2)


def test_restart_resets_clocks_and_liveness(ready: GroupTracker) -> None:
    ready.heartbeat(0, 7)
    ready.heartbeat(1, 8)
    ready.restart(3)
    assert [(w.alive, w.clock) for w in ready.workers()] == [(False, 3), (False, 3)]
    assert ready.step() == 3 and ready.start_step == 3


def test_heartbeat_raises_progress_monotonically(ready: GroupTracker) -> None:
    assert ready.heartbeat(0, 5) is None
    ready.heartbeat(0, 2)  # a late report does not move the clock back
    ready.heartbeat(0)  # alive, no step
    assert ready.workers()[0].clock == 5


def test_heartbeat_of_an_unregistered_worker_does_not_count_as_progress(
    tracker: GroupTracker,
) -> None:
    tracker.heartbeat(0, 9)
    assert tracker.workers()[0].clock == 0


def test_step_and_version_are_the_slowest_workers_clock(ready: GroupTracker) -> None:
    ready.heartbeat(0, 7)
    ready.heartbeat(1, 4)
    assert ready.step() == 4 and ready.version == 4
    ready.heartbeat(1, 9)
    assert ready.step() == 7 and ready.version == 7


def test_close_stops_the_workers_and_refuses_new_work(ready: GroupTracker) -> None:
    assert ready.closed is None
    ready.close("cancelled by user")
    ready.close("server shutting down")  # the first reason stays
    assert ready.closed == "cancelled by user"
    assert ready.heartbeat(0, 3) == "cancelled by user"
    with pytest.raises(StateError, match="job 'j-1' is over: cancelled by user"):
        ready.register(0)
    with pytest.raises(StateError, match="is over"):
        ready.accept_checkpoint(0, 5, LAYOUT)


def test_accept_checkpoint_checks_rank_step_and_layout(ready: GroupTracker) -> None:
    ready.accept_checkpoint(0, 1, LAYOUT)
    ready.accept_checkpoint(0, 10, LAYOUT)
    with pytest.raises(ProtocolError, match="rank: only worker 0 saves checkpoints, not worker 1"):
        ready.accept_checkpoint(1, 5, LAYOUT)
    for step in (0, -1, 11):
        with pytest.raises(ProtocolError, match=rf"step: {step} is outside this job's steps 1..10"):
            ready.accept_checkpoint(0, step, LAYOUT)
    other = Layout(names=("w", "b"), shapes=((3, 2), (2,)))
    with pytest.raises(
        ProtocolError, match="params: the model's parameters changed between checkpoints"
    ):
        ready.accept_checkpoint(0, 5, other)


def test_accept_checkpoint_before_the_total_is_known(tracker: GroupTracker) -> None:
    tracker.register(0)
    with pytest.raises(StateError, match="total_steps: unknown until a worker registers"):
        tracker.accept_checkpoint(0, 1, LAYOUT)


def test_the_first_checkpoint_fixes_the_layout(ready: GroupTracker) -> None:
    other = Layout(names=("x",), shapes=((4,),))
    ready.accept_checkpoint(0, 2, other)
    with pytest.raises(ProtocolError, match="parameters changed"):
        ready.accept_checkpoint(0, 3, LAYOUT)


def test_saved_final_step_finishes(ready: GroupTracker) -> None:
    ready.saved(4)
    assert not ready.finished()
    ready.saved(10)
    assert ready.finished()


def test_saved_before_the_total_is_known_does_not_finish(tracker: GroupTracker) -> None:
    tracker.saved(0)
    tracker.saved(10)
    assert not tracker.finished()


def test_set_total_steps_must_agree(tracker: GroupTracker) -> None:
    assert tracker.total_steps is None
    tracker.set_total_steps(10)
    tracker.set_total_steps(10)
    with pytest.raises(ProtocolError, match="total_steps: worker computed 12, the job has 10"):
        tracker.set_total_steps(12)
    assert tracker.total_steps == 10


@pytest.mark.parametrize("rank", [-1, 2])
def test_unknown_rank(tracker: GroupTracker, rank: int) -> None:
    message = rf"rank: worker {rank} is not in job 'j-1' \(world size 2\)"
    for call in (
        lambda: tracker.register(rank),
        lambda: tracker.heartbeat(rank, 1),
        lambda: tracker.mark_dead(rank),
        lambda: tracker.accept_checkpoint(rank, 1, LAYOUT),
    ):
        with pytest.raises(NotFoundError, match=message):
            call()


def test_seconds_since_seen_on_an_injected_clock(tracker: GroupTracker, clock: FakeClock) -> None:
    assert tracker.seconds_since_seen() == [0.0, 0.0]  # nobody alive yet
    tracker.register(0)
    clock.now += 7.5
    tracker.register(1)
    clock.now += 2.0
    assert tracker.seconds_since_seen() == [9.5, 2.0]
    tracker.heartbeat(0, 1)
    assert tracker.seconds_since_seen() == [0.0, 2.0]
    tracker.mark_dead(1)
    clock.now += 1.0
    assert tracker.seconds_since_seen() == [1.0, 0.0]  # the dead are not "silent"


def test_workers_are_copies(ready: GroupTracker) -> None:
    ready.workers()[0].clock = 99
    assert ready.workers()[0].clock == 0


# ------------------------------------------------------------ group formation
def _tracker(world: int = 3) -> GroupTracker:
    t = GroupTracker(GroupConfig("j", world))
    t.set_total_steps(100)
    return t


def test_a_group_forms_when_every_rank_has_asked_from_the_furthest_live_state() -> None:
    t = _tracker()
    assert t.join(0, 41) is None and t.join(2, None) is None  # a survivor, a fresh process
    formed = t.join(1, 42)  # a survivor that finished one step more before the loss
    assert formed is not None and (formed.generation, formed.step, formed.source) == (1, 42, 1)
    assert t.join(0, 41) == formed and t.join(2, None) == formed  # the others hear of it
    assert [w.clock for w in t.workers()] == [42, 42, 42]


def test_a_group_of_fresh_processes_starts_where_the_job_does() -> None:
    t = _tracker(2)
    t.restart(30)  # e.g. the latest checkpoint, after a server restart
    t.join(0, None)
    formed = t.join(1, None)
    assert formed is not None and (formed.step, formed.source) == (30, -1)


def test_the_next_group_needs_every_rank_to_ask_again() -> None:
    t = _tracker(2)
    t.join(0, None)
    first = t.join(1, None)
    assert t.join(0, None) == first
    assert t.join(0, 7) is None  # it lost its peer: a new group
    second = t.join(1, None)
    assert second is not None and (second.generation, second.step, second.source) == (2, 7, 0)


def test_a_rank_that_died_before_hearing_of_its_group_voids_it() -> None:
    t = _tracker(2)
    t.join(0, 5)
    formed = t.join(1, 5)
    assert formed is not None
    t.mark_dead(0)  # rank 0 died before it was told
    assert t.join(1, 5) is None  # rank 1 asks for the next group
    again = t.join(0, None)  # the restarted rank 0, fresh
    assert again is not None and again.generation == 2 and (again.step, again.source) == (5, 1)


def test_a_restarted_rank_that_asks_with_other_state_voids_the_group_it_missed() -> None:
    t = _tracker(2)
    t.join(0, 5)
    t.join(1, 5)
    assert t.join(0, None) is None  # the same rank, now a fresh process: that group is void
    again = t.join(1, 5)
    assert again is not None and again.generation == 2 and again.source == 1


def test_after_the_final_state_or_a_failure_nobody_forms_a_group() -> None:
    t = _tracker(2)
    t.fail()
    told = t.join(0, 12)
    assert told is not None and told.finished and told.keep  # rank 0: send the state of step 12
    other = t.join(1, 12)
    assert other is not None and other.finished and not other.keep
    assert not t.wait_kept(0.01)
    t.saved(12)
    assert t.wait_kept(0.01)
    done = _tracker(2)
    done.saved(100)
    told = done.join(1, None)
    assert told is not None and told.finished and not told.keep


def test_a_join_outside_the_steps_is_refused() -> None:
    t = _tracker(2)
    with pytest.raises(ProtocolError, match="step: 101 is outside"):
        t.join(0, 101)


def test_a_group_of_fresh_processes_starts_from_the_latest_checkpoint() -> None:
    t = _tracker(2)
    t.accept_checkpoint(0, 40, LAYOUT)
    t.saved(40)
    t.join(0, None)
    formed = t.join(1, None)  # every member lost its state: the checkpoint, not step 0
    assert formed is not None and (formed.step, formed.source) == (40, -1)


def test_a_failed_job_waits_for_nothing_when_rank_0_holds_no_whole_step() -> None:
    t = _tracker(2)
    t.fail()
    told = t.join(0, 0)  # it failed in step 0: nothing to keep
    assert told is not None and told.finished and not told.keep
    assert t.wait_kept(0.0)
