"""What the server keeps of an allreduce job (no gRPC, no Ray in here): who is in the group,
how far each worker got, which group forms next, and whether the final state arrived.

The parameters never pass through the server in this mode: the workers average gradients
among themselves and rank 0 saves checkpoints. When a worker is lost, the others keep their
processes and their state and ask to join the next group (``join``); the restarted worker asks
too, and the group forms again from the survivor that got furthest. A group whose members all
start fresh (a new job, a server restart) starts from the latest checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class Formation:
    """A group the tracker formed: every rank of the job, starting at ``step`` from the live
    state of rank ``source`` (-1: nobody has it; the members load the checkpoint of ``step``)."""

    generation: int
    world_size: int
    step: int
    source: int
    finished: bool = False  # nothing is left to train: the final state is saved, or the job failed
    keep: bool = False  # with finished, to rank 0 of a failed job: send the state it holds
    released: bool = False  # with finished: the job shrank below this rank, which leaves
    asks: dict[int, int | None] = field(default_factory=dict, compare=False)  # what each rank asked with


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
        self._generation = 0  # groups formed so far
        self._asks: dict[int, int | None] = {}  # rank -> the step of its live state (None: none), for the next group
        self._formed: Formation | None = None  # the latest group, while some members have not heard of it
        self._untold: set[int] = set()
        self._failing = False  # the job failed: no group forms again; rank 0 is asked for its state
        self._kept = False  # rank 0's state arrived after the failure

    # ----------------------------------------------------------- the group
    def restart(self, step: int) -> None:
        """A new group starts at ``step`` (0, or a checkpoint's): every worker rejoins there,
        fresh (what a worker of an earlier group asked for is void)."""
        with self._cond:
            self._start_step = step
            self._asks, self._formed, self._untold = {}, None, set()
            for w in self._workers:
                w.clock, w.alive = step, False

    def join(self, rank: int, step: int | None) -> Formation | None:
        """Worker ``rank`` asks to join the next group, holding the state after ``step`` whole
        steps (None: a fresh process). Returns the group once every member has asked, else None
        (ask again). The group starts at the furthest step any member holds; the lowest rank
        holding it shares its state.

        An elastic job's next group has the size it was scaled to: a rank above it is told it is
        released; a group that grows forms once every joining rank has asked too (until then,
        a group that must form again keeps its size)."""
        with self._cond:
            self._check_open()
            self._worker(rank)
            if step is not None and not 0 <= step <= (self._total_steps or 0):
                raise ProtocolError(f"step: {step} is outside this job's steps 0..{self._total_steps}")
            if self._final or self._failing:
                keep = self._failing and not self._final and rank == 0 and bool(step)
                if rank == 0 and not keep:
                    self._kept = True  # rank 0 holds nothing to keep: nobody waits for it
                    self._cond.notify_all()
                return Formation(self._generation, self._size, step or 0, -1, finished=True, keep=keep)
            formed = self._formed
            if formed is not None and rank in self._untold:
                if formed.asks.get(rank, step) == step:
                    self._untold.discard(rank)
                    return formed
                # it asked for this group with other state: it was lost and restarted since.
                # The group is void (members that already formed it fail at their rendezvous)
                self._formed, self._untold = None, set()
            if rank >= self._target:
                self._asks.pop(rank, None)
                self._workers[rank].alive = False
                return Formation(self._generation, self._size, step or 0, -1, finished=True, released=True)
            self._asks[rank] = step
            size = self._next_size()
            if size is None:
                return None
            asks = {r: s for r, s in self._asks.items() if r < size}
            held = {r: s for r, s in asks.items() if s is not None}
            start = max(held.values()) if held else self._start_step
            source = min((r for r, s in held.items() if s == start), default=-1)
            self._generation += 1
            self._set_size(size, start)
            formed = Formation(self._generation, size, start, source, asks=asks)
            self._formed, self._untold = formed, set(asks) - {rank}
            self._asks = {r: s for r, s in self._asks.items() if r >= size}  # joiners wait for the next group
            for w in self._workers:
                w.clock = start
            self._cond.notify_all()
            return formed

    def _next_size(self) -> int | None:
        """The size of the group that forms now, or None while a member has not asked."""
        asked = [r in self._asks for r in range(max(self._size, self._target))]
        keep = min(self._size, self._target)
        if not all(asked[:keep]):
            return None
        return self._target if all(asked[:self._target]) else keep

    def regroup_due(self) -> bool:
        """Whether the running group should re-form now to change its size: it shrinks, or it
        grows and every joining rank is waiting for the group."""
        with self._cond:
            return self._regroup_due()

    def _regroup_due(self) -> bool:
        if self._target < self._size:
            return True
        return self._target > self._size and all(r in self._asks for r in range(self._size, self._target))

    def fail(self) -> None:
        """The job failed: every worker that asks to join is told it is finished, and rank 0 to
        send the state it holds first."""
        with self._cond:
            self._failing = True
            self._cond.notify_all()

    def mark_dead(self, rank: int) -> None:
        """Worker ``rank``'s process is gone: what it asked for is void, and so is a group it was
        still to be told of."""
        with self._cond:
            self._asks.pop(rank, None)
            if rank in self._untold:
                self._formed, self._untold = None, set()
        super().mark_dead(rank)

    @property
    def generation(self) -> int:
        return self._generation

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
        """A checkpoint is on disk: a group of fresh processes starts there from now on; the one
        at the last step means training is complete."""
        with self._cond:
            self._start_step = max(self._start_step, step)
            if step == self._total_steps:
                self._final = True
            if self._failing:
                self._kept = True
            self._cond.notify_all()

    def wait_kept(self, timeout: float) -> bool:
        """After ``fail``: wait until rank 0's state is on disk; False after ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: self._kept or self._closed is not None, timeout)

    # ----------------------------------------------------- state and life
    @property
    def version(self) -> int:
        """Updates applied: in this mode one per step, on every worker at once."""
        return self.step()

    def finished(self) -> bool:
        """True once the final state (step == total steps) is saved."""
        with self._cond:
            return self._final
