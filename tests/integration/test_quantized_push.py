"""Quantised pushes (compression int8 / int4) against a real server on port 0 whose workers are
this test (an external launcher), on the data plane (Unix socket and TCP) and on gRPC streams:

- the server decodes each push to what the worker meant, within half a step of its block, and
  its store applies exactly the decoded gradient; pulled parameters stay float32;
- a header that does not match the job's quantisation (dtype, block, byte count with the
  scales) is refused before a byte of its payload is read.
"""

from __future__ import annotations

import re
import socket

import pytest
import torch

from gradhub.client.client import Client
from gradhub.proto import frames
from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import ProtocolError
from gradhub.proto.quant import BlockQuant
from gradhub.proto.v1 import data_pb2, ps_pb2, tensor_pb2
from gradhub.server.app import Server
from gradhub.server.config import ServerConfig
from gradhub.server.launcher import ExternalLauncher
from gradhub.worker import data_link
from gradhub.worker.server_link import ServerLink

from ..conftest import wait_for, worker_link
from .test_data_plane import _reply

LAYOUT = Layout(("w", "b"), ((30, 20), (7,)))
NUMEL = 607
BLOCK = 64
LR = 0.5
FORMATS = {"int8": tensor_pb2.QINT8, "int4": tensor_pb2.QINT4}


@pytest.fixture
def server(tmp_path):
    with Server(ServerConfig(port=0, data_dir=tmp_path), launcher=ExternalLauncher()) as s:
        yield s


def _running(server: Server, compression: str, **extra) -> str:
    spec = {"name": "quantised", "workers": 1, "model": "mlp", "dataset": "digits", "steps": 10,
            "optimizer": {"name": "sgd", "lr": LR}, "resources": {"cpus": 1}, "compression": compression,
            "compression_block": BLOCK, **extra}
    with Client(server.address) as client:
        info = client.submit(spec)
        wait_for(lambda: client.get_job(info.id).state == "RUNNING", 30, "the job to run")
    return info.id


def _worker(server: Server, job_id: str, compression: str, **kw) -> ServerLink:
    link = worker_link(server, job_id, 0, compression=compression, compression_block=BLOCK, **kw)
    link.register("t", 0, total_steps=10, train_size=1)
    return link


@pytest.mark.parametrize("compression", ["int8", "int4"])
@pytest.mark.parametrize("transport", ["shm", "unix", "tcp", "grpc"])
def test_a_quantised_push_is_decoded_to_what_the_worker_meant(server, monkeypatch, compression, transport):
    if transport == "tcp":
        monkeypatch.setattr(data_link.frames, "host_id", lambda: "another-host")
    job_id = _running(server, compression)
    q = BlockQuant(FORMATS[compression], BLOCK)
    torch.manual_seed(0)
    with _worker(server, job_id, compression, transport="grpc" if transport == "grpc" else "auto",
                 shared_memory=transport == "shm") as link:
        assert link.transport == transport
        link.init_parameters(LAYOUT, torch.zeros(NUMEL))
        params = torch.empty(NUMEL)
        version = link.pull(LAYOUT, 0, params).version
        expected = torch.zeros(NUMEL)
        for step in range(3):
            grad = torch.randn(NUMEL) * torch.logspace(-3, 1, NUMEL)
            scales, _ = q.quantize(grad)
            meant = q.decode(q.encode(grad), NUMEL)
            assert bool(((meant - grad).abs() <= q.bound(scales).repeat_interleave(BLOCK)[:NUMEL] * 1.0001).all())
            if step < 2:
                version = link.push_pull(LAYOUT, step, version, grad, params).version
            else:
                assert link.push(LAYOUT, step, version, grad)
                version = link.pull(LAYOUT, step + 1, params).version
            expected -= LR * meant  # plain SGD on exactly the decoded gradient
            assert version == step + 1
            assert params.dtype == torch.float32 and torch.equal(params, expected)
    store = server.manager.store(job_id)
    assert store.workers()[0].bytes_in == 3 * q.nbytes(NUMEL)  # as they travelled
    assert store.workers()[0].bytes_out == 4 * 4 * NUMEL  # four float32 pulls


