"""The queue and elastic jobs (JobManager with an ExternalLauncher: the queue's arithmetic, no
Ray): an elastic job starts as large as fits, queued work gets freed room before an elastic job
grows into it, and a scale outside the spec's bounds is refused."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gradhub.proto.contract.errors import SpecError, StateError
from gradhub.proto.contract.spec import JobSpec
from gradhub.proto.contract.states import JobState
from gradhub.server.checkpoints import CheckpointStore
from gradhub.server.config import ServerConfig
from gradhub.server.job_db import JobDB
from gradhub.server.jobs import JobManager
from gradhub.server.launcher import ExternalLauncher

WAIT_S = 10.0


def _spec(name: str, workers: object) -> JobSpec:
    return JobSpec.from_dict({"name": name, "model": "mlp", "dataset": "digits", "steps": 10, "workers": workers,
                              "resources": {"cpus": 1}})


def _until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT_S} s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[JobManager]:
    with JobDB(tmp_path / "jobs.db") as db:
        m = JobManager(db, CheckpointStore(tmp_path / "ckpt"), ExternalLauncher({"CPU": 2.0}), tmp_path / "wd",
                       ServerConfig(poll_s=0.01))
        m.start()
        try:
            yield m
        finally:
            m.stop(grace=5.0)


def _state(manager: JobManager, job_id: str) -> JobState:
    return manager.get(job_id).record.state


def test_an_elastic_job_starts_as_large_as_fits_and_queued_work_comes_before_its_growth(manager: JobManager) -> None:
    elastic = manager.submit(_spec("elastic", {"min": 1, "max": 3})).record.id
    _until(lambda: manager.get(elastic).size > 0, "the elastic job to start")
    view = manager.get(elastic)
    assert (view.size, view.target) == (2, 3), "two of its three workers fit the two CPUs"
    manager.scale(elastic, 2)  # its controller stops asking for room: the test asks below
    queued = manager.submit(_spec("queued", 1)).record.id
    assert _state(manager, queued) == JobState.QUEUED
    assert manager.reserve_workers(elastic, 1) == 0, "no room, and a job waits"
    manager.release_workers(elastic, 1)  # the elastic job shrank by one: the queued job starts in its room
    _until(lambda: _state(manager, queued) == JobState.RUNNING, "the queued job to start")
    assert manager.reserve_workers(elastic, 1) == 0
    manager.cancel(queued)
    _until(lambda: _state(manager, queued) == JobState.CANCELLED, "the cancel")
    assert manager.reserve_workers(elastic, 2) == 1, "as much room as there is"


def test_scaling_checks_the_bounds_and_the_kind_of_job(manager: JobManager) -> None:
    elastic = manager.submit(_spec("elastic", {"min": 2, "max": 3})).record.id
    fixed = manager.submit(_spec("fixed", 1)).record.id
    with pytest.raises(SpecError, match=r"workers: 1 is outside this job's bounds 2\.\.3"):
        manager.scale(elastic, 1)
    with pytest.raises(SpecError, match="has a fixed size of 1 workers"):
        manager.scale(fixed, 1)
    manager.cancel(fixed)
    _until(lambda: _state(manager, fixed) == JobState.CANCELLED, "the cancel")
    with pytest.raises(StateError, match="only a queued or running job scales"):
        manager.scale(fixed, 1)


def test_a_job_that_needs_more_than_the_cluster_at_its_smallest_is_refused(manager: JobManager) -> None:
    with pytest.raises(SpecError, match=r"asks for at least 3 workers .* lower workers\.min"):
        manager.submit(_spec("too-big", {"min": 3, "max": 4}))
    accepted = manager.submit(_spec("fits", {"min": 2, "max": 8})).record.id
    _until(lambda: manager.get(accepted).size == 2, "the job to start with the two workers that fit")
