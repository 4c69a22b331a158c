"""Shared memory on the data plane (proto/v1/data.proto, "Shared memory"), against a real server
on port 0 whose workers are this test:

- a worker on the server's host puts its payloads in a region the server gives it, and the
  values land as on the socket; a ps-sync job's workers read each version from one region of
  the job's, an async job's from their own;
- the regions are sealed: a worker cannot shrink one under the server's mapping;
- every request that names the region is checked (the connection has one, offsets aligned,
  ranges inside it, sizes under the server's limit, Unix socket only) before anything is read,
  and a refusal changes nothing; descriptors a client sends are never kept;
- a server that cannot give a region leaves the worker on the Unix socket, with the reason logged.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading

import pytest
import torch

from gradhub.proto import frames, shm
from gradhub.proto.contract.errors import ProtocolError, ResourceExhaustedError
from gradhub.proto.v1 import data_pb2, ps_pb2, tensor_pb2
from gradhub.server import data_plane
from gradhub.worker import data_link

from .test_data_plane import (
    LAYOUT,
    LR,
    MAX_MODEL_BYTES,
    NUMEL,
    _closed,
    _error,
    _hello,
    _read,
    _reply,
    _running,
    _train_three_steps,
    _two_at_step_zero,
    _worker,
)


def test_this_platform_has_sealed_memfd_regions():
    assert shm.available(), "shared memory needs Linux's memfd_create, its seals and SCM_RIGHTS"


@pytest.fixture
def server(tmp_path):  # (test_data_plane's, by name: its module's fixtures are not imported with it)
    from gradhub.server.app import Server
    from gradhub.server.config import ServerConfig
    from gradhub.server.launcher import ExternalLauncher

    config = ServerConfig(port=0, data_dir=tmp_path, max_model_bytes=MAX_MODEL_BYTES)
    with Server(config, launcher=ExternalLauncher()) as s:
        yield s


def _link(link) -> data_link.DataLink:
    assert isinstance(link._data, data_link.DataLink)
    return link._data


def test_same_host_workers_use_shared_memory(server):
    job_id = _running(server)
    with _worker(server, job_id) as link:
        assert link.transport == "shm"
        _train_three_steps(link)
        data = _link(link)
        assert data._region is not None and data._job_region is not None  # its gradient; the job's parameters
        assert link._session is None, "no gRPC stream was opened"
    assert server.manager.store(job_id).workers()[0].transport == "shm"


def test_ps_sync_workers_read_one_region_of_the_jobs_and_async_workers_their_own(server):
    with _two_at_step_zero(server, _running(server, workers=2)) as (w0, w1, p0, p1):
        regions = [_link(w)._job_region for w in (w0, w1)]
        assert all(r is not None for r in regions)
        assert len({os.fstat(r.fd).st_ino for r in regions}) == 1, "one region for the job"  # type: ignore[union-attr]
        for step in range(2):
            t = threading.Thread(target=w0.push_pull, args=(LAYOUT, step, step, torch.ones(NUMEL), p0))
            t.start()
            w1.push_pull(LAYOUT, step, step, 3 * torch.ones(NUMEL), p1)
            t.join(30)
            assert not t.is_alive()
            assert torch.equal(p0, torch.full((NUMEL,), -2 * LR * (step + 1))) and torch.equal(p0, p1)

    asynchronous = _running(server, mode="ps-async")
    with _worker(server, asynchronous) as link:
        _train_three_steps(link)
        assert _link(link)._job_region is None and _link(link)._region is not None


def test_a_region_is_sealed_at_its_size(server):
    with _worker(server, _running(server)) as link:
        _train_three_steps(link)
        region = _link(link)._region
        assert region is not None
        with pytest.raises(PermissionError):
            os.ftruncate(region.fd, 0)  # a read past its end would be a SIGBUS in the server
        with pytest.raises(PermissionError):
            os.ftruncate(region.fd, region.size * 2)


# ----------------------------------------------------------------------- what a worker may ask


def _unix(server, job_id: str) -> socket.socket:
    """An authenticated raw connection on the server's Unix socket (worker 0, registered on gRPC)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(server._data.unix_path)
    sock.sendall(frames.frame_head(data_pb2.DataFrame(hello=_hello(
        job_id, credential=server.manager.store(job_id).credential(0)))))
    assert not _reply(sock).reply.HasField("error")
    return sock


def _ask_region(sock: socket.socket, nbytes: int) -> tuple[data_pb2.DataFrame, list[int]]:
    sock.sendall(frames.frame_head(data_pb2.DataFrame(region=data_pb2.RegionRequest(bytes=nbytes))))
    prefix, fds, _, _ = socket.recv_fds(sock, frames.PREFIX.size, 4)
    raw = _read(sock, frames.header_length(prefix, frames.MAX_HEADER_BYTES))
    return frames.parse_header(raw), fds


def _push(job_id: str, **frame) -> bytes:
    header = ps_pb2.PushHeader(job_id=job_id, rank=0, step=0, tensors=LAYOUT.metas(tensor_pb2.FLOAT32))
    return frames.frame_head(data_pb2.DataFrame(push=header, payload_bytes=NUMEL * 4, **frame))


