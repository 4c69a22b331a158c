"""One QUEUED or RUNNING job's live state on the server: what serves it (the parameter store or
the group tracker), its workers' phases and deaths, its merged metrics and a cancel request.

A ``JobRun`` owns that state and the lock that guards it; the job's controller and the RPC
handlers change it only through its methods, and the manager reads snapshots.
"""

from __future__ import annotations

import queue
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gradhub.proto.contract.errors import SpecError
from gradhub.proto.contract.spec import JobSpec
from gradhub.proto.contract.states import WorkerPhase
from gradhub.server.shard_server import ShardStats
from gradhub.server.shard_set import OtherShards
from gradhub.server.store import CheckpointState, ParameterStore
from gradhub.server.tracker import GroupTracker


@dataclass(frozen=True)
class RunSnapshot:
    phases: tuple[WorkerPhase, ...]
    restarts: tuple[int, ...]  # deaths of each worker so far
    samples_per_second: float  # the latest rate, summed over workers


class JobRun:
    def __init__(self, job_id: str, spec: JobSpec, resume: bool = False, owner: str = "") -> None:
        self.id, self.spec, self.resume, self.owner = job_id, spec, resume, owner
        # the job's workers' credential (launch hands it to them; WorkerControl and the
        # ParameterServer accept a call for this job only with it); new at every start
        self.credential = secrets.token_urlsafe(32)
        self._lock = threading.Lock()
        self._state: ParameterStore | GroupTracker | None = None
        self._phases: list[WorkerPhase] = []
        self._restarts: list[int] = []
        self._cancel: str | None = None
        self._rates: dict[int, float] = {}
        self._losses: dict[int, float] = {}
        self._avg_rates: dict[int, float] = {}
        self._allreduce_s: dict[int, float] = {}
        self._train: dict[int, dict[str, float]] = {}  # each worker's latest train report
        self._last_point = 0.0  # when the job's curves got their latest train point
        self._metrics: dict[str, float] = {}  # the job's, as last reported
        self._metrics_seq = 0  # reports merged so far
        self._metrics_written = 0  # the report the database holds
        self._db_lock = threading.Lock()  # orders this job's metric writes
        # checkpoints the store took (in an RPC thread), for the controller to write
        self.checkpoints: queue.Queue[CheckpointState] = queue.Queue()
        self.thread: threading.Thread | None = None
        self._generation_seen = 0  # allreduce: the latest group formation told to the job's log
        self._target = spec.workers  # an elastic job: the size it is scaled to (``scale``)
        self.start_size = spec.workers  # how many workers it starts with (the queue decides, as they fit)
        self.reserved_size = 0  # how many workers' resources the queue holds for it (the manager's lock)
        # ps_shards > 1: the parameter server's shards beyond the job's own store, and every
        # shard's latest figures (the runtime's tick writes them; the API reads them)
        self.shards: OtherShards | None = None
        self.shard_status: tuple[ShardStats, ...] = ()

    # ------------------------------------------------------------ serving
    @property
    def state(self) -> ParameterStore | GroupTracker | None:
        """What serves the running job (None until it starts)."""
        return self._state

    def begin(self, state: ParameterStore | GroupTracker, metrics: Mapping[str, float]) -> None:
        """The job runs, served by ``state``; it keeps the metrics it reported before (a resume).
        Ranks above the table's size (an elastic job's) are IDLE."""
        with self._lock:
            self._state = state
            self._phases = [WorkerPhase.STARTING if r < state.size else WorkerPhase.IDLE
                            for r in range(self.spec.workers)]
            self._restarts = [0] * self.spec.workers
            self._metrics = dict(metrics)

    def serve(self, state: ParameterStore) -> None:
        """From now on ``state`` serves the job (a sharded ps job started again from its
        latest checkpoint, in a new store); its workers' phases and counts stay."""
        with self._lock:
            self._state = state

    # ------------------------------------------------------------ size
    @property
    def target(self) -> int:
        """The size the job is scaled to (its largest until ``scale``)."""
        return self._target

    def scale(self, workers: int) -> None:
        """Scale the job to ``workers`` (within its spec's bounds, or ``SpecError``); its
        controller grows or shrinks the running group toward it."""
        spec = self.spec
        if not spec.elastic:
            raise SpecError("workers", f"job {self.id!r} has a fixed size of {spec.workers} workers; "
                                       "give the spec workers: {min: A, max: B} to scale it")
        if not spec.min_workers <= workers <= spec.workers:
            raise SpecError("workers", f"{workers} is outside this job's bounds "
                                       f"{spec.min_workers}..{spec.workers} (workers.min, workers.max)")
        with self._lock:
            self._target = workers

    # ------------------------------------------------------------ workers
    def phase(self, rank: int) -> WorkerPhase:
        with self._lock:
            return self._phases[rank] if self._phases else WorkerPhase.STARTING

    def set_phase(self, rank: int, phase: WorkerPhase) -> None:
        """Move worker ``rank`` to ``phase``: an allowed transition, or ``StateError``."""
        with self._lock:
            if self._phases:
                self._phases[rank] = self._phases[rank].to(phase)

    def count_death(self, rank: int) -> int:
        """One more death of worker ``rank``; returns its deaths so far."""
        with self._lock:
            self._restarts[rank] += 1
            return self._restarts[rank]

    def first_to_see(self, generation: int) -> bool:
        """True for the first caller that sees group ``generation`` formed (it logs it)."""
        with self._lock:
            if generation <= self._generation_seen:
                return False
            self._generation_seen = generation
            return True

    def snapshot(self) -> RunSnapshot:
        with self._lock:
            return RunSnapshot(tuple(self._phases), tuple(self._restarts), sum(self._rates.values()))

    # ------------------------------------------------------------ cancel
    def request_cancel(self, reason: str) -> None:
        with self._lock:
            if self._cancel is None:
                self._cancel = reason
        if self._state is not None:
            self._state.close(reason)

    @property
    def cancelled(self) -> str | None:
        return self._cancel

    # ------------------------------------------------------------ metrics
    def merge_metrics(self, rank: int, kind: str, metrics: Mapping[str, float]) -> tuple[int, dict[str, float], float]:
        """Fold one worker's report into the job's metrics; returns (its sequence number, the
        job's metrics, the summed samples/s) for ``write_metrics``."""
        with self._lock:
            merged = self._metrics
            if kind == "train":
                self._train[rank] = {k: float(v) for k, v in metrics.items()}
                self._rates[rank] = float(metrics.get("samples_per_s", 0.0))
                self._losses[rank] = float(metrics.get("loss", 0.0))
                self._avg_rates[rank] = float(metrics.get("avg_samples_per_s", 0.0))
                merged["loss"] = sum(self._losses.values()) / len(self._losses)
                # the whole run's rate so far, summed over workers
                merged["avg_samples_per_s"] = sum(self._avg_rates.values())
                if "bytes_per_round" in metrics:  # local-sgd: what one worker's round exchanges
                    merged["bytes_per_round"] = float(metrics["bytes_per_round"])
                if "allreduce_s" in metrics:
                    # allreduce mode: seconds per step in the all-reduce. A rank that starts it
                    # first also waits there for the others' backward; the last one to join
                    # measures the all-reduce itself: the minimum over ranks
                    self._allreduce_s[rank] = float(metrics["allreduce_s"])
                    merged["allreduce_s"] = min(self._allreduce_s.values())
            else:
                merged.update({k: float(v) for k, v in metrics.items()})
            self._metrics_seq += 1
            return self._metrics_seq, dict(merged), sum(self._rates.values())

    def point_due(self, now: float, every_s: float) -> bool:
        """Whether a train report at ``now`` makes a point of the job's curves (at most one
        every ``every_s`` seconds, whatever the number of workers)."""
        with self._lock:
            if now - self._last_point < every_s:
                return False
            self._last_point = now
            return True

    def worker_metrics(self) -> dict[int, dict[str, float]]:
        """Each worker's latest train report (loss, samples_per_s, compute_s, comm_s, ...)."""
        with self._lock:
            return {rank: dict(m) for rank, m in self._train.items()}

    def write_metrics(self, seq: int, write: Callable[[], object]) -> None:
        """Run ``write`` (the database update of report ``seq``) unless a newer report is
        already written; writes of one job never overlap. Called outside every other lock."""
        with self._db_lock:
            if seq > self._metrics_written:
                write()
                self._metrics_written = seq
