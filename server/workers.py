"""Who is in a running job and how far each worker got: the bookkeeping that the parameter
store (ps modes) and the group tracker (allreduce) share. No gRPC, no Ray in here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gradhub.proto.contract.errors import NotFoundError, ProtocolError, StateError


@dataclass
class WorkerState:
    rank: int
    clock: int = 0  # steps done (ps modes: pushed and accepted)
    alive: bool = False
    host: str = ""
    pid: int = 0
    registrations: int = 0
    last_seen: float = 0.0
    staleness: int = 0
    max_staleness: int = 0


class WorkerTable:
    """A job's workers, its total steps and whether it is over, guarded by ``_cond``
    (subclasses keep their own state under the same condition)."""

    def __init__(self, job_id: str, world_size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._job_id = job_id
        self._now = clock
        self._cond = threading.Condition()
        self._workers = [WorkerState(rank=r) for r in range(world_size)]
        self._total_steps: int | None = None
        self._closed: str | None = None

    @property
    def total_steps(self) -> int | None:
        return self._total_steps

    def set_total_steps(self, total_steps: int) -> None:
        """Record the steps per worker (from the first worker to register); later ones must agree."""
        with self._cond:
            if self._total_steps is None:
                self._total_steps = total_steps
            elif total_steps != self._total_steps:
                raise ProtocolError(
                    f"total_steps: worker computed {total_steps}, the job has {self._total_steps} "
                    "(do the workers build the same dataset?)"
                )

    def _joined(self, rank: int, host: str, pid: int) -> WorkerState:
        """Record a (re)registration; call under ``_cond``."""
        self._check_open()
        w = self._worker(rank)
        w.alive, w.host, w.pid, w.last_seen = True, host, pid, self._now()
        w.registrations += 1
        self._cond.notify_all()
        return w

    def mark_dead(self, rank: int) -> None:
        """The worker's process is gone (it may come back and register again)."""
        with self._cond:
            self._worker(rank).alive = False
            self._cond.notify_all()

    def check_registered(self, rank: int) -> None:
        """NotFoundError for a rank outside the job, StateError for one that never registered."""
        with self._cond:
            if self._worker(rank).registrations == 0:
                raise StateError(f"rank: worker {rank} of job {self._job_id!r} has not registered")

    def seconds_since_seen(self) -> list[float]:
        with self._cond:
            now = self._now()
            return [now - w.last_seen if w.alive else 0.0 for w in self._workers]

    def step(self) -> int:
        """The job's progress in steps: the slowest worker's clock."""
        with self._cond:
            return min(w.clock for w in self._workers)

    def workers(self) -> list[WorkerState]:
        with self._cond:
            return [WorkerState(**vars(w)) for w in self._workers]

    def close(self, reason: str) -> None:
        """End the job: every waiting and future call fails with ``reason``."""
        with self._cond:
            if self._closed is None:
                self._closed = reason
            self._cond.notify_all()

    @property
    def closed(self) -> str | None:
        return self._closed

    def _check_open(self) -> None:
        if self._closed is not None:
            raise StateError(f"job {self._job_id!r} is over: {self._closed}")

    def _worker(self, rank: int) -> WorkerState:
        if not 0 <= rank < len(self._workers):
            raise NotFoundError(
                f"rank: worker {rank} is not in job {self._job_id!r} "
                f"(world size {len(self._workers)})"
            )
        return self._workers[rank]
