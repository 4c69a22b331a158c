"""MaxRestarts: which failure leads to which decision, counted per worker, and what it says."""

from __future__ import annotations

from gradhub.server.policies import Failure, FailureDecision, FailureKind, MaxRestarts

R, G, F = FailureDecision.RESTART_WORKER, FailureDecision.RESTART_GROUP, FailureDecision.FAIL


def test_deaths_and_hangs_count_per_worker_against_max_restarts() -> None:
    policy = MaxRestarts(max_restarts=2, world_size=2)
    decisions = [policy.decide(Failure(rank, kind, "x")) for rank, kind in [
        (0, FailureKind.DEATH), (1, FailureKind.HANG), (0, FailureKind.HANG), (1, FailureKind.DEATH),
        (0, FailureKind.DEATH)]]
    assert decisions == [R, R, R, R, F]
    assert policy.deaths == [3, 2]


def test_a_workers_own_error_fails_at_once_and_is_not_counted() -> None:
    policy = MaxRestarts(max_restarts=5, world_size=2)
    failure = Failure(1, FailureKind.USER_ERROR, "worker 1 failed at training step 3: ValueError: bad")
    assert policy.decide(failure) == F
    assert policy.deaths == [0, 0]
    assert policy.explain(failure) == "worker 1 failed at training step 3: ValueError: bad"


def test_a_lost_group_restarts_the_group_within_its_own_budget() -> None:
    policy = MaxRestarts(max_restarts=1, world_size=2)
    lost = Failure(0, FailureKind.LOST_PEER, "rendezvous timed out")
    assert policy.decide(lost) == G
    assert policy.explain(lost) == "worker 0 lost its peers (rendezvous timed out); restarting the group (1 of 1)"
    assert policy.decide(lost) == F
    assert policy.explain(lost).endswith("the group was restarted 1 times (max_restarts is 1)")
    assert policy.deaths == [0, 0]


def test_a_lost_shard_restarts_the_job_from_its_checkpoint_within_the_group_budget() -> None:
    policy = MaxRestarts(max_restarts=1, world_size=2)
    lost = Failure(0, FailureKind.SHARD_LOST, "parameter-server shard 1 died")
    assert policy.decide(lost) == G
    assert policy.explain(lost) == ("parameter-server shard 1 died; every shard and worker starts again from the "
                                    "latest checkpoint (restart 1 of 1)")
    assert policy.decide(lost) == F
    assert policy.explain(lost).endswith("the job was restarted 1 times (max_restarts is 1)")
    assert policy.deaths == [0, 0]


def test_no_restarts_when_max_restarts_is_0() -> None:
    policy = MaxRestarts(max_restarts=0, world_size=1)
    death = Failure(0, FailureKind.DEATH, "killed")
    assert policy.decide(death) == F
    assert policy.explain(death) == "worker 0 died 1 times (max_restarts is 0): killed"


def test_explain_counts_the_restart_it_decided() -> None:
    policy = MaxRestarts(max_restarts=3, world_size=2)
    hang = Failure(1, FailureKind.HANG, "silent for 21 s")
    policy.decide(hang)
    assert policy.explain(hang) == "worker 1 hung (silent for 21 s); restart 1 of 3"
