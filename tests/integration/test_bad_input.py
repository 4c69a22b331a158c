"""Bad input gets the right gRPC status and a message naming the field or limit; the server
stays up and the stored parameters are unchanged.

The test is the worker here: a real server on port 0 with an ExternalLauncher (it starts no workers), and
raw gRPC stubs speaking the WorkerControl and ParameterServer protocols.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import grpc
import pytest
import torch

from gradhub.client.client import Client
from gradhub.proto.codec import Layout, as_bytes, iter_chunks
from gradhub.proto.contract.errors import NotFoundError, ProtocolError
from gradhub.proto.v1 import jobs_pb2, jobs_pb2_grpc, ps_pb2, ps_pb2_grpc, tensor_pb2
from gradhub.server.app import Server
from gradhub.server.config import ServerConfig
from gradhub.server.launcher import ExternalLauncher
from gradhub.worker.server_link import ServerLink

from ..conftest import wait_for, worker_channel, worker_link

LAYOUT = Layout(("fc.weight", "fc.bias"), ((4, 3), (4,)))
F32, F16 = tensor_pb2.FLOAT32, tensor_pb2.FLOAT16


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory) -> Iterator[Server]:
    with Server(ServerConfig(port=0, data_dir=tmp_path_factory.mktemp("bad")), launcher=ExternalLauncher({"CPU": 8.0})) as s:
        yield s


@pytest.fixture(scope="module")
def job(idle_server):
    """A running ps-sync job with 2 workers whose parameters are initialized."""
    with Client(idle_server.address) as client:
        info = client.submit({"name": "bad-input", "workers": 2, "model": "mlp", "dataset": "digits",
                              "steps": 10, "resources": {"cpus": 1}})
        wait_for(lambda: client.get_job(info.id).state == "RUNNING", 30, "the job to run")
    stub = ps_pb2_grpc.ParameterServerStub(worker_channel(idle_server, info.id))
    reg = control(idle_server, info.id).Register(ps_pb2.RegisterRequest(job_id=info.id, rank=0, total_steps=10, train_size=100), timeout=10)
    assert reg.needs_init and reg.world_size == 2
    init = torch.arange(LAYOUT.numel, dtype=torch.float32)
    stub.InitParameters(stream(header(info.id, step=0), init), timeout=10)
    return info.id, stub, idle_server, init


def control(server: Server, job_id: str) -> ps_pb2_grpc.WorkerControlStub:
    """The WorkerControl service (register, heartbeats, metrics) on its own channel, as one of
    ``job_id``'s workers."""
    return ps_pb2_grpc.WorkerControlStub(worker_channel(server, job_id))


def header(job_id: str, step: int = 0, rank: int = 0, metas=None) -> ps_pb2.PushHeader:
    return ps_pb2.PushHeader(job_id=job_id, rank=rank, step=step, base_version=0,
                             tensors=metas if metas is not None else LAYOUT.metas(F32))


def stream(hdr: ps_pb2.PushHeader, flat: torch.Tensor | None = None, raw: bytes | None = None,
           fail_after: int | None = None) -> Iterator[ps_pb2.PushChunk]:
    yield ps_pb2.PushChunk(header=hdr)
    data = raw if raw is not None else bytes(as_bytes(flat))
    for i, chunk in enumerate(iter_chunks(memoryview(data), 16)):
        if fail_after is not None and i == fail_after:
            raise RuntimeError("client died mid-stream")
        yield ps_pb2.PushChunk(data=chunk)


def grad() -> torch.Tensor:
    return torch.ones(LAYOUT.numel)


def assert_rejected(call, code: grpc.StatusCode, *words: str) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    for w in words:
        assert w in err.value.details(), err.value.details()
    return err.value.details()


@pytest.fixture
def unchanged(job):
    """After the test: the server answers, and the parameters are the initial ones at version 0."""
    job_id, _, server, init = job
    yield
    store = server.manager.store(job_id)
    assert store.version == 0
    got = torch.cat([t.reshape(-1) for t in store.parameters().values()])
    assert torch.equal(got, init)
    assert [w.clock for w in store.workers()] == [0, 0]
    with Client(server.address) as c:
        assert c.get_job(job_id).state == "RUNNING"


def test_wrong_shape(job, unchanged):
    job_id, stub, *_ = job
    metas = LAYOUT.metas(F32)
    metas[0].shape[:] = [3, 4]
    assert_rejected(lambda: stub.PushGradients(stream(header(job_id, metas=metas), grad()), timeout=10),
                    grpc.StatusCode.INVALID_ARGUMENT, "tensors[0].shape", "fc.weight", "[4, 3]")


