"""Elastic jobs (``workers: {min, max}``) scaled down and up while they run, in every mode,
through the real server (port 0), real Ray workers and ``Client.scale``.

An elastic job keeps its global batch (``workers.max`` x ``batch_size``) whatever its size, cut
into one slice per worker, so a synchronous job ends with the parameters of single-process
PyTorch on the same global batches however it was scaled (ps-sync, allreduce). The job is held
at chosen steps by its dataset (a sample that waits for a file, see ``gh_zoo.gated_digits``), so
every change of size lands at a known step boundary, which the job's log records.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from gradhub.client.client import Client, JobInfo
from gradhub.server.app import Server
from gradhub.worker.data import global_batch_indices

from ..conftest import final_params, wait_for
from .test_exactness import OPTIMIZERS, SEED, STEPS, reference

USER_CODE = Path(__file__).parent / "user_code"
TRAIN, BATCH, LARGEST = 1437, 16, 3  # digits' training samples
# the steps the job is held at (in its first epoch: a gated sample is read there first): it
# shrinks to one worker after the first and grows back after the second
DOWN_AT, UP_AT = 10, 20
WAIT_S = 120.0


def first_read(step: int, lo: int = 0, hi: int = LARGEST * BATCH, largest: int = LARGEST) -> int:
    """A sample of global batch ``step`` (of a job of ``largest`` workers), within its positions
    ``lo..hi``, that no earlier step reads."""
    earlier = {int(i) for s in range(step) for i in global_batch_indices(TRAIN, largest * BATCH, SEED, s)}
    batch = global_batch_indices(TRAIN, largest * BATCH, SEED, step)[lo:hi]
    return next(int(i) for i in batch if int(i) not in earlier)


def spec(mode: str, gates: dict[int, Path], shards: int = 1) -> dict:
    return {"name": f"elastic-{mode}", "mode": mode, "workers": {"min": 1, "max": LARGEST}, "ps_shards": shards,
            "resources": {"cpus": 0.5}, "model": {"name": "mlp", "args": {"hidden": [32]}},
            "dataset": {"factory": "gh_zoo:gated_digits", "args": {"gates": {str(k): str(v) for k, v in gates.items()}}},
            "working_dir": str(USER_CODE), "optimizer": OPTIMIZERS["adam"], "batch_size": BATCH, "steps": STEPS,
            "seed": SEED, "max_restarts": 0}


def _table(server: Server, job_id: str):  # -> ParameterStore | GroupTracker
    run = next(r for r in server.manager.running() if r.id == job_id)
    assert run.state is not None
    return run.state


def _asked(server: Server, job_id: str, size: int) -> None:
    """Wait until the job's controller has asked its store or tracker for ``size`` workers."""
    wait_for(lambda: _table(server, job_id).target == size, WAIT_S, f"the controller to ask for {size} workers")


def _heard(server: Server, job_id: str) -> None:
    """allreduce: wait until every member's heartbeat was answered after the group was asked to
    re-form (the answer says so; the members agree on it at their next step boundary)."""
    table = _table(server, job_id)
    wait_for(table.regroup_due, WAIT_S, "the tracker to ask the group to re-form")
    asked = time.monotonic()
    wait_for(lambda: all(w.last_seen > asked for w in table.workers()[:table.size]), WAIT_S,
             "every member's next heartbeat")


def _phases(client: Client, job_id: str) -> list[str]:
    return [w.state for w in client.get_job(job_id).workers]


def _finished(client: Client, job_id: str, down_at: int, up_at: int) -> JobInfo:
    """Wait for the job's end: it succeeded, its log says it ran on 1 worker from ``down_at``
    and on all of them from ``up_at``, and nobody died."""
    info = client.get_job(job_id)
    for info in client.watch(job_id, timeout=WAIT_S):
        pass
    logs = "\n".join(client.logs(job_id))
    assert info.state == "SUCCEEDED", (info.reason, logs)
    assert f"size: 1 workers from step {down_at}" in logs, logs
    assert f"size: {LARGEST} workers from step {up_at}" in logs, logs
    assert all(w.restarts == 0 for w in info.workers) and " died " not in logs, logs
    return info


def _at(client: Client, job_id: str, step: int) -> JobInfo:
    info = client.get_job(job_id)
    return info if info.state == "RUNNING" and info.step >= step else None  # type: ignore[return-value]


@pytest.mark.timeout(300)
# the default suite runs ps-sync with two shards: its control store takes every decision a
# one-store job's store takes, and its shards follow; CI runs the one-store job too (matrix)
@pytest.mark.parametrize(("mode", "shards"), [pytest.param("ps-sync", 1, marks=pytest.mark.matrix), ("ps-sync", 2),
                                              ("allreduce", 1)], ids=["ps-sync", "ps-sync-2-shards", "allreduce"])
