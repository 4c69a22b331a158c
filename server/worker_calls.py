"""The worker services' side of the job manager (a mixin of ``JobManager``): what
WorkerControl, the ParameterServer and the data plane ask of a running job (its credential,
store or tracker, registrations, metrics and curve points, allreduce checkpoints, local-sgd's
workers' states). Every call a worker makes lands here: nothing in it takes the manager's
lock, and its database writes go through the write-behind."""

from __future__ import annotations

import builtins
import hmac
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import (
    AuthError,
    NotFoundError,
    ProtocolError,
    ResourceExhaustedError,
    StateError,
)
from gradhub.proto.contract.states import WorkerPhase
from gradhub.proto.state import TrainingState
from gradhub.server.checkpoints import CheckpointStore
from gradhub.server.job_db import JobDB, MetricPoint
from gradhub.server.job_run import JobRun
from gradhub.server.rendezvous import RendezvousStore
from gradhub.server.shard_set import settle_held_clip
from gradhub.server.store import ParameterStore
from gradhub.server.tensorboard import TensorBoardLogs
from gradhub.server.tracker import Formation, GroupTracker
from gradhub.server.worker_states import WorkerStates
from gradhub.server.write_behind import WriteBehind

log = logging.getLogger(__name__)

POINT_EVERY_S = 1.0  # a job's curves get a train point at most this often


