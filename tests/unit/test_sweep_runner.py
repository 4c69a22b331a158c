"""The sweep's search and runner without a cluster: Optuna's sampling and pruning through
``Search``, and the ``SweepRunner`` against a fake job manager whose jobs the test moves one
evaluation at a time (a real JobDB + SweepDB underneath): at most ``parallel`` trials at once,
a pruned trial's job cancelled and its slot given to the next, a resumed sweep that goes on
where it was, a cancelled sweep."""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gradhub.proto.contract.errors import NotFoundError, SpecError
from gradhub.proto.contract.spec import JobSpec
from gradhub.proto.contract.states import JobState
from gradhub.proto.contract.sweep import SweepSpec, SweepState, TrialState
from gradhub.server.job_db import JobDB, JobRecord, MetricPoint
from gradhub.server.jobs import JobView
from gradhub.server.sweep_db import SweepDB
from gradhub.server.sweep_runner import SweepRunner
from gradhub.server.sweeps import PastTrial, Search

from ..conftest import wait_for

JOB = {"model": {"name": "mlp", "args": {"hidden": [8]}}, "dataset": "digits", "steps": 40, "eval_every": 10}


def spec(**changes: object) -> SweepSpec:
    data = {"job": JOB, "search": "random", "seed": 1, "space": {"optimizer.lr": {"loguniform": [1e-4, 0.1]}},
            "objective": {"metric": "val_accuracy", "mode": "max"}, "trials": 4, "parallel": 2,
            "prune": {"name": "median", "startup_trials": 1}}
    return SweepSpec.from_dict({**data, **changes})


# --- Search: Optuna through ask / report / tell --------------------------------------------------


@pytest.mark.parametrize("search", ["random", "bayes"])
def test_samples_stay_in_the_space(search: str) -> None:
    s = Search(spec(search=search, trials=12, space={"optimizer.lr": {"loguniform": [1e-4, 0.1]},
                                                      "batch_size": {"int": [8, 64], "step": 8},
                                                      "model.args.hidden": {"choice": [[8], [16, 16]]}}), seed=3)
    for n in range(12):
        sample = s.ask(n)
        assert 1e-4 <= sample.values["optimizer.lr"] <= 0.1
        assert sample.values["batch_size"] in range(8, 65, 8)
        assert sample.values["model.args.hidden"] in ([8], [16, 16])
        s.tell(n, TrialState.COMPLETE, sample.values["optimizer.lr"])


def test_a_grid_visits_every_point_once_even_across_a_restart() -> None:
    sp = spec(search="grid", space={"batch_size": {"choice": [8, 16, 32]}, "seed": {"int": [0, 1]}}, trials=6)
    first = Search(sp, seed=5)
    past = []
    for n in range(4):
        sample = first.ask(n)
        value = float(n)
        if n < 3:
            first.tell(n, TrialState.COMPLETE, value)
        past.append(PastTrial(n, TrialState.COMPLETE if n < 3 else TrialState.RUNNING, sample.internal,
                              value if n < 3 else None, {}, sample.notes))
    resumed = Search(sp, seed=5, history=past)
    assert resumed.running() == [3]
    points = [tuple(sorted(first.values(p.internal).items())) for p in past]
    points += [tuple(sorted(resumed.ask(n).values.items())) for n in (4, 5)]
    assert len(set(points)) == 6, "every point of the 3 x 2 grid exactly once"


def test_median_prunes_a_trial_behind_the_completed_ones() -> None:
    s = Search(spec(), seed=0)
    s.ask(0)
    assert not s.report(0, 10, 0.8)
    s.tell(0, TrialState.COMPLETE, 0.9)
    s.ask(1)
    assert not s.report(1, 10, 0.85), "ahead of the median: goes on"
    s.ask(2)
    assert s.report(2, 10, 0.1), "behind the median at the same step: pruned"
    assert s.tell(2, TrialState.PRUNED) == 0.1, "a pruned trial keeps its last evaluation"


def test_asha_promotes_the_best_of_a_rung() -> None:
    s = Search(spec(prune={"name": "asha", "min_resource": 10, "reduction_factor": 2}, trials=6), seed=0)
    verdicts = []
    for n, value in enumerate([0.5, 0.9, 0.2, 0.95]):
        s.ask(n)
        verdicts.append(s.report(n, 10, value))
    assert verdicts[0] is False and verdicts[2] is True, "in the bottom half of the first rung: stopped"


# --- SweepRunner against a fake manager ----------------------------------------------------------


