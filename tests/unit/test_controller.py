"""The job controller driven one ``step()`` at a time with a fake worker group, in every mode,
for every failure kind (death, hang, user error, lost group, server stop, cancel), the way Ray
Train v2 tests its controller. The mode runtimes, the job's database and the checkpoint store
are the real ones; only Ray is faked."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from gradhub.proto.contract.spec import JobSpec
from gradhub.proto.contract.states import JobState, WorkerPhase
from gradhub.server.checkpoints import CheckpointStore
from gradhub.server.config import ServerConfig
from gradhub.server.controller import GROW_RETRY_S, Controller, Outcome
from gradhub.server.job_db import JobDB, JobRecord
from gradhub.server.job_run import JobRun
from gradhub.server.launcher import WorkerExit
from gradhub.server.modes import ModeRuntime, runtime_for
from gradhub.server.policies import MaxRestarts
from gradhub.server.tracker import GroupTracker

MODES = ("ps-sync", "ps-async", "ps-ssp", "allreduce")
STEPS = 10
DIED = "The actor died unexpectedly before finishing this task."
RESTARTING = "The actor is temporarily unavailable: IOError: The actor is restarting."
CONFIG = ServerConfig(poll_s=0.01, heartbeat_interval_s=1.0, heartbeat_timeout_s=20.0)


class FakeGroup:
    """Ends the runs it is told to (``end``) at the next ``wait``; records what it was asked."""

    def __init__(self) -> None:
        self.pending: list[WorkerExit] = []
        self.reruns: list[int] = []
        self.kills: list[int] = []
        self.stops = 0
        self.on_kill: Any = None
        self.grown: list[list[int]] = []
        self.released: list[int] = []
        self.moves: list[tuple[int, int]] = []
        self.lost_nodes: set[int] = set()  # ranks whose node Ray reports dead

    def end(self, *exits: WorkerExit) -> None:
        self.pending.extend(exits)

    def wait(self, timeout: float) -> list[WorkerExit]:
        out, self.pending = self.pending, []
        return out

    def rerun(self, rank: int) -> str | None:
        self.reruns.append(rank)
        return None

    def kill(self, rank: int) -> None:
        self.kills.append(rank)
        if self.on_kill is not None:
            self.on_kill(rank)

    def stop(self) -> None:
        self.stops += 1

    def grow(self, ranks: list[int]) -> None:
        self.grown.append(list(ranks))

    def release(self, rank: int) -> None:
        self.released.append(rank)

    def move(self, rank: int, to: int) -> None:
        self.moves.append((rank, to))

    def node_lost(self, rank: int) -> bool:
        return rank in self.lost_nodes


@dataclass
class FakeLauncher:
    fail_with: Exception | None = None
    on_launch: Any = None  # called with each new group
    groups: list[FakeGroup] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # each launch's size

    def total_resources(self) -> dict[str, float]:
        return {"CPU": 64.0}

    def launch(self, job_id: str, spec: JobSpec, runtime_env: Mapping[str, Any] | None,
               credential: str = "", size: int | None = None) -> FakeGroup:
        self.sizes.append(spec.workers if size is None else size)
        if self.fail_with is not None:
            raise self.fail_with
        self.groups.append(FakeGroup())
        if self.on_launch is not None:
            self.on_launch(self.groups[-1])
        return self.groups[-1]


class FakeHost:
    def __init__(self, db: JobDB, checkpoints: CheckpointStore) -> None:
        self._db, self._ckpts = db, checkpoints
        self.stopping = False
        self.lines: list[str] = []
        self.tracebacks: list[tuple[int, str]] = []
        self.room = 0  # workers an elastic job may grow by
        self.shards: list[FakeShards] = []  # a sharded job's, each start's

    @property
    def db(self) -> JobDB:
        return self._db

    @property
    def checkpoint_store(self) -> CheckpointStore:
        return self._ckpts

    def log_line(self, job_id: str, line: str) -> None:
        self.lines.append(line)

    def log_traceback(self, job_id: str, rank: int, traceback: str) -> None:
        self.tracebacks.append((rank, traceback))

    def notify(self) -> None:
        pass

    def reserve_workers(self, job_id: str, workers: int) -> int:
        granted = min(workers, self.room)
        self.room -= granted
        return granted

    def release_workers(self, job_id: str, workers: int) -> None:
        self.room += workers

    def shard_count(self, ps_shards: int | str) -> int:
        assert isinstance(ps_shards, int)
        return ps_shards

    def start_shards(self, config: Any, count: int) -> FakeShards:
        self.shards.append(FakeShards(count - 1))
        return self.shards[-1]


class FakeShards:
    """A sharded job's shards (``OtherShards``) as far as the controller's paths reach them:
    each answers ``follow`` with the version it is told to."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.versions: list[int] | None = None  # what ``follow`` answers (None: each at the control store's)
        self.followed: list[tuple[int, bool]] = []
        self.stopped = False

    def endpoints(self) -> list[dict[str, object]]:
        return [{"tcp_host": "127.0.0.1"}] * self.count

    def follow(self, size: int, clocks: Any, at_once: bool = False) -> list[int]:
        self.followed.append((size, at_once))
        return list(self.versions) if self.versions is not None else [0] * self.count

    def lost(self) -> list[int]:
        return []

    def mark_dead(self, rank: int) -> None:
        pass

    def stats(self) -> list[Any]:
        return []

    def stop(self) -> None:
        self.stopped = True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    controller: Controller
    run: JobRun
    runtime: ModeRuntime
    host: FakeHost
    launcher: FakeLauncher
    clock: Clock

    @property
    def group(self) -> FakeGroup:
        return self.launcher.groups[-1]

    def step(self) -> Outcome | None:
        return self.controller.step()

    def register(self, rank: int) -> None:
        """Worker ``rank`` registers, as its run does when it starts."""
        self.runtime.table.set_total_steps(STEPS)
        self.runtime.table.register(rank)
        self.run.set_phase(rank, WorkerPhase.RUNNING)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Any]:
    dbs: list[JobDB] = []

    def make(mode: str, max_restarts: int = 1, launcher: FakeLauncher | None = None,
             workers: Any = 2, size: int | None = None, **fields: Any) -> Rig:
        db = JobDB(tmp_path / f"jobs-{len(dbs)}.db")
        dbs.append(db)
        spec = JobSpec.from_dict({"mode": mode, "workers": workers, "model": "mlp", "dataset": "digits",
                                  "steps": STEPS, "max_restarts": max_restarts, **fields})
        db.insert(JobRecord(id="j-1", name="t", mode=mode, spec_json=spec.to_json(), state=JobState.QUEUED,
                            created_at=0.0))
        db.update("j-1", state=JobState.RUNNING)
        host, clock = FakeHost(db, CheckpointStore(tmp_path / f"ckpt-{len(dbs)}")), Clock()
        run = JobRun("j-1", spec)
        runtime = runtime_for(run, host, clock)
        runtime.prepare()  # (a sharded job's shards start)
        runtime.start_with(size or spec.workers)
        run.begin(runtime.table, {})
        launcher = launcher or FakeLauncher()
        controller = Controller(run, runtime, launcher, host, MaxRestarts(max_restarts, spec.workers), CONFIG,
                                clock=clock)
        return Rig(controller, run, runtime, host, launcher, clock)

    yield make
    for db in dbs:
        db.close()


