"""The data plane (proto/v1/data.proto): tensors on a socket beside gRPC, against a real server
on port 0 whose workers are this test (an external launcher).

- pushes and pulls land where gRPC's would, on the Unix socket (same host, buffers of a few MB
  at both ends; tests/integration/test_shared_memory.py with shared memory) and on TCP (a model
  of a few MB too);
- a broken connection is reopened and the push applied once; a pull that waits past the
  server's bound is asked again;
- no connection gets in without the credential of its worker's latest registration;
- every header is checked before a byte of payload is read or allocated: the server answers a
  bad one at once, without the payload having been sent;
- a data plane that cannot be reached leaves the worker on gRPC streams, with the reason logged.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gradhub.client.client import Client
from gradhub.proto import frames
from gradhub.proto.channels import UNIX_SOCKET_BUFFER, widen_buffers
from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import AuthError, ProtocolError, StateError
from gradhub.proto.v1 import data_pb2, ps_pb2, tensor_pb2
from gradhub.server import data_plane
from gradhub.server.app import Server
from gradhub.server.config import ServerConfig
from gradhub.server.launcher import ExternalLauncher
from gradhub.worker import data_link
from gradhub.worker.server_link import ServerLink

from ..conftest import wait_for, worker_link

LAYOUT = Layout(("w", "b"), ((2, 3), (4,)))
NUMEL = 10
LR = 0.5
MAX_MODEL_BYTES = 1 << 20


def _spec(workers: int = 1, **extra) -> dict:
    return {"name": "data-plane", "workers": workers, "model": "mlp", "dataset": "digits", "steps": 10,
            "optimizer": {"name": "sgd", "lr": LR}, "resources": {"cpus": 1}, **extra}


@pytest.fixture
def server(tmp_path):
    config = ServerConfig(port=0, data_dir=tmp_path, max_model_bytes=MAX_MODEL_BYTES)
    with Server(config, launcher=ExternalLauncher()) as s:
        yield s


def _running(server: Server, **spec) -> str:
    with Client(server.address) as client:
        info = client.submit(_spec(**spec))
        wait_for(lambda: client.get_job(info.id).state == "RUNNING", 30, "the job to run")
    return info.id


@pytest.fixture
def job(server):
    return server, _running(server)


def _worker(server: Server, job_id: str, rank: int = 0, **kw) -> ServerLink:
    link = worker_link(server, job_id, rank, **kw)
    link.register("t", 0, total_steps=10, train_size=1)
    return link


def _train_three_steps(link: ServerLink) -> None:
    link.init_parameters(LAYOUT, torch.zeros(NUMEL))
    params = torch.empty(NUMEL)
    version = link.pull(LAYOUT, 0, params).version
    for step in range(3):
        version = link.push_pull(LAYOUT, step, version, torch.ones(NUMEL), params).version
        assert version == step + 1
        assert torch.equal(params, torch.full((NUMEL,), -LR * (step + 1)))


def test_same_host_workers_without_shared_memory_use_the_unix_socket(job, monkeypatch):
    """(tests/integration/test_shared_memory.py: the same with the server's shared memory.)"""
    server, job_id = job
    widened: list[socket.socket] = []  # the server's end of each connection, as it widens its buffers

    def widen(sock: socket.socket) -> None:
        widen_buffers(sock)
        widened.append(sock)

    monkeypatch.setattr(data_plane, "widen_buffers", widen)
    with _worker(server, job_id, shared_memory=False) as link:
        assert link.transport == "unix"
        _train_three_steps(link)
        assert link._session is None, "no gRPC stream was opened"
        # both ends send with buffers of a few MB (the kernel's 208 KiB cut a model into dozens of writes)
        assert isinstance(link._data, data_link.DataLink) and link._data._sock is not None
        ends = [link._data._sock, *widened]
        assert len(ends) == 2 and all(end.family == socket.AF_UNIX for end in ends)
        for end in ends:
            for option, cap in ((socket.SO_SNDBUF, "wmem_max"), (socket.SO_RCVBUF, "rmem_max")):
                allowed = int(Path(f"/proc/sys/net/core/{cap}").read_text())
                assert end.getsockopt(socket.SOL_SOCKET, option) >= min(UNIX_SOCKET_BUFFER, allowed)
    assert server.manager.store(job_id).workers()[0].transport == "unix"


def test_other_hosts_use_tcp(job, monkeypatch):
    server, job_id = job
    monkeypatch.setattr(data_link.frames, "host_id", lambda: "another-host")
    with _worker(server, job_id) as link:
        assert link.transport == "tcp"
        _train_three_steps(link)
    assert server.manager.store(job_id).workers()[0].transport == "tcp"


def test_a_model_of_a_few_mb_crosses_tcp_whole(tmp_path, monkeypatch):
    """Over TCP a payload of a few MB arrives in many reads, the last an odd size: every value
    lands, both ways."""
    numel = 750_001  # 3 MB and 4 bytes: the last read of each payload is less than a MiB
    layout = Layout(("w",), ((numel,),))
    config = ServerConfig(port=0, data_dir=tmp_path, max_model_bytes=8 << 20)
    with Server(config, launcher=ExternalLauncher()) as server:
        job_id = _running(server)
        monkeypatch.setattr(data_link.frames, "host_id", lambda: "another-host")  # the worker's, not the server's
        with _worker(server, job_id) as link:
            assert link.transport == "tcp"
            start = torch.arange(numel, dtype=torch.float32)
            link.init_parameters(layout, start)
            params = torch.empty(numel)
            version = link.pull(layout, 0, params).version
            assert torch.equal(params, start)
            grad = torch.linspace(-1, 1, numel)
            for step in range(2):
                version = link.push_pull(layout, step, version, grad, params).version
            assert torch.equal(params, start - LR * grad - LR * grad)


def test_grpc_transport_stays_on_grpc(job):
    server, job_id = job
    with _worker(server, job_id, transport="grpc") as link:
        assert link.transport == "grpc"
        _train_three_steps(link)
    assert server.manager.store(job_id).workers()[0].transport == "grpc"


def test_compressed_gradients_and_parameters(server):
    job_id = _running(server, compression="bf16")
    with _worker(server, job_id, compression="bf16") as link:
        assert link.transport == "shm"  # converted as they are copied in and out of the region
        _train_three_steps(link)  # -0.5, -1.0, -1.5 are exact in bfloat16


def test_a_broken_connection_is_reopened_and_the_push_applied_once(job):
    server, job_id = job
    with _worker(server, job_id) as link:
        link.init_parameters(LAYOUT, torch.zeros(NUMEL))
        params = torch.empty(NUMEL)
        version = link.push_pull(LAYOUT, 0, link.pull(LAYOUT, 0, params).version, torch.ones(NUMEL), params).version
        assert link._data is not None
        link._data._sock.shutdown(socket.SHUT_RDWR)  # as on a network reset
        # the worker does not know whether step 1 landed: it pushes again on a new connection
        version = link.push_pull(LAYOUT, 1, version, torch.ones(NUMEL), params).version
        assert link.push_pull(LAYOUT, 1, version, torch.ones(NUMEL), params).version == 2  # a retry
        assert version == 2 and torch.equal(params, torch.full((NUMEL,), -2 * LR))
        assert server.manager.store(job_id).version == 2


@contextlib.contextmanager
def _two_at_step_zero(server: Server, job_id: str) -> Iterator[tuple[ServerLink, ServerLink, torch.Tensor, torch.Tensor]]:
    """Workers 0 and 1 of a 2-worker job, the model initialised and step 0's parameters pulled
    (into the two tensors)."""
    with _worker(server, job_id, 0) as w0, _worker(server, job_id, 1) as w1:
        w0.init_parameters(LAYOUT, torch.zeros(NUMEL))
        p0, p1 = torch.empty(NUMEL), torch.empty(NUMEL)
        w0.pull(LAYOUT, 0, p0)
        w1.pull(LAYOUT, 0, p1)
        yield w0, w1, p0, p1


def test_a_pull_that_waits_past_the_bound_is_asked_again(server, monkeypatch):
    monkeypatch.setattr(data_plane, "MAX_PULL_WAIT_S", 0.1)
    job_id = _running(server, workers=2)
    with _two_at_step_zero(server, job_id) as (w0, w1, p0, p1):
        got = {}
        t = threading.Thread(target=lambda: got.setdefault("v", w0.push_pull(LAYOUT, 0, 0, torch.ones(NUMEL), p0)))
        t.start()
        store = server.manager.store(job_id)
        wait_for(lambda: store.workers()[0].clock == 1, 10, "worker 0's push")
        t.join(0.5)  # several of the server's 0.1 s waits run out meanwhile
        assert t.is_alive(), "worker 0 must wait for worker 1's gradient"
        w1.push_pull(LAYOUT, 0, 0, 3 * torch.ones(NUMEL), p1)
        t.join(10)
        assert got["v"].version == 1 and torch.equal(p0, torch.full((NUMEL,), -2 * LR)) and torch.equal(p0, p1)


# ----------------------------------------------------------------------- who gets in


def _raw(server: Server, hello: data_pb2.DataHello | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server._data.port), timeout=10)
    if hello is not None:
        sock.sendall(frames.frame_head(data_pb2.DataFrame(hello=hello)))
    return sock