def test_a_synchronous_job_scaled_down_and_up_equals_single_process_pytorch(server, tmp_path, mode, shards):
    """(With shards, each follows the size the server's control store decides: from the
    first push of each step.)"""
    down, up = tmp_path / "down", tmp_path / "up"
    with Client(server.address) as client:
        job = client.submit(spec(mode, {first_read(DOWN_AT): down, first_read(UP_AT): up}, shards))
        wait_for(lambda: _at(client, job.id, DOWN_AT) is not None, WAIT_S, f"the job to reach step {DOWN_AT}")
        assert client.get_job(job.id).size == LARGEST
        info = client.scale(job.id, 1)
        assert info.target_size == 1 and info.size == LARGEST, "it shrinks at the next step boundary"
        _asked(server, job.id, 1)
        if mode == "allreduce":
            _heard(server, job.id)
        down.touch()
        wait_for(lambda: _at(client, job.id, UP_AT) is not None, WAIT_S, f"the job to reach step {UP_AT}")
        assert client.get_job(job.id).size == 1
        wait_for(lambda: _phases(client, job.id) == ["running", "idle", "idle"], WAIT_S, "workers 1 and 2 to leave")
        client.scale(job.id, LARGEST)
        _asked(server, job.id, LARGEST)
        if mode == "allreduce":
            _heard(server, job.id)
        else:  # ps-sync grows at the first step boundary after its new workers registered
            wait_for(lambda: _phases(client, job.id) == ["running"] * LARGEST, WAIT_S, "the new workers to register")
        up.touch()
        info = _finished(client, job.id, DOWN_AT + 1, UP_AT + 1)
        got = final_params(client, info, tmp_path)
    expected = reference(LARGEST, OPTIMIZERS["adam"])
    worst = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    assert worst <= 1e-5, f"max |gradhub - pytorch| = {worst:.3g} after scaling {mode} down and up"


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("mode", "shards"), [pytest.param("ps-async", 1, marks=pytest.mark.matrix), ("ps-async", 2),
                                              pytest.param("ps-ssp", 1, marks=pytest.mark.matrix)],  # in CI
                         ids=["ps-async", "ps-async-2-shards", "ps-ssp"])
def test_an_asynchronous_job_lets_workers_leave_and_join_without_restarting_anyone(server, tmp_path, mode, shards):
    """(With shards, a push goes to the server's control store first, which decides who is in:
    a worker that leaves has its last push refused everywhere.)"""
    down, up = tmp_path / "down", tmp_path / "up"
    # every worker's first sample at DOWN_AT waits (each holds one slice of the global batch);
    # at UP_AT the one worker left reads the whole global batch
    gates = {first_read(DOWN_AT, r * BATCH, (r + 1) * BATCH): down for r in range(LARGEST)}
    gates[first_read(UP_AT)] = up
    with Client(server.address) as client:
        job = client.submit(spec(mode, gates, shards))
        wait_for(lambda: _at(client, job.id, DOWN_AT) is not None, WAIT_S, f"the job to reach step {DOWN_AT}")
        client.scale(job.id, 1)
        _asked(server, job.id, 1)
        assert client.get_job(job.id).size == 1, "an asynchronous job changes size at once"
        down.touch()
        wait_for(lambda: _at(client, job.id, UP_AT) is not None, WAIT_S, f"worker 0 to reach step {UP_AT}")
        wait_for(lambda: _phases(client, job.id) == ["running", "idle", "idle"], WAIT_S, "workers 1 and 2 to leave")
        if shards > 1:  # (worker 0 waits at UP_AT) the leavers' last pushes went nowhere, or everywhere
            wait_for(lambda: len({s.version for s in client.get_job(job.id).shards}) == 1, WAIT_S,
                     "the control store and every shard to have taken the same pushes")
        client.scale(job.id, LARGEST)
        wait_for(lambda: _phases(client, job.id) == ["running"] * LARGEST, WAIT_S, "the new workers to join")
        up.touch()
        info = _finished(client, job.id, DOWN_AT, UP_AT)
        # updates: worker 0 did every step; 1 and 2 the steps before they left and, from where
        # worker 0 was when they joined again, the rest
        assert info.version == STEPS + 2 * DOWN_AT + 2 * (STEPS - UP_AT), "\n".join(client.logs(info.id))
        got = final_params(client, info, tmp_path)
    assert all(torch.isfinite(t).all() for t in got.values())
