"""No client can starve the server: 500 open watch streams and 100 stalled uploads leave GetJob
answering within a second; a stalled upload is cut after the stall limit; streams over the
per-client limit are refused with RESOURCE_EXHAUSTED naming it, and nothing else is affected."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Self

import grpc
import pytest
import torch

from gradhub.client.client import Client
from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import JOB_CREDENTIAL_KEY
from gradhub.proto.v1 import jobs_pb2, jobs_pb2_grpc, ps_pb2, ps_pb2_grpc, tensor_pb2
from gradhub.server import limits
from gradhub.server.app import Server
from gradhub.server.config import ServerConfig
from gradhub.server.launcher import ExternalLauncher

from ..conftest import wait_for, worker_credential, worker_link

LAYOUT = Layout(("w",), ((10,),))
WATCHES, STALLED = 500, 100


@pytest.fixture
def job(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "STALL_S", 3.0)
    with Server(ServerConfig(port=0, data_dir=tmp_path), launcher=ExternalLauncher()) as server:
        with Client(server.address) as client:
            info = client.submit({"name": "busy", "model": "mlp", "dataset": "digits", "steps": 10, "workers": 1})
            wait_for(lambda: client.get_job(info.id).state == "RUNNING", 30, "the job to run")
        with worker_link(server, info.id, 0, transport="grpc") as link:
            link.register("t", 0, total_steps=10, train_size=1)
            link.init_parameters(LAYOUT, torch.zeros(10))
        yield server, info.id


class _Crowd:
    """Many long-lived calls from one asyncio client, in a thread of its own."""

    def __init__(self, address: str, job_id: str, credential: str) -> None:
        self.address, self.job_id, self.credential = address, job_id, credential
        self.watching = self.stalled_errors = 0
        self.opened = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with grpc.aio.insecure_channel(self.address) as channel:
            jobs, ps = jobs_pb2_grpc.JobServiceStub(channel), ps_pb2_grpc.ParameterServerStub(channel)
            await asyncio.gather(*(self._watch(jobs) for _ in range(WATCHES)), *(self._stall(ps) for _ in range(STALLED)))

    async def _watch(self, jobs) -> None:
        call = jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=self.job_id))
        await call.read()
        self.watching += 1
        if self.watching == WATCHES:
            self.opened.set()
        await self._stop.wait()
        call.cancel()

    async def _stall(self, ps) -> None:
        async def requests():
            header = ps_pb2.PushHeader(job_id=self.job_id, rank=0, step=0, tensors=LAYOUT.metas(tensor_pb2.FLOAT32))
            yield ps_pb2.PushChunk(header=header)
            await self._stop.wait()  # ... and not a byte of the gradient
        try:
            await ps.PushGradients(requests(), metadata=((JOB_CREDENTIAL_KEY, self.credential),))
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "none came" in e.details():
                self.stalled_errors += 1

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


def test_watches_and_stalled_uploads_do_not_starve_get_job(job):
    server, job_id = job
    with _Crowd(server.address, job_id, worker_credential(server, job_id)) as crowd, Client(server.address) as client:
        assert crowd.opened.wait(60), f"only {crowd.watching} of {WATCHES} watches were answered"
        latencies, deadline = [], time.monotonic() + 2
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            assert client.get_job(job_id).state == "RUNNING"
            latencies.append(time.perf_counter() - t0)
        assert max(latencies) < 1.0, f"GetJob took up to {max(latencies):.2f} s"
        wait_for(lambda: crowd.stalled_errors == STALLED, 30, "every stalled upload to be cut")
        assert server.manager.store(job_id).version == 0, "nothing was applied"


def test_streams_over_the_per_client_limit_are_refused(job):
    server, job_id = job
    service_limits = server._limits  # the running server's, lowered to 3 per client for the test
    assert service_limits is not None
    service_limits.per_client = 3
    with grpc.insecure_channel(server.address) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        calls = [stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), timeout=30) for _ in range(3)]
        for call in calls:
            next(call)  # each is open
        with pytest.raises(grpc.RpcError) as err:
            next(stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "3 open from 127.0.0.1, the limit per client" in err.value.details()
        assert stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=5).job.id == job_id  # unaffected
        calls[0].cancel()
        wait_for(lambda: service_limits.open_streams() == 2, 10, "the cancelled watch to close")
        next(stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), timeout=30))  # room again
        for call in calls[1:]:
            call.cancel()

