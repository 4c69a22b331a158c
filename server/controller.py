"""The controller of one running job, in every mode: it launches the job's worker group, and
each ``step()`` observes the group once (how runs ended, who went silent) and returns the job's
outcome, or None to go on. What a failure leads to is the injected ``RestartPolicy``'s
decision; what differs between modes is the ``ModeRuntime``'s.

Failures it sees: a death (Ray reports the actor's process gone; Ray restarts it and the
controller runs it again), a hang (no heartbeat for ``heartbeat_timeout_s``: it kills the
process, whose death follows and counts as this one), a worker's own error (the job fails),
a lost group (allreduce: the whole group restarts), a lost parameter-server shard (every shard
and worker starts again from the job's latest checkpoint), the server stopping and a cancel.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gradhub.proto.contract.errors import GradhubError
from gradhub.proto.contract.states import JobState, WorkerPhase
from gradhub.server.config import ServerConfig
from gradhub.server.job_run import JobRun
from gradhub.server.launcher import Launcher, WorkerExit, WorkerGroup
from gradhub.server.modes import ModeRuntime
from gradhub.server.policies import Failure, FailureDecision, FailureKind, RestartPolicy

log = logging.getLogger(__name__)

KEEP_STATE_S = 30.0  # allreduce: how long a failed job waits for rank 0 to send its state
GROW_RETRY_S = 2.0  # an elastic job below its target: how often it asks for room to grow
GROW_BACKOFF_S = 30.0  # and how long it waits after its workers could not be placed


@dataclass(frozen=True)
class Outcome:
    """How the job ended: a final state and its reason; state None when the server stops (the
    job stays RUNNING and resumes at the next start)."""

    state: JobState | None
    reason: str = ""


class ControllerHost(Protocol):
    """What the controller needs of the server around it."""

    @property
    def stopping(self) -> bool: ...

    def log_line(self, job_id: str, line: str) -> None: ...

    def log_traceback(self, job_id: str, rank: int, traceback: str) -> None: ...

    def notify(self) -> None: ...

    def reserve_workers(self, job_id: str, workers: int) -> int:
        """Room for up to ``workers`` more workers of an elastic job (none while other jobs
        queue: queued work starts first); returns how many it reserved."""
        ...

    def release_workers(self, job_id: str, workers: int) -> None:
        """An elastic job gives back the resources of ``workers`` workers."""
        ...


class Controller:
    def __init__(self, run: JobRun, runtime: ModeRuntime, launcher: Launcher, host: ControllerHost,
                 policy: RestartPolicy, config: ServerConfig, runtime_env: Mapping[str, Any] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.run, self.runtime, self.launcher, self.host = run, runtime, launcher, host
        self.policy, self.config, self.runtime_env = policy, config, runtime_env
        self._now = clock
        self.group: WorkerGroup | None = None
        self._done: set[int] = set()
        self._rerun_at: dict[int, float] = {}  # ranks to run again once Ray has restarted their actor
        self._killed: set[int] = set()  # ranks killed for a failure already counted
        self._failed_rank: int | None = None  # the worker whose failure failed the job
        # an elastic job: the ranks that have a worker, workers to run another rank once they
        # leave (the top rank fills the place of one whose node died), when to ask to grow
        # next, and the changes of size told to the job's log so far
        self._launched: set[int] = set()
        self._moves: dict[int, int] = {}
        self._grow_at = 0.0
        self._grow_error = ""  # why the latest growth failed (told to the log once)
        self._nodes_at = 0.0  # when to look again for restarting workers whose node died
        self._sizes_told = 0
        self._regroup = False  # a shrink at once left a sharded job's shards at two steps

    # ------------------------------------------------------------ the loop
    def execute(self) -> Outcome:
        """Launch the group and step until the job ends; the group is stopped on the way out."""
        outcome = self.start()
        reason = "job ended"
        try:
            while outcome is None:
                outcome = self.step()
            reason = outcome.reason or reason
            if outcome.state == JobState.FAILED:
                self._keep_state()
            return outcome
        finally:
            self.runtime.table.close(reason)
            if self.group is not None:
                self.group.stop()
            self.runtime.tick()
            self.runtime.close()

    def start(self) -> Outcome | None:
        """Launch the worker group; the job's failure when it cannot start."""
        size = self.runtime.table.size
        try:
            self.group = self.launcher.launch(self.run.id, self.run.spec, self.runtime_env, self.run.credential,
                                              size=size)
        except Exception as e:  # noqa: BLE001 - reported as the job's failure
            return Outcome(JobState.FAILED, f"could not start the workers: {type(e).__name__}: {e}")
        self._launched = set(range(size))
        return None

    def step(self) -> Outcome | None:
        """Observe the group once (waiting up to ``poll_s`` for runs to end); the job's outcome,
        or None while it goes on."""
        assert self.group is not None, "start() first"
        run, group, table = self.run, self.group, self.runtime.table
        self.runtime.tick()
        if self.host.stopping:
            return Outcome(None, "server shutting down")
        if run.cancelled is not None:
            return Outcome(JobState.CANCELLED, run.cancelled)
        if (lost := self.runtime.lost()) is not None:
            return self._failed(Failure(0, FailureKind.SHARD_LOST, lost))
        if self._regroup:  # (the runtime logged why; the death that caused it counted already)
            self._regroup = False
            return self._restart_group()
        if run.spec.elastic:
            self._scale()
        for rank in [r for r, at in self._rerun_at.items() if at <= self._now()]:
            del self._rerun_at[rank]
            self._rerun(rank)
        for ex in group.wait(self.config.poll_s):
            if self.host.stopping or run.cancelled is not None:
                break  # workers end with errors when the job closes: not the job's failure
            if (outcome := self._ended(ex)) is not None:
                return outcome
        for rank, silent in enumerate(table.seconds_since_seen()):
            if (rank not in self._done and silent > self.config.heartbeat_timeout_s
                    and run.phase(rank) == WorkerPhase.RUNNING):
                failure = Failure(rank, FailureKind.HANG, f"silent for {silent:.0f} s")
                if (outcome := self._failed(failure)) is not None:
                    return outcome
        self._tell_sizes()
        if all(rank in self._done for rank in range(table.size)):
            state, reason = self.runtime.finish()
            return Outcome(state, reason)
        return None

    # ------------------------------------------------------------ size
    def _scale(self) -> None:
        """An elastic job: grow toward the size it is scaled to when there is room (a worker
        per new rank, each joining at the next step boundary), or shrink to it (the workers
        above it leave at the next step boundary)."""
        run, table, group = self.run, self.runtime.table, self.group
        assert group is not None
        want = run.target
        if want > len(self._launched) and not self._moves and self._now() >= self._grow_at:
            ranks = [r for r in range(want) if r not in self._launched]
            reserved = self.host.reserve_workers(run.id, len(ranks))
            self._grow_at = self._now() + GROW_RETRY_S
            if reserved:
                ranks = ranks[:reserved]
                try:
                    group.grow(ranks)
                except Exception as e:  # noqa: BLE001 - the job goes on at its size; it asks again later
                    self.host.release_workers(run.id, reserved)
                    self._grow_at = self._now() + GROW_BACKOFF_S
                    error = f"{type(e).__name__}: {e}"
                    if error != self._grow_error:  # once, not every try
                        self.host.log_line(run.id, f"could not start workers {ranks} (tries again every "
                                                   f"{GROW_BACKOFF_S:.0f} s): {error}")
                    self._grow_error = error
                else:
                    self._grow_error = ""
                    for rank in ranks:
                        _set_phase(run, rank, WorkerPhase.STARTING)
                    self._launched.update(ranks)
        self._check_nodes()
        size = min(want, len(self._launched))
        if table.target != size:
            self.host.log_line(run.id, f"scaling to {size} workers (from {table.size})")
            if not self.runtime.resize(size):
                self._regroup = True
            self.host.notify()

    def _check_nodes(self) -> None:
        """A worker Ray is restarting may be waiting for a node that died: Ray reports the
        process gone at once, and the node dead only once its health checks fail. When that
        node is dead, the job goes on without the worker (its death is counted already)."""
        run, group = self.run, self.group
        assert group is not None
        if self._now() < self._nodes_at:
            return
        self._nodes_at = self._now() + GROW_RETRY_S
        for rank in sorted(self._launched):
            if run.phase(rank) == WorkerPhase.RESTARTING and self._can_shrink() and group.node_lost(rank):
                self.host.log_line(run.id, f"worker {rank}'s node died; the job goes on without it")
                _set_phase(run, rank, WorkerPhase.IDLE)
                self._shrink(rank)

    def _tell_sizes(self) -> None:
        """Every change of size to the job's log, with the step it took effect at: rerunning the
        job with the same changes at the same steps gives the same parameters."""
        for step, size in self.runtime.table.size_changes(self._sizes_told):
            self._sizes_told += 1
            self.host.log_line(self.run.id, f"size: {size} workers from step {step}")
            self.host.notify()

    def _left(self, rank: int) -> None:
        """Worker ``rank`` left the job (it shrank below it): its process runs the rank of a
        worker whose node died, runs again (the job grew back meanwhile), or stops for good."""
        run, group = self.run, self.group
        assert group is not None
        _set_phase(run, rank, WorkerPhase.IDLE)
        to = self._moves.pop(rank, None)
        if to is not None:
            group.move(rank, to)
            self._launched.discard(rank)
            self._launched.add(to)
            _set_phase(run, to, WorkerPhase.STARTING)
            self.host.log_line(run.id, f"worker {rank}'s process takes over rank {to}")
        elif rank < self.runtime.table.target:
            _set_phase(run, rank, WorkerPhase.STARTING)
            self._rerun(rank)
        else:
            group.release(rank)
            self._launched.discard(rank)
            self.host.release_workers(run.id, 1)
        self.host.notify()

    def _shrink(self, rank: int) -> None:
        """Worker ``rank``'s node died: the job goes on with one worker fewer at once (ps-sync
        does its step in flight again at the new size; allreduce re-forms its group without
        it). Ranks stay 0..size-1: the top rank's worker leaves and its process takes ``rank``."""
        run, group = self.run, self.group
        assert group is not None
        group.release(rank)
        self.host.release_workers(run.id, 1)
        self._launched.discard(rank)
        self._rerun_at.pop(rank, None)
        top = len(self._launched)  # the ranks left are 0..top, but rank
        if rank != top:
            self._moves[top] = rank
        if not self.runtime.resize(top, at_once=True):
            self._regroup = True

    # ------------------------------------------------------------ failures
    def _ended(self, ex: WorkerExit) -> Outcome | None:
        """One run of a worker ended: done, or a failure to decide on."""
        run = self.run
        if ex.result is not None and ex.result.get("released"):
            self._left(ex.rank)
            return None
        if ex.result is not None:
            self._done.add(ex.rank)
            run.set_phase(ex.rank, WorkerPhase.DONE)
            self.host.notify()
            return None
        if ex.died:
            if ex.rank in self._killed or (ex.unavailable and run.phase(ex.rank) == WorkerPhase.RESTARTING):
                # the death the controller caused, or a rerun that reached the actor while Ray was
                # still restarting it: the same death, counted already. Run it again a poll later
                self._killed.discard(ex.rank)
                self._rerun_at[ex.rank] = self._now() + self.config.poll_s
                return None
            return self._failed(Failure(ex.rank, FailureKind.DEATH, ex.error or "died", node_lost=ex.node_lost,
                                        can_shrink=self._can_shrink()))
        if ex.lost_peer:
            return self._failed(Failure(ex.rank, FailureKind.LOST_PEER, ex.error or "lost its peers"))
        self.host.log_traceback(run.id, ex.rank, ex.traceback)
        return self._failed(Failure(ex.rank, FailureKind.USER_ERROR, ex.failure()))

    def _failed(self, failure: Failure) -> Outcome | None:
        run, group, table = self.run, self.group, self.runtime.table
        assert group is not None
        decision = self.policy.decide(failure)
        why = self.policy.explain(failure)
        if failure.kind in (FailureKind.DEATH, FailureKind.HANG):
            run.count_death(failure.rank)  # what the user sees: one per death, in every mode
            table.mark_dead(failure.rank)
            if run.shards is not None:  # a sharded ps job's other shards (ps-ssp waits for live workers only)
                run.shards.mark_dead(failure.rank)
        if failure.kind == FailureKind.HANG:
            self.host.log_line(run.id, f"worker {failure.rank} {failure.error}: killing it")
            self._killed.add(failure.rank)
            group.kill(failure.rank)  # Ray restarts it; its run ends as this same failure
        if decision == FailureDecision.FAIL:
            self._failed_rank = failure.rank
            _set_phase(run, failure.rank, WorkerPhase.FAILED if failure.kind == FailureKind.USER_ERROR
                       else WorkerPhase.LOST)
            return Outcome(JobState.FAILED, why)
        self.host.log_line(run.id, why)
        outcome = None
        if decision == FailureDecision.SHRINK:
            _set_phase(run, failure.rank, WorkerPhase.IDLE)
            self._shrink(failure.rank)
        elif decision == FailureDecision.RESTART_WORKER:
            _set_phase(run, failure.rank, WorkerPhase.RESTARTING)
            if failure.kind == FailureKind.DEATH:
                self._rerun(failure.rank)
        else:
            outcome = self._restart_group()
        self.host.notify()
        return outcome

    def _can_shrink(self) -> bool:
        """An elastic job above its smallest size, with no shrink under way."""
        return self.run.spec.elastic and len(self._launched) > self.run.spec.min_workers and not self._moves

    def _rerun(self, rank: int) -> None:
        assert self.group is not None
        if (note := self.group.rerun(rank)) is not None:
            self.host.log_line(self.run.id, f"worker {rank}: {note}")

    def _restart_group(self) -> Outcome | None:
        """Stop every worker and launch the group again; the job's failure when it cannot start."""
        assert self.group is not None
        self.group.stop()
        self._done.clear()
        self._rerun_at.clear()
        self._killed.clear()
        self._moves.clear()
        table = self.runtime.table
        try:
            self.runtime.restart_group()
        except GradhubError as e:  # a sharded job whose shards cannot start again, or its checkpoint not load
            return Outcome(JobState.FAILED, f"could not start the job again: {e}")
        if self.runtime.table is not table:
            self._sizes_told = 0  # a new table (it logged the size it starts at)
        # an elastic job's joiners (and a sharded one's workers above its smallest size, where it
        # starts again): started again as it grows
        extra = len(self._launched) - self.runtime.table.size
        if extra > 0:
            self.host.release_workers(self.run.id, extra)
        for rank in range(self.runtime.table.size):
            _set_phase(self.run, rank, WorkerPhase.RESTARTING)
        self.group = None
        return self.start()

    def _keep_state(self) -> None:
        """The job failed: keep what it trained. ps modes: the store's state. allreduce: rank 0
        sends its state, once the worker that failed is gone (its peers wait for it)."""
        self.runtime.keep_state()  # allreduce: from now on, rank 0 is asked for its state when it rejoins
        failed = self._failed_rank
        if not self.runtime.holds_state and self.group is not None and failed not in (None, 0):
            self.group.kill(failed)
            if not self.runtime.wait_kept(KEEP_STATE_S):
                log.warning("job %s: rank 0 sent no state within %.0f s of the failure", self.run.id, KEEP_STATE_S)


def _set_phase(run: JobRun, rank: int, phase: WorkerPhase) -> None:
    """Move a worker to ``phase`` when that is an allowed transition (a worker that is DONE stays so)."""
    if run.phase(rank).allows(phase):
        run.set_phase(rank, phase)
