"""Shared fixtures: one local Ray for the whole session, real servers on port 0."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any, TypeVar

import pytest
import torch

from gradhub.client.client import Client, JobInfo
from gradhub.server.app import Server
from gradhub.server.config import ServerConfig


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray (2 logical CPUs, like the CI machine) shared by every test that needs one."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def server(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with Server(ServerConfig(port=0, data_dir=tmp_path_factory.mktemp("server"))) as s:
        yield s


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with Client(server.address) as c:
        yield c


T = TypeVar("T")


def tiered(values: Iterable[T], default: Collection[T], id: Callable[[T], str] | None = None) -> list[Any]:
    """``values`` as parameters of a test, each one outside ``default`` marked ``matrix`` (CI
    runs those after the default suite); ``id``: each one's test id."""
    return [pytest.param(v, marks=() if v in default else pytest.mark.matrix, id=None if id is None else id(v))
            for v in values]


def _selected_items(request: pytest.FixtureRequest) -> list[pytest.Item]:
    """The requesting module's tests that this run selected (after ``-m`` and ``-k``)."""
    return [item for item in request.session.items if getattr(item, "module", None) is request.module]


def selected(request: pytest.FixtureRequest, argname: str) -> set[Any]:
    """The values ``argname`` takes in the requesting module's selected tests: a module fixture
    that runs one real job per value runs only the jobs a selected test reads (the ``matrix``
    marker puts most of a matrix in CI's run)."""
    return {item.callspec.params[argname] for item in _selected_items(request)
            if argname in getattr(getattr(item, "callspec", None), "params", {})}


def selected_tests(request: pytest.FixtureRequest) -> set[str]:
    """The names of the requesting module's selected test functions."""
    return {getattr(item, "originalname", item.name) for item in _selected_items(request)}


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll until ``predicate()`` holds; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def final_params(client: Client, job: JobInfo, tmp_path) -> dict[str, torch.Tensor]:
    """The job's final parameters, pulled as a checkpoint."""
    from safetensors.torch import load_file

    path = tmp_path / f"{job.id}.safetensors"
    client.pull_checkpoint(job.id, path)
    return load_file(path)


def worker_credential(server: Server, job_id: str) -> str:
    """The credential a running job gives its workers (tests that act as a job's workers use it)."""
    return server.manager.job_credential(job_id)


def worker_link(server: Server, job_id: str, rank: int = 0, **kw: object):  # -> ServerLink
    """A ServerLink as one of ``job_id``'s workers would hold it (with the job's credential)."""
    from gradhub.worker.server_link import ServerLink

    return ServerLink(server.address, job_id, rank, credential=worker_credential(server, job_id), **kw)  # type: ignore[arg-type]


def worker_channel(server: Server, job_id: str):  # -> grpc.Channel
    """A channel whose every call carries ``job_id``'s worker credential (raw stub tests)."""
    import grpc

    from gradhub.proto.contract.errors import JOB_CREDENTIAL_KEY

    credential = worker_credential(server, job_id)

    class _Credential(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                      grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
        def _with(self, details):  # type: ignore[no-untyped-def]
            metadata = list(details.metadata or []) + [(JOB_CREDENTIAL_KEY, credential)]
            return details._replace(metadata=metadata)

        def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
            return continuation(self._with(details), request)

        def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
            return continuation(self._with(details), request)

        def intercept_stream_unary(self, continuation, details, requests):  # type: ignore[no-untyped-def]
            return continuation(self._with(details), requests)

        def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
            return continuation(self._with(details), requests)

    return grpc.intercept_channel(grpc.insecure_channel(server.address), _Credential())