def started(rig: Any, mode: str, **kw: Any) -> Rig:
    r: Rig = rig(mode, **kw)
    assert r.controller.start() is None
    r.register(0)
    r.register(1)
    return r


# ------------------------------------------------------------------- death
@pytest.mark.parametrize("mode", MODES)
def test_a_death_restarts_only_that_worker_and_counts_once(rig: Any, mode: str) -> None:
    r = started(rig, mode)
    r.group.end(WorkerExit(1, died=True, error=DIED))
    assert r.step() is None
    assert r.group.reruns == [1] and r.group.kills == [] and r.group.stops == 0
    assert r.run.snapshot().restarts == (0, 1)
    assert r.run.phase(1) == WorkerPhase.RESTARTING and r.run.phase(0) == WorkerPhase.RUNNING
    assert f"worker 1 died ({DIED}); restart 1 of 1" in r.host.lines
    assert len(r.launcher.groups) == 1  # no group restart, in any mode


@pytest.mark.parametrize("mode", MODES)
def test_a_rerun_that_meets_the_restarting_actor_is_the_same_death(rig: Any, mode: str) -> None:
    r = started(rig, mode)
    r.group.end(WorkerExit(1, died=True, error=DIED))
    r.step()
    r.group.end(WorkerExit(1, died=True, unavailable=True, error=RESTARTING))  # the rerun, too early
    assert r.step() is None
    assert r.group.reruns == [1], "not at once: a poll later"
    r.clock.now += CONFIG.poll_s
    assert r.step() is None
    assert r.group.reruns == [1, 1]
    assert r.run.snapshot().restarts == (0, 1)


