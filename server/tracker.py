"""What the server keeps of an allreduce job (no gRPC, no Ray in here): who is in the group,
how far each worker got, where the group starts from, and whether the final state arrived.

The parameters never pass through the server in this mode: the workers average gradients
among themselves, rank 0 saves checkpoints, and a restarted group loads the latest one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gradhub.client.errors import NotFoundError, ProtocolError, StateError
from gradhub.proto.codec import Layout
from gradhub.server.store import WorkerState


@dataclass(frozen=True)
class GroupConfig:
    job_id: str
    world_size: int
    mode: str = "allreduce"

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError("world_size: must be >= 1")


class GroupTracker:
    """One allreduce job's workers and progress; every mutation happens under ``_lock``.

    Offers the read side of ``ParameterStore`` that the job manager shows (``workers``,
    ``step``, ``version``, ``total_steps``), so status looks the same in every mode.
    """

    def __init__(self, config: GroupConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._now = clock
        self._lock = threading.Lock()
        self._workers = [WorkerState(rank=r) for r in range(config.world_size)]
        self._start_step = 0
        self._total_steps: int | None = None
        self._layout: Layout | None = None
        self._final = False
        self._closed: str | None = None

    # ----------------------------------------------------------- the group
    def restart(self, step: int) -> None:
        """A new group starts at ``step`` (0, or a checkpoint's): every worker rejoins there."""
        with self._lock:
            self._start_step = step
            for w in self._workers:
                w.clock, w.alive = step, False

    @property
    def start_step(self) -> int:
        return self._start_step

    def register(self, rank: int, host: str = "", pid: int = 0) -> tuple[int, int, bool]:
        """A worker joins: returns (version, the step it starts at, False: nothing to send)."""
        with self._lock:
            self._check_open()
            w = self._worker(rank)
            w.alive, w.host, w.pid, w.last_seen = True, host, pid, self._now()
            w.registrations += 1
            w.clock = self._start_step
            return self._start_step, self._start_step, False

    def heartbeat(self, rank: int, step: int | None = None) -> str | None:
        """A worker is alive at ``step``; returns the reason to stop when the job is over."""
        with self._lock:
            w = self._worker(rank)
            w.last_seen = self._now()
            if step is not None and w.alive:
                w.clock = max(w.clock, step)
            return self._closed


    def mark_dead(self, rank: int) -> None:
        with self._lock:
            self._worker(rank).alive = False

    def seconds_since_seen(self) -> list[float]:
        with self._lock:
            now = self._now()
            return [now - w.last_seen if w.alive else 0.0 for w in self._workers]

    # ------------------------------------------------------- checkpoints
    def accept_checkpoint(self, rank: int, step: int, layout: Layout) -> None:
        """Check a checkpoint rank 0 sends before it is stored; the first fixes the model's layout."""
        with self._lock:
            self._check_open()
            self._worker(rank)
            if rank != 0:
                raise ProtocolError(f"rank: only worker 0 saves checkpoints, not worker {rank}")
            total = self._total_steps
            if total is None:
                raise StateError("total_steps: unknown until a worker registers")
            if not 0 < step <= total:
                raise ProtocolError(f"step: {step} is outside this job's steps 1..{total}")
            if self._layout is None:
                self._layout = layout
            elif layout != self._layout:
                raise ProtocolError("params: the model's parameters changed between checkpoints")

    def saved(self, step: int) -> None:
        """A checkpoint is on disk; the one at the last step means training is complete."""
        with self._lock:
            if step == self._total_steps:
                self._final = True

    # ----------------------------------------------------- state and life
    def set_total_steps(self, total_steps: int) -> None:
        with self._lock:
            if self._total_steps is None:
                self._total_steps = total_steps
            elif total_steps != self._total_steps:
                raise ProtocolError(
                    f"total_steps: worker computed {total_steps}, the job has {self._total_steps} "
                    "(do the workers build the same dataset?)"
                )

    @property
    def total_steps(self) -> int | None:
        return self._total_steps

    def step(self) -> int:
        """The job's progress: the slowest worker's step."""
        with self._lock:
            return min(w.clock for w in self._workers)

    @property
    def version(self) -> int:
        """Updates applied: in this mode one per step, on every worker at once."""
        return self.step()

    def finished(self) -> bool:
        """True once the final state (step == total steps) is saved."""
        with self._lock:
            return self._final

    def workers(self) -> list[WorkerState]:
        with self._lock:
            return [WorkerState(**vars(w)) for w in self._workers]

    def close(self, reason: str) -> None:
        with self._lock:
            if self._closed is None:
                self._closed = reason

    @property
    def closed(self) -> str | None:
        return self._closed

    def _check_open(self) -> None:
        if self._closed is not None:
            raise StateError(f"job {self.config.job_id!r} is over: {self._closed}")

    def _worker(self, rank: int) -> WorkerState:
        if not 0 <= rank < len(self._workers):
            raise NotFoundError(
                f"rank: worker {rank} is not in job {self.config.job_id!r} "
                f"(world size {len(self._workers)})"
            )
        return self._workers[rank]
