"""What differs between the modes while a job runs, behind one interface for the controller:
the ps modes keep the job's state in a ``ParameterStore`` on the server (which also writes its
checkpoints); allreduce keeps a ``GroupTracker`` and rank 0 sends the checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from collections.abc import Callable
from typing import Protocol

from gradhub.proto.contract.errors import StateError
from gradhub.proto.contract.spec import JobSpec
from gradhub.proto.contract.states import JobState
from gradhub.server.checkpoints import CheckpointStore
from gradhub.server.job_db import JobDB
from gradhub.server.job_run import JobRun
from gradhub.server.shard_server import UpdateRate, store_stats
from gradhub.server.shard_set import OtherShards, merge_states
from gradhub.server.store import CheckpointState, ParameterStore, StoreConfig
from gradhub.server.tracker import GroupConfig, GroupTracker

log = logging.getLogger(__name__)


class Host(Protocol):
    """What a running job needs of the server around it."""

    @property
    def db(self) -> JobDB: ...

    @property
    def checkpoint_store(self) -> CheckpointStore: ...

    def log_line(self, job_id: str, line: str) -> None: ...

    def notify(self) -> None: ...

    def worker_states_kept(self, job_id: str, round_: int, workers: int) -> bool:
        """local-sgd: whether every worker's inner state at ``round_`` is kept."""
        ...

    def worker_states_written(self, job_id: str, round_: int) -> None:
        """local-sgd: the job's checkpoint of ``round_`` is written (older states may go)."""
        ...

    def shard_count(self, ps_shards: int | str) -> int: ...

    def start_shards(self, config: StoreConfig, count: int) -> OtherShards: ...


class ModeRuntime(Protocol):
    table: ParameterStore | GroupTracker
    holds_state: bool  # whether the server holds the job's training state (ps modes)

    def prepare(self) -> None:
        """Before the workers start: resume where the job was (a GradhubError fails the job)."""
        ...

    def tick(self) -> None:
        """Once per controller step: write what the store asked to keep."""
        ...

    def finish(self) -> tuple[JobState, str]:
        """Every worker returned: whether the job is complete, and its last checkpoint written."""
        ...

    def keep_state(self) -> None:
        """The job failed: keep what it trained (ps: write it; allreduce: ask rank 0 for it)."""
        ...

    def wait_kept(self, timeout: float) -> bool:
        """After ``keep_state``: whether the state is on disk within ``timeout``."""
        ...

    def restart_group(self) -> None:
        """Every worker is stopped and the group is launched again."""
        ...

    def close(self) -> None:
        """The job is over: stop what serves it beside the server (a sharded job's shards)."""
        ...


def store_config(job_id: str, spec: JobSpec) -> StoreConfig:
    """What the job's parameter store does. In local-sgd a store step is a round: workers push
    their parameters' change over the round (global - local, the pseudo-gradient) and the
    store takes the outer optimizer's step; the inner optimizer, its schedule and clipping are
    the workers'."""
    if spec.mode == "local-sgd":
        assert spec.outer_optimizer is not None
        return StoreConfig(
            job_id=job_id, mode=spec.store_mode, world_size=spec.workers, optimizer=spec.outer_optimizer.name,
            lr=spec.outer_optimizer.lr, hyper=dict(spec.outer_optimizer.hyper), schedule=None,
            checkpoint_every=spec.checkpoint_every, compression=spec.compression, buffers=spec.buffers,
            compression_block=spec.compression_block,
            keep_history=spec.store_mode == "ps-sync", staleness_scaling=bool(spec.staleness_scaling),
            fragments=spec.fragments or 1,
        )
    return StoreConfig(
        job_id=job_id, mode=spec.mode, world_size=spec.workers, staleness=spec.effective_staleness,
        optimizer=spec.optimizer.name, lr=spec.optimizer.lr, hyper=dict(spec.optimizer.hyper),
        schedule=spec.lr_schedule.to_dict(), checkpoint_every=spec.checkpoint_every,
        compression=spec.compression, param_groups=spec.optimizer.param_groups, buffers=spec.buffers,
        clip_grad_norm=spec.clip_grad_norm, compression_block=spec.compression_block,
    )


def runtime_for(run: JobRun, host: Host, clock: Callable[[], float] = time.monotonic) -> ModeRuntime:
    """The runtime of ``run``'s mode (``clock`` is its workers' table's: tests pass a fake one)."""
    return PSRuntime(run, host, clock) if run.spec.is_ps else GroupRuntime(run, host, clock)


