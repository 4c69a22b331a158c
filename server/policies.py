"""What a job's controller does when a worker fails: plain policy objects, injected into the
controller and tested on their own (no Ray, no gRPC).

A failure has a kind; the ``RestartPolicy`` turns it into a decision (restart the worker,
restart the whole group, shrink an elastic job, or fail the job) and keeps the count it
decides on.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Protocol


class FailureKind(StrEnum):
    DEATH = "death"  # the worker's process died (killed, out of memory, node lost)
    HANG = "hang"  # the worker went silent past the heartbeat timeout (the controller kills it)
    USER_ERROR = "user error"  # the worker raised: bad code or data, which would fail again
    LOST_PEER = "lost peer"  # allreduce: the worker gave up on its group (it could not re-form)
    SHARD_LOST = "shard lost"  # a parameter-server shard of the job died (its rank is 0: the job's)


@dataclass(frozen=True)
class Failure:
    rank: int
    kind: FailureKind
    error: str
    node_lost: bool = False  # a death: its node died with it (the machine is gone, not only the process)
    can_shrink: bool = False  # an elastic job above its smallest size: it may go on without the worker


class FailureDecision(Enum):
    RESTART_WORKER = "restart the worker"  # Ray restarts its actor; the others go on
    RESTART_GROUP = "restart the group"  # stop every worker and launch the group again
    SHRINK = "go on without the worker"  # an elastic job shrinks by one (and grows back when it can)
    FAIL = "fail the job"


class RestartPolicy(Protocol):
    def decide(self, failure: Failure) -> FailureDecision: ...

    def explain(self, failure: Failure) -> str:
        """Why the last decision on ``failure`` was what it was, for the job's log or its reason."""
        ...


class MaxRestarts:
    """The job's ``max_restarts``: each worker may die (or hang) that many times, and the group
    be restarted that many times; a worker's own error fails the job at once."""

    def __init__(self, max_restarts: int, world_size: int) -> None:
        self.max_restarts = max_restarts
        self.deaths = [0] * world_size
        self.group_restarts = 0

    def decide(self, failure: Failure) -> FailureDecision:
        if failure.kind == FailureKind.USER_ERROR:
            return FailureDecision.FAIL
        if failure.kind in (FailureKind.LOST_PEER, FailureKind.SHARD_LOST):
            self.group_restarts += 1
            return FailureDecision.FAIL if self.group_restarts > self.max_restarts else FailureDecision.RESTART_GROUP
        self.deaths[failure.rank] += 1
        if failure.node_lost and failure.can_shrink:
            return FailureDecision.SHRINK  # its node is gone: go on with those left, not wait for one
        return FailureDecision.FAIL if self.deaths[failure.rank] > self.max_restarts else FailureDecision.RESTART_WORKER

    def explain(self, failure: Failure) -> str:
        what = {FailureKind.DEATH: "died", FailureKind.HANG: "hung"}.get(failure.kind, "failed")
        if failure.kind == FailureKind.USER_ERROR:
            return failure.error  # the worker's own words: "worker 1 failed at training step 5: ..."
        if failure.kind == FailureKind.SHARD_LOST:
            n = self.group_restarts
            return (f"{failure.error}; " + (f"the job was restarted {n - 1} times (max_restarts is "
                                            f"{self.max_restarts})" if n > self.max_restarts else
                                            f"every shard and worker starts again from the latest checkpoint "
                                            f"(restart {n} of {self.max_restarts})"))
        if failure.kind == FailureKind.LOST_PEER:
            n = self.group_restarts
            return (f"worker {failure.rank} lost its peers ({failure.error}); "
                    + (f"the group was restarted {n - 1} times (max_restarts is {self.max_restarts})"
                       if n > self.max_restarts else f"restarting the group ({n} of {self.max_restarts})"))
        n = self.deaths[failure.rank]
        if failure.node_lost and failure.can_shrink:
            return f"worker {failure.rank} {what} with its node ({failure.error}); the job goes on without it"
        if n > self.max_restarts:
            return f"worker {failure.rank} {what} {n} times (max_restarts is {self.max_restarts}): {failure.error}"
        return f"worker {failure.rank} {what} ({failure.error}); restart {n} of {self.max_restarts}"
