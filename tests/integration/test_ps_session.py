"""The gRPC fallback path's PushPull session: many pushes on one call, and a broken call reopened without a step
being applied twice."""

from __future__ import annotations

import grpc
import pytest
import torch

from gradhub.client.client import Client
from gradhub.proto.codec import Layout, as_bytes, encode_data_chunk
from gradhub.proto.v1 import ps_pb2, tensor_pb2
from gradhub.server.app import Server
from gradhub.server.config import ServerConfig
from gradhub.server.launcher import ExternalLauncher

from ..conftest import wait_for, worker_channel, worker_link

LAYOUT = Layout(("w",), ((6,),))
LR = 0.5


@pytest.fixture
def job(tmp_path):
    with Server(ServerConfig(port=0, data_dir=tmp_path), launcher=ExternalLauncher()) as server:
        with Client(server.address) as client:
            info = client.submit({"name": "session", "workers": 1, "model": "mlp", "dataset": "digits",
                                  "steps": 10, "optimizer": {"name": "sgd", "lr": LR}, "resources": {"cpus": 1}})
            wait_for(lambda: client.get_job(info.id).state == "RUNNING", 30, "the job to run")
        yield server, info.id


def test_one_call_carries_many_pushes(job):
    server, job_id = job
    with worker_link(server, job_id, 0, transport="grpc") as ps:
        ps.register("t", 0, total_steps=10, train_size=1)
        ps.init_parameters(LAYOUT, torch.zeros(6))
        params = torch.empty(6)
        version = ps.pull(LAYOUT, 0, params).version
        for step in range(3):
            version = ps.push_pull(LAYOUT, step, version, torch.ones(6), params).version
            assert version == step + 1
            assert torch.equal(params, torch.full((6,), -LR * (step + 1)))
        session = ps._session
        assert session is not None
        ps.push_pull(LAYOUT, 3, version, torch.ones(6), params)
        assert ps._session is session, "the same call serves every step"


def test_a_broken_session_is_reopened_and_the_push_applied_once(job):
    server, job_id = job
    with worker_link(server, job_id, 0, transport="grpc") as ps:
        ps.register("t", 0, total_steps=10, train_size=1)
        ps.init_parameters(LAYOUT, torch.zeros(6))
        params = torch.empty(6)
        version = ps.push_pull(LAYOUT, 0, ps.pull(LAYOUT, 0, params).version, torch.ones(6), params).version
        ps._session._responses.cancel()  # the call dies (as on a network reset)
        with pytest.raises(grpc.RpcError):
            ps.push_pull(LAYOUT, 1, version, torch.ones(6), params)
        assert ps._session is None
        # the worker does not know whether step 1 landed: it pushes it again on a new call
        version = ps.push_pull(LAYOUT, 1, version, torch.ones(6), params).version
        assert version == 2 and torch.equal(params, torch.full((6,), -2 * LR))
        assert server.manager.store(job_id).version == 2


def test_a_push_cut_short_inside_a_session_is_rejected(job):
    server, job_id = job
    with worker_link(server, job_id, 0, transport="grpc") as ps:
        ps.register("t", 0, total_steps=10, train_size=1)
        ps.init_parameters(LAYOUT, torch.zeros(6))
    channel = worker_channel(server, job_id)
    call = channel.stream_stream("/gradhub.v1.ParameterServer/PushPull",
                                 request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
                                 response_deserializer=ps_pb2.PullChunk.FromString)
    header = ps_pb2.PushChunk(header=ps_pb2.PushHeader(job_id=job_id, rank=0, step=0,
                                                       tensors=LAYOUT.metas(tensor_pb2.FLOAT32)))
    half = encode_data_chunk(bytes(as_bytes(torch.ones(3))))
    with pytest.raises(grpc.RpcError) as err:
        list(call(iter([header, half, header]), timeout=10))  # a new header where data belongs
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "only data chunks may follow the header" in err.value.details()
    assert server.manager.store(job_id).version == 0
    channel.close()