def test_wrong_dtype(job, unchanged):
    job_id, stub, *_ = job
    assert_rejected(lambda: stub.PushGradients(stream(header(job_id, metas=LAYOUT.metas(F16)), grad().half()),
                                               timeout=10),
                    grpc.StatusCode.INVALID_ARGUMENT, "tensors[0].dtype", "FLOAT16", "FLOAT32")


def test_wrong_tensor_name_and_count(job, unchanged):
    job_id, stub, *_ = job
    metas = LAYOUT.metas(F32)
    metas[1].name = "fc.bogus"
    assert_rejected(lambda: stub.PushGradients(stream(header(job_id, metas=metas), grad()), timeout=10),
                    grpc.StatusCode.INVALID_ARGUMENT, "tensors[1].name", "fc.bogus")
    # one tensor is a bucket of the step (the rest to come), and the whole gradient is too many bytes for it
    assert_rejected(lambda: stub.PushGradients(stream(header(job_id, metas=LAYOUT.metas(F32)[:1]), grad()),
                                               timeout=10),
                    grpc.StatusCode.INVALID_ARGUMENT, "byte count", "more than the expected")
    beyond = header(job_id)
    beyond.first_tensor = 1
    assert_rejected(lambda: stub.PushGradients(stream(beyond, grad()), timeout=10),
                    grpc.StatusCode.INVALID_ARGUMENT, "first_tensor", "are not a part of the model's")


def test_too_few_bytes_is_a_stream_cut_short(job, unchanged):
    job_id, stub, *_ = job
    raw = bytes(as_bytes(grad()))[:-4]
    assert_rejected(lambda: stub.PushGradients(stream(header(job_id), raw=raw), timeout=10),
                    grpc.StatusCode.INVALID_ARGUMENT, "byte count", f"{len(raw)} of the expected {len(raw) + 4}")


def test_too_many_bytes(job, unchanged):
    job_id, stub, *_ = job
    raw = bytes(as_bytes(grad())) + b"\0" * 4
    assert_rejected(lambda: stub.PushGradients(stream(header(job_id), raw=raw), timeout=10),
                    grpc.StatusCode.INVALID_ARGUMENT, "byte count", "more than the expected 64 bytes")


def test_client_dying_mid_stream_applies_nothing(job, unchanged):
    job_id, stub, *_ = job
    assert_rejected(lambda: stub.PushGradients(stream(header(job_id), grad(), fail_after=2), timeout=10),
                    grpc.StatusCode.UNKNOWN)


def test_non_finite_gradient(job, unchanged):
    job_id, stub, *_ = job
    g = grad()
    g[13] = float("nan")  # inside fc.bias (elements 12..15)
    assert_rejected(lambda: stub.PushGradients(stream(header(job_id), g), timeout=10),
                    grpc.StatusCode.INVALID_ARGUMENT, "non-finite", "fc.bias")


def test_header_missing(job, unchanged):
    _, stub, *_ = job
    assert_rejected(lambda: stub.PushGradients(iter([ps_pb2.PushChunk(data=b"1234")]), timeout=10),
                    grpc.StatusCode.INVALID_ARGUMENT, "header")


def test_unknown_job_and_worker(job, unchanged):
    job_id, stub, server, _ = job
    assert_rejected(lambda: stub.PushGradients(stream(header("j-nope"), grad()), timeout=10),
                    grpc.StatusCode.NOT_FOUND, "j-nope")
    assert_rejected(lambda: stub.PushGradients(stream(header(job_id, rank=7), grad()), timeout=10),
                    grpc.StatusCode.NOT_FOUND, "rank", "worker 7", "world size 2")
    assert_rejected(lambda: control(server, job_id).Register(ps_pb2.RegisterRequest(job_id=job_id, rank=-1, total_steps=10),
                                          timeout=10),
                    grpc.StatusCode.NOT_FOUND, "rank")
    assert_rejected(lambda: list(stub.PullParameters(ps_pb2.PullRequest(job_id="j-nope"), timeout=10)),
                    grpc.StatusCode.NOT_FOUND, "j-nope")


def test_joining_a_group_of_a_ps_job(job, unchanged):
    job_id, _, server, _ = job
    assert_rejected(lambda: control(server, job_id).JoinGroup(ps_pb2.JoinGroupRequest(job_id=job_id, rank=0),
                                                              timeout=10),
                    grpc.StatusCode.FAILED_PRECONDITION, "mode", "parameter server")
    assert_rejected(lambda: control(server, job_id).JoinGroup(ps_pb2.JoinGroupRequest(job_id="j-nope", rank=0),
                                                              timeout=10),
                    grpc.StatusCode.NOT_FOUND, "j-nope")


