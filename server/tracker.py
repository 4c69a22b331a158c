"""What the server keeps of an allreduce job (no gRPC, no Ray in here): who is in the group,
how far each worker got, where the group starts from, and whether the final state arrived.

The parameters never pass through the server in this mode: the workers average gradients
among themselves, rank 0 saves checkpoints, and a restarted group loads the latest one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import ProtocolError, SpecError, StateError
from gradhub.server.workers import WorkerTable


@dataclass(frozen=True)
class GroupConfig:
    job_id: str
    world_size: int
    mode: str = "allreduce"

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise SpecError("workers", "must be >= 1")


class GroupTracker(WorkerTable):
    """One allreduce job's workers and progress; every mutation happens under ``_cond``.

    Offers the read side of ``ParameterStore`` that the job manager shows (``workers``,
    ``step``, ``version``, ``total_steps``), so status looks the same in every mode.
    """

    def __init__(self, config: GroupConfig, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(config.job_id, config.world_size, clock)
        self.config = config
        self._start_step = 0
        self._layout: Layout | None = None
        self._final = False

    # ----------------------------------------------------------- the group
    def restart(self, step: int) -> None:
        """A new group starts at ``step`` (0, or a checkpoint's): every worker rejoins there."""
        with self._cond:
            self._start_step = step
            for w in self._workers:
                w.clock, w.alive = step, False

    @property
    def start_step(self) -> int:
        return self._start_step

    def register(self, rank: int, host: str = "", pid: int = 0) -> tuple[int, int, bool]:
        """A worker joins: returns (version, the step it starts at, False: nothing to send)."""
        with self._cond:
            self._joined(rank, host, pid).clock = self._start_step
            return self._start_step, self._start_step, False

    def heartbeat(self, rank: int, step: int | None = None) -> str | None:
        """A worker is alive at ``step``; returns the reason to stop when the job is over."""
        with self._cond:
            w = self._worker(rank)
            w.last_seen = self._now()
            if step is not None and w.alive:
                w.clock = max(w.clock, step)
            return self._closed

    # ------------------------------------------------------- checkpoints
    def accept_checkpoint(self, rank: int, step: int, layout: Layout) -> None:
        """Check a checkpoint rank 0 sends before it is stored; the first fixes the model's layout."""
        with self._cond:
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
        with self._cond:
            if step == self._total_steps:
                self._final = True

    # ----------------------------------------------------- state and life
    @property
    def version(self) -> int:
        """Updates applied: in this mode one per step, on every worker at once."""
        return self.step()

    def finished(self) -> bool:
        """True once the final state (step == total steps) is saved."""
        with self._cond:
            return self._final
