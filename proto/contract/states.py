"""The lifecycles of a job and of its workers: the states, and which transitions are allowed.

``JobState`` matches ``gradhub.v1.JobState``; ``WorkerPhase`` is the ``state`` string of a
``WorkerStatus``. Both are ``StrEnum``s, so they compare equal to their names
(``info.state == "SUCCEEDED"``). Every change of state goes through ``JobState.to`` or
``WorkerPhase.to``, which raise ``StateError`` for a transition the tables do not allow: a
bug in the server, not a condition to handle.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

from gradhub.proto.contract.errors import StateError


class JobState(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    def to(self, new: JobState | str) -> JobState:
        """``new``, when a job in this state may move there; else ``StateError``."""
        return _checked("job", JOB_TRANSITIONS, self, JobState(new))


class WorkerPhase(StrEnum):
    STARTING = "starting"  # launched, not registered yet
    RUNNING = "running"  # registered with the server, training
    RESTARTING = "restarting"  # died (or its group was restarted): a new run is on its way
    DONE = "done"  # its run returned: all its steps are pushed or taken
    FAILED = "failed"  # raised an error of its own (bad code or data)
    LOST = "lost"  # allreduce: lost its group because another worker is gone
    IDLE = "idle"  # an elastic job's rank above its size: no worker runs it (it left, or never started)

    def to(self, new: WorkerPhase | str) -> WorkerPhase:
        """``new``, when a worker in this phase may move there; else ``StateError``."""
        return _checked("worker", WORKER_TRANSITIONS, self, WorkerPhase(new))

    def allows(self, new: WorkerPhase | str) -> bool:
        """Whether a worker in this phase may move to ``new``."""
        return WorkerPhase(new) in WORKER_TRANSITIONS[self]


_S, _W = JobState, WorkerPhase

JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    _S.QUEUED: frozenset({_S.RUNNING, _S.FAILED, _S.CANCELLED}),
    # QUEUED again: the server stopped or died while the job ran; it resumes at the next start
    _S.RUNNING: frozenset({_S.SUCCEEDED, _S.FAILED, _S.CANCELLED, _S.QUEUED}),
    _S.SUCCEEDED: frozenset(),
    _S.FAILED: frozenset(),
    _S.CANCELLED: frozenset(),
}

# A group restart (allreduce) sends every worker to RESTARTING, whatever its phase.
# An elastic job's size changes send a rank to IDLE (it leaves) and back to STARTING (it joins).
WORKER_TRANSITIONS: dict[WorkerPhase, frozenset[WorkerPhase]] = {
    _W.STARTING: frozenset({_W.RUNNING, _W.RESTARTING, _W.DONE, _W.FAILED, _W.LOST, _W.IDLE}),
    # RUNNING again: a Register retried (the channel retries UNAVAILABLE) registers twice
    _W.RUNNING: frozenset({_W.RUNNING, _W.RESTARTING, _W.DONE, _W.FAILED, _W.LOST, _W.IDLE}),
    _W.RESTARTING: frozenset({_W.RUNNING, _W.RESTARTING, _W.DONE, _W.FAILED, _W.LOST, _W.IDLE}),
    _W.DONE: frozenset({_W.RESTARTING, _W.IDLE}),
    _W.FAILED: frozenset({_W.RESTARTING}),
    _W.LOST: frozenset({_W.RESTARTING, _W.IDLE}),
    _W.IDLE: frozenset({_W.STARTING}),
}


_T = TypeVar("_T", JobState, WorkerPhase)


def _checked(what: str, table: dict[_T, frozenset[_T]], old: _T, new: _T) -> _T:
    if new not in table[old]:
        allowed = ", ".join(sorted(table[old])) or "none: it is final"
        raise StateError(f"{what} state: {old} -> {new} is not an allowed transition (from {old}: {allowed})")
    return new