def test_metrics_only_finite_and_only_from_registered_workers(job, unchanged):
    job_id, _, server, _ = job

    def report(rank: int, **metrics: float):
        return lambda: control(server, job_id).ReportMetrics(
            ps_pb2.ReportMetricsRequest(job_id=job_id, rank=rank, step=0, kind="eval", metrics=metrics), timeout=10)

    assert_rejected(report(0, val_loss=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "metrics.val_loss",
                    "finite")
    assert_rejected(report(0, val_loss=float("inf")), grpc.StatusCode.INVALID_ARGUMENT, "metrics.val_loss")
    assert_rejected(report(0, **{f"m{i}": 1.0 for i in range(65)}), grpc.StatusCode.INVALID_ARGUMENT,
                    "65 in one report", "limit is 64")
    assert_rejected(report(7, val_loss=1.0), grpc.StatusCode.NOT_FOUND, "rank", "worker 7")
    assert_rejected(report(1, val_loss=1.0), grpc.StatusCode.FAILED_PRECONDITION, "worker 1", "has not registered")
    with Client(server.address) as c:
        assert "val_loss" not in c.get_job(job_id).metrics


def test_step_out_of_order(job, unchanged):
    job_id, stub, *_ = job
    assert_rejected(lambda: stub.PushGradients(stream(header(job_id, step=5), grad()), timeout=10),
                    grpc.StatusCode.FAILED_PRECONDITION, "step", "next step is 0")


def test_total_steps_must_agree(job, unchanged):
    job_id, _, server, _ = job
    assert_rejected(lambda: control(server, job_id).Register(ps_pb2.RegisterRequest(job_id=job_id, rank=1, total_steps=11),
                                          timeout=10),
                    grpc.StatusCode.INVALID_ARGUMENT, "total_steps", "11", "10")


@pytest.mark.parametrize(("spec", "field"), [
    ({"dataset": "digits"}, "model"),
    ({"model": "mlp"}, "dataset"),
    ({"model": "mlp", "dataset": "digits", "workers": 0}, "workers"),
    ({"model": "mlp", "dataset": "digits", "optimizer": {"name": "adam", "lr": -1}}, "optimizer.lr"),
    ({"model": "mlp", "dataset": "digits", "mode": "ps-magic"}, "mode"),
    ({"model": "mlp", "dataset": "digits", "bogus": 1}, "bogus"),
    ({"model": "mlp", "dataset": "digits", "workers": 64, "resources": {"cpus": 1}}, "resources"),
    ({"model": "mlp", "dataset": "digits", "steps": 10**400}, "steps"),
    ({"model": "mlp", "dataset": "digits", "optimizer": {"name": "sgd", "lr": 10**400}}, "optimizer.lr"),
    ({"model": {"name": "mlp", "args": {"a": json.loads("[" * 40 + "]" * 40)}}, "dataset": "digits"},
     "model.args.a"),
    ({"model": {"name": "mlp", "args": {"blobs": ["x" * 4000] * 20}}, "dataset": "digits"}, "json"),
])
def test_invalid_job_spec_is_rejected_by_the_server(job, unchanged, spec, field):
    _, _, server, _ = job
    stub = jobs_pb2_grpc.JobServiceStub(grpc.insecure_channel(server.address))
    before = len(stub.ListJobs(jobs_pb2.ListJobsRequest(), timeout=10).jobs)
    details = assert_rejected(lambda: stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_json=json.dumps(spec)),
                                                     timeout=10),
                              grpc.StatusCode.INVALID_ARGUMENT)
    assert details.startswith(field), details
    assert len(stub.ListJobs(jobs_pb2.ListJobsRequest(), timeout=10).jobs) == before


def test_malformed_spec_json(job, unchanged):
    _, _, server, _ = job
    stub = jobs_pb2_grpc.JobServiceStub(grpc.insecure_channel(server.address))
    assert_rejected(lambda: stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_json="{not json"), timeout=10),
                    grpc.StatusCode.INVALID_ARGUMENT)
    assert_rejected(lambda: stub.GetJob(jobs_pb2.GetJobRequest(job_id="j-nope"), timeout=10),
                    grpc.StatusCode.NOT_FOUND, "j-nope")


