"""What differs between the modes while a job runs, behind one interface for the controller:
the ps modes keep the job's state in a ``ParameterStore`` on the server (which also writes its
checkpoints); allreduce keeps a ``GroupTracker`` and rank 0 sends the checkpoints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from gradhub.proto.contract.states import JobState
from gradhub.server.job_run import JobRun
from gradhub.server.ps_runtime import Host, PSRuntime
from gradhub.server.store import ParameterStore
from gradhub.server.tracker import GroupConfig, GroupTracker

log = logging.getLogger(__name__)


class ModeRuntime(Protocol):
    @property
    def table(self) -> ParameterStore | GroupTracker:
        """Who is in the job and how far it got (ps modes: the store, which holds the state too)."""
        ...

    @property
    def holds_state(self) -> bool:
        """Whether the server holds the job's training state (ps modes)."""
        ...

    def prepare(self) -> None:
        """Before the workers start: resume where the job was (a GradhubError fails the job)."""
        ...

    def start_with(self, size: int) -> None:
        """The job starts on ``size`` workers (an elastic job: as many as fit)."""
        ...

    def resize(self, size: int, at_once: bool = False) -> bool:
        """An elastic job: ask for ``size`` workers (``WorkerTable.resize``). False when the job
        must go back to its latest checkpoint for it (``restart_group``): a sharded ps-sync
        job whose shards were not at one step when a worker's node died."""
        ...

    def tick(self) -> None:
        """Once per controller step: write what the store asked to keep."""
        ...

    def finish(self) -> tuple[JobState, str]:
        """Every worker returned: whether the job is complete, and its last checkpoint written."""
        ...

    def keep_state(self) -> None:
        """The job failed: keep what it trained (ps: write it; allreduce: ask rank 0 for it)."""
        ...

    def wait_kept(self, timeout: float) -> bool:
        """After ``keep_state``: whether the state is on disk within ``timeout``."""
        ...

    def restart_group(self) -> None:
        """Every worker is stopped and the group is launched again."""
        ...

    def close(self) -> None:
        """The job is over: stop what serves it beside the server (a sharded job's shards)."""
        ...

    def lost(self) -> str | None:
        """Whether something the job's state lives in beside the server died (a sharded job's
        shard), and what: the whole job then starts again from its latest checkpoint."""
        ...


def runtime_for(run: JobRun, host: Host, clock: Callable[[], float] = time.monotonic) -> ModeRuntime:
    """The runtime of ``run``'s mode (``clock`` is its workers' table's: tests pass a fake one)."""
    return PSRuntime(run, host, clock) if run.spec.is_ps else GroupRuntime(run, host, clock)


class GroupRuntime:
    """allreduce: the tracker forms the groups; rank 0 sends checkpoints (and, when the job fails
    by its own error, the state of its last whole step)."""

    holds_state = False

    def __init__(self, run: JobRun, host: Host, clock: Callable[[], float] = time.monotonic) -> None:
        self.run, self.host = run, host
        self.table: GroupTracker = GroupTracker(GroupConfig(run.id, run.spec.workers), clock)

    def prepare(self) -> None:
        if self.run.resume:
            step = self._latest_step()
            self.table.restart(step)
            self.host.log_line(self.run.id, f"resuming from the checkpoint at step {step}" if step
                               else "no checkpoint yet: restarting from step 0 (same result, by determinism)")

    def start_with(self, size: int) -> None:
        self.table.start_with(size)

    def resize(self, size: int, at_once: bool = False) -> bool:
        self.table.resize(size, at_once)
        return True

    def tick(self) -> None:
        """Checkpoints arrive from rank 0 through an RPC and are written there."""

    def finish(self) -> tuple[JobState, str]:
        if not self.table.finished():
            return JobState.FAILED, "the workers stopped before the last step"
        return JobState.SUCCEEDED, ""

    def keep_state(self) -> None:
        """No group forms again; rank 0 is told to send the state it holds when it asks."""
        self.table.fail()

    def wait_kept(self, timeout: float) -> bool:
        return self.table.wait_kept(timeout)

    def close(self) -> None:
        """Nothing serves an allreduce job beside the server."""

    def lost(self) -> str | None:
        return None

    def restart_group(self) -> None:
        step = self._latest_step()
        self.table.restart(step)
        self.host.log_line(self.run.id, f"restarting all {self.run.spec.workers} workers from step {step}")

    def _latest_step(self) -> int:
        latest = self.host.checkpoint_store.latest(self.run.id)
        return 0 if latest is None else latest.step