class WorkerCalls:
    """Mixed into ``JobManager``, which owns these:"""

    _active: dict[str, JobRun]
    _cond: threading.Condition
    _ckpts: CheckpointStore
    _db: JobDB
    _behind: WriteBehind
    _tensorboard: TensorBoardLogs
    _worker_states: WorkerStates
    _rendezvous: RendezvousStore
    _log: Callable[[str, str], None]
    notify: Callable[[], None]

    def check_worker(self, job_id: str, credential: str) -> None:
        """AuthError unless ``credential`` is the one the running job ``job_id`` gave its workers."""
        run = self._running(job_id)
        if not hmac.compare_digest(run.credential.encode(), credential.encode()):
            raise AuthError(f"credential: not the one job {job_id!r} gave its workers (a worker's calls "
                            "carry its job's credential, from the job's launcher)")

    def register_on_shards(self, job_id: str, rank: int, host: str, pid: int, credential: str
                           ) -> tuple[list[dict[str, object]], int | None]:
        run = self._running(job_id)
        others = run.shards
        if others is None:
            return [], None
        store = self.store(job_id)
        total_steps = store.total_steps
        assert total_steps is not None  # on_register set it
        # an elastic async job: the worker's step here, where a joining worker starts (the
        # control store takes a push before the shards do, so it is never behind them)
        at_least = store.workers()[rank].clock if store.config.pushes_control_first else None
        steps = others.register(rank, host, pid, credential, total_steps, at_least)
        if store.config.clips_across_shards and (step := settle_held_clip(store, others)) is not None:
            log.info("job %s: step %d, held for its norm, taken as worker %d registered again", job_id, step, rank)
        return others.endpoints(), min(steps)

    def job_credential(self, job_id: str) -> str:
        """The running job's worker credential, for a launcher that starts the workers itself
        (``ExternalLauncher``): they pass it as ``ServerLink(credential=...)``."""
        return self._running(job_id).credential

    def _running(self, job_id: str) -> JobRun:
        # on every worker call: read without ``_cond`` (a dict read is atomic, and every write
        # to ``_active`` happens under it), so that no call waits behind the manager's
        # database work, which runs under ``_cond``
        a = self._active.get(job_id)
        if a is None or a.state is None:
            raise NotFoundError(f"job_id: job {job_id!r} is not running on this server")
        return a

    def state(self, job_id: str) -> ParameterStore | GroupTracker:
        store = self._running(job_id).state
        assert store is not None
        return store

    def store(self, job_id: str) -> ParameterStore:
        store = self.state(job_id)
        if not isinstance(store, ParameterStore):
            raise StateError(f"mode: job {job_id!r} runs in allreduce mode: its workers average "
                             "gradients among themselves, there are no parameters to push or pull")
        return store

    def tracker(self, job_id: str) -> GroupTracker:
        tracker = self.state(job_id)
        if not isinstance(tracker, GroupTracker):
            raise StateError(f"mode: job {job_id!r} runs in {tracker.config.mode} mode: the parameter "
                             "server keeps its state and writes its checkpoints itself")
        return tracker

    def takes_states(self, job_id: str) -> None:
        if self._running(job_id).spec.mode != "local-sgd":
            self.tracker(job_id)  # FAILED_PRECONDITION for the other ps modes

    def save_checkpoint(self, job_id: str, rank: int, state: TrainingState) -> tuple[int, int]:
        spec = self._running(job_id).spec
        if spec.mode == "local-sgd":
            return self._save_worker_state(job_id, rank, state)
        if not state.params:
            raise ProtocolError("params: the checkpoint lists no parameters")
        tracker = self.tracker(job_id)
        layout = Layout(tuple(state.params), tuple(tuple(t.shape) for t in state.params.values()))
        tracker.accept_checkpoint(rank, state.step, layout)
        try:
            info = self._ckpts.save(job_id, state.step, state.step, state.params, state.optimizer_state,
                                    state.scheduler_state, keep=spec.keep_checkpoints,
                                    resume_state={"clocks": [state.step] * spec.workers})
        except OSError as e:  # a full disk: nothing was kept; the worker decides whether to go on
            self._log(job_id, f"checkpoint at step {state.step} not written ({e.strerror or e})")
            raise ResourceExhaustedError(f"disk: the checkpoint at step {state.step} could not be written "
                                         f"({e.strerror or e})") from e
        tracker.saved(state.step)
        self._log(job_id, f"checkpoint at step {info.step} ({info.size_bytes / 1e6:.1f} MB)")
        self.notify()
        return info.step, info.size_bytes

    def _save_worker_state(self, job_id: str, rank: int, state: TrainingState) -> tuple[int, int]:
        """A local-sgd worker's inner state at round ``state.step``: once every worker's is
        kept, the store forgets the parameters of the rounds before (the older states go once
        the job's checkpoint of this round is written: ``worker_states_written``)."""
        store = self.store(job_id)
        store.check_registered(rank)
        layout = store.layout
        for name, t in state.params.items():  # a worker's own model, kept when it is not the global one
            if name not in ("local", "global"):
                raise ProtocolError(f"params: a local-sgd worker keeps 'local' and 'global', not {name!r}")
            if layout is None or t.dtype != torch.float32 or tuple(t.shape) != (layout.numel,):
                raise ProtocolError(f"params.{name}: {t.dtype} of shape {list(t.shape)}, expected the model's "
                                    f"{0 if layout is None else layout.numel} float32 values")
        size = self._worker_states.save(job_id, rank, state)
        if self._worker_states.complete(job_id, state.step, len(store.workers())):
            store.trim_history(state.step)
        return state.step, size

    def worker_states_written(self, job_id: str, round_: int) -> None:
        """The job's checkpoint of ``round_`` is on disk: a resume starts there, so the
        workers' states of earlier rounds are not needed any more."""
        self._worker_states.prune(job_id, before=round_)

    def worker_states_kept(self, job_id: str, round_: int, workers: int) -> bool:
        return self._worker_states.complete(job_id, round_, workers)

    def _load_worker_state(self, job_id: str, rank: int) -> TrainingState:
        """What a restarted local-sgd worker needs to go on exactly: its latest kept inner
        state (none: it starts afresh at round 0; its own parameters when it kept them) and the
        global parameters of every round from there to the one it owes (``global.<round>``),
        which it replays."""
        store = self.store(job_id)
        store.check_registered(rank)
        owed = store.workers()[rank].clock
        kept = self._worker_states.latest(job_id, rank, owed)
        state = (self._worker_states.load(job_id, rank, kept) if kept is not None
                 else TrainingState(step=0, params={}))
        params = {**state.params, **{f"global.{r}": store.global_at(r) for r in range(state.step, owed)}}
        return TrainingState(step=state.step, params=params, optimizer_state=state.optimizer_state,
                             scheduler_state=state.scheduler_state)

    def load_checkpoint(self, job_id: str, rank: int) -> TrainingState:
        if self._running(job_id).spec.mode == "local-sgd":
            return self._load_worker_state(job_id, rank)
        tracker = self.tracker(job_id)
        tracker.heartbeat(rank)  # NOT_FOUND for a rank outside the job
        step = tracker.start_step
        if step == 0:
            raise NotFoundError(f"checkpoint: job {job_id!r} starts at step 0; there is no state to load")
        loaded = self._ckpts.load(job_id, step)
        return TrainingState(step=loaded.info.step, params=loaded.params, optimizer_state=loaded.optimizer_state,
                             scheduler_state=loaded.scheduler_state)

    def join_group(self, job_id: str, rank: int, step: int | None) -> tuple[Formation | None, int, str]:
        formed = self.tracker(job_id).join(rank, step)
        if formed is None or formed.finished:
            return formed, 0, ""
        if formed.generation > 1 and self._running(job_id).first_to_see(formed.generation):
            source = (f"the live state of worker {formed.source}" if formed.source >= 0
                      else "the checkpoint" if formed.step else "the start")
            self._log(job_id, f"group {formed.generation} formed: {formed.world_size} workers go on from step "
                              f"{formed.step}, with {source}")
        return formed, self._rendezvous.port(), self._rendezvous.prefix(job_id, formed.generation)

    def on_register(self, job_id: str, rank: int, total_steps: int, train_size: int) -> None:
        run = self._running(job_id)
        store = self.state(job_id)
        first = store.total_steps is None
        store.set_total_steps(total_steps)  # the first registration sets it, the others must agree
        store.check_member(rank)  # a worker an elastic job shrank away from leaves: ReleasedError
        run.set_phase(rank, WorkerPhase.RUNNING)
        self.notify()
        if first:
            self._behind.put(("total_steps", job_id), lambda: self._db.update(job_id, total_steps=total_steps))

    def on_metrics(self, job_id: str, rank: int, step: int, kind: str, metrics: Mapping[str, float]) -> None:
        run = self._running(job_id)
        store = self.state(job_id)
        store.check_registered(rank)  # only the job's registered workers report
        if isinstance(store, GroupTracker):
            store.heartbeat(rank, step)  # progress: the server sees no pushes in this mode
        seq, snapshot, rate = run.merge_metrics(rank, kind, metrics)
        # the database is written behind (a busy database never delays the worker) and outside
        # every lock that a push or a pull takes; a report that lost the race to a newer one
        # is not written over it
        step_now, version = store.step(), store.version
        self._behind.put(("metrics", job_id), lambda: run.write_metrics(seq, lambda: self._db.update(
            job_id, metrics=snapshot, step=step_now, version=version, samples_per_second=rate)))
        self.notify()
        if kind == "eval":
            line = f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
            self._behind.put(None, lambda: self._log(job_id, line))
            point = {k: float(v) for k, v in metrics.items()}
        elif run.point_due(time.monotonic(), POINT_EVERY_S) or step_now >= (store.total_steps or 0):
            point = {"loss": snapshot.get("loss", 0.0), "samples_per_s": rate}
            lr = store.lr() if isinstance(store, ParameterStore) else metrics.get("lr")
            if lr is not None:
                point["lr"] = float(lr)
            if isinstance(store, ParameterStore) and run.spec.store_mode != "ps-sync":
                workers = store.workers()
                point["staleness"] = sum(w.staleness for w in workers) / max(len(workers), 1)
        else:
            return
        self._behind.put(None, lambda: self._add_point(job_id, step if kind == "eval" else step_now, kind, point))

    def _add_point(self, job_id: str, step: int, kind: str, point: dict[str, float]) -> None:
        """A point of the job's curves, in the database and in its TensorBoard files."""
        self._db.add_point(job_id, step, kind, point)
        self._tensorboard.write(job_id, step, kind, point)

    def points(self, job_id: str, after: int = 0) -> builtins.list[MetricPoint]:
        """The job's curves: its train points (at most one a second) and every evaluation."""
        return self._db.points(job_id, after)

    def tensorboard_dir(self, job_id: str) -> Path:
        """Where the job's TensorBoard event files are (``tensorboard --logdir`` it)."""
        return self._tensorboard.path(job_id)
