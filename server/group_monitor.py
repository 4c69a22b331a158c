"""The loop that runs one allreduce job: launches its worker group, and when a worker is lost
restarts the whole group from the latest checkpoint (or fails the job, past ``max_restarts``).

A collective cannot go on without every rank, so one dead worker stops the group. The
loop notices within a poll (Ray reports the actor's death; the survivors' collectives fail
at once on Gloo), waits ``SETTLE_S`` for the other ranks' outcomes so it can tell the cause
from the consequences, then kills the rest: nobody sits in a collective until a timeout.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from gradhub.proto.contract.states import JobState, WorkerPhase
from gradhub.server.launcher import WorkerExit, WorkerGroup
from gradhub.server.tracker import GroupConfig, GroupTracker

if TYPE_CHECKING:
    from gradhub.server.jobs import JobManager, _Active

log = logging.getLogger(__name__)

SETTLE_S = 3.0  # after the first failure, how long to wait for the other ranks' outcomes


class _Retry(Exception):
    """The group lost a worker; restarting it from a checkpoint may succeed."""

    def __init__(self, reason: str, ranks: list[int]) -> None:
        super().__init__(reason)
        self.reason, self.ranks = reason, ranks


class GroupMonitor:
    def __init__(self, manager: JobManager, active: _Active) -> None:
        self.m, self.a = manager, active

    def run(self) -> tuple[JobState | None, str]:
        """Run the job to its end; returns (final state, reason), or (None, "") when the server stops."""
        m, a, spec = self.m, self.a, self.a.spec
        tracker = GroupTracker(GroupConfig(a.id, spec.workers))
        tracker.restart(self._latest_step() if a.resume else 0)
        if a.resume:
            m.log_line(a.id, f"resuming from the checkpoint at step {tracker.start_step}" if tracker.start_step
                       else "no checkpoint yet: restarting from step 0 (same result, by determinism)")
        runtime_env = m.begin(a, tracker)
        restarts, reason = 0, "job ended"
        try:
            while True:
                try:
                    a.group = m.launcher.launch(a.id, spec, runtime_env)
                except Exception as e:  # noqa: BLE001 - reported as the job's failure
                    reason = "could not start workers"
                    return JobState.FAILED, f"could not start the workers: {type(e).__name__}: {e}"
                try:
                    state, reason = self._watch(tracker, a.group)
                    return state, reason
                except _Retry as lost:
                    a.group.stop()  # the survivors may sit in a collective: end them now
                    restarts += 1
                    for r in lost.ranks:
                        m.count_death(a, r)
                    if restarts > spec.max_restarts:
                        reason = (f"{lost.reason}; the group was restarted {restarts - 1} times "
                                  f"(max_restarts is {spec.max_restarts})")
                        return JobState.FAILED, reason
                    step = self._latest_step()
                    m.log_line(a.id, f"{lost.reason}; restarting all {spec.workers} workers from step {step} "
                                     f"(restart {restarts} of {spec.max_restarts})")
                    tracker.restart(step)
                    for r in range(spec.workers):
                        self.m.set_worker_phase(self.a, r, WorkerPhase.RESTARTING)
        finally:
            tracker.close(reason or "job ended")
            if a.group is not None:
                a.group.stop()

    def _latest_step(self) -> int:
        latest = self.m.checkpoint_store.latest(self.a.id)
        return 0 if latest is None else latest.step

    def _watch(self, tracker: GroupTracker, group: WorkerGroup) -> tuple[JobState | None, str]:
        """Until the group ends: a final state, or ``_Retry`` when a worker was lost."""
        m, a, spec = self.m, self.a, self.a.spec
        done: set[int] = set()
        while True:
            if m.stopping:
                return None, "server shutting down"
            if a.cancel is not None:
                return JobState.CANCELLED, a.cancel
            exits = group.wait(m.config.poll_s)
            if m.stopping or a.cancel is not None:
                continue  # workers end with errors when the job closes: not the job's failure
            failed = [ex for ex in exits if ex.result is None]
            for ex in exits:
                if ex.result is not None:
                    done.add(ex.rank)
                    self.m.set_worker_phase(self.a, ex.rank, WorkerPhase.DONE)
            if failed:
                for ex in failed:
                    if not ex.died:
                        # a worker that raised keeps its process, and with it its sockets: its
                        # peers would wait in their collective. End it, so they fail at once
                        # (and rank 0 sends the state of its last whole step)
                        group.kill(ex.rank)
                failed += self._settle(group, done, {ex.rank for ex in failed})
                return self._verdict(tracker, failed)
            for rank, silent in enumerate(tracker.seconds_since_seen()):
                if rank not in done and silent > m.config.heartbeat_timeout_s and a.worker_state[rank] == WorkerPhase.RUNNING:
                    m.log_line(a.id, f"worker {rank} silent for {silent:.0f} s: killing it")
                    tracker.mark_dead(rank)
                    group.kill(rank)  # its death then restarts the group
            if len(done) == spec.workers:
                if not tracker.finished():
                    return JobState.FAILED, "the workers stopped before the last step"
                return JobState.SUCCEEDED, ""

    def _settle(self, group: WorkerGroup, done: set[int], ended: set[int]) -> list[WorkerExit]:
        """The outcomes of the other ranks that end within ``SETTLE_S`` (they usually fail
        at once, in the collective the lost worker left)."""
        more: list[WorkerExit] = []
        deadline = time.monotonic() + SETTLE_S
        while len(done) + len(ended) < self.a.spec.workers and (left := deadline - time.monotonic()) > 0:
            for ex in group.wait(min(left, self.m.config.poll_s)):
                ended.add(ex.rank)
                if ex.result is not None:
                    done.add(ex.rank)
                else:
                    more.append(ex)
        return more

    def _verdict(self, tracker: GroupTracker, failed: list[WorkerExit]) -> tuple[JobState, str]:
        """FAILED for a worker's own error (bad code or data would fail again); ``_Retry`` when
        a worker died or lost its peers (the group can go on from a checkpoint)."""
        for ex in failed:
            phase = WorkerPhase.FAILED if ex.error and not ex.lost_peer else WorkerPhase.LOST
            self.m.set_worker_phase(self.a, ex.rank, phase)
            tracker.mark_dead(ex.rank)
        own = [ex for ex in failed if not ex.died and not ex.lost_peer]
        if own:
            ex = min(own, key=lambda e: e.rank)
            self.m.log_traceback(self.a.id, ex.rank, ex.traceback)
            return JobState.FAILED, ex.failure()
        died = sorted((ex for ex in failed if ex.died), key=lambda e: e.rank)
        if died:
            names = ", ".join(f"worker {ex.rank} died ({ex.error})" for ex in died)
            raise _Retry(names, [ex.rank for ex in died])
        ex = min(failed, key=lambda e: e.rank)
        raise _Retry(f"worker {ex.rank} lost its peers: {ex.error}", [ex.rank])

