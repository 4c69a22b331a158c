"""The sweep runner: runs every sweep's trials as ordinary jobs of the JobManager, at most
``parallel`` at once, feeds their evaluations to the sweep's search (``gradhub.server.sweeps``),
cancels the trials it prunes and gives their slots to the next, and persists every step in the
SweepDB, so that a sweep resumes after a restart.

One thread owns every running sweep: it wakes when the manager reports a change (its listener
only sets an event) or after ``poll_s`` at the latest, and it takes the calls that change a sweep
(submit, cancel) from a queue, answering each through a future. It never holds the manager's
lock; reads (a sweep, its leaderboard) go to the database and need no thread at all.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from gradhub.proto.contract.errors import (
    GradhubError,
    NotFoundError,
    ResourceExhaustedError,
    ServerUnavailableError,
    SpecError,
    StateError,
)
from gradhub.proto.contract.states import JobState
from gradhub.proto.contract.sweep import SweepSpec, SweepState, TrialState
from gradhub.server.jobs import JobManager
from gradhub.server.sweep_db import SweepDB, SweepRecord, TrialRecord
from gradhub.server.sweeps import PastTrial, Search

log = logging.getLogger(__name__)
T = TypeVar("T")
POLL_S = 1.0  # a sweep looks at its trials at least this often (the manager's changes wake it sooner)
CALL_TIMEOUT_S = 60.0  # how long a submit or a cancel waits for the runner's thread


@dataclass(frozen=True)
class TrialView:
    """A trial as the leaderboard shows it: its record, and its job's live state while it runs."""

    record: TrialRecord
    job_state: str = ""
    job_step: int = 0
    job_total_steps: int = 0


@dataclass(frozen=True)
class SweepView:
    record: SweepRecord
    spec: SweepSpec
    trials: tuple[TrialView, ...] = ()  # in leaderboard order (best first)
    best: int | None = None  # the best completed trial's number


def leaderboard(trials: list[TrialRecord], mode: str) -> list[TrialRecord]:
    """Completed trials by their objective (best first), then pruned ones by their last
    evaluation, then running ones, then failed ones; ties by trial number."""
    order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.RUNNING: 2, TrialState.FAILED: 3}
    sign = -1.0 if mode == "max" else 1.0

    def key(t: TrialRecord) -> tuple[int, int, float, int]:
        value = t.value if t.state in (TrialState.COMPLETE, TrialState.PRUNED) else None
        return order[t.state], value is None, 0.0 if value is None else sign * value, t.number
    return sorted(trials, key=key)


@dataclass
class _Active:
    """A running sweep, owned by the runner's thread."""

    record: SweepRecord
    spec: SweepSpec
    search: Search
    trials: dict[int, TrialRecord]
    seen: dict[int, int] = field(default_factory=dict)  # running trial -> its job's last point read
    pruning: dict[int, str] = field(default_factory=dict)  # trials being pruned: their job's cancel reason
    zip: bytes | None = None

    def running(self) -> list[TrialRecord]:
        return [t for t in self.trials.values() if t.state is TrialState.RUNNING]


