"""The job manager: jobs' lifecycle, the FIFO queue, and a controller thread per running job.

States go QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED (``gradhub.proto.contract.states``
holds the table; ``JobDB.update`` enforces it, and ``JobRun.set_phase`` a worker's). Jobs persist
in the JobDB; a job that was RUNNING when the server stopped is resumed from its latest
checkpoint at the next start. Each running job's live state is its ``JobRun`` (which owns its
lock); its ``Controller`` runs it; the Ray side is behind the ``Launcher`` interface.
"""

from __future__ import annotations

import builtins
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gradhub.proto.contract.errors import (
    GradhubError,
    NotFoundError,
    ResourceExhaustedError,
    ServerUnavailableError,
    SpecError,
    StateError,
)
from gradhub.proto.contract.spec import JobSpec
from gradhub.proto.contract.states import JobState, WorkerPhase
from gradhub.server.auth import Quota
from gradhub.server.checkpoints import CheckpointStore
from gradhub.server.config import ServerConfig
from gradhub.server.controller import Controller, Outcome
from gradhub.server.job_db import JobDB, JobRecord
from gradhub.server.job_run import JobRun
from gradhub.server.launcher import Launcher, demand
from gradhub.server.modes import runtime_for
from gradhub.server.policies import MaxRestarts
from gradhub.server.rendezvous import RendezvousStore
from gradhub.server.shard_server import ShardStats
from gradhub.server.shard_set import OtherShards
from gradhub.server.store import StoreConfig
from gradhub.server.tensorboard import TensorBoardLogs
from gradhub.server.worker_calls import WorkerCalls
from gradhub.server.worker_states import WorkerStates
from gradhub.server.working_dirs import WorkingDirs
from gradhub.server.write_behind import WriteBehind

log = logging.getLogger(__name__)
PRUNE_EVERY_S = 3600.0  # how often jobs past --retention-days are looked for

TERMINAL = tuple(s for s in JobState if s.terminal)


@dataclass(frozen=True)
class WorkerView:
    rank: int
    state: WorkerPhase
    step: int
    staleness: int
    max_staleness: int
    host: str
    pid: int
    restarts: int
    transport: str = ""
    local_step: int = 0  # local-sgd: inner steps (``step`` counts rounds)


@dataclass(frozen=True)
class JobView:
    """A job as the API shows it: its record plus the live state of its workers."""

    record: JobRecord
    workers: tuple[WorkerView, ...] = ()
    size: int = 0  # an elastic job: how many workers it runs on now (0: not running, or a fixed size)
    target: int = 0  # an elastic job: the size it is scaled to
    shards: tuple[ShardStats, ...] = ()  # ps_shards > 1: each shard's latest figures


