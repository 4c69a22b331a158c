"""Who is in a running job and how far each worker got: the bookkeeping that the parameter
store (ps modes) and the group tracker (allreduce) share. No gRPC, no Ray in here.

An elastic job's table has a rank for each worker it may ever have (``workers.max``); its
members are the ranks below its ``size``. ``resize`` asks for another size, which the store
or the tracker applies when its mode allows (at a step boundary in ps-sync and allreduce, at
once in ps-async and ps-ssp); every change is recorded with the step it took effect at.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gradhub.proto.contract.errors import (
    AuthError,
    NotFoundError,
    ProtocolError,
    ReleasedError,
    StateError,
)


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
    # the worker's data-plane credential, new at each registration (see DataEndpoint)
    credential: str = ""
    # how its gradients arrive (the latest seen): "tcp", "unix", "shm" (the Unix socket with shared
    # memory) or "grpc"
    transport: str = ""
    bytes_in: int = 0  # gradient bytes it pushed (as they travelled: the wire dtype), accepted or not
    bytes_out: int = 0  # parameter bytes it pulled
    local_step: int = 0  # local-sgd: its inner steps so far (its heartbeats say)


class WorkerTable:
    """A job's workers, its total steps and whether it is over, guarded by ``_cond``
    (subclasses keep their own state under the same condition). Every change that may let a
    waiting call go on goes through ``_changed``: it wakes the threads waiting on ``_cond`` and
    calls the listeners (the data plane's event loop, which waits without a thread)."""

    def __init__(self, job_id: str, world_size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._job_id = job_id
        self._now = clock
        self._cond = threading.Condition()
        self._workers = [WorkerState(rank=r) for r in range(world_size)]
        self._size = world_size  # the members: the ranks below it
        self._target = world_size  # the size asked for (``resize``), applied when the mode allows
        self._sizes: list[tuple[int, int]] = []  # (step, size): every change of size, in order
        self._total_steps: int | None = None
        self._closed: str | None = None
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (under the lock: it must only schedule work, never block) after
        every change that may let a waiting pull go on."""
        with self._cond:
            self._listeners.append(listener)

    def _changed(self) -> None:
        """Wake whoever waits for this job's state; call under ``_cond``."""
        self._cond.notify_all()
        for listener in self._listeners:
            listener()

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

    # ------------------------------------------------------------ size
    @property
    def size(self) -> int:
        """How many workers the job runs on now (ranks ``0..size-1``)."""
        return self._size

    @property
    def target(self) -> int:
        """The size the job was asked to have (``size`` once it is applied)."""
        return self._target

    def start_with(self, size: int) -> None:
        """The job starts (or restarts its group) with ``size`` workers."""
        with self._cond:
            self._check_size(size)
            self._size = self._target = size
            self._changed()

    def resize(self, target: int, at_once: bool = False) -> None:
        """Ask for ``target`` workers; the mode applies it (``_resized`` below). ``at_once``:
        a worker is gone for good, so the job shrinks now rather than at a step boundary."""
        with self._cond:
            self._check_open()
            self._check_size(target)
            self._target = target
            self._resized(at_once)
            self._changed()

    def size_changes(self, after: int = 0) -> list[tuple[int, int]]:
        """The changes of size (step, size) from the ``after``-th on."""
        with self._cond:
            return self._sizes[after:]

    def _resized(self, at_once: bool) -> None:
        """A new target: apply it now if the mode may; call under ``_cond``."""

    def _set_size(self, size: int, step: int) -> None:
        """The job runs on ``size`` workers from ``step`` on; call under ``_cond``."""
        if size != self._size:
            self._size = size
            self._sizes.append((step, size))

    def _check_size(self, size: int) -> None:
        if not 1 <= size <= len(self._workers):
            raise StateError(f"workers: {size} is outside this job's 1..{len(self._workers)}")

    def _members(self) -> list[WorkerState]:
        return self._workers[:self._size]

    def check_member(self, rank: int) -> bool:
        """``_check_member`` under the lock."""
        with self._cond:
            return self._check_member(rank)

    def _check_member(self, rank: int) -> bool:
        """Whether ``rank`` is a member now (False: it joins at the next change of size);
        ``ReleasedError`` when the job shrank below it."""
        w = self._worker(rank)  # NotFoundError outside the job
        if rank < self._size:
            return True
        if rank >= self._target:
            w.alive = False  # it leaves: a later worker of this rank is a new one
            raise ReleasedError(f"rank: job {self._job_id!r} runs on {self._size} workers now; worker {rank} "
                                "leaves")
        return False

    def _joined(self, rank: int, host: str, pid: int, credential: str | None = None) -> WorkerState:
        """Record a (re)registration (with ``credential``: the one the job's control plane
        issued, for a parameter-server shard); call under ``_cond``."""
        self._check_open()
        w = self._worker(rank)
        w.alive, w.host, w.pid, w.last_seen = True, host, pid, self._now()
        w.registrations += 1
        w.credential = credential or secrets.token_urlsafe(24)
        self._changed()
        return w

    def credential(self, rank: int) -> str:
        """Worker ``rank``'s data-plane credential (issued at its latest registration)."""
        with self._cond:
            return self._worker(rank).credential

    def open_session(self, rank: int, credential: str, transport: str) -> int:
        """A data-plane connection says it is worker ``rank``: AuthError unless ``credential`` is
        the one its latest registration got. Returns that registration's number, which
        ``check_session`` compares later."""
        with self._cond:
            self._check_open()
            w = self._worker(rank)
            if not w.credential or not hmac.compare_digest(w.credential.encode(), credential.encode()):
                raise AuthError(f"credential: not the one worker {rank} of job {self._job_id!r} "
                                "got at its latest registration")
            w.transport = transport
            return w.registrations

    def note_transport(self, rank: int, transport: str) -> None:
        with self._cond:
            self._worker(rank).transport = transport

    def check_session(self, rank: int, registration: int) -> None:
        """StateError when worker ``rank`` registered again since its connection opened (that
        connection belongs to a process that was replaced). Reads one int without the lock (the
        data plane's loop calls it for every frame and must not wait for an update to finish):
        a registration that lands meanwhile is seen at the next frame."""
        if self._worker(rank).registrations != registration:
            raise StateError(f"rank: worker {rank} registered again; this data-plane connection "
                             "belongs to its previous process")

    def mark_dead(self, rank: int) -> None:
        """The worker's process is gone (it may come back and register again)."""
        with self._cond:
            self._worker(rank).alive = False
            self._changed()

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
        """The job's progress in steps: the slowest member's clock."""
        with self._cond:
            return min(w.clock for w in self._members())

    def workers(self) -> list[WorkerState]:
        with self._cond:
            return [WorkerState(**vars(w)) for w in self._workers]

    def close(self, reason: str) -> None:
        """End the job: every waiting and future call fails with ``reason``."""
        with self._cond:
            if self._closed is None:
                self._closed = reason
            self._changed()

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