class SweepRunner:
    """``start()`` resumes the sweeps the last server left RUNNING; ``stop(grace)`` ends the thread
    (trials keep running as jobs: at the next start the sweep takes them up again)."""

    def __init__(self, manager: JobManager, db: SweepDB, folder: Path, poll_s: float = POLL_S) -> None:
        """``folder``: where each sweep's packed working_dir is kept for its trials."""
        self._jobs, self._db, self._folder, self._poll_s = manager, db, folder, poll_s
        self._active: dict[str, _Active] = {}  # the thread's own
        self._calls: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> SweepRunner:
        for rec in self._db.sweeps(states=[SweepState.RUNNING]):
            try:
                self._active[rec.id] = self._resume(rec)
            except GradhubError as e:  # e.g. a stored spec that no longer validates: that sweep only
                log.exception("sweep %s: cannot resume", rec.id)
                self._db.update_sweep(rec.id, state=SweepState.FAILED, reason=f"cannot resume: {e}",
                                      finished_at=time.time())
        self._jobs.add_listener(self._wake.set)
        self._thread = threading.Thread(target=self._loop, name="gradhub-sweeps", daemon=True)
        self._thread.start()
        return self

    def stop(self, grace: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=grace)
        while not self._calls.empty():
            _, future = self._calls.get_nowait()
            future.set_exception(StateError("server: shutting down, not accepting sweeps"))

    # ------------------------------------------------------------ the API
    def submit(self, spec: SweepSpec, working_dir_zip: bytes | None = None, owner: str = "") -> SweepView:
        """Start a sweep of ``owner``: its first trials are queued before this returns (a trial job
        that the cluster or the owner's quota could never take refuses the whole sweep)."""
        sweep_id = self._call(lambda: self._start_sweep(spec, working_dir_zip, owner))
        return self.get(sweep_id)

    def cancel(self, sweep_id: str, reason: str = "cancelled by user") -> SweepView:
        """Cancel the sweep's running trials and end it CANCELLED (an ended sweep stays as it is)."""
        self._db.get_sweep(sweep_id)  # NotFoundError first
        self._call(lambda: self._cancel(sweep_id, reason))
        return self.get(sweep_id)

    def owner(self, sweep_id: str) -> str:
        return self._db.get_sweep(sweep_id).owner

    def get(self, sweep_id: str) -> SweepView:
        rec = self._db.get_sweep(sweep_id)
        spec = SweepSpec.from_json(rec.spec_json)
        views = []
        for t in leaderboard(self._db.trials(sweep_id), spec.objective.mode):
            job_state, step, total = "", t.step, 0
            if t.job_id:
                try:
                    job = self._jobs.get(t.job_id).record
                    job_state, total = str(job.state), job.total_steps
                    step = job.step if t.state is TrialState.RUNNING else t.step
                except NotFoundError:
                    job_state = "deleted"
            views.append(TrialView(t, job_state, step, total))
        complete = [v.record for v in views if v.record.state is TrialState.COMPLETE]
        return SweepView(rec, spec, tuple(views), complete[0].number if complete else None)

    def list_sweeps(self) -> list[SweepRecord]:
        return self._db.sweeps()

    def _call(self, fn: Callable[[], T]) -> T:
        if self._stopping or self._thread is None:
            raise StateError("server: shutting down, not accepting sweeps")
        future: Future[T] = Future()
        self._calls.put((fn, future))
        self._wake.set()
        return future.result(timeout=CALL_TIMEOUT_S)

    # ------------------------------------------------------------ the thread
    def _loop(self) -> None:
        while not self._stopping:
            self._wake.wait(self._poll_s)
            self._wake.clear()  # before the work: a change during it wakes the next round
            while not self._stopping:
                try:
                    fn, future = self._calls.get_nowait()
                except queue.Empty:
                    break
                try:
                    future.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - the caller gets it
                    future.set_exception(e)
            for active in list(self._active.values()):
                if self._stopping:
                    return
                try:
                    self._step(active)
                except ServerUnavailableError as e:  # a busy database: the next round tries again
                    log.warning("sweep %s: %s", active.record.id, e)
                except Exception as e:
                    log.exception("sweep %s crashed", active.record.id)
                    self._end(active, SweepState.FAILED, f"internal error: {type(e).__name__}: {e}")

    def _start_sweep(self, spec: SweepSpec, working_dir_zip: bytes | None, owner: str) -> str:
        sweep_id = "s-" + uuid.uuid4().hex[:10]
        workdir = None
        if working_dir_zip:
            self._folder.mkdir(parents=True, exist_ok=True)
            path = self._folder / f"{sweep_id}.zip"
            tmp = path.with_suffix(".part")
            tmp.write_bytes(working_dir_zip)
            tmp.replace(path)
            workdir = str(path)
        seed = spec.seed if spec.seed is not None else secrets.randbelow(2**31)
        rec = SweepRecord(id=sweep_id, name=spec.name, spec_json=spec.to_json(), seed=seed, owner=owner,
                          working_dir=workdir)
        self._db.insert_sweep(rec)
        active = _Active(rec, spec, Search(spec, seed), {}, zip=working_dir_zip)
        refused = self._launch(active)
        if refused is not None:  # the first trial's job cannot run here: neither can the sweep
            self._db.delete_sweep(sweep_id)
            if workdir:
                Path(workdir).unlink(missing_ok=True)
            raise refused
        self._active[sweep_id] = active
        log.info("sweep %s: started by %s: %d trials, %d at once, search %s, prune %s", sweep_id,
                 owner or "anonymous", spec.trials, spec.parallel, spec.search.name, spec.prune.name)
        self._step(active)
        return sweep_id

    def _resume(self, rec: SweepRecord) -> _Active:
        spec = SweepSpec.from_json(rec.spec_json)
        trials = {t.number: t for t in self._db.trials(rec.id)}
        past = [PastTrial(t.number, t.state, t.internal, t.value, t.intermediate, t.notes) for t in trials.values()]
        zip_bytes = Path(rec.working_dir).read_bytes() if rec.working_dir else None
        active = _Active(rec, spec, Search(spec, rec.seed, past), trials, zip=zip_bytes)
        for t in active.running():
            if not t.job_id:  # stopped between the trial's record and its job: find or submit the job
                found = [j for j in self._jobs.db.list() if j.name == _job_name(rec.id, t.number)]
                if found:
                    active.trials[t.number] = self._db.update_trial(rec.id, t.number, job_id=found[0].id)
                else:
                    self._submit(active, active.trials[t.number])
        log.info("sweep %s: resumed with %d of %d trials started", rec.id, len(trials), spec.trials)
        return active

    def _cancel(self, sweep_id: str, reason: str) -> None:
        active = self._active.get(sweep_id)
        if active is None:
            return  # ended already
        for t in active.running():
            if t.job_id:
                self._jobs.cancel(t.job_id, f"sweep {sweep_id} cancelled: {reason}")
            self._finish(active, t, TrialState.FAILED, reason=f"sweep cancelled: {reason}")
        self._end(active, SweepState.CANCELLED, reason)

    def _step(self, a: _Active) -> None:
        """Look at each running trial's job (evaluations, end), then fill the free slots, then end
        the sweep when every trial has ended."""
        for t in a.running():
            if t.job_id:
                self._watch(a, t)
        while len(a.running()) < a.spec.parallel and len(a.trials) < a.spec.trials:
            self._launch(a)  # a refused trial ends FAILED, and the next one takes its slot
        if len(a.trials) >= a.spec.trials and not a.running():
            complete = [t for t in a.trials.values() if t.state is TrialState.COMPLETE]
            if complete:
                self._end(a, SweepState.SUCCEEDED, "")
            else:
                self._end(a, SweepState.FAILED, f"no trial completed ({len(a.trials)} ended: pruned or failed; "
                                                "see each trial's reason with gradhub status SWEEP)")

    def _watch(self, a: _Active, t: TrialRecord) -> None:
        metric = a.spec.objective.metric
        try:
            job = self._jobs.get(t.job_id).record
            points = self._jobs.points(t.job_id, a.seen.get(t.number, 0))
        except NotFoundError:
            self._finish(a, t, TrialState.FAILED, reason=f"its job {t.job_id} was deleted")
            return
        intermediate = dict(t.intermediate)
        for p in points:
            a.seen[t.number] = p.seq
            if p.kind != "eval" or metric not in p.metrics or t.number in a.pruning:
                continue
            value = float(p.metrics[metric])
            intermediate[p.step] = value
            # its final evaluation, or a job that has trained its last step since: nothing to save
            last = bool(job.total_steps) and max(p.step, job.step) >= job.total_steps
            if a.search.report(t.number, p.step, value) and not job.state.terminal and not last:
                # the trial ends when its job does: PRUNED once the cancel took (its slot frees
                # then), or COMPLETE if the job's last step beat the cancel
                why = (f"pruned by sweep {a.record.id} ({a.spec.prune.name}): {metric} {value:.4g} at step "
                       f"{p.step} is behind the other trials")
                a.pruning[t.number] = why
                job = self._jobs.cancel(t.job_id, why).record
                log.info("sweep %s: trial %d (%s) %s", a.record.id, t.number, t.job_id, why)
        why = a.pruning.get(t.number, "")
        if job.state is JobState.CANCELLED and why:
            self._finish(a, t, TrialState.PRUNED, intermediate=intermediate, metrics=job.metrics, step=job.step,
                         reason=why)
        elif job.state is JobState.SUCCEEDED:
            if metric in job.metrics:
                self._finish(a, t, TrialState.COMPLETE, value=float(job.metrics[metric]), intermediate=intermediate,
                             metrics=job.metrics, step=job.step)
            else:
                self._finish(a, t, TrialState.FAILED, intermediate=intermediate, metrics=job.metrics, step=job.step,
                             reason=f"its job reported no {metric} (it reported {', '.join(sorted(job.metrics))})")
        elif job.state.terminal:
            self._finish(a, t, TrialState.FAILED, intermediate=intermediate, metrics=job.metrics, step=job.step,
                         reason=f"its job {job.state}: {job.reason}")
        elif intermediate != t.intermediate:
            a.trials[t.number] = self._db.update_trial(a.record.id, t.number, intermediate=intermediate)

    def _launch(self, a: _Active) -> GradhubError | None:
        """Ask the search for the next trial and queue its job; the error when the manager refused it."""
        number = len(a.trials)
        sample = a.search.ask(number)
        rec = TrialRecord(sweep_id=a.record.id, number=number, params=sample.values, internal=sample.internal,
                          notes=sample.notes)
        self._db.add_trial(rec)
        a.trials[number] = rec
        return self._submit(a, rec)

    def _submit(self, a: _Active, t: TrialRecord) -> GradhubError | None:
        try:
            spec = a.spec.trial_spec(t.params, _job_name(a.record.id, t.number))
            view = self._jobs.submit(spec, a.zip, a.record.owner)
        except StateError:
            return None  # the server is stopping: the trial's job is submitted at the next start
        except (SpecError, ResourceExhaustedError) as e:
            self._finish(a, t, TrialState.FAILED, reason=f"its job was refused: {e}")
            return e
        a.trials[t.number] = self._db.update_trial(a.record.id, t.number, job_id=view.record.id)
        return None

    def _finish(self, a: _Active, t: TrialRecord, state: TrialState, value: float | None = None,
                **changes: Any) -> None:
        kept = a.search.tell(t.number, state, value)
        a.seen.pop(t.number, None)
        a.pruning.pop(t.number, None)
        a.trials[t.number] = self._db.update_trial(a.record.id, t.number, state=state, value=kept,
                                                   finished_at=time.time(), **changes)

    def _end(self, a: _Active, state: SweepState, reason: str) -> None:
        self._active.pop(a.record.id, None)
        self._db.update_sweep(a.record.id, state=state, reason=reason, finished_at=time.time())
        log.info("sweep %s: %s%s", a.record.id, state, f": {reason}" if reason else "")
        self._jobs.notify()  # watchers of the sweep wake with the jobs' listeners


def _job_name(sweep_id: str, number: int) -> str:
    """A trial's job name: its sweep and number (``gradhub status`` shows which sweep a job is in)."""
    return f"{sweep_id}-t{number}"
