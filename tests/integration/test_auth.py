"""A server started with a token: every JobService RPC needs ``authorization: Bearer <token>``,
and every WorkerControl and ParameterServer RPC the credential that the job's launcher gave its
workers (workers hold no user token; a user's token gives no worker's rights, and a job's
credential no user's).

Without them, or with wrong ones, each RPC gets UNAUTHENTICATED and changes nothing: no job
appears, none is cancelled, no log line or metric is written, the parameters, the workers'
clocks and registrations stay as they were. With the right ones the same requests are served,
and a real job on Ray workers runs to SUCCEEDED. Users and roles are in test_users.py, the
CLI's side in test_cli.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch

from gradhub.client.client import Client
from gradhub.proto.codec import Layout, as_bytes, iter_chunks
from gradhub.proto.contract.errors import JOB_CREDENTIAL_KEY, AuthError
from gradhub.proto.v1 import jobs_pb2, jobs_pb2_grpc, ps_pb2, ps_pb2_grpc, tensor_pb2
from gradhub.server.app import Server
from gradhub.server.config import ServerConfig
from gradhub.server.launcher import ExternalLauncher

from ..conftest import final_params, wait_for

TOKEN = "s3cret"
GOOD = (("authorization", f"Bearer {TOKEN}"),)
BAD_METADATA = {
    "no token": None,
    "wrong token": (("authorization", "Bearer wrong"),),
    "no Bearer scheme": (("authorization", TOKEN),),
    "empty token": (("authorization", "Bearer "),),
    "token in another header": (("x-token", f"Bearer {TOKEN}"),),
}
LAYOUT = Layout(("fc.weight", "fc.bias"), ((4, 3), (4,)))
F32 = tensor_pb2.FLOAT32
SPEC = {"name": "auth", "workers": 2, "model": "mlp", "dataset": "digits", "steps": 10,
        "resources": {"cpus": 1}}


# --- a token server whose workers are the test itself ---------------------------------------


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = ServerConfig(port=0, data_dir=tmp_path_factory.mktemp("auth-idle"), token=TOKEN)
    with Server(config, launcher=ExternalLauncher({"CPU": 8.0})) as s:
        yield s


@pytest.fixture(scope="module")
def stubs(idle_server: Server) -> Iterator[tuple[jobs_pb2_grpc.JobServiceStub, ps_pb2_grpc.ParameterServerStub,
                                                 ps_pb2_grpc.WorkerControlStub]]:
    channel = grpc.insecure_channel(idle_server.address)
    yield (jobs_pb2_grpc.JobServiceStub(channel), ps_pb2_grpc.ParameterServerStub(channel),
           ps_pb2_grpc.WorkerControlStub(channel))
    channel.close()


@pytest.fixture(scope="module")
def job(idle_server: Server, stubs) -> str:
    """A RUNNING ps-sync job of 2 workers; worker 0 registered and sent the initial parameters."""
    jobs, ps, control = stubs
    job_id = jobs.SubmitJob(jobs_pb2.SubmitJobRequest(spec_json=json.dumps(SPEC)), timeout=10,
                            metadata=GOOD).job.id
    wait_for(lambda: jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=10,
                                 metadata=GOOD).job.state == jobs_pb2.RUNNING, 30, "the job to run")
    worker = GOOD + ((JOB_CREDENTIAL_KEY, idle_server.manager.job_credential(job_id)),)
    reg = control.Register(ps_pb2.RegisterRequest(job_id=job_id, rank=0, total_steps=10, train_size=100),
                           timeout=10, metadata=worker)
    assert reg.needs_init
    ps.InitParameters(push_stream(job_id, 0, initial()), timeout=10, metadata=worker)
    return job_id


WORKER_METHODS = {m.name for name in ("ParameterServer", "WorkerControl")
                  for m in ps_pb2.DESCRIPTOR.services_by_name[name].methods}


def initial() -> torch.Tensor:
    return torch.arange(LAYOUT.numel, dtype=torch.float32)


def push_stream(job_id: str, rank: int, flat: torch.Tensor, step: int = 0) -> Iterator[ps_pb2.PushChunk]:
    yield ps_pb2.PushChunk(header=ps_pb2.PushHeader(job_id=job_id, rank=rank, step=step, base_version=0,
                                                    tensors=LAYOUT.metas(F32)))
    for chunk in iter_chunks(memoryview(bytes(as_bytes(flat))), 16):
        yield ps_pb2.PushChunk(data=chunk)


def every_rpc(jobs: jobs_pb2_grpc.JobServiceStub, ps: ps_pb2_grpc.ParameterServerStub,
              control: ps_pb2_grpc.WorkerControlStub, job_id: str,
              credential: str = "") -> dict[str, Callable[[Any], object]]:
    """Each RPC of the three services with a request that would be served (and would change
    something) if it were authenticated; called with the metadata to send."""
    spec = json.dumps({**SPEC, "name": "intruder"})
    grad = torch.ones(LAYOUT.numel)

    def w(md: Any) -> Any:  # a worker's call: the metadata plus the job's credential
        return tuple(md or ()) + ((JOB_CREDENTIAL_KEY, credential),)

    return {
        "SubmitJob": lambda md: jobs.SubmitJob(jobs_pb2.SubmitJobRequest(spec_json=spec), timeout=10, metadata=md),
        "GetJob": lambda md: jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=10, metadata=md),
        "ListJobs": lambda md: jobs.ListJobs(jobs_pb2.ListJobsRequest(), timeout=10, metadata=md),
        "CancelJob": lambda md: jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=job_id), timeout=10, metadata=md),
        "DeleteJob": lambda md: jobs.DeleteJob(jobs_pb2.DeleteJobRequest(job_id=job_id), timeout=10, metadata=md),
        "ScaleJob": lambda md: jobs.ScaleJob(jobs_pb2.ScaleJobRequest(job_id=job_id, workers=1), timeout=10,
                                             metadata=md),
        "WatchJob": lambda md: next(jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), timeout=10, metadata=md)),
        "ListCheckpoints": lambda md: jobs.ListCheckpoints(jobs_pb2.ListCheckpointsRequest(job_id=job_id),
                                                           timeout=10, metadata=md),
        "PullCheckpoint": lambda md: list(jobs.PullCheckpoint(jobs_pb2.PullCheckpointRequest(job_id=job_id),
                                                              timeout=10, metadata=md)),
        "GetJobLogs": lambda md: list(jobs.GetJobLogs(jobs_pb2.GetJobLogsRequest(job_id=job_id), timeout=10,
                                                      metadata=md)),
        "GetJobMetrics": lambda md: jobs.GetJobMetrics(jobs_pb2.GetJobMetricsRequest(job_id=job_id), timeout=10,
                                                       metadata=md),
        "Register": lambda md: control.Register(ps_pb2.RegisterRequest(job_id=job_id, rank=1, total_steps=10,
                                                                  train_size=100), timeout=10, metadata=w(md)),
        "InitParameters": lambda md: ps.InitParameters(push_stream(job_id, 0, grad), timeout=10, metadata=w(md)),
        "PushGradients": lambda md: ps.PushGradients(push_stream(job_id, 0, grad), timeout=10, metadata=w(md)),
        "PullParameters": lambda md: list(ps.PullParameters(ps_pb2.PullRequest(job_id=job_id, rank=0, step=0),
                                                            timeout=10, metadata=w(md))),
        "PushPull": lambda md: list(ps.PushPull(push_stream(job_id, 0, grad), timeout=10, metadata=w(md))),
        "Heartbeat": lambda md: control.Heartbeat(ps_pb2.HeartbeatRequest(job_id=job_id, rank=0, step=0), timeout=10,
                                             metadata=w(md)),
        "SaveCheckpoint": lambda md: control.SaveCheckpoint(iter([ps_pb2.CheckpointChunk(
            header=ps_pb2.CheckpointHeader(job_id=job_id, rank=0, step=1, params=LAYOUT.metas(F32)))]),
            timeout=10, metadata=w(md)),
        "LoadCheckpoint": lambda md: list(control.LoadCheckpoint(ps_pb2.LoadCheckpointRequest(job_id=job_id, rank=0),
                                                            timeout=10, metadata=w(md))),
        "JoinGroup": lambda md: control.JoinGroup(ps_pb2.JoinGroupRequest(job_id=job_id, rank=0), timeout=10,
                                                  metadata=w(md)),
        "ReportMetrics": lambda md: control.ReportMetrics(
            ps_pb2.ReportMetricsRequest(job_id=job_id, rank=0, step=0, kind="eval", metrics={"val_accuracy": 1.0}),
            timeout=10, metadata=w(md)),
    }


def test_every_method_of_every_service_is_covered(stubs, job):
    names = set(every_rpc(*stubs, job))
    services = {s.full_name: s for s in (jobs_pb2.DESCRIPTOR.services_by_name["JobService"],
                                         ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"],
                                         ps_pb2.DESCRIPTOR.services_by_name["WorkerControl"])}
    assert names == {m.name for s in services.values() for m in s.methods}


def snapshot(server: Server, job_id: str) -> dict[str, object]:
    """Everything an RPC could change, read on the server's side."""
    store = server.manager.store(job_id)
    view = server.manager.get(job_id)
    return {
        "jobs": [(r.record.id, r.record.state) for r in server.manager.list()],
        "logs": server.manager.logs(job_id),
        "metrics": view.record.metrics,
        "version": store.version,
        "params": torch.cat([t.reshape(-1) for t in store.parameters().values()]).tolist(),
        "workers": [(w.clock, w.registrations, w.alive) for w in store.workers()],
    }