@pytest.mark.parametrize("mode", MODES)
def test_past_max_restarts_the_job_fails_naming_the_worker(rig: Any, mode: str) -> None:
    r = started(rig, mode, max_restarts=1)
    for _ in range(2):
        r.group.end(WorkerExit(1, died=True, error=DIED))
        outcome = r.step()
    assert outcome == Outcome(JobState.FAILED, f"worker 1 died 2 times (max_restarts is 1): {DIED}")
    assert r.run.phase(1) == WorkerPhase.LOST
    assert r.run.snapshot().restarts == (0, 2)


# -------------------------------------------------------------------- hang
@pytest.mark.parametrize("mode", MODES)
def test_a_silent_worker_is_killed_and_its_death_is_the_same_failure(rig: Any, mode: str) -> None:
    r = started(rig, mode)
    r.clock.now += CONFIG.heartbeat_timeout_s / 2
    r.runtime.table.heartbeat(0)
    assert r.step() is None and r.group.kills == []
    r.clock.now += CONFIG.heartbeat_timeout_s / 2 + 1
    assert r.step() is None
    assert r.group.kills == [1], "only the silent worker"
    assert r.run.phase(1) == WorkerPhase.RESTARTING and r.run.snapshot().restarts == (0, 1)
    assert any(line.startswith("worker 1 silent for 21 s: killing it") for line in r.host.lines)
    r.group.end(WorkerExit(1, died=True, error=DIED))  # the kill, as Ray reports it
    assert r.step() is None
    r.clock.now += CONFIG.poll_s
    assert r.step() is None
    assert r.group.reruns == [1] and r.run.snapshot().restarts == (0, 1)


# -------------------------------------------------------------- user error
@pytest.mark.parametrize("mode", MODES)
def test_a_workers_own_error_fails_the_job_without_retry(rig: Any, mode: str) -> None:
    r = started(rig, mode, max_restarts=3)
    error = WorkerExit(1, error="at training step 5: ValueError: bad data", phase="train", traceback="Traceback...")
    r.group.end(error)
    outcome = r.step()
    assert outcome == Outcome(JobState.FAILED, "worker 1 failed at training step 5: ValueError: bad data")
    assert r.group.reruns == [] and r.host.tracebacks == [(1, "Traceback...")]
    assert r.run.phase(1) == WorkerPhase.FAILED


def test_allreduce_a_failed_job_asks_rank_0_for_its_state_after_ending_the_failed_worker(rig: Any) -> None:
    asked: list[Any] = []

    def launched(group: FakeGroup) -> None:
        def rank_0_rejoins(rank: int) -> None:
            # rank 0's collective fails when the failed worker's process goes; it asks to
            # rejoin holding step 5 and is told to send that state
            asked.append(tracker.join(0, 5))
            tracker.saved(5)

        group.on_kill = rank_0_rejoins
        group.end(WorkerExit(1, error="ValueError: bad data"))

    r = rig("allreduce", max_restarts=0, launcher=FakeLauncher(on_launch=launched))
    tracker = r.runtime.table
    assert isinstance(tracker, GroupTracker)
    tracker.set_total_steps(STEPS)
    outcome = r.controller.execute()
    assert outcome.state == JobState.FAILED
    assert r.group.kills == [1] and asked[0].finished and asked[0].keep
    assert r.group.stops == 1 and tracker.closed