STATS_EVERY_S = 1.0  # a sharded job's shard figures (gradhub status) are read this often


class PSRuntime:
    """ps-sync, ps-async, ps-ssp: the store holds the parameters and takes the checkpoints.
    With ``ps_shards: K > 1`` it holds shard 0's slice and the job's other shards the rest
    (``gradhub.server.shard_set``): their checkpoints of a step merge into the model's."""

    holds_state = True

    def __init__(self, run: JobRun, host: Host, clock: Callable[[], float] = time.monotonic) -> None:
        self.run, self.host = run, host
        count = host.shard_count(run.spec.ps_shards) if run.spec.ps_shards != 1 else 1
        self.config = dataclasses.replace(store_config(run.id, run.spec), shards=count)
        self.table: ParameterStore = ParameterStore(self.config, on_checkpoint=run.checkpoints.put, clock=clock)
        self.others: OtherShards | None = None
        self._rate = UpdateRate()
        self._stats_at = 0.0
        # sync local-sgd: a checkpoint waits here until every worker's inner state of its round
        # is kept, so that a job resumed from it finds them all (its workers replay from there)
        self._waiting: list[CheckpointState] = []

    def prepare(self) -> None:
        if self.config.shards > 1:
            self._start_shards()
        if not self.run.resume:
            return
        ckpts, job_id = self.host.checkpoint_store, self.run.id
        total_steps = self.host.db.get(job_id).total_steps
        if ckpts.latest(job_id) is None or total_steps <= 0:
            self.host.log_line(job_id, "no checkpoint yet: restarting from step 0 (same result, by determinism)")
            return
        loaded = ckpts.load(job_id)
        if loaded.optimizer_state is None:
            raise StateError(f"the checkpoint at step {loaded.info.step} holds no optimizer state")
        clocks = tuple(loaded.resume_state.get("clocks", [loaded.info.step] * self.run.spec.workers))
        state = CheckpointState(step=loaded.info.step, version=loaded.info.version, params=loaded.params,
                                optimizer_state=loaded.optimizer_state, scheduler_state=loaded.scheduler_state,
                                clocks=clocks)
        self.table.resume_from(state, total_steps=total_steps)
        if self.others is not None:
            self.others.resume_from(state, total_steps)
        self.host.log_line(job_id, f"resuming from the checkpoint at step {loaded.info.step}")

    def _start_shards(self) -> None:
        count = self.config.shards
        try:
            self.others = self.host.start_shards(self.config, count)
        except Exception as e:
            raise StateError(f"ps_shards: could not start the parameter server's {count} shards: "
                             f"{type(e).__name__}: {e}") from e
        self.run.shards = self.others
        hosts = ", ".join(str(e["tcp_host"]) for e in self.others.endpoints())
        self.host.log_line(self.run.id, f"parameter server: {count} shards (shard 0 on the server; 1 to "
                                        f"{count - 1} on {hosts})")

    def close(self) -> None:
        if self.others is not None:
            self.others.stop()
            self.others = self.run.shards = None

    def tick(self) -> None:
        """Write the checkpoints the store took (a sharded job's once every shard has its
        part). One that cannot be written (a full disk) is logged and training goes on: the
        next one tries again (only the final one must be)."""
        while not self.run.checkpoints.empty():
            self._waiting.append(self.run.checkpoints.get_nowait())
        spec = self.run.spec
        self._read_shards()
        while self._waiting:
            state = self._waiting[0]
            if spec.mode == "local-sgd" and spec.outer_sync and not self.host.worker_states_kept(
                    self.run.id, state.step, spec.workers):
                return
            if self.others is not None:
                parts = self.others.captures(state.step)
                if any(p is None for p in parts):
                    return  # a shard has not got there yet
                state = merge_states(self.table, state, [p for p in parts if p is not None])
            self._waiting.pop(0)
            try:
                self._save(state)
            except OSError as e:
                self.host.log_line(self.run.id, f"checkpoint at step {state.step} not written ({e.strerror or e}); "
                                                "training goes on, the next checkpoint tries again")

    def finish(self) -> tuple[JobState, str]:
        store = self.table
        if not store.finished():
            return JobState.FAILED, "the workers stopped before the last step"
        self._final_checkpoint()
        if self.run.spec.store_mode != "ps-sync":
            rec = self.host.db.get(self.run.id)
            staleness = max(w.max_staleness for w in store.workers())
            self.host.db.update(self.run.id, metrics={**rec.metrics, "max_staleness": float(staleness)})
        return JobState.SUCCEEDED, ""

    def keep_state(self) -> None:
        """A failed job keeps what it trained: the store's state, consistent at every moment,
        becomes a checkpoint that ``gradhub pull`` fetches (unless the latest one already is it)."""
        store = self.table
        if not store.initialized or store.version == 0:
            return
        try:
            self._final_checkpoint()
        except Exception as e:  # noqa: BLE001 - the job's own failure is what the user must see
            log.warning("job %s: could not keep its state after the failure: %s", self.run.id, e)
            return
        self.host.log_line(self.run.id, f"kept the state at version {store.version} as a checkpoint (gradhub pull)")

    def wait_kept(self, timeout: float) -> bool:
        return True

    def restart_group(self) -> None:
        """The store keeps the parameters: the new workers register and resume from it."""

    def _read_shards(self) -> None:
        """Every shard's figures for ``gradhub status``, once a second."""
        now = time.monotonic()
        if self.others is None or now - self._stats_at < STATS_EVERY_S:
            return
        self._stats_at = now
        own = store_stats(0, socket.gethostname(), self.table, self._rate.read(self.table.version))
        try:
            self.run.shard_status = (own, *self.others.stats())
        except Exception as e:  # noqa: BLE001 - figures only: training goes on
            log.warning("job %s: could not read its shards' figures: %s", self.run.id, e)

    def _state_now(self) -> CheckpointState:
        """The job's whole state now (every shard's, merged)."""
        own = self.table.checkpoint_state()
        return own if self.others is None else merge_states(self.table, own, self.others.checkpoint_states())

    def _final_checkpoint(self) -> None:
        self.tick()
        state = self._state_now()
        latest = self.host.checkpoint_store.latest(self.run.id)
        if latest is None or latest.step != state.step or latest.version != state.version:
            self._save(state)

    def _save(self, state: CheckpointState) -> None:
        info = self.host.checkpoint_store.save(
            self.run.id, state.step, state.version, state.params, state.optimizer_state, state.scheduler_state,
            keep=self.run.spec.keep_checkpoints, resume_state={"clocks": list(state.clocks)},
        )
        self.host.log_line(self.run.id, f"checkpoint at step {info.step} ({info.size_bytes / 1e6:.1f} MB)")
        if self.run.spec.mode == "local-sgd" and self.run.spec.outer_sync:
            self.host.worker_states_written(self.run.id, info.step)
        self.host.notify()