@pytest.mark.parametrize("metadata", list(BAD_METADATA))
def test_without_the_right_token_every_rpc_is_refused_and_changes_nothing(idle_server, stubs, job, metadata):
    before = snapshot(idle_server, job)
    assert before["params"] == initial().tolist()
    for name, call in every_rpc(*stubs, job).items():
        with pytest.raises(grpc.RpcError) as err:
            call(BAD_METADATA[metadata])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, err.value.details())
        missing = "credential" if name in WORKER_METHODS else "token"
        assert missing in err.value.details(), (name, err.value.details())
    assert snapshot(idle_server, job) == before


def test_a_jobs_credential_opens_its_worker_calls_only(idle_server, stubs, job):
    """Workers carry their job's credential and no token; the credential alone opens no
    JobService call."""
    credential = ((JOB_CREDENTIAL_KEY, idle_server.manager.job_credential(job)),)
    rpcs = every_rpc(*stubs, job, idle_server.manager.job_credential(job))
    rpcs["Heartbeat"](None)  # served without a token
    for name in ("SubmitJob", "ListJobs", "CancelJob"):
        with pytest.raises(grpc.RpcError) as err:
            rpcs[name](credential)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, err.value.details())


@pytest.mark.parametrize("credential", ["", "a-guess"])
def test_with_the_token_but_not_the_jobs_credential_no_worker_rpc_is_served(idle_server, stubs, job, credential):
    """The token lets a user in; a job's worker calls also need the credential its launcher gave
    its workers, so a user cannot register, push, pull or report as another job's worker."""
    before = snapshot(idle_server, job)
    rpcs = every_rpc(*stubs, job, credential)
    for name in sorted(WORKER_METHODS):
        with pytest.raises(grpc.RpcError) as err:
            rpcs[name](GOOD)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, err.value.details())
        assert "credential" in err.value.details(), (name, err.value.details())
    assert snapshot(idle_server, job) == before