def _reply(sock: socket.socket) -> data_pb2.DataFrame:
    prefix = _read(sock, frames.PREFIX.size)
    return frames.parse_header(_read(sock, frames.header_length(prefix, frames.MAX_HEADER_BYTES)))


def _read(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def _error(frame: data_pb2.DataFrame) -> Exception:
    assert frame.reply.HasField("error"), frame
    return frames.reply_error(frame.reply.error)


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionError:
        return True


def _hello(job_id: str, rank: int = 0, credential: str = "") -> data_pb2.DataHello:
    return data_pb2.DataHello(protocol=frames.DATA_PROTOCOL, job_id=job_id, rank=rank, credential=credential)


def test_a_stranger_without_a_credential_is_refused(job):
    server, job_id = job
    with _raw(server, _hello(job_id)) as sock:  # worker 0 never registered
        err = _error(_reply(sock))
        assert isinstance(err, AuthError) and "credential" in str(err)
        assert _closed(sock)
    with _worker(server, job_id, transport="grpc"):  # registered, but the credential is guessed
        with _raw(server, _hello(job_id, credential="guess")) as sock:
            assert isinstance(_error(_reply(sock)), AuthError)
        with _raw(server, _hello("no-such-job", credential=server.manager.store(job_id).credential(0))) as sock:
            assert "no-such-job" in str(_error(_reply(sock)))
    assert server.manager.store(job_id).version == 0


def test_a_connection_must_say_hello_first(job):
    server, job_id = job
    push = data_pb2.DataFrame(push=ps_pb2.PushHeader(job_id=job_id, rank=0), payload_bytes=40)
    with _raw(server) as sock:
        sock.sendall(frames.frame_head(push))
        assert "hello" in str(_error(_reply(sock)))
        assert _closed(sock)
    with _raw(server) as sock:  # a long header before authenticating
        sock.sendall(frames.PREFIX.pack(frames.MAGIC, frames.MAX_HELLO_BYTES + 1))
        assert "over the limit" in str(_error(_reply(sock)))
    with _raw(server) as sock:  # not our protocol at all
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert "magic" in str(_error(_reply(sock)))


def test_a_later_registration_ends_the_previous_process_connection(job):
    server, job_id = job
    with _worker(server, job_id) as old:
        old.init_parameters(LAYOUT, torch.zeros(NUMEL))
        # the same rank registers again (its process was replaced)
        with _worker(server, job_id), pytest.raises(StateError, match="registered again"):
            old._data.pull(ps_pb2.PullRequest(job_id=job_id, rank=0, step=0), LAYOUT, torch.empty(NUMEL))


# ----------------------------------------------------------------------- headers first


def _authenticated(server: Server, job_id: str) -> tuple[ServerLink, socket.socket]:
    link = _worker(server, job_id, transport="grpc")
    link.init_parameters(LAYOUT, torch.zeros(NUMEL))
    sock = _raw(server, _hello(job_id, credential=server.manager.store(job_id).credential(0)))
    assert not _reply(sock).reply.HasField("error")
    return link, sock


@pytest.mark.parametrize(("header", "payload_bytes", "message"), [
    ({"tensors": LAYOUT.metas(tensor_pb2.FLOAT32)}, 1 << 30, "payload_bytes: 1073741824"),
    ({"tensors": LAYOUT.metas(tensor_pb2.FLOAT16)}, NUMEL * 2, r"tensors\[0\].dtype"),
    ({"tensors": Layout(("w",), ((10,),)).metas(tensor_pb2.FLOAT32)}, NUMEL * 4, r"tensors\[0\].shape: 'w' has shape \[10\]"),
    ({"tensors": LAYOUT.metas(tensor_pb2.FLOAT32), "rank": 1}, NUMEL * 4, "not this connection's worker"),
    ({"tensors": LAYOUT.metas(tensor_pb2.FLOAT32), "first_tensor": 1}, NUMEL * 4,
     "first_tensor: tensors 1 to 2 are not a part of the model's 2 tensors"),
])
def test_a_bad_push_header_is_refused_before_its_payload(job, header, payload_bytes, message):
    server, job_id = job
    link, sock = _authenticated(server, job_id)
    with link, sock:
        fields = {"job_id": job_id, "rank": 0, "step": 0, **header}
        sock.sendall(frames.frame_head(data_pb2.DataFrame(push=ps_pb2.PushHeader(**fields),
                                                          payload_bytes=payload_bytes)))
        # answered without a byte of the payload having been sent
        err = _error(_reply(sock))
        assert isinstance(err, ProtocolError)
        assert re.search(message, str(err)), err
        assert _closed(sock)
    assert server.manager.store(job_id).version == 0


def test_a_model_over_the_servers_limit_is_refused_before_its_bytes(server):
    job_id = _running(server)
    link = _worker(server, job_id, transport="grpc")
    with link, _raw(server, _hello(job_id, credential=server.manager.store(job_id).credential(0))) as sock:
        _reply(sock)
        big = Layout(("w",), ((MAX_MODEL_BYTES // 4 + 1,),))
        sock.sendall(frames.frame_head(data_pb2.DataFrame(
            init=ps_pb2.PushHeader(job_id=job_id, rank=0, tensors=big.metas(tensor_pb2.FLOAT32)),
            payload_bytes=big.nbytes(tensor_pb2.FLOAT32))))
        err = _error(_reply(sock))
        assert isinstance(err, ProtocolError) and "--max-model-bytes" in str(err)
    assert not server.manager.store(job_id).initialized


def test_non_finite_gradients_are_refused_and_the_connection_kept(job):
    server, job_id = job
    with _worker(server, job_id) as link:
        link.init_parameters(LAYOUT, torch.zeros(NUMEL))
        params = torch.empty(NUMEL)
        link.pull(LAYOUT, 0, params)
        bad = torch.ones(NUMEL)
        bad[7] = float("nan")
        with pytest.raises(ProtocolError, match="non-finite value .* 'b'"):
            link.push_pull(LAYOUT, 0, 0, bad, params)
        assert link.push_pull(LAYOUT, 0, 0, torch.ones(NUMEL), params).version == 1


# ----------------------------------------------------------------------- fallback


def test_an_unreachable_data_plane_leaves_the_worker_on_grpc(job, caplog):
    server, job_id = job
    server._data.stop(0)  # a closed port, as behind a firewall that lets only gRPC through
    with caplog.at_level(logging.WARNING, logger="gradhub.worker.server_link"), _worker(server, job_id) as link:
        assert link.transport == "grpc"
        _train_three_steps(link)
    assert "cannot be used" in caplog.text and "gRPC streams instead" in caplog.text
    assert server.manager.store(job_id).workers()[0].transport == "grpc"


def test_garbage_never_harms_the_server(job):
    """Random bytes, cut frames and lies about lengths end their own connection only."""
    import random

    server, job_id = job
    rng = random.Random(0)
    hello = frames.frame_head(data_pb2.DataFrame(hello=_hello(job_id)))
    attempts = [
        bytes(rng.getrandbits(8) for _ in range(64)),
        frames.MAGIC + bytes(rng.getrandbits(8) for _ in range(60)),
        hello[:5],  # cut inside the prefix
        hello[:-3],  # cut inside the header
        frames.PREFIX.pack(frames.MAGIC, 12) + b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01\x00",  # a bad varint
        frames.PREFIX.pack(frames.MAGIC, 0),  # an empty header: no kind
    ]
    for data in attempts:
        with _raw(server) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):  # the server answers (or not) and closes: never hangs, never crashes
                pass
    with _worker(server, job_id) as link:
        _train_three_steps(link)  # and the next worker is served as if nothing happened
