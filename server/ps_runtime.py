"""The ps modes' runtime (``ps-sync``, ``ps-async``, ``ps-ssp``, and local-sgd's outer step): the
job's ``ParameterStore`` on the server holds the parameters and takes the checkpoints; with
``ps_shards: K > 1`` it is the job's control store (its steps, buffers, frozen parameters and
schedule, no trainable value) and K shards, each a process of its own, hold the parameters
(``gradhub.server.shard_set``); their checkpoints of a step merge into the model's. A shard
that dies takes the job back to its latest checkpoint: every shard and worker starts again
from there (in ps-sync the job still ends with the parameters of an undisturbed run).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import StateError
from gradhub.proto.contract.spec import JobSpec
from gradhub.proto.contract.states import JobState
from gradhub.proto.shards import stores_for
from gradhub.server.checkpoints import CheckpointStore
from gradhub.server.job_db import JobDB
from gradhub.server.job_run import JobRun
from gradhub.server.shard_server import UpdateRate, store_stats
from gradhub.server.shard_set import OtherShards, merge_states, resume_slices
from gradhub.server.store import CheckpointState, ParameterStore, StoreConfig

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
            fragments=spec.fragments or 1, elastic=spec.elastic,
        )
    return StoreConfig(
        job_id=job_id, mode=spec.mode, world_size=spec.workers, staleness=spec.effective_staleness,
        optimizer=spec.optimizer.name, lr=spec.optimizer.lr, hyper=dict(spec.optimizer.hyper),
        schedule=spec.lr_schedule.to_dict(), checkpoint_every=spec.checkpoint_every,
        compression=spec.compression, param_groups=spec.optimizer.param_groups, buffers=spec.buffers,
        clip_grad_norm=spec.clip_grad_norm, compression_block=spec.compression_block, apply_buckets=spec.applies_buckets,
        elastic=spec.elastic,
    )


STATS_EVERY_S = 1.0  # a sharded job's shard figures (gradhub status) are read this often


class PSRuntime:
    """ps-sync, ps-async, ps-ssp: the store holds the parameters and takes the checkpoints."""

    holds_state = True

    def __init__(self, run: JobRun, host: Host, clock: Callable[[], float] = time.monotonic) -> None:
        self.run, self.host = run, host
        shards = host.shard_count(run.spec.ps_shards) if run.spec.ps_shards != 1 else 1
        # ps_shards K > 1: this store is the job's control (no trainable value), K shards the rest
        self.config = dataclasses.replace(store_config(run.id, run.spec), shards=stores_for(shards))
        self._clock = clock
        self.table: ParameterStore = ParameterStore(self.config, on_checkpoint=run.checkpoints.put, clock=clock)
        self.others: OtherShards | None = None
        self._rate = UpdateRate()
        self._stats_at = 0.0
        self._lost: str | None = None  # a shard died: the job starts again from its latest checkpoint
        # sync local-sgd: a checkpoint waits here until every worker's inner state of its round
        # is kept, so that a job resumed from it finds them all (its workers replay from there)
        self._waiting: list[CheckpointState] = []

    def prepare(self) -> None:
        if self.config.shards > 1:
            self._start_shards()
        if self.run.resume:
            self._resume(self.host.db.get(self.run.id).total_steps, "resuming from")

    def start_with(self, size: int) -> None:
        self.table.start_with(size)
        if not self._follow(size):
            raise StateError(f"ps_shards: {self._lost}")

    def resize(self, size: int, at_once: bool = False) -> bool:
        """An elastic job's new size, on the control store and then on its shards. ps-async,
        ps-ssp: every shard follows at once. ps-sync: a shard takes a change at a step boundary
        from the first push of the step (each names the size it was computed for); a shrink
        at once (a worker's node died) drops the step in flight on every shard, as on the
        control store. A shard that took that step already (the dead worker's push reached it,
        not the control store) leaves the shards at two steps: False, and the job goes back to
        its latest checkpoint (``restart_group``). So does a job that clips over shards (its
        workers wait on each shard for the norm of a step that is no longer taken)."""
        self.table.resize(size, at_once)
        if self.others is None:
            return True
        if self.config.mode != "ps-sync":
            return self._follow(size)
        if not at_once:
            return True
        if self.config.clips_across_shards:
            return self._go_back("the job shrank at once, and a job that clips over shards cannot drop its step "
                                 "in flight")
        version = self.table.version
        try:
            versions = self.others.follow(size, (), at_once=True)
        except Exception as e:  # noqa: BLE001 - a shard that died: it goes back to the checkpoint too
            return self._go_back(f"a shard did not answer as the job shrank at once ({type(e).__name__}: {e})")
        if any(v != version for v in versions):
            return self._go_back(f"the shards were at two steps as the job shrank at once (versions "
                                 f"{[version, *versions]})")
        return True

    def _follow(self, size: int) -> bool:
        """ps-async, ps-ssp over shards: every shard takes the control store's size now, a
        joining worker at its step there. False (``_go_back``) when a shard could not."""
        if self.others is None or not self.config.elastic or self.config.mode == "ps-sync":
            return True
        try:
            self.others.follow(size, [w.clock for w in self.table.workers()])
        except Exception as e:  # noqa: BLE001 - the job goes back to its latest checkpoint
            return self._go_back(f"the shards could not take the job's size {size} ({type(e).__name__}: {e})")
        return True

    def _go_back(self, why: str) -> bool:
        """The shards cannot go on from where they are: the job goes back to its latest
        checkpoint (``restart_group``, which ``why`` is kept for); False."""
        self._lost = why
        self.host.log_line(self.run.id, f"{why}: every shard and worker starts again from the latest checkpoint")
        return False

    def _resume(self, total_steps: int | None, how: str) -> None:
        """Install the job's latest checkpoint in every shard (none yet: from step 0)."""
        ckpts, job_id = self.host.checkpoint_store, self.run.id
        if ckpts.latest(job_id) is None or not total_steps:
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
            self.others.resume_from(self._other_shards_states(state, loaded.resume_state), total_steps)
        self.host.log_line(job_id, f"{how} the checkpoint at step {loaded.info.step}")

    def _other_shards_states(self, state: CheckpointState, resume_state: Mapping[str, Any]) -> list[CheckpointState]:
        """What shards 1 to K-1 resume from: each its slice when the checkpoint names the model's
        trainable parameters (a ps job's do), else (an older checkpoint) the whole of it."""
        count = self.config.shards
        trainable = resume_state.get("trainable")
        if not trainable:
            return [state] * (count - 1)
        layout = Layout(tuple(str(n) for n, _ in trainable), tuple(tuple(int(d) for d in shape) for _, shape in trainable))
        return resume_slices(state, layout, self.config.param_groups, count)

    def lost(self) -> str | None:
        if self.others is None or self._lost is not None:
            return None
        dead = self.others.lost()
        if dead:
            self._lost = f"parameter-server shard{'s' if len(dead) > 1 else ''} {', '.join(map(str, dead))} died"
            return self._lost
        return None

    def _start_shards(self) -> None:
        count = self.config.shards
        try:
            self.others = self.host.start_shards(self.config, count)
        except Exception as e:
            raise StateError(f"ps_shards: could not start the parameter server's {count - 1} shards: "
                             f"{type(e).__name__}: {e}") from e
        self.run.shards = self.others
        hosts = ", ".join(str(e["tcp_host"]) for e in self.others.endpoints())
        self.host.log_line(self.run.id, f"parameter server: {count - 1} shards, on {hosts} (the server keeps "
                                        "the job's control: its steps, buffers and frozen parameters)")

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
                try:
                    parts = self.others.captures(state.step)
                except Exception as e:  # noqa: BLE001 - a shard that died: ``lost`` tells the controller
                    log.warning("job %s: a shard did not answer for the checkpoint at step %d: %s", self.run.id,
                                state.step, e)
                    return
                if any(p is None for p in parts):
                    return  # a shard has not got there yet
                try:
                    state = merge_states(self.table, state, [p for p in parts if p is not None])
                except StateError as e:  # parts that are not one state: a bug, which costs this checkpoint only
                    self._waiting.pop(0)
                    log.error("job %s: the shards' checkpoints at step %d do not merge: %s", self.run.id,
                              state.step, e)
                    self.host.log_line(self.run.id, f"checkpoint at step {state.step} not written: {e}")
                    continue
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
        """The store keeps the parameters: the new workers register and resume from it. After a
        shard died (``lost``) or the shards were left at two steps (``resize``), every shard
        starts again from the job's latest checkpoint: a new store here, new shards, each
        holding its slice of that checkpoint. An elastic job starts again on its smallest size
        (a shard's node may be gone with workers of the job) and grows back as the cluster has
        room (``Controller._scale``)."""
        if self._lost is None:
            return
        old, why, self._lost = self.table, self._lost, None
        total_steps = old.total_steps
        self.close()
        old.close(f"{why}; the job starts again from its latest checkpoint")
        self._waiting.clear()  # states that no longer merge (a shard's part died with it)
        while not self.run.checkpoints.empty():
            self.run.checkpoints.get_nowait()
        self.table = ParameterStore(self.config, on_checkpoint=self.run.checkpoints.put, clock=self._clock)
        if total_steps is not None:
            self.table.set_total_steps(total_steps)
        self._start_shards()
        self._resume(total_steps, "every shard starts again from")
        if self.run.spec.elastic:
            size = self.run.spec.min_workers
            self.start_with(size)
            self.host.log_line(self.run.id, f"size: {size} workers from step {self.table.step()}")
        self.run.serve(self.table)

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
        """The job's whole state now (every shard's, merged; an async worker's last push may be
        on some shards only: the merged state has each worker at its least clock)."""
        own = self.table.checkpoint_state()
        return own if self.others is None else merge_states(self.table, own, self.others.checkpoint_states(),
                                                            checkpoint=False)

    def _final_checkpoint(self) -> None:
        self.tick()
        state = self._state_now()
        latest = self.host.checkpoint_store.latest(self.run.id)
        if latest is None or latest.step != state.step or latest.version != state.version:
            self._save(state)

    def _save(self, state: CheckpointState) -> None:
        resume: dict[str, Any] = {"clocks": list(state.clocks)}
        model = self.table.model
        if model is not None:  # what cuts it into slices when a job resumes from it with shards
            resume["trainable"] = [[n, list(shape)] for n, shape in zip(model.trainable.names, model.trainable.shapes,
                                                                         strict=True)]
        info = self.host.checkpoint_store.save(
            self.run.id, state.step, state.version, state.params, state.optimizer_state, state.scheduler_state,
            keep=self.run.spec.keep_checkpoints, resume_state=resume,
        )
        self.host.log_line(self.run.id, f"checkpoint at step {info.step} ({info.size_bytes / 1e6:.1f} MB)")
        if self.run.spec.mode == "local-sgd" and self.run.spec.outer_sync:
            self.host.worker_states_written(self.run.id, info.step)
        self.host.notify()