# --------------------------------------------------------- the group is lost
def test_allreduce_a_worker_that_gave_up_on_its_group_restarts_the_group_from_the_checkpoint(
        rig: Any) -> None:
    r = started(rig, "allreduce")
    r.host.checkpoint_store.save("j-1", 4, 4, {"w": torch.zeros(2)})
    r.group.end(WorkerExit(0, error="PeerLostError: could not form its group", lost_peer=True))
    assert r.step() is None
    assert len(r.launcher.groups) == 2 and r.launcher.groups[0].stops == 1
    assert r.runtime.table.step() == 4
    assert r.run.phase(0) == WorkerPhase.RESTARTING and r.run.phase(1) == WorkerPhase.RESTARTING
    assert "restarting all 2 workers from step 4" in r.host.lines


# ------------------------------------------------------- stop, cancel, end
@pytest.mark.parametrize("mode", MODES)
def test_a_server_stop_leaves_the_job_to_resume(rig: Any, mode: str) -> None:
    r = started(rig, mode)
    r.host.stopping = True
    r.group.end(WorkerExit(1, error="StateError: job is over: server shutting down"))
    assert r.step() == Outcome(None, "server shutting down")
    assert r.group.reruns == [] and r.run.phase(1) == WorkerPhase.RUNNING


@pytest.mark.parametrize("mode", MODES)
def test_a_cancel_ends_the_job_and_its_workers_errors_are_not_failures(rig: Any, mode: str) -> None:
    r = started(rig, mode)
    assert r.step() is None
    r.run.request_cancel("cancelled by user")
    assert r.runtime.table.closed == "cancelled by user"
    r.group.end(WorkerExit(0, error="StateError: job is over: cancelled by user"))
    assert r.step() == Outcome(JobState.CANCELLED, "cancelled by user")


@pytest.mark.parametrize("mode", MODES)
def test_workers_that_return_before_the_last_step_fail_the_job(rig: Any, mode: str) -> None:
    r = started(rig, mode)
    r.group.end(WorkerExit(0, result={}))
    assert r.step() is None and r.run.phase(0) == WorkerPhase.DONE
    r.group.end(WorkerExit(1, result={}))
    assert r.step() == Outcome(JobState.FAILED, "the workers stopped before the last step")


def test_allreduce_succeeds_once_the_final_state_is_saved(rig: Any) -> None:
    r = started(rig, "allreduce")
    r.runtime.table.saved(STEPS)
    r.group.end(WorkerExit(0, result={}), WorkerExit(1, result={}))
    assert r.step() == Outcome(JobState.SUCCEEDED, "")


@pytest.mark.parametrize("mode", MODES)
def test_a_launch_that_raises_fails_the_job(rig: Any, mode: str) -> None:
    r = rig(mode, launcher=FakeLauncher(fail_with=RuntimeError("placement group not ready in 120 s")))
    assert r.controller.execute() == Outcome(
        JobState.FAILED, "could not start the workers: RuntimeError: placement group not ready in 120 s")



def test_allreduce_a_relaunch_that_raises_fails_the_job(rig: Any) -> None:
    r = started(rig, "allreduce")
    r.launcher.fail_with = RuntimeError("node lost")
    r.group.end(WorkerExit(0, error="PeerLostError: could not form its group", lost_peer=True))
    assert r.step() == Outcome(JobState.FAILED, "could not start the workers: RuntimeError: node lost")
    assert r.launcher.groups[0].stops == 1


# ----------------------------------------------------------------- elastic
ELASTIC = {"min": 1, "max": 3}