class GroupRuntime:
    """allreduce: the tracker forms the groups; rank 0 sends checkpoints (and, when the job fails
    by its own error, the state of its last whole step)."""

    holds_state = False

    def __init__(self, run: JobRun, host: Host, clock: Callable[[], float] = time.monotonic) -> None:
        self.run, self.host = run, host
        self.table: GroupTracker = GroupTracker(GroupConfig(run.id, run.spec.workers), clock)

    def prepare(self) -> None:
        if self.run.resume:
            step = self._latest_step()
            self.table.restart(step)
            self.host.log_line(self.run.id, f"resuming from the checkpoint at step {step}" if step
                               else "no checkpoint yet: restarting from step 0 (same result, by determinism)")

    def tick(self) -> None:
        """Checkpoints arrive from rank 0 through an RPC and are written there."""

    def finish(self) -> tuple[JobState, str]:
        if not self.table.finished():
            return JobState.FAILED, "the workers stopped before the last step"
        return JobState.SUCCEEDED, ""

    def keep_state(self) -> None:
        """No group forms again; rank 0 is told to send the state it holds when it asks."""
        self.table.fail()

    def wait_kept(self, timeout: float) -> bool:
        return self.table.wait_kept(timeout)

    def close(self) -> None:
        """Nothing serves an allreduce job beside the server."""

    def restart_group(self) -> None:
        step = self._latest_step()
        self.table.restart(step)
        self.host.log_line(self.run.id, f"restarting all {self.run.spec.workers} workers from step {step}")

    def _latest_step(self) -> int:
        latest = self.host.checkpoint_store.latest(self.run.id)
        return 0 if latest is None else latest.step