def test_with_the_token_the_same_requests_are_served(idle_server, stubs, job):
    """Control: the refusals above were about the token, not the requests."""
    jobs, ps, control = stubs
    rpcs = every_rpc(jobs, ps, control, job, idle_server.manager.job_credential(job))
    for name in ("GetJob", "ListJobs", "WatchJob", "ListCheckpoints", "GetJobLogs", "GetJobMetrics", "Heartbeat"):
        rpcs[name](GOOD)
    assert not rpcs["InitParameters"](GOOD).accepted  # already initialized: nothing changes
    rpcs["Register"](GOOD)
    assert rpcs["PushGradients"](GOOD).accepted
    worker = GOOD + ((JOB_CREDENTIAL_KEY, idle_server.manager.job_credential(job)),)
    assert list(ps.PushPull(push_stream(job, 1, torch.ones(LAYOUT.numel)), timeout=10, metadata=worker))
    assert idle_server.manager.store(job).version == 1  # both workers pushed step 0
    rpcs["ReportMetrics"](GOOD)
    # the job's record is written behind the call (a busy database never delays a worker)
    wait_for(lambda: "val_accuracy" in idle_server.manager.get(job).record.metrics, 30, "the reported metric")
    assert idle_server.manager.get(job).record.metrics["val_accuracy"] == 1.0
    with pytest.raises(grpc.RpcError) as err:  # served: the job has no checkpoint yet
        rpcs["PullCheckpoint"](GOOD)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    for name in ("SaveCheckpoint", "LoadCheckpoint"):  # served: allreduce only
        with pytest.raises(grpc.RpcError) as err:
            rpcs[name](GOOD)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, (name, err.value.details())
        assert "ps-sync mode" in err.value.details(), err.value.details()
    assert rpcs["SubmitJob"](GOOD).job.name == "intruder"
    rpcs["CancelJob"](GOOD)  # a running job ends once its monitor sees the request
    wait_for(lambda: rpcs["GetJob"](GOOD).job.state == jobs_pb2.CANCELLED, 30, "the job to be cancelled")