@pytest.fixture
def raw(server):
    job_id = _running(server)
    with _worker(server, job_id, transport="grpc") as link:
        link.init_parameters(LAYOUT, torch.zeros(NUMEL))
        with _unix(server, job_id) as sock:
            yield server, job_id, sock


def test_a_region_is_given_sealed_and_a_push_read_from_it(raw):
    server, job_id, sock = raw
    reply, fds = _ask_region(sock, 4096)
    assert reply.reply.region_bytes == 4096 and len(fds) == 1
    region = shm.Region.attach(fds[0], 4096)  # (checks the seals)
    region.tensor(0, NUMEL, torch.float32).fill_(2.0)
    sock.sendall(_push(job_id, in_region=True, region_offset=0, pull_next=True, reply_offset=128))
    reply = _reply(sock)
    assert not reply.reply.HasField("error") and reply.in_region and reply.shared  # ps-sync: the job's region
    region.close()
    snapshot = server.manager.store(job_id).try_pull(0, 1, tensor_pb2.FLOAT32)
    assert snapshot is not None and snapshot.version == 1
    assert torch.equal(snapshot.data, torch.full((NUMEL,), -2 * LR))


@pytest.mark.parametrize(("frame", "message"), [
    ({"in_region": True}, "in_region: this connection has no region"),
    ({"region": 0}, "region.bytes: 0"),
    ({"region": 2 * (MAX_MODEL_BYTES + shm.ALIGN) + 1}, f"at most|1 to {2 * (MAX_MODEL_BYTES + shm.ALIGN)} bytes"),
    ({"region": 4096, "in_region": True, "region_offset": 32}, "region_offset: 32 is not a multiple of 64"),
    ({"region": 4096, "in_region": True, "region_offset": 4096}, "40 bytes from offset 4096 .* 4096"),
])
def test_a_bad_region_request_is_refused(raw, frame, message):
    server, job_id, sock = raw
    nbytes = frame.pop("region", None)
    if nbytes is not None:
        reply, fds = _ask_region(sock, nbytes)
        for fd in fds:
            os.close(fd)
        if not frame:  # the region request itself is refused
            err = _error(reply)
            assert isinstance(err, ProtocolError) and re.search(message, str(err)), err
            assert _closed(sock)
            return
        assert not reply.reply.HasField("error")
    sock.sendall(_push(job_id, **frame))  # no payload on the socket: a refusal must not wait for one
    err = _error(_reply(sock))
    assert isinstance(err, ProtocolError) and re.search(message, str(err)), err
    assert _closed(sock)
    assert server.manager.store(job_id).version == 0, "a refused request changed nothing"


def test_the_tcp_port_gives_no_region(server):
    job_id = _running(server)
    with _worker(server, job_id, transport="grpc") as link:
        link.init_parameters(LAYOUT, torch.zeros(NUMEL))
        with socket.create_connection(("127.0.0.1", server._data.port), timeout=10) as sock:
            sock.sendall(frames.frame_head(data_pb2.DataFrame(hello=_hello(
                job_id, credential=server.manager.store(job_id).credential(0)))))
            _reply(sock)
            sock.sendall(frames.frame_head(data_pb2.DataFrame(region=data_pb2.RegionRequest(bytes=4096))))
            err = _error(_reply(sock))
            assert isinstance(err, ProtocolError) and "Unix socket only" in str(err)


def test_descriptors_a_client_sends_are_not_kept(raw):
    _, job_id, sock = raw
    before = len(os.listdir("/proc/self/fd"))  # the server runs in this process
    memfds = [os.memfd_create("stranger") for _ in range(3)]
    socket.send_fds(sock, [frames.frame_head(data_pb2.DataFrame(
        pull=ps_pb2.PullRequest(job_id=job_id, rank=0, step=0)))], memfds)
    for fd in memfds:
        os.close(fd)
    reply = _reply(sock)  # answered on the socket, as any pull without in_region
    assert not reply.reply.HasField("error") and not reply.in_region
    _read(sock, reply.payload_bytes)
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_server_without_memory_for_a_region_leaves_the_worker_on_the_unix_socket(server, monkeypatch, caplog):
    def no_memory(size: int) -> shm.Region:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(data_plane.shm.Region, "create", staticmethod(no_memory))
    job_id = _running(server)
    with caplog.at_level(logging.WARNING, logger="gradhub.worker.data_link"), _worker(server, job_id) as link:
        _train_three_steps(link)  # the values land all the same
        assert _link(link).kind == "unix"
    assert "no shared memory" in caplog.text and ResourceExhaustedError.__name__ in caplog.text
    assert server.manager.store(job_id).workers()[0].transport == "unix"


def test_a_sharded_jobs_workers_use_shared_memory_with_every_shard(server, caplog):
    """(The control store holds no value: its pushes and pulls have no payload, and no region.)"""
    job_id = _running(server, ps_shards=2)
    with caplog.at_level(logging.WARNING, logger="gradhub.worker.data_link"), _worker(server, job_id) as link:
        _train_three_steps(link)
        assert [data.kind for data in link._data.links] == ["shm"] * 3
        assert [data._job_region is not None for data in link._data.links] == [False, True, True]
    assert "no shared memory" not in caplog.text