def elastic(rig: Any, mode: str, size: int = 3, workers: Any = None, **fields: Any) -> Rig:
    """An elastic job started with ``size`` workers, every one registered (``fields``: more of
    its spec)."""
    r: Rig = rig(mode, workers=workers or ELASTIC, size=size, **fields)
    assert r.controller.start() is None and r.launcher.sizes == [size]
    for rank in range(size):
        r.register(rank)
    return r


@pytest.mark.parametrize("mode", MODES)
def test_an_elastic_job_grows_as_far_as_there_is_room_and_logs_it(rig: Any, mode: str) -> None:
    r = rig(mode, workers=ELASTIC, size=1)
    assert r.controller.start() is None and r.launcher.sizes == [1]
    r.register(0)
    assert r.run.phase(1) == WorkerPhase.IDLE
    r.run.scale(3)
    assert r.step() is None and r.group.grown == [], "no room yet"
    r.host.room = 1
    assert r.step() is None and r.group.grown == [], "it asks again GROW_RETRY_S later, not every poll"
    r.clock.now += GROW_RETRY_S
    assert r.step() is None
    assert r.group.grown == [[1]] and r.run.phase(1) == WorkerPhase.STARTING
    assert r.runtime.table.target == 2
    assert "scaling to 2 workers (from 1)" in r.host.lines
    r.host.room = 5
    r.clock.now += GROW_RETRY_S
    r.step()
    assert r.group.grown == [[1], [2]] and r.runtime.table.target == 3 and r.host.room == 4


@pytest.mark.parametrize("mode", MODES)
def test_an_elastic_job_shrinks_and_gives_the_workers_resources_back(rig: Any, mode: str) -> None:
    r = elastic(rig, mode)
    r.run.scale(1)
    assert r.step() is None and r.runtime.table.target == 1
    r.group.end(WorkerExit(2, result={"released": True}), WorkerExit(1, result={"released": True}))
    assert r.step() is None
    assert sorted(r.group.released) == [1, 2] and r.host.room == 2
    assert r.run.phase(1) == r.run.phase(2) == WorkerPhase.IDLE
    assert r.run.snapshot().restarts == (0, 0, 0), "leaving is not a failure"


@pytest.mark.parametrize("mode", MODES)
def test_a_worker_whose_node_died_is_not_waited_for_the_top_rank_takes_its_place(rig: Any, mode: str) -> None:
    r = elastic(rig, mode)
    r.group.end(WorkerExit(1, died=True, error=DIED, node_lost=True))
    assert r.step() is None
    assert r.group.released == [1] and r.group.reruns == [], "not restarted: its node is gone"
    assert r.runtime.table.target == 2 and r.run.snapshot().restarts == (0, 1, 0)
    assert any("died with its node" in line and "goes on without it" in line for line in r.host.lines)
    r.group.end(WorkerExit(2, result={"released": True}))  # the top rank leaves ...
    assert r.step() is None
    assert r.group.moves == [(2, 1)], "... and its process takes rank 1"
    assert r.run.phase(1) == WorkerPhase.STARTING and r.run.phase(2) == WorkerPhase.IDLE
    r.host.room = 1  # a node joins: the job grows back toward its target
    r.clock.now += GROW_RETRY_S
    r.step()
    assert r.group.grown == [[2]] and r.runtime.table.target == 3


