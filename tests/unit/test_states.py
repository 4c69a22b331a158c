"""Job states and worker phases: the transition tables, enforced where state is written."""

from __future__ import annotations

import pytest

from gradhub.proto.contract.errors import StateError
from gradhub.proto.contract.states import JOB_TRANSITIONS, WORKER_TRANSITIONS, JobState, WorkerPhase
from gradhub.proto.v1 import jobs_pb2
from gradhub.server.job_db import JobDB, JobRecord


def test_job_states_match_the_proto_and_compare_as_strings() -> None:
    names = [v.name for v in jobs_pb2.DESCRIPTOR.enum_types_by_name["JobState"].values]
    assert [s.value for s in JobState] == names[1:]  # after JOB_STATE_UNSPECIFIED
    assert JobState.FAILED == "FAILED" and f"{JobState.FAILED}" == "FAILED"
    assert {s for s in JobState if s.terminal} == {"SUCCEEDED", "FAILED", "CANCELLED"}


def test_every_state_has_a_row_and_terminal_states_are_final() -> None:
    assert set(JOB_TRANSITIONS) == set(JobState) and set(WORKER_TRANSITIONS) == set(WorkerPhase)
    for state in JobState:
        assert (JOB_TRANSITIONS[state] == frozenset()) == state.terminal


@pytest.mark.parametrize(("old", "new"), [("QUEUED", "RUNNING"), ("RUNNING", "SUCCEEDED"), ("RUNNING", "QUEUED"),
                                          ("QUEUED", "CANCELLED"), ("QUEUED", "FAILED")])
def test_allowed_job_transitions(old: str, new: str) -> None:
    assert JobState(old).to(new) is JobState(new)


@pytest.mark.parametrize(("old", "new"), [("SUCCEEDED", "RUNNING"), ("FAILED", "QUEUED"), ("QUEUED", "SUCCEEDED"),
                                          ("CANCELLED", "FAILED")])
def test_forbidden_job_transitions_raise(old: str, new: str) -> None:
    with pytest.raises(StateError, match=rf"job state: {old} -> {new} is not an allowed transition"):
        JobState(old).to(new)


def test_worker_phases() -> None:
    assert WorkerPhase.STARTING.to("running") is WorkerPhase.RUNNING
    assert WorkerPhase.RUNNING.to(WorkerPhase.RUNNING) is WorkerPhase.RUNNING  # a retried Register
    for phase in (WorkerPhase.DONE, WorkerPhase.FAILED, WorkerPhase.LOST):
        assert phase.to(WorkerPhase.RESTARTING) is WorkerPhase.RESTARTING  # a group restart
        with pytest.raises(StateError, match=f"worker state: {phase} -> running"):
            phase.to(WorkerPhase.RUNNING)
    with pytest.raises(ValueError, match="'dead' is not a valid WorkerPhase"):
        WorkerPhase.RUNNING.to("dead")


def test_the_job_db_enforces_the_table(tmp_path) -> None:
    with JobDB(tmp_path / "jobs.db") as db:
        db.insert(JobRecord(id="j", name="n", mode="ps-sync", spec_json="{}", state="QUEUED"))
        assert db.update("j", state=JobState.RUNNING).state is JobState.RUNNING
        assert db.update("j", state="RUNNING", step=3).step == 3  # the same state is no transition
        db.update("j", state=JobState.SUCCEEDED, reason="")
        with pytest.raises(StateError, match="SUCCEEDED -> RUNNING"):
            db.update("j", state=JobState.RUNNING, step=9)
        rec = db.get("j")
        assert rec.state is JobState.SUCCEEDED and rec.step == 3  # nothing of the refused update landed