class FakeJobs:
    """The JobManager calls the runner makes; the test decides when jobs evaluate and end."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.records: dict[str, JobRecord] = {}
        self.points_: dict[str, list[MetricPoint]] = {}
        self._listeners: list[Callable[[], None]] = []
        self._ids = itertools.count()
        self.refuse: Exception | None = None

    # what the runner calls
    def submit(self, spec: JobSpec, working_dir_zip: bytes | None = None, owner: str = "") -> JobView:
        if self.refuse is not None:
            raise self.refuse
        with self._lock:
            job_id = f"j-{next(self._ids)}"
            self.records[job_id] = JobRecord(id=job_id, name=spec.name, mode=spec.mode, spec_json=spec.to_json(),
                                             state=JobState.QUEUED, owner=owner, total_steps=40)
            self.points_[job_id] = []
        return JobView(self.records[job_id])

    def get(self, job_id: str) -> JobView:
        with self._lock:
            if job_id not in self.records:
                raise NotFoundError(job_id)
            return JobView(self.records[job_id])

    def points(self, job_id: str, after: int = 0) -> list[MetricPoint]:
        with self._lock:
            return [p for p in self.points_[job_id] if p.seq > after]

    def cancel(self, job_id: str, reason: str = "") -> JobView:
        self._set(job_id, state=JobState.CANCELLED, reason=reason)
        return self.get(job_id)

    def add_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def notify(self) -> None:
        for listener in self._listeners:
            listener()

    @property
    def db(self) -> FakeJobs:
        return self

    def list(self) -> list[JobRecord]:
        return list(self.records.values())

    # what the test does
    def evaluate(self, job_id: str, step: int, accuracy: float, trained: int | None = None) -> None:
        """An evaluation at ``step``; the job's record says it has trained ``trained`` steps by the time
        the runner reads it (``step`` unless given)."""
        with self._lock:
            pts = self.points_[job_id]
            pts.append(MetricPoint(len(pts) + 1, step, "eval", {"val_accuracy": accuracy}, time.time()))
            rec = self.records[job_id]
            if not rec.state.terminal:
                self.records[job_id] = dataclasses.replace(rec, state=JobState.RUNNING, step=trained or step,
                                                           metrics={"val_accuracy": accuracy})
        self.notify()

    def succeed(self, job_id: str, accuracy: float) -> None:
        self.evaluate(job_id, 40, accuracy)
        self._set(job_id, state=JobState.SUCCEEDED)

    def _set(self, job_id: str, **changes: object) -> None:
        with self._lock:
            if not self.records[job_id].state.terminal:
                self.records[job_id] = dataclasses.replace(self.records[job_id], **changes)  # type: ignore[arg-type]
        self.notify()

    def live(self) -> list[str]:
        return [j for j, r in self.records.items() if not r.state.terminal]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "jobs.db"
    JobDB(path).close()  # migrates: the sweep tables are its schema 4
    return path


@pytest.fixture
def jobs() -> FakeJobs:
    return FakeJobs()


@pytest.fixture
def runner(jobs: FakeJobs, db_path: Path, tmp_path: Path) -> Iterator[SweepRunner]:
    db = SweepDB(db_path)
    r = SweepRunner(jobs, db, tmp_path / "sweeps", poll_s=0.05).start()  # type: ignore[arg-type]
    yield r
    r.stop()
    db.close()


def test_trials_run_parallel_at_a_time_and_the_leaderboard_ranks_them(runner: SweepRunner, jobs: FakeJobs) -> None:
    view = runner.submit(spec(prune="none"), owner="alice")
    assert len(jobs.live()) == 2, "the first `parallel` trials are queued before submit returns"
    for accuracy in (0.5, 0.9, 0.7, 0.6):
        wait_for(lambda: len(jobs.live()) >= 1, 5, "a running trial")
        assert len(jobs.live()) <= 2
        jobs.succeed(jobs.live()[0], accuracy)
    wait_for(lambda: runner.get(view.record.id).record.state.terminal, 5, "the sweep's end")
    done = runner.get(view.record.id)
    assert done.record.state is SweepState.SUCCEEDED
    assert [t.record.value for t in done.trials] == [0.9, 0.7, 0.6, 0.5]
    assert done.best == done.trials[0].record.number
    assert {r.owner for r in jobs.records.values()} == {"alice"}
    assert len(jobs.records) == 4


def test_a_pruned_trial_is_cancelled_and_its_slot_goes_to_the_next(runner: SweepRunner, jobs: FakeJobs) -> None:
    view = runner.submit(spec())
    first, second = jobs.live()
    jobs.evaluate(first, 10, 0.8)
    jobs.succeed(first, 0.9)
    wait_for(lambda: len(jobs.live()) == 2, 5, "the next trial in the free slot")
    jobs.evaluate(second, 10, 0.1)
    wait_for(lambda: jobs.records[second].state is JobState.CANCELLED, 5, "the pruned trial's cancel")
    assert "pruned by sweep" in jobs.records[second].reason
    wait_for(lambda: len(jobs.records) == 4, 5, "a trial in the pruned one's slot")
    trial = next(t.record for t in runner.get(view.record.id).trials if t.record.job_id == second)
    assert trial.state is TrialState.PRUNED and trial.value == 0.1 and trial.intermediate == {10: 0.1}


def test_a_trial_that_trained_its_last_step_before_its_evaluation_was_read_is_not_pruned(
        runner: SweepRunner, jobs: FakeJobs) -> None:
    view = runner.submit(spec())
    first, second = jobs.live()
    jobs.evaluate(first, 10, 0.8)
    jobs.succeed(first, 0.9)
    wait_for(lambda: len(jobs.live()) == 2, 5, "the next trial in the free slot")
    jobs.evaluate(second, 10, 0.1, trained=40)  # behind the median, but its job has trained all 40 steps
    third = next(j for j in jobs.live() if j != second)
    jobs.succeed(third, 0.5)  # the runner has read the second's evaluation once it frees the third's slot
    wait_for(lambda: len(jobs.records) == 4, 5, "a trial in the third's slot")
    assert jobs.records[second].state is JobState.RUNNING, "nothing is saved by cancelling a job that has trained"
    jobs.succeed(second, 0.2)
    wait_for(lambda: any(t.record.job_id == second and t.record.state is TrialState.COMPLETE
                         for t in runner.get(view.record.id).trials), 5, "the second trial's end")


def test_a_sweep_resumes_where_it_was(jobs: FakeJobs, db_path: Path, tmp_path: Path) -> None:
    sp = spec(search="grid", space={"batch_size": {"choice": [8, 16, 32]}}, trials=3, parallel=1)
    db = SweepDB(db_path)
    first = SweepRunner(jobs, db, tmp_path, poll_s=0.05).start()  # type: ignore[arg-type]
    sweep_id = first.submit(sp).record.id
    jobs.succeed(jobs.live()[0], 0.5)
    wait_for(lambda: len(jobs.records) == 2, 5, "the second trial")
    second_job = jobs.live()[0]
    jobs.evaluate(second_job, 10, 0.6)
    wait_for(lambda: first.get(sweep_id).trials[-1].record.intermediate == {10: 0.6}, 5, "the evaluation's record")
    first.stop()
    db.close()

    db = SweepDB(db_path)  # a new server on the same data dir
    again = SweepRunner(jobs, db, tmp_path, poll_s=0.05).start()  # type: ignore[arg-type]
    try:
        assert jobs.live() == [second_job], "the running trial is taken up, not started again"
        jobs.succeed(second_job, 0.7)
        wait_for(lambda: len(jobs.records) == 3, 5, "the third trial")
        jobs.succeed(jobs.live()[0], 0.4)
        wait_for(lambda: again.get(sweep_id).record.state.terminal, 5, "the sweep's end")
        view = again.get(sweep_id)
        assert view.record.state is SweepState.SUCCEEDED
        assert sorted(t.record.params["batch_size"] for t in view.trials) == [8, 16, 32]
        assert [t.record.value for t in view.trials] == [0.7, 0.5, 0.4]
    finally:
        again.stop()
        db.close()


def test_cancelling_a_sweep_cancels_its_running_trials(runner: SweepRunner, jobs: FakeJobs) -> None:
    view = runner.submit(spec())
    running = jobs.live()
    done = runner.cancel(view.record.id, "enough")
    assert done.record.state is SweepState.CANCELLED
    assert all(jobs.records[j].state is JobState.CANCELLED for j in running)
    assert {t.record.state for t in done.trials} == {TrialState.FAILED}
    assert runner.cancel(view.record.id).record.state is SweepState.CANCELLED  # again: no change


def test_a_sweep_whose_first_job_is_refused_is_refused(runner: SweepRunner, jobs: FakeJobs) -> None:
    jobs.refuse = SpecError("resources", "the job asks for 64 CPUs, the cluster has 2")
    with pytest.raises(SpecError, match="^resources: "):
        runner.submit(spec())
    assert runner.list_sweeps() == []
