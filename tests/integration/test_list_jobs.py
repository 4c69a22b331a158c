"""ListJobs pages through the jobs in creation order and sends summaries (no spec), so that a
server with many jobs, or large specs, always answers within the message limit."""

from __future__ import annotations

import grpc
import pytest

from gradhub.client.client import Client
from gradhub.proto.v1 import jobs_pb2, jobs_pb2_grpc
from gradhub.server.app import Server
from gradhub.server.config import ServerConfig
from gradhub.server.launcher import ExternalLauncher


@pytest.fixture
def server(tmp_path):
    with Server(ServerConfig(port=0, data_dir=tmp_path), launcher=ExternalLauncher({"CPU": 1})) as s:
        yield s


def test_pages_in_creation_order_as_summaries(server):
    with Client(server.address) as client:
        ids = [client.submit({"name": f"j{i}", "model": "mlp", "dataset": "digits", "steps": 5, "workers": 1 + i % 2,
                              "resources": {"cpus": 0.5}}).id for i in range(7)]
        listed = client.list_jobs(page_size=3)
        assert [j.id for j in listed] == ids
        assert all(j.spec == {} for j in listed), "summaries carry no spec"
        assert [j.world_size for j in listed] == [1 + i % 2 for i in range(7)]
        assert client.get_job(ids[0]).spec["name"] == "j0"  # GetJob has it
    with grpc.insecure_channel(server.address) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        first = stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=3), timeout=10)
        assert [j.id for j in first.jobs] == ids[:3] and first.next_page_token
        last = stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=4, page_token=first.next_page_token), timeout=10)
        assert [j.id for j in last.jobs] == ids[3:] and last.next_page_token  # a full page: maybe more
        end = stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=4, page_token=last.next_page_token), timeout=10)
        assert not end.jobs and not end.next_page_token
        for request, field in ((jobs_pb2.ListJobsRequest(page_size=5000), "page_size"),
                               (jobs_pb2.ListJobsRequest(page_token="abc"), "page_token")):
            with pytest.raises(grpc.RpcError) as err:
                stub.ListJobs(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(field)