class JobManager(WorkerCalls):
    """Owns the queue and the set of running jobs (under ``_cond``, which also tells watchers of
    every change); each job's live state is its ``JobRun``. Also the worker services' backend."""

    def __init__(self, db: JobDB, checkpoints: CheckpointStore, launcher: Launcher,
                 working_dirs: Path, config: ServerConfig | None = None,
                 quota: Callable[[str], Quota] | None = None) -> None:
        """``quota(owner)``: what a user's running jobs may hold at once (default: no limit)."""
        self._db, self._ckpts, self._launcher = db, checkpoints, launcher
        self._quota = quota or (lambda owner: Quota())
        self._working_dirs = WorkingDirs(working_dirs)
        self.config = config = config or ServerConfig()
        self.heartbeat_interval_s = config.heartbeat_interval_s
        self.collective_timeout_s = config.collective_timeout_s
        self._cond = threading.Condition()
        self._active: dict[str, JobRun] = {}
        self._rendezvous = RendezvousStore(config.host)
        self._queue: list[str] = []
        self._reserved: dict[str, dict[str, float]] = {}
        self._waiting: dict[str, str] = {}  # why each queued job waits, as its record says
        self._behind = WriteBehind()  # the database writes of workers' calls
        self._tensorboard = TensorBoardLogs(config.data_dir / "tensorboard")  # written by _behind's thread
        self._worker_states = WorkerStates(config.data_dir / "worker_states")  # local-sgd's inner states
        # told of every change; replaced whole (under _cond), read without a lock
        self._listeners: tuple[Callable[[], None], ...] = ()
        self._stopping = False
        self._scheduler: threading.Thread | None = None
        self._started_at = time.monotonic()

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Requeue what the last server left QUEUED or RUNNING, then start scheduling."""
        self._started_at = time.monotonic()
        self._behind.start()
        self._working_dirs.remove_partials()
        self.prune()
        for rec in self._db.list(states=(JobState.QUEUED, JobState.RUNNING)):
            try:
                spec = JobSpec.from_json(rec.spec_json)
            except SpecError as e:  # stored by an older server that accepted it: fail that job only
                self._finish(rec.id, JobState.FAILED, f"its stored spec is not valid any more: {e}")
                continue
            resume = rec.state == JobState.RUNNING
            if resume:
                self._log(rec.id, "server restarted: resuming from the latest checkpoint")
                self._db.update(rec.id, state=JobState.QUEUED, attempts=rec.attempts + 1)
            self._active[rec.id] = JobRun(rec.id, spec, resume=resume, owner=rec.owner)
            self._queue.append(rec.id)
        self._scheduler = threading.Thread(target=self._schedule_loop, name="gradhub-scheduler", daemon=True)
        self._scheduler.start()

    def stop(self, grace: float = 10.0) -> None:
        """Stop every running job's workers; RUNNING jobs stay RUNNING and resume at the next start."""
        with self._cond:
            self._stopping = True
            active = list(self._active.values())
            for a in active:
                if a.state is not None:
                    a.state.close("server shutting down")
            self._cond.notify_all()
        for a in active:
            if a.thread is not None:
                a.thread.join(timeout=grace)
        if self._scheduler is not None:
            self._scheduler.join(timeout=grace)
        self._behind.put(None, self._tensorboard.close_all)
        self._behind.stop(grace)
        self._rendezvous.close()

    # -------------------------------------------------------------- the API
    def submit(self, spec: JobSpec, working_dir_zip: bytes | None = None, owner: str = "") -> JobView:
        """Queue a job of ``owner`` (a user's name; "" without users)."""
        too_big = self._never_fits(spec)
        if too_big:
            raise SpecError("resources", too_big)
        over = self._quota(owner).never(demand(spec, spec.min_workers))
        if over:
            raise ResourceExhaustedError(f"quota: {over}, the most {owner}'s running jobs may hold at once "
                                         "(the server's tokens file sets it)")
        job_id = "j-" + uuid.uuid4().hex[:10]
        # checked (a zip that unpacks safely) and written whole before the job exists
        workdir = str(self._working_dirs.store(job_id, working_dir_zip)) if working_dir_zip else None
        rec = JobRecord(id=job_id, name=spec.name, mode=spec.mode, spec_json=spec.to_json(), state=JobState.QUEUED,
                        created_at=time.time(), working_dir=workdir, owner=owner)
        try:
            with self._cond:
                if self._stopping:
                    raise StateError("server: shutting down, not accepting jobs")
                self._db.insert(rec)
                self._active[job_id] = JobRun(job_id, spec, owner=owner)
                self._queue.append(job_id)
                self._changed()
        except BaseException:
            self._working_dirs.delete(job_id)  # no job, no zip
            raise
        spares = f" and {spec.spares} spares" if spec.spares else ""
        size = f"{spec.min_workers} to {spec.workers}" if spec.elastic else str(spec.workers)
        self._log(job_id, f"submitted: {size} workers{spares}, mode {spec.mode}")
        return self.get(job_id)

    def get(self, job_id: str) -> JobView:
        return self._view(self._db.get(job_id))

    def owner(self, job_id: str) -> str:
        """Who submitted ``job_id`` (NotFoundError for an unknown job)."""
        return self._db.get(job_id).owner

    def _view(self, rec: JobRecord) -> JobView:
        """``rec`` with the live state of its workers, when it runs."""
        job_id = rec.id
        with self._cond:
            a = self._active.get(job_id)
        store = None if a is None else a.state
        target = a.target if a is not None and a.spec.elastic else 0
        if a is None or store is None:
            return JobView(rec, target=target)
        run = a.snapshot()
        workers = tuple(
            WorkerView(w.rank, run.phases[w.rank] if run.phases else WorkerPhase.STARTING, w.clock,
                       w.staleness, w.max_staleness, w.host, w.pid, run.restarts[w.rank] if run.restarts else 0,
                       w.transport, w.local_step)
            for w in store.workers()
        )
        rec = dataclasses.replace(rec, step=store.step(), version=store.version,
                                  total_steps=store.total_steps or rec.total_steps,
                                  samples_per_second=run.samples_per_second)
        return JobView(rec, workers, size=store.size if target else 0, target=target, shards=a.shard_status)

    def list(self) -> list[JobView]:
        return [self.get(r.id) for r in self._db.list()]

    def page(self, after: int, limit: int) -> tuple[builtins.list[JobView], int]:
        """A page of jobs (``JobDB.page``), each with its live state."""
        records, last = self._db.page(after, limit)
        return [self._view(rec) for rec in records], last

    def cancel(self, job_id: str, reason: str = "cancelled by user") -> JobView:
        rec = self._db.get(job_id)
        if rec.state in TERMINAL:
            return self.get(job_id)
        with self._cond:
            a = self._active.get(job_id)
            if a is not None and job_id in self._queue:
                self._queue.remove(job_id)
                self._finish(job_id, JobState.CANCELLED, reason)
            elif a is not None:
                a.request_cancel(reason)
            self._changed()
        return self.get(job_id)

    def scale(self, job_id: str, workers: int) -> JobView:
        """Scale an elastic job to ``workers``: a running one grows or shrinks at a step
        boundary (growing as far as the cluster has room), a queued one starts at most that
        large. ``SpecError`` outside the spec's bounds or for a job of fixed size."""
        rec = self._db.get(job_id)
        with self._cond:
            a = self._active.get(job_id)
            if a is None:
                raise StateError(f"state: job {job_id!r} is {rec.state}; only a queued or running job scales")
            a.scale(workers)
            self._changed()
        self._log(job_id, f"scale: to {workers} workers")
        return self.get(job_id)

    def delete(self, job_id: str) -> None:
        """Remove a job that has ended, with its log, checkpoints and working dir."""
        rec = self._db.get(job_id)  # NotFoundError for an unknown job
        with self._cond:
            if job_id in self._active or rec.state not in TERMINAL:
                raise StateError(f"state: job {job_id!r} is {rec.state}; cancel it first (gradhub cancel), "
                                 "then delete it")
            self._db.delete(job_id)
            self._changed()
        self._ckpts.delete_job(job_id)
        self._worker_states.delete_job(job_id)
        self._working_dirs.delete(job_id)
        self._behind.put(None, lambda: self._tensorboard.delete(job_id))
        self._behind.flush()  # gone when the call returns
        log.info("job %s: deleted", job_id)

    def running(self) -> builtins.list[JobRun]:
        """The jobs that run now (their live state), for the metrics."""
        with self._cond:
            return [a for a in self._active.values() if a.state is not None]

    def queue_length(self) -> int:
        with self._cond:
            return len(self._queue)

    def logs(self, job_id: str, after: int = 0) -> builtins.list[tuple[int, str]]:
        self._db.get(job_id)
        return self._db.logs(job_id, after=after)

    # ------------------------------------------------------------ scheduling
    def _schedule_loop(self) -> None:
        next_prune = time.monotonic() + PRUNE_EVERY_S
        while True:
            with self._cond:
                if self._stopping:
                    return
                try:
                    started = self._start_fitting()
                except ServerUnavailableError as e:  # the database is locked: the next pass tries again
                    log.warning("scheduler: %s", e)
                    started = False
                if not started:
                    self._cond.wait(self.config.poll_s * 4)
            if self.config.retention_days and time.monotonic() >= next_prune:
                next_prune = time.monotonic() + PRUNE_EVERY_S
                try:
                    self.prune()
                except ServerUnavailableError as e:
                    log.warning("retention: %s; trying again in an hour", e)

    def prune(self, now: float | None = None) -> builtins.list[str]:
        """Delete the jobs that ended more than ``retention_days`` ago (none when it is 0); their ids."""
        days = self.config.retention_days
        if not days:
            return []
        cutoff = (time.time() if now is None else now) - days * 86400
        old = [r.id for r in self._db.list(states=TERMINAL) if r.finished_at and r.finished_at < cutoff]
        for job_id in old:
            try:
                self.delete(job_id)
            except (NotFoundError, StateError):
                continue  # deleted meanwhile
            log.info("job %s: deleted, it ended more than %g days ago (--retention-days)", job_id, days)
        return old

    def _start_fitting(self) -> bool:
        """Start queued jobs in FIFO order while the first one that is within its owner's quota
        fits the cluster; a job over its owner's quota waits without holding up the others'.
        Every queued job's record says why it waits."""
        started = False
        blocked_by = ""
        waiting: dict[str, str] = {}
        for job_id in list(self._queue):
            a = self._active[job_id]
            need = demand(a.spec, a.spec.min_workers)  # an elastic job starts once its smallest size fits
            over = self._quota(a.owner).over(self._used_by(a.owner), need)
            if over:
                waiting[job_id] = f"waiting: over the quota of {a.owner}: {over}"
                continue
            if blocked_by:
                waiting[job_id] = f"waiting: queued behind {blocked_by}"
                continue
            if not self._fits(need):
                too_big = self._never_fits(a.spec)
                if not too_big or time.monotonic() - self._started_at < self.config.node_join_grace_s:
                    # it will fit later (or nodes are still joining after a restart)
                    blocked_by = job_id
                    waiting[job_id] = (f"waiting: for resources, it needs {_fmt(need)}, "
                                       f"{_fmt({k: self._free().get(k, 0.0) for k in need})} free")
                    continue
                # queued before a restart on a smaller cluster: it would block the queue forever
                self._queue.remove(job_id)
                self._finish(job_id, JobState.FAILED, f"resources: {too_big}")
                self._changed()
                continue
            self._queue.remove(job_id)
            a.start_size = a.reserved_size = self._room(a, a.spec.min_workers, a.target)
            self._reserved[job_id] = demand(a.spec, a.start_size)
            a.thread = threading.Thread(target=self._run_job, args=(a,), name=f"gradhub-{job_id}", daemon=True)
            a.thread.start()
            started = True
        self._tell_waiting(waiting)
        return started

    def _room(self, a: JobRun, least: int, most: int, held: Mapping[str, float] | None = None) -> int:
        """The largest size in ``least..most`` whose resources (beyond ``held``, what the job
        holds already) fit the cluster and its owner's quota; ``least - 1`` when none does."""
        held = held or {}
        used = self._used_by(a.owner)
        for n in range(most, least - 1, -1):
            need = {k: v - held.get(k, 0.0) for k, v in demand(a.spec, n).items()}
            if self._fits(need) and not self._quota(a.owner).over(used, need):
                return n
        return least - 1

    def reserve_workers(self, job_id: str, workers: int) -> int:
        """Room for up to ``workers`` more workers of a running elastic job: none while other
        jobs queue (queued work starts first); returns how many it reserved."""
        with self._cond:
            a = self._active.get(job_id)
            held = self._reserved.get(job_id)
            if self._queue or a is None or held is None:
                return 0
            have = a.reserved_size
            size = self._room(a, have, have + workers, held)
            if size <= have:
                return 0
            self._reserved[job_id] = demand(a.spec, size)
            a.reserved_size = size
            return size - have

    def release_workers(self, job_id: str, workers: int) -> None:
        """A running elastic job gives back the resources of ``workers`` workers (queued jobs
        may start in them)."""
        with self._cond:
            a = self._active.get(job_id)
            if a is None or job_id not in self._reserved:
                return
            a.reserved_size = max(a.reserved_size - workers, 0)
            self._reserved[job_id] = demand(a.spec, a.reserved_size)
            self._changed()

    def _used_by(self, owner: str) -> dict[str, float]:
        """What ``owner``'s running jobs hold."""
        used: dict[str, float] = {}
        for job_id, reserved in self._reserved.items():
            a = self._active.get(job_id)
            if a is not None and a.owner == owner:
                for k, v in reserved.items():
                    used[k] = used.get(k, 0.0) + v
        return used

    def _tell_waiting(self, waiting: dict[str, str]) -> None:
        """Write the reasons of queued jobs that changed (a QUEUED job's record says why it waits)."""
        changed = {j: r for j, r in waiting.items() if self._waiting.get(j) != r}
        self._waiting = {j: r for j, r in self._waiting.items() if j in waiting}
        for job_id, reason in changed.items():  # one that fails (a locked database) is written next pass
            self._db.update(job_id, reason=reason)
            self._waiting[job_id] = reason
        if changed:
            self._changed()

    def _never_fits(self, spec: JobSpec) -> str | None:
        """Why the job cannot run on this cluster even when it is idle, or None if it can."""
        total = self._launcher.total_resources()
        need = demand(spec, spec.min_workers)  # an elastic job runs at its smallest size
        if all(v <= total.get(k, 0.0) + 1e-9 for k, v in need.items()):
            return None
        n, spares = spec.min_workers + spec.spares, f" (with {spec.spares} spares)" if spec.spares else ""
        least = " at least" if spec.elastic else ""
        field = "workers.min" if spec.elastic else "workers"
        return (f"the job asks for{least} {n} workers{spares} x {_fmt(need, n)} = {_fmt(need)}, "
                f"but the cluster has {_fmt({k: total.get(k, 0.0) for k in need})} in all; "
                f"lower {field}{', spares' if spec.spares else ''} or resources")

    def _fits(self, need: dict[str, float]) -> bool:
        free = self._free()
        return all(v <= free.get(k, 0.0) + 1e-9 for k, v in need.items())

    def _free(self) -> dict[str, float]:
        """The cluster's resources that no running job holds."""
        free = dict(self._launcher.total_resources())
        for r in self._reserved.values():
            for k, v in r.items():
                free[k] = free.get(k, 0.0) - v
        return free

    # ----------------------------------------------------------- running
    def _run_job(self, a: JobRun) -> None:
        try:
            outcome = self._control(a)
            state, reason = outcome.state, outcome.reason
        except Exception as e:
            log.exception("job %s crashed", a.id)
            state, reason = JobState.FAILED, f"internal error: {type(e).__name__}: {e}"
        self._behind.put(None, lambda: self._tensorboard.close(a.id))
        self._behind.flush()  # its last metrics, points and log lines first, then its end
        with self._cond:
            self._reserved.pop(a.id, None)
            if state is not None:
                self._finish(a.id, state, reason)
            self._changed()

    def _control(self, a: JobRun) -> Outcome:
        """Prepare the job's mode, mark it RUNNING and run its controller to the end."""
        runtime = runtime_for(a, self)
        try:
            runtime.prepare()
            runtime.start_with(a.start_size)  # an elastic job: as many workers as fit, up to its target
        except GradhubError as e:
            runtime.close()
            return Outcome(JobState.FAILED, f"cannot resume after the server restart: {e}" if a.resume
                           else f"cannot start: {e}")
        rec = self._db.update(a.id, state=JobState.RUNNING, started_at=time.time(), reason="")
        if a.spec.elastic:
            self._log(a.id, f"size: {a.start_size} workers from step {runtime.table.step()}")
        a.begin(runtime.table, rec.metrics)  # a resumed job keeps what it reported before
        self.notify()
        env = {"working_dir": rec.working_dir} if rec.working_dir else None
        policy = MaxRestarts(a.spec.max_restarts, a.spec.workers)
        return Controller(a, runtime, self._launcher, self, policy, self.config, env).execute()

    def _finish(self, job_id: str, state: JobState, reason: str) -> None:
        self._db.update(job_id, state=state, reason=reason, finished_at=time.time())
        self._active.pop(job_id, None)
        self._log(job_id, f"{state}{': ' + reason if reason else ''}")

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (it must only schedule work, never block) after every change to a
        job (the event loop's watches wait on it without a thread)."""
        with self._cond:
            self._listeners = (*self._listeners, listener)

    def _changed(self) -> None:
        """Under ``_cond``: the queue or a job's record changed (wakes the scheduler too)."""
        self._cond.notify_all()
        self.notify()

    def _log(self, job_id: str, line: str) -> None:
        log.info("job %s: %s", job_id, line)
        self._db.append_log(job_id, f"{time.strftime('%H:%M:%S')} {line}")

    # hooks used by the monitor
    @property
    def db(self) -> JobDB:
        return self._db

    @property
    def checkpoint_store(self) -> CheckpointStore:
        return self._ckpts

    @property
    def launcher(self) -> Launcher:
        return self._launcher

    def shard_count(self, ps_shards: int | str) -> int:
        """A spec's ``ps_shards``: a count, or for ``auto`` one per node that has room for
        workers (CPUs; ``Launcher.nodes``)."""
        return self._launcher.nodes() if ps_shards == "auto" else int(ps_shards)

    def start_shards(self, config: StoreConfig, count: int) -> OtherShards:
        """Start shards 1 to ``count - 1`` of a job whose control store (store 0 of ``count``)
        ``config`` describes, with the server's TLS (their TCP ports speak it as the server's
        data plane does)."""
        c = self.config
        tls = None
        if c.tls_cert is not None and c.tls_key is not None:
            tls = (Path(c.tls_cert).read_bytes(), Path(c.tls_key).read_bytes())
        return self._launcher.start_shards(config, count, c.max_model_bytes, tls)

    @property
    def cond(self) -> threading.Condition:
        return self._cond

    @property
    def stopping(self) -> bool:
        return self._stopping

    def notify(self) -> None:
        """A running job's live state changed (a report, a worker's phase): tell the listeners.
        Takes no lock, so a worker's call never waits behind the manager's database work."""
        for listener in self._listeners:
            listener()

    def log_line(self, job_id: str, line: str) -> None:
        self._log(job_id, line)

    def log_traceback(self, job_id: str, rank: int, traceback: str) -> None:
        """A failed worker's traceback, line by line, in the job's log (``gradhub logs``)."""
        if traceback:
            self._log(job_id, f"worker {rank} traceback (most recent call last):")
            for line in traceback.rstrip().splitlines()[1:]:
                self._log(job_id, f"  {line}")


def _fmt(res: Mapping[str, float], per: int = 1) -> str:
    return "{" + ", ".join(f"{k}: {v / per:g}" for k, v in sorted(res.items())) + "}"

