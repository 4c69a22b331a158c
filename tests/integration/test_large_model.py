"""A model of 300+ MB crosses the wire in ~1 MiB chunks: no gRPC message limit is ever hit."""

from __future__ import annotations

import grpc
import pytest
import torch

from gradhub.client.client import Client
from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import JOB_CREDENTIAL_KEY
from gradhub.proto.v1 import tensor_pb2
from gradhub.server.app import Server
from gradhub.server.config import ServerConfig
from gradhub.server.launcher import ExternalLauncher

from ..conftest import wait_for, worker_credential, worker_link

NUMEL = 80 * 2**20  # 80 Mi float32 = 320 MiB (335 MB)


@pytest.mark.timeout(240)
def test_exchange_a_320_mib_model(tmp_path):
    layout = Layout(("big.weight", "big.bias"), ((NUMEL // 1024, 1024), (16,)))
    with Server(ServerConfig(port=0, data_dir=tmp_path), launcher=ExternalLauncher()) as server:
        with Client(server.address) as client:
            job = client.submit({"name": "big", "workers": 1, "model": "mlp", "dataset": "digits", "steps": 2,
                                 "optimizer": {"name": "sgd", "lr": 0.5}, "resources": {"cpus": 1}})
            wait_for(lambda: client.get_job(job.id).state == "RUNNING", 30, "the job to run")
        with worker_link(server, job.id, rank=0) as ps:
            reg = ps.register("test", 0, total_steps=2, train_size=10)
            assert reg.needs_init
            init = torch.randn(layout.numel, generator=torch.Generator().manual_seed(0))
            assert init.numel() * 4 > 300e6
            assert ps.init_parameters(layout, init)
            params = torch.empty_like(init)
            assert ps.pull(layout, 0, params).version == 0
            assert torch.equal(params, init)
            grads = torch.full_like(init, 2.0)
            assert ps.push(layout, 0, 0, grads)
            assert ps.pull(layout, 1, params).version == 1
            torch.testing.assert_close(params, init - 1.0, rtol=0, atol=0)  # SGD: p - 0.5 * 2
            # the largest gRPC message stays ~1 MiB: a 4 MiB receive limit on a raw channel suffices
            channel = grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", 4 << 20)])
            from gradhub.proto.v1 import ps_pb2, ps_pb2_grpc

            stub = ps_pb2_grpc.ParameterServerStub(channel)
            chunks = stub.PullParameters(ps_pb2.PullRequest(job_id=job.id, rank=0, step=1,
                                                            dtype=tensor_pb2.FLOAT32), timeout=60,
                                         metadata=((JOB_CREDENTIAL_KEY, worker_credential(server, job.id)),))
            sizes = [len(c.data) for c in chunks]
            assert sum(sizes) == layout.numel * 4 and max(sizes) <= 1 << 20
            channel.close()
