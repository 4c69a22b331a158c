"""The job queue: strict FIFO on Ray resources, with the session's local Ray (2 logical CPUs).

A job starts when it is at the head of the queue and fits beside the running ones; a job
behind it never jumps it, even when it would fit. A job that could never fit is refused at
submit, and one that no longer fits after a restart on a smaller cluster fails rather than
stall the queue; a queued job can be cancelled and then never starts. Order is read from the
jobs' records (started_at, finished_at).
"""

from __future__ import annotations

import json

import grpc
import pytest

from gradhub.client.client import Client, JobInfo
from gradhub.proto.contract.errors import SpecError
from gradhub.proto.v1 import jobs_pb2, jobs_pb2_grpc
from gradhub.server.app import Server
from gradhub.server.config import ServerConfig
from gradhub.server.launcher import ExternalLauncher

from ..conftest import wait_for


def spec(name: str, workers: int, cpus: float, steps: int, **extra: object) -> dict:
    return {"name": name, "mode": "ps-sync", "workers": workers, "resources": {"cpus": cpus, **extra},
            "model": {"name": "mlp", "args": {"hidden": [32]}}, "dataset": "digits",
            "optimizer": {"name": "sgd", "lr": 0.05}, "batch_size": 16, "steps": steps}


@pytest.mark.timeout(240)
def test_fifo_a_job_behind_the_head_does_not_jump_it(client: Client) -> None:
    # A takes 1.5 of the 2 CPUs: C (0.5) would fit beside it, B (2) would not.
    a = client.submit(spec("a", workers=1, cpus=1.5, steps=300)).id
    b = client.submit(spec("b", workers=2, cpus=1, steps=100)).id
    c = client.submit(spec("c", workers=1, cpus=0.5, steps=100)).id
    d = client.submit(spec("d", workers=1, cpus=0.5, steps=100)).id
    wait_for(lambda: client.get_job(a).state != "QUEUED", 30, "job a to start")
    now = {j: client.get_job(j) for j in (a, b, c, d)}
    if now[a].state == "RUNNING":  # the live view while A runs (the records below prove it anyway)
        assert [now[j].state for j in (b, c, d)] == ["QUEUED"] * 3, now

    cancelled = client.cancel(d)
    assert cancelled.state == "CANCELLED" and cancelled.reason == "cancelled by user"
    assert cancelled.started_at is None and cancelled.finished_at is not None

    done: dict[str, JobInfo] = {j: client.job(j).wait(timeout=180) for j in (a, b, c)}
    assert all(info.state == "SUCCEEDED" for info in done.values()), done
    ra, rb, rc = done[a], done[b], done[c]
    assert ra.finished_at is not None and rb.started_at is not None and rc.started_at is not None
    assert ra.finished_at <= rb.started_at, "b started before a ended"
    assert rb.started_at - ra.finished_at < 10, "b did not start as soon as a ended"
    assert rc.started_at >= rb.started_at, "c jumped b"
    assert rc.started_at >= ra.finished_at, "c started beside a although b was ahead of it"
    assert rb.finished_at is not None and rc.started_at >= rb.finished_at  # c does not fit beside b

    never = client.get_job(d)
    assert never.state == "CANCELLED" and never.started_at is None and never.step == 0 and not never.workers
    assert client.list_checkpoints(d) == []
    log = list(client.logs(d))
    assert any("CANCELLED: cancelled by user" in line for line in log), log
    assert len(log) == 2 and "submitted" in log[0], log  # nothing happened between the two


@pytest.mark.timeout(120)
def test_four_workers_of_half_a_cpu_fill_the_cluster_and_run(client: Client) -> None:
    info = client.submit(spec("four", workers=4, cpus=0.5, steps=20)).wait(timeout=90)
    assert info.state == "SUCCEEDED" and info.step == info.version == 20


def _cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


@pytest.mark.parametrize("case", ["cpus", "gpus"])
def test_a_job_larger_than_the_cluster_is_refused_at_submit(client: Client, server, case: str) -> None:
    if case == "cpus":
        too_big = spec("too-big", workers=3, cpus=1, steps=10)
        asked, has = ["3 workers x {CPU: 1}", "= {CPU: 3}"], "the cluster has {CPU: 2}"
    else:  # more GPUs than the cluster has (none on a CPU-only machine)
        gpus = _cluster_gpus() + 1
        too_big = spec("too-big", workers=gpus, cpus=0.5, steps=10, gpus=1)
        asked, has = [f"{gpus} workers x {{CPU: 0.5, GPU: 1}}"], f"GPU: {gpus - 1}}}"
    before = len(client.list_jobs())
    with pytest.raises(SpecError) as err:
        client.submit(too_big)
    assert err.value.field == "resources"
    for fragment in [*asked, has, "lower workers or resources"]:
        assert fragment in str(err.value), str(err.value)
    # the status code on the wire, for clients other than ours
    stub = jobs_pb2_grpc.JobServiceStub(grpc.insecure_channel(server.address))
    with pytest.raises(grpc.RpcError) as raw:
        stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_json=json.dumps(too_big)), timeout=10)
    assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raw.value.details().startswith("resources: ")
    assert len(client.list_jobs()) == before


def test_a_queued_job_too_big_for_the_cluster_after_a_restart_fails_instead_of_blocking(tmp_path) -> None:
    """Jobs queued (or running) on a 4-CPU cluster, the server restarted on a 2-CPU one: the
    jobs that can no longer fit end FAILED naming resources, and the queue moves on."""
    data = tmp_path / "data"
    with (Server(ServerConfig(port=0, data_dir=data), launcher=ExternalLauncher({"CPU": 4.0})) as big,
          Client(big.address) as client):
        running = client.submit(spec("running", workers=2, cpus=2, steps=10)).id
        queued = client.submit(spec("queued", workers=1, cpus=3, steps=10)).id
        wait_for(lambda: client.get_job(running).state == "RUNNING", 30, "the first job to start")
        assert client.get_job(queued).state == "QUEUED"
    with (Server(ServerConfig(port=0, data_dir=data, node_join_grace_s=0),
                 launcher=ExternalLauncher({"CPU": 2.0})) as small,
          Client(small.address) as client):
        behind = client.submit(spec("behind", workers=1, cpus=1, steps=10)).id
        wait_for(lambda: client.get_job(behind).state == "RUNNING", 30, "the job behind them to start")
        for job_id, asked in ((running, "2 workers x {CPU: 2} = {CPU: 4}"), (queued, "= {CPU: 3}")):
            info = client.get_job(job_id)
            assert info.state == "FAILED", info
            assert info.reason.startswith("resources: ") and asked in info.reason, info.reason
            assert "the cluster has {CPU: 2}" in info.reason, info.reason