def test_sharded_a_dead_node_that_left_the_shards_at_two_steps_restarts_the_job_at_its_smallest_size(
        rig: Any) -> None:
    """ps-sync over shards: the node of worker 1 died between its pushes of a step, and a shard
    took that step (its version is past the control store's): the job shrinks at once, sees
    the shards at two steps, and every shard and worker starts again from the latest checkpoint
    on the job's smallest size; it grows back toward its size as the cluster has room."""
    r = elastic(rig, "ps-sync", ps_shards=3)
    r.host.shards[0].versions = [0, 1]
    r.group.end(WorkerExit(1, died=True, error=DIED, node_lost=True))
    assert r.step() is None
    assert r.host.shards[0].followed == [(2, True)] and r.runtime.table.target == 2
    assert any("at two steps as the job shrank at once (versions [0, 0, 1])" in line for line in r.host.lines)
    assert r.step() is None, "the next step takes the job back to its checkpoint"
    assert r.host.shards[0].stopped and len(r.host.shards) == 2, "new shards"
    assert r.launcher.sizes == [3, 1] and r.runtime.table.size == 1
    assert "size: 1 workers from step 0" in r.host.lines
    assert r.run.snapshot().restarts == (0, 1, 0), "one death, counted once"
    r.host.room = 5
    r.clock.now += GROW_RETRY_S
    r.step()
    assert r.group.grown == [[1, 2]] and r.runtime.table.target == 3


def test_sharded_a_dead_node_that_left_the_shards_at_one_step_shrinks_at_once(rig: Any) -> None:
    r = elastic(rig, "ps-sync", ps_shards=3)
    r.group.end(WorkerExit(1, died=True, error=DIED, node_lost=True))
    assert r.step() is None and r.step() is None
    assert r.host.shards[0].followed == [(2, True)] and r.runtime.table.size == 2
    assert len(r.host.shards) == 1 and r.launcher.sizes == [3], "nobody started again"


def test_sharded_a_dead_node_restarts_a_job_that_clips_over_shards(rig: Any) -> None:
    """(Its workers wait on each shard for the norm of the step that would be done again.)"""
    r = elastic(rig, "ps-sync", ps_shards=3, clip_grad_norm=1.0)
    r.group.end(WorkerExit(1, died=True, error=DIED, node_lost=True))
    assert r.step() is None and r.step() is None
    assert any("a job that clips over shards cannot drop its step in flight" in line for line in r.host.lines)
    assert len(r.host.shards) == 2 and r.launcher.sizes == [3, 1]


@pytest.mark.parametrize("mode", ["ps-async", "ps-ssp"])
def test_sharded_async_shards_follow_every_change_of_size_at_once(rig: Any, mode: str) -> None:
    r = elastic(rig, mode, ps_shards=3)
    r.run.scale(1)
    assert r.step() is None and r.runtime.table.size == 1
    r.group.end(WorkerExit(2, result={"released": True}), WorkerExit(1, result={"released": True}))
    assert r.step() is None and r.group.released == [2, 1]
    r.run.scale(3)
    r.clock.now += GROW_RETRY_S
    assert r.step() is None and r.group.grown == [[1, 2]]
    assert r.host.shards[0].followed == [(3, False), (1, False), (3, False)]


@pytest.mark.parametrize("mode", MODES)
def test_an_elastic_job_at_its_smallest_size_restarts_a_worker_whose_node_died(rig: Any, mode: str) -> None:
    r = elastic(rig, mode, size=2, workers={"min": 2, "max": 3})
    r.group.end(WorkerExit(1, died=True, error=DIED, node_lost=True))
    assert r.step() is None
    assert r.group.reruns == [1] and r.group.released == [] and r.runtime.table.target == 2


@pytest.mark.parametrize("mode", MODES)
def test_a_restarting_worker_whose_node_is_found_dead_later_is_not_waited_for(rig: Any, mode: str) -> None:
    r = elastic(rig, mode)
    r.group.end(WorkerExit(2, died=True, unavailable=True, error=RESTARTING))  # Ray: the process is gone
    assert r.step() is None and r.group.reruns == [2] and r.run.phase(2) == WorkerPhase.RESTARTING
    r.group.lost_nodes.add(2)  # seconds later Ray marks its node dead
    r.clock.now += GROW_RETRY_S
    assert r.step() is None
    assert r.group.released == [2] and r.runtime.table.target == 2 and r.group.moves == []
    assert r.run.phase(2) == WorkerPhase.IDLE and r.run.snapshot().restarts == (0, 0, 1), "one death, counted once"
    assert "worker 2's node died; the job goes on without it" in r.host.lines
