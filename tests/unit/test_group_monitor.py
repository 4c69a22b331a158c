"""GroupMonitor through the real JobManager with a fake launcher: which lost workers restart the
whole group (and from which step), which fail the job, and what the job's log says."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from gradhub.proto.contract.spec import JobSpec
from gradhub.server import group_monitor
from gradhub.server.checkpoints import CheckpointStore
from gradhub.server.config import ServerConfig
from gradhub.server.job_db import JobDB, JobRecord
from gradhub.server.jobs import TERMINAL, JobManager
from gradhub.server.launcher import WorkerExit

STEPS = 10
DIED = "The actor died unexpectedly before finishing this task."
LOST = "PeerLostError: worker {} lost its group: Connection reset by peer"

# A script is what one launched group reports: batches of exits returned by successive
# wait() calls. A batch may be a callable, run at that wait() (it gets the manager and job id).
Batch = list[WorkerExit] | Callable[[JobManager, str], list[WorkerExit]]


def succeed(manager: JobManager, job_id: str) -> list[WorkerExit]:
    """Every rank returns after rank 0 saved the final step, as real workers do."""
    tracker = manager.tracker(job_id)
    tracker.set_total_steps(STEPS)
    tracker.saved(STEPS)
    return [WorkerExit(r, result={"step": STEPS}) for r in range(2)]


def died(rank: int) -> WorkerExit:
    return WorkerExit(rank, died=True, error=DIED)


def lost(rank: int) -> WorkerExit:
    return WorkerExit(rank, error=LOST.format(rank), lost_peer=True)


class FakeGroup:
    def __init__(self, manager: JobManager, job_id: str, script: list[Batch]) -> None:
        self._manager, self._job_id = manager, job_id
        self._script = list(script)
        self._stopped = threading.Event()
        self.stops = 0
        self.killed: list[int] = []

    def wait(self, timeout: float) -> list[WorkerExit]:
        if self._script:
            batch = self._script.pop(0)
            return batch(self._manager, self._job_id) if callable(batch) else list(batch)
        self._stopped.wait(timeout)
        return []

    def rerun(self, rank: int) -> None:
        raise AssertionError("allreduce groups are restarted whole, never one rank")

    def kill(self, rank: int) -> None:
        self.killed.append(rank)

    def stop(self) -> None:
        self.stops += 1
        self._stopped.set()


@dataclass
class FakeLauncher:
    """Launches a ``FakeGroup`` per script, in order; an exception in place of a script is raised."""

    scripts: list[list[Batch] | Exception]
    manager: JobManager | None = None
    groups: list[FakeGroup] = field(default_factory=list)
    start_steps: list[int] = field(default_factory=list)

    def total_resources(self) -> dict[str, float]:
        return {"CPU": 64.0}

    def launch(
        self, job_id: str, spec: JobSpec, runtime_env: Mapping[str, Any] | None
    ) -> FakeGroup:
        assert self.manager is not None and not spec.is_ps
        self.start_steps.append(self.manager.tracker(job_id).start_step)
        if not self.scripts:
            raise AssertionError(f"launch {len(self.start_steps)} was not expected")
        script = self.scripts.pop(0)
        if isinstance(script, Exception):
            raise script
        group = FakeGroup(self.manager, job_id, script)
        self.groups.append(group)
        return group


@pytest.fixture
def run_job(tmp_path: Path) -> Iterator[Callable[..., tuple[JobRecord, FakeLauncher, JobManager]]]:
    """Runs one allreduce job on a fresh manager with the given scripts; returns its final record."""
    managers: list[JobManager] = []
    with JobDB(tmp_path / "jobs.db") as db:

        def run(
            scripts: list[list[Batch] | Exception], max_restarts: int = 1, timeout: float = 10.0
        ) -> tuple[JobRecord, FakeLauncher, JobManager]:
            launcher = FakeLauncher(scripts)
            manager = JobManager(
                db=db,
                checkpoints=CheckpointStore(tmp_path / "ckpt"),
                launcher=launcher,
                working_dirs=tmp_path / "wd",
                config=ServerConfig(poll_s=0.01),
            )
            launcher.manager = manager
            managers.append(manager)
            manager.start()
            spec = JobSpec.from_dict(
                {
                    "mode": "allreduce",
                    "workers": 2,
                    "model": "mlp",
                    "dataset": "digits",
                    "steps": STEPS,
                    "max_restarts": max_restarts,
                }
            )
            job_id = manager.submit(spec).record.id
            deadline = time.monotonic() + timeout
            for view in manager.watch(job_id, refresh_s=0.1):
                if view.record.state in TERMINAL:
                    return view.record, launcher, manager
                if time.monotonic() > deadline:
                    pytest.fail(f"job {job_id} still {view.record.state} after {timeout} s")
            pytest.fail("the manager stopped before the job ended")

        yield run
        for m in managers:
            m.stop(grace=5.0)


def _log(manager: JobManager, job_id: str) -> str:
    return "\n".join(line for _, line in manager.logs(job_id))


# ---------------------------------------------------------------------------- retried
def test_a_dead_worker_restarts_the_whole_group(run_job) -> None:
    rec, launcher, manager = run_job([[[died(1), lost(0)]], [succeed]], max_restarts=1)
    assert (rec.state, rec.reason) == ("SUCCEEDED", "")
    assert len(launcher.groups) == 2 and launcher.start_steps == [0, 0]
    assert launcher.groups[0].stops >= 1  # the survivors were ended before the new group
    assert launcher.groups[1].stops >= 1  # and the last group on the way out
    log = _log(manager, rec.id)
    assert f"worker 1 died ({DIED})" in log
    assert "restarting all 2 workers from step 0 (restart 1 of 1)" in log
    assert "lost its peers" not in log


def test_a_death_reported_after_the_survivors_error_is_still_the_cause(run_job) -> None:
    # rank 0's collective fails first; Ray reports rank 1's death a couple of polls later
    rec, launcher, manager = run_job([[[lost(0)], [], [died(1)]], [succeed]])
    assert rec.state == "SUCCEEDED"
    assert len(launcher.groups) == 2
    log = _log(manager, rec.id)
    assert "worker 1 died" in log and "restarting all 2 workers from step 0" in log
    assert "lost its peers" not in log


def test_a_worker_that_lost_its_peers_alone_is_retried(run_job) -> None:
    rec, launcher, manager = run_job([[[lost(1), lost(0)]], [succeed]])
    assert rec.state == "SUCCEEDED" and len(launcher.groups) == 2
    log = _log(manager, rec.id)
    assert f"worker 0 lost its peers: {LOST.format(0)}" in log
    assert "(restart 1 of 1)" in log


def test_the_survivor_that_never_reports_is_stopped_after_the_settle_window(
    run_job, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(group_monitor, "SETTLE_S", 0.1)
    rec, launcher, manager = run_job([[[died(1)]], [succeed]])
    assert rec.state == "SUCCEEDED" and len(launcher.groups) == 2
    assert launcher.groups[0].stops >= 1
    assert "worker 1 died" in _log(manager, rec.id)


def test_the_restart_starts_from_the_latest_checkpoint(run_job) -> None:
    def checkpoint_then_die(manager: JobManager, job_id: str) -> list[WorkerExit]:
        manager.checkpoint_store.save(job_id, 4, 4, {"w": torch.zeros(2)})
        return [died(1), lost(0)]

    rec, launcher, manager = run_job([[checkpoint_then_die], [succeed]])
    assert rec.state == "SUCCEEDED"
    assert launcher.start_steps == [0, 4]
    assert "restarting all 2 workers from step 4 (restart 1 of 1)" in _log(manager, rec.id)


def test_every_restart_counts_against_max_restarts(run_job) -> None:
    rec, launcher, _ = run_job([[[died(0), lost(1)]], [[died(1), lost(0)]]], max_restarts=1)
    assert rec.state == "FAILED"
    assert rec.reason == (
        f"worker 1 died ({DIED}); the group was restarted 1 times (max_restarts is 1)"
    )
    assert len(launcher.groups) == 2
    assert all(g.stops >= 1 for g in launcher.groups)


# ---------------------------------------------------------------------------- failed
def test_a_workers_own_error_fails_the_job_without_retry(run_job) -> None:
    rec, launcher, _ = run_job(
        [[[WorkerExit(1, error="ValueError: bad data"), lost(0)]]], max_restarts=3
    )
    assert (rec.state, rec.reason) == ("FAILED", "worker 1 failed: ValueError: bad data")
    assert len(launcher.groups) == 1 and launcher.groups[0].stops >= 1


def test_an_own_error_after_a_lost_peer_is_still_the_cause(run_job) -> None:
    rec, launcher, _ = run_job([[[lost(0)], [WorkerExit(1, error="ValueError: bad data")]]])
    assert (rec.state, rec.reason) == ("FAILED", "worker 1 failed: ValueError: bad data")
    assert len(launcher.groups) == 1


def test_no_restart_when_max_restarts_is_0(run_job) -> None:
    rec, launcher, manager = run_job([[[died(1), lost(0)]]], max_restarts=0)
    assert rec.state == "FAILED"
    assert rec.reason.startswith("worker 1 died")
    assert "max_restarts is 0" in rec.reason
    assert len(launcher.groups) == 1 and launcher.groups[0].stops >= 1
    assert "restarting" not in _log(manager, rec.id)


def test_a_launch_that_raises_fails_the_job(run_job) -> None:
    rec, launcher, _ = run_job([RuntimeError("placement group not ready in 120 s")])
    assert rec.state == "FAILED"
    assert (
        rec.reason
        == "could not start the workers: RuntimeError: placement group not ready in 120 s"
    )
    assert launcher.groups == [] and launcher.start_steps == [0]


def test_workers_that_return_before_the_final_checkpoint_fail_the_job(run_job) -> None:
    rec, _, _ = run_job([[[WorkerExit(0, result={}), WorkerExit(1, result={})]]])
    assert (rec.state, rec.reason) == ("FAILED", "the workers stopped before the last step")


def test_a_relaunch_that_raises_fails_the_job(run_job) -> None:
    rec, launcher, _ = run_job([[[died(1), lost(0)]], RuntimeError("node lost")], max_restarts=2)
    assert (rec.state, rec.reason) == (
        "FAILED",
        "could not start the workers: RuntimeError: node lost",
    )
    assert launcher.start_steps == [0, 0] and launcher.groups[0].stops >= 1