def test_error_feedback_through_the_server(server):
    job_id = _running(server, "int4", error_feedback=True)
    q = BlockQuant(tensor_pb2.QINT4, BLOCK)
    with _worker(server, job_id, "int4", error_feedback=True) as link:
        link.init_parameters(LAYOUT, torch.zeros(NUMEL))
        params = torch.empty(NUMEL)
        version = link.pull(LAYOUT, 0, params).version
        grad = torch.linspace(-1, 1, NUMEL) * 0.013
        for step in range(8):
            version = link.push_pull(LAYOUT, step, version, grad, params).version
        # what the server applied differs from 8 exact steps by the last residual alone
        residual = link.encoder.residual(LAYOUT)
        assert residual is not None and residual.abs().max() <= q.quantize(grad)[0].max()
        assert torch.allclose(params, -LR * (8 * grad - residual), atol=1e-6)


# ----------------------------------------------------------------------- headers first


def _raw(server: Server, job_id: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server._data.port), timeout=10)
    hello = data_pb2.DataHello(protocol=frames.DATA_PROTOCOL, job_id=job_id, rank=0,
                               credential=server.manager.store(job_id).credential(0))
    sock.sendall(frames.frame_head(data_pb2.DataFrame(hello=hello)))
    assert not _reply(sock).reply.HasField("error")
    return sock




INT8_BYTES = BlockQuant(tensor_pb2.QINT8, BLOCK).nbytes(NUMEL)
BAD_HEADERS = [
    ({"tensors": LAYOUT.metas(tensor_pb2.FLOAT32)}, NUMEL * 4, r"tensors\[0\].dtype: 'w' is FLOAT32, expected QINT8"),
    ({"tensors": LAYOUT.metas(tensor_pb2.QINT4), "quant_block": BLOCK}, INT8_BYTES, r"tensors\[0\].dtype"),
    ({"tensors": LAYOUT.metas(tensor_pb2.QINT8)}, INT8_BYTES, "quant_block: 0, the job's compression_block is 64"),
    ({"tensors": LAYOUT.metas(tensor_pb2.QINT8), "quant_block": 128}, INT8_BYTES, "quant_block: 128"),
    ({"tensors": LAYOUT.metas(tensor_pb2.QINT8), "quant_block": BLOCK}, NUMEL,  # the codes without the scales
     f"payload_bytes: {NUMEL}, the job's gradient has {INT8_BYTES}"),
]


@pytest.mark.parametrize(("header", "payload_bytes", "message"), BAD_HEADERS)
def test_a_bad_quantised_header_is_refused_before_its_payload(server, header, payload_bytes, message):
    job_id = _running(server, "int8")
    with _worker(server, job_id, "int8", transport="grpc") as link, _raw(server, job_id) as sock:
        link.init_parameters(LAYOUT, torch.zeros(NUMEL))
        fields = {"job_id": job_id, "rank": 0, "step": 0, **header}
        sock.sendall(frames.frame_head(data_pb2.DataFrame(push=ps_pb2.PushHeader(**fields),
                                                          payload_bytes=payload_bytes)))
        frame = _reply(sock)  # answered without a byte of the payload having been sent
        assert frame.reply.HasField("error")
        err = frames.reply_error(frame.reply.error)
        assert isinstance(err, ProtocolError) and re.search(message, str(err)), err
    assert server.manager.store(job_id).version == 0


def test_a_float_job_refuses_a_quantised_push_on_grpc(server):
    job_id = _running(server, "none", compression_block=None)
    with worker_link(server, job_id, 0, transport="grpc") as plain:
        plain.register("t", 0, total_steps=10, train_size=1)
        plain.init_parameters(LAYOUT, torch.zeros(NUMEL))
        params = torch.empty(NUMEL)
        plain.pull(LAYOUT, 0, params)
        # a worker that believes the job quantises: its header says QINT8
        with (worker_link(server, job_id, 0, transport="grpc", compression="int8") as wrong,
              pytest.raises(ProtocolError, match=r"tensors\[0\].dtype: 'w' is QINT8, expected FLOAT32")):
            wrong.push(LAYOUT, 0, 0, torch.ones(NUMEL))
    assert server.manager.store(job_id).version == 0