def test_buffers_the_model_does_not_have(job, unchanged):
    job_id, stub, *_ = job
    hdr = header(job_id)
    hdr.buffers.append(tensor_pb2.Tensor(meta=tensor_pb2.TensorMeta(name="bn.running_mean", dtype=F32, shape=[2]),
                                         data=b"\0" * 8))
    assert_rejected(lambda: stub.PushGradients(stream(hdr, grad()), timeout=10),
                    grpc.StatusCode.INVALID_ARGUMENT, "buffers", "bn.running_mean", "has []")


def test_an_inline_buffer_with_the_wrong_byte_count(job, unchanged):
    job_id, stub, *_ = job
    hdr = header(job_id)
    hdr.buffers.append(tensor_pb2.Tensor(meta=tensor_pb2.TensorMeta(name="count", dtype=tensor_pb2.INT64, shape=[]),
                                         data=b"\0" * 4))
    assert_rejected(lambda: stub.PushGradients(stream(hdr, grad()), timeout=10),
                    grpc.StatusCode.INVALID_ARGUMENT, "buffers[0].data", "'count' carries 4 bytes", "need 8")


def test_an_unused_index_outside_the_model(job, unchanged):
    job_id, stub, *_ = job
    hdr = header(job_id)
    hdr.unused.append(5)
    assert_rejected(lambda: stub.PushGradients(stream(hdr, grad()), timeout=10),
                    grpc.StatusCode.INVALID_ARGUMENT, "unused: index 5", "2 parameters")


def test_errors_keep_their_class_across_the_wire(job, unchanged):
    job_id, stub, server, _ = job
    metas = LAYOUT.metas(F32)
    metas[0].shape[:] = [3, 4]
    with pytest.raises(grpc.RpcError) as err:
        stub.PushGradients(stream(header(job_id, metas=metas), grad()), timeout=10)
    assert dict(err.value.trailing_metadata())["gradhub-error"] == "ProtocolError"
    with ServerLink(server.address, "no-such-job", 0) as ps, pytest.raises(NotFoundError, match="no-such-job"):
        ps.heartbeat(0)
    with worker_link(server, job_id, 0) as ps, pytest.raises(ProtocolError, match=r"tensors\[0\].shape"):
        ps.push(Layout(("fc.weight", "fc.bias"), ((3, 4), (4,))), 0, 0, grad())


def test_a_good_push_after_all_that_is_applied(job):
    """Control: the same connection and job still work (and the bad pushes did not count)."""
    job_id, stub, server, _ = job
    assert stub.PushGradients(stream(header(job_id), grad()), timeout=10).accepted
    assert not stub.PushGradients(stream(header(job_id), grad()), timeout=10).accepted  # retry: at most once
    store = server.manager.store(job_id)
    assert store.version == 0  # ps-sync: waits for worker 1
    control(server, job_id).Register(ps_pb2.RegisterRequest(job_id=job_id, rank=1, total_steps=10, train_size=100),
                             timeout=10)
    assert stub.PushGradients(stream(header(job_id, rank=1), grad()), timeout=10).accepted
    assert store.version == 1



GARBAGE = b"\xff\xff\xff\xff\xff"


@pytest.mark.parametrize(("method", "kind"), [
    ("/gradhub.v1.JobService/GetJob", "unary_unary"),
    ("/gradhub.v1.JobService/SubmitJob", "unary_unary"),
    ("/gradhub.v1.JobService/WatchJob", "unary_stream"),
    ("/gradhub.v1.WorkerControl/Register", "unary_unary"),
    ("/gradhub.v1.WorkerControl/Heartbeat", "unary_unary"),
    ("/gradhub.v1.WorkerControl/SaveCheckpoint", "stream_unary"),
    ("/gradhub.v1.ParameterServer/PullParameters", "unary_stream"),
    ("/gradhub.v1.ParameterServer/PushGradients", "stream_unary"),
    ("/gradhub.v1.ParameterServer/PushPull", "stream_stream"),
])
def test_garbage_protobuf_is_invalid_argument_and_logs_nothing(idle_server, caplog, method, kind):
    server = idle_server
    with grpc.insecure_channel(server.address) as channel, caplog.at_level(logging.WARNING):
        call = getattr(channel, kind)(method)
        def send():
            request = iter([GARBAGE]) if kind.startswith("stream") else GARBAGE
            result = call(request, timeout=10)
            return list(result) if kind.endswith("_stream") else result
        for _ in range(3):  # repeated garbage: the same answer, and nothing in the log
            assert_rejected(send, grpc.StatusCode.INVALID_ARGUMENT, "request: not a valid message")
    assert not [r for r in caplog.records if r.name.startswith("gradhub")], caplog.text
    with Client(server.address) as client:
        assert client.list_jobs() is not None  # and the server goes on answering
