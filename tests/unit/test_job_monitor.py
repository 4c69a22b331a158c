"""JobMonitor (the ps modes) through the real JobManager with a fake worker group: one death of a
worker counts once, also when the monitor's rerun reaches the actor while Ray still restarts it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from gradhub.proto.contract.spec import JobSpec
from gradhub.server.checkpoints import CheckpointStore
from gradhub.server.config import ServerConfig
from gradhub.server.job_db import JobDB
from gradhub.server.jobs import TERMINAL, JobManager
from gradhub.server.launcher import WorkerExit

SOCKET_CLOSED = "The actor is temporarily unavailable: RpcError: Socket closed"
RESTARTING = "The actor is temporarily unavailable: IOError: The actor is restarting."


class FakePSGroup:
    """Answers wait() from a script; a batch may be a callable of the group."""

    def __init__(self, script: list[list[WorkerExit] | Callable[[FakePSGroup], list[WorkerExit]]]) -> None:
        self.script, self.reruns, self.kills = list(script), [], []
        self._stopped = threading.Event()

    def wait(self, timeout: float) -> list[WorkerExit]:
        if self.script:
            batch = self.script.pop(0)
            return batch(self) if callable(batch) else batch
        self._stopped.wait(timeout)
        return []

    def rerun(self, rank: int) -> None:
        self.reruns.append(rank)

    def kill(self, rank: int) -> None:
        self.kills.append(rank)

    def stop(self) -> None:
        self._stopped.set()


class FakeLauncher:
    def __init__(self, group: FakePSGroup) -> None:
        self.group = group

    def total_resources(self) -> dict[str, float]:
        return {"CPU": 64.0}

    def launch(self, job_id: str, spec: JobSpec, runtime_env: Mapping[str, Any] | None) -> FakePSGroup:
        return self.group


def _run(tmp_path: Path, group: FakePSGroup, max_restarts: int = 1) -> tuple[Any, list[str]]:
    with JobDB(tmp_path / "jobs.db") as db:
        manager = JobManager(db, CheckpointStore(tmp_path / "ckpt"), FakeLauncher(group), tmp_path / "wd",
                             ServerConfig(poll_s=0.01))
        manager.start()
        try:
            spec = JobSpec.from_dict({"mode": "ps-sync", "workers": 2, "model": "mlp", "dataset": "digits",
                                      "steps": 5, "max_restarts": max_restarts})
            job_id = manager.submit(spec).record.id
            deadline = time.monotonic() + 10
            for view in manager.watch(job_id, refresh_s=0.05):
                if view.record.state in TERMINAL:
                    return view.record, [line for _, line in manager.logs(job_id)]
                if time.monotonic() > deadline:
                    pytest.fail(f"job still {view.record.state} after 10 s")
            pytest.fail("the manager stopped first")
        finally:
            manager.stop()


def _rerun_twice_then_fail(group: FakePSGroup) -> list[WorkerExit]:
    # the rerun after the death, then the one after the "restarting" answer, a poll later
    if group.reruns != [1, 1]:
        group.script.insert(0, _rerun_twice_then_fail)
        return []
    return [WorkerExit(0, error="ValueError: boom")]


def test_a_rerun_that_meets_the_restarting_actor_is_the_same_death(tmp_path: Path) -> None:
    group = FakePSGroup([
        [WorkerExit(1, died=True, unavailable=True, error=SOCKET_CLOSED)],  # the kill: one death
        [WorkerExit(1, died=True, unavailable=True, error=RESTARTING)],  # the rerun came too early
        _rerun_twice_then_fail,
    ])
    record, logs = _run(tmp_path, group, max_restarts=1)
    assert record.reason == "worker 0 failed: ValueError: boom"  # not "worker 1 died 2 times"
    assert sum("died" in line for line in logs) == 1 and any("restart 1 of 1" in line for line in logs)


def test_past_max_restarts_the_job_fails_naming_the_worker(tmp_path: Path) -> None:
    group = FakePSGroup([[WorkerExit(1, died=True, unavailable=True, error=SOCKET_CLOSED)]])
    record, _ = _run(tmp_path, group, max_restarts=0)
    assert record.state == "FAILED"
    assert record.reason.startswith("worker 1 died 1 times (max_restarts is 0)")