# --- a token server with real Ray workers ---------------------------------------------------


@pytest.fixture(scope="module")
def ray_server(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with Server(ServerConfig(port=0, data_dir=tmp_path_factory.mktemp("auth-ray"), token=TOKEN)) as s:
        yield s


def test_the_python_client_without_the_token_raises_auth_error(ray_server, tmp_path):
    with Client(ray_server.address, token="") as client:  # "" rather than None: ignore GRADHUB_TOKEN
        calls = {
            "submit": lambda: client.submit({**SPEC, "workers": 1}),
            "get_job": lambda: client.get_job("j-0000000000"),
            "list_jobs": client.list_jobs,
            "cancel": lambda: client.cancel("j-0000000000"),
            "delete": lambda: client.delete("j-0000000000"),
            "watch": lambda: list(client.watch("j-0000000000", timeout=10)),
            "logs": lambda: list(client.logs("j-0000000000")),
            "list_checkpoints": lambda: client.list_checkpoints("j-0000000000"),
            "pull_checkpoint": lambda: client.pull_checkpoint("j-0000000000", tmp_path / "x.safetensors"),
        }
        for name, call in calls.items():
            with pytest.raises(AuthError, match="GRADHUB_TOKEN"):
                call()
            assert not list(tmp_path.iterdir()), name  # pull left no partial file
    with Client(ray_server.address, token=TOKEN) as client:
        assert client.list_jobs() == []


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["ps-sync", "allreduce"])
def test_a_real_job_runs_with_the_token(ray_server, tmp_path, mode):
    spec = {"name": "auth-real", "mode": mode, "workers": 1, "resources": {"cpus": 0.5},
            "model": {"name": "mlp", "args": {"hidden": [16]}}, "dataset": "digits",
            "optimizer": {"name": "adam", "lr": 0.01}, "batch_size": 32, "steps": 30, "eval_every": 10}
    with Client(ray_server.address, token=TOKEN) as client:
        info = client.submit(spec).wait(timeout=120)  # the worker used its credential for every call
        assert info.state == "SUCCEEDED" and info.step == info.version == 30, info.reason
        assert "val_accuracy" in info.metrics  # ReportMetrics from the worker got through
        assert info.id in [j.id for j in client.list_jobs()]
        assert client.cancel(info.id).state == "SUCCEEDED"
        assert client.list_checkpoints(info.id)[-1].step == 30
        assert set(final_params(client, info, tmp_path)) == {"1.weight", "1.bias", "3.weight", "3.bias"}
        assert any("SUCCEEDED" in line for line in client.logs(info.id))
