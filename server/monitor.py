"""The loop that runs one job: launches its worker group, restarts dead workers, writes checkpoints.

It notices a dead worker within one poll (Ray reports the actor's death) or after
``heartbeat_timeout_s`` of silence (then it kills the actor so Ray restarts it).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from gradhub.proto.contract.errors import GradhubError, StateError
from gradhub.proto.contract.states import JobState, WorkerPhase
from gradhub.server.store import CheckpointState, ParameterStore

if TYPE_CHECKING:
    from gradhub.server.jobs import JobManager, _Active

log = logging.getLogger(__name__)


class JobMonitor:
    def __init__(self, manager: JobManager, active: _Active) -> None:
        self.m, self.a = manager, active

    def run(self) -> tuple[JobState | None, str]:
        """Run the job to its end; returns (final state, reason), or (None, "") when the server stops."""
        from gradhub.server.jobs import store_config

        m, a, spec = self.m, self.a, self.a.spec
        store = ParameterStore(store_config(a.id, spec), on_checkpoint=a.checkpoints.put)
        rec = m.db.get(a.id)
        if a.resume:
            try:
                self._resume(store, rec.total_steps)
            except GradhubError as e:
                return JobState.FAILED, f"cannot resume after the server restart: {e}"
        runtime_env = m.begin(a, store)
        try:
            group = m.launcher.launch(a.id, spec, runtime_env)
        except Exception as e:  # noqa: BLE001 - reported as the job's failure
            store.close("could not start workers")
            return JobState.FAILED, f"could not start the workers: {type(e).__name__}: {e}"
        a.group = group
        reason = "job ended"
        try:
            state, reason = self._loop(store)
            if state == JobState.FAILED:
                self._keep_state(store)
            return state, reason
        finally:
            store.close(reason or "job ended")
            group.stop()
            self._write_checkpoints()

    def _resume(self, store: ParameterStore, total_steps: int) -> None:
        ckpts = self.m.checkpoint_store
        if ckpts.latest(self.a.id) is None or total_steps <= 0:
            self.m.log_line(self.a.id, "no checkpoint yet: restarting from step 0 (same result, by determinism)")
            return
        loaded = ckpts.load(self.a.id)
        if loaded.optimizer_state is None:
            raise StateError(f"the checkpoint at step {loaded.info.step} holds no optimizer state")
        clocks = tuple(loaded.resume_state.get("clocks", [loaded.info.step] * self.a.spec.workers))
        store.resume_from(
            CheckpointState(step=loaded.info.step, version=loaded.info.version, params=loaded.params,
                            optimizer_state=loaded.optimizer_state, scheduler_state=loaded.scheduler_state,
                            clocks=clocks),
            total_steps=total_steps,
        )
        self.m.log_line(self.a.id, f"resuming from the checkpoint at step {loaded.info.step}")

    def _loop(self, store: ParameterStore) -> tuple[JobState | None, str]:
        m, a, spec = self.m, self.a, self.a.spec
        assert a.group is not None
        done: set[int] = set()
        rerun_at: dict[int, float] = {}  # ranks to run again once Ray has restarted their actor
        while True:
            self._write_checkpoints()
            if m.stopping:
                return None, "server shutting down"
            if a.cancel is not None:
                return JobState.CANCELLED, a.cancel
            for rank in [r for r, at in rerun_at.items() if at <= time.monotonic()]:
                del rerun_at[rank]
                a.group.rerun(rank)
            for ex in a.group.wait(m.config.poll_s):
                if m.stopping or a.cancel is not None:
                    break  # workers end with errors when their store closes: not the job's failure
                if ex.result is not None:
                    done.add(ex.rank)
                    self.m.set_worker_phase(self.a, ex.rank, WorkerPhase.DONE)
                elif ex.died:
                    if ex.unavailable and a.worker_state[ex.rank] == WorkerPhase.RESTARTING:
                        # the run reached the actor while Ray was still restarting it after the
                        # death already counted: the same death. Run it again a poll later
                        rerun_at[ex.rank] = time.monotonic() + m.config.poll_s
                        continue
                    if (failed := self._death(store, ex.rank, ex.error)) is not None:
                        return JobState.FAILED, failed
                    a.group.rerun(ex.rank)
                else:
                    m.log_traceback(a.id, ex.rank, ex.traceback)
                    return JobState.FAILED, ex.failure()
            for rank, silent in enumerate(store.seconds_since_seen()):
                if rank not in done and silent > m.config.heartbeat_timeout_s and a.worker_state[rank] == WorkerPhase.RUNNING:
                    m.log_line(a.id, f"worker {rank} silent for {silent:.0f} s: killing it so Ray restarts it")
                    if (failed := self._death(store, rank, f"silent for {silent:.0f} s")) is not None:
                        return JobState.FAILED, failed
                    a.group.kill(rank)  # its run then ends as this same death (counted once)
            if len(done) == spec.workers:
                if not store.finished():
                    return JobState.FAILED, "the workers stopped before the last step"
                self._final_checkpoint(store)
                if spec.mode != "ps-sync":
                    rec = m.db.get(a.id)
                    staleness = max(w.max_staleness for w in store.workers())
                    m.db.update(a.id, metrics={**rec.metrics, "max_staleness": float(staleness)})
                return JobState.SUCCEEDED, ""

    def _death(self, store: ParameterStore, rank: int, error: str | None) -> str | None:
        """Count one death of worker ``rank``: the job's failure reason past ``max_restarts``,
        else None (the worker is RESTARTING)."""
        a, spec = self.a, self.a.spec
        deaths = self.m.count_death(a, rank)
        store.mark_dead(rank)
        if deaths > spec.max_restarts:
            return f"worker {rank} died {deaths} times (max_restarts is {spec.max_restarts}): {error}"
        self.m.log_line(a.id, f"worker {rank} died ({error}); restart {deaths} of {spec.max_restarts}")
        self.m.set_worker_phase(a, rank, WorkerPhase.RESTARTING)
        return None

    def _keep_state(self, store: ParameterStore) -> None:
        """A failed job keeps what it trained: the store's state, consistent at every moment,
        becomes a checkpoint that ``gradhub pull`` fetches (unless the latest one already is it)."""
        if not store.initialized or store.version == 0:
            return
        try:
            self._final_checkpoint(store)
        except Exception as e:  # noqa: BLE001 - the job's own failure is what the user must see
            log.warning("job %s: could not keep its state after the failure: %s", self.a.id, e)
            return
        self.m.log_line(self.a.id, f"kept the state at version {store.version} as a checkpoint (gradhub pull)")

    def _final_checkpoint(self, store: ParameterStore) -> None:
        self._write_checkpoints()
        state = store.checkpoint_state()
        latest = self.m.checkpoint_store.latest(self.a.id)
        if latest is None or latest.step != state.step or latest.version != state.version:
            self._save(state)

    def _write_checkpoints(self) -> None:
        while not self.a.checkpoints.empty():
            self._save(self.a.checkpoints.get_nowait())

    def _save(self, state: CheckpointState) -> None:
        info = self.m.checkpoint_store.save(
            self.a.id, state.step, state.version, state.params, state.optimizer_state, state.scheduler_state,
            keep=self.a.spec.keep_checkpoints, resume_state={"clocks": list(state.clocks)},
        )
        self.m.log_line(self.a.id, f"checkpoint at step {info.step} ({info.size_bytes / 1e6:.1f} MB)")
        self.m.notify()
