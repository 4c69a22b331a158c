"""A server with TLS (``--tls-cert``/``--tls-key``), its certificate issued by a throwaway CA
(trustme): clients that trust the CA are served; a plaintext client, or one that trusts other
CAs, gets no answer. Workers verify the server with what the launcher gives them, on the gRPC
port and on the data plane's TCP port (TLS too, on every shard's of a sharded job), and a real
job on Ray workers runs to the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import trustme

from gradhub.client.client import Client
from gradhub.proto.contract.errors import ServerUnavailableError
from gradhub.server.app import Server
from gradhub.server.config import ServerConfig
from gradhub.server.launcher import ExternalLauncher
from gradhub.worker import data_link

from ..conftest import wait_for, worker_link
from .test_data_plane import _spec, _train_three_steps

TOKEN = "tls-token-" + "t" * 16


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    paths = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key",
             "other_ca": folder / "other-ca.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    paths["cert"].write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    trustme.CA().cert_pem.write_to_path(str(paths["other_ca"]))
    return paths


def tls_config(certs: dict[str, Path], data_dir: Path) -> ServerConfig:
    return ServerConfig(port=0, data_dir=data_dir, token=TOKEN, tls_cert=certs["cert"], tls_key=certs["key"],
                        tls_ca=certs["ca"])


@pytest.fixture
def external(certs, tmp_path) -> Iterator[Server]:
    with Server(tls_config(certs, tmp_path), launcher=ExternalLauncher()) as server:
        yield server


def test_only_clients_that_trust_the_servers_ca_are_served(external, certs):
    with Client(external.address, token=TOKEN, tls_ca=certs["ca"]) as client:
        assert client.list_jobs() == []
    for kwargs in ({}, {"tls": True}, {"tls_ca": certs["other_ca"]}):  # plaintext; system CAs; another CA
        with Client(external.address, token=TOKEN, timeout=5, **kwargs) as client, \
                pytest.raises(ServerUnavailableError):
            client.list_jobs()


def test_a_worker_on_another_host_speaks_tls_on_the_data_planes_tcp_port(external, certs, monkeypatch):
    with Client(external.address, token=TOKEN, tls_ca=certs["ca"]) as client:
        job_id = client.submit(_spec()).id
        wait_for(lambda: client.get_job(job_id).state == "RUNNING", 30, "the job to run")
    monkeypatch.setattr(data_link.frames, "host_id", lambda: "another-host")  # no Unix socket
    with worker_link(external, job_id, tls_ca=certs["ca"].read_bytes()) as link:
        link.register("t", 0, total_steps=10, train_size=1)
        assert link.transport == "tcp"
        _train_three_steps(link)
    assert external.manager.store(job_id).workers()[0].transport == "tcp"


def test_every_shard_of_a_sharded_job_speaks_tls(external, certs, monkeypatch):
    """ps_shards: 3 on a server with TLS: the other shards' TCP ports speak TLS with the server's
    certificate, which a worker checks by the server's name, as on the server's own port."""
    with Client(external.address, token=TOKEN, tls_ca=certs["ca"]) as client:
        job_id = client.submit(_spec(ps_shards=3)).id
        wait_for(lambda: client.get_job(job_id).state == "RUNNING", 30, "the job to run")
    monkeypatch.setattr(data_link.frames, "host_id", lambda: "another-host")  # no Unix socket
    with worker_link(external, job_id, tls_ca=certs["ca"].read_bytes()) as link:
        reply = link.register("t", 0, total_steps=10, train_size=1)
        assert reply.data.tls and len(reply.shards) == 3 and all(e.tls for e in reply.shards)
        assert link.transport == "tcp (3 shards)"
        _train_three_steps(link)


def test_a_worker_that_does_not_trust_the_server_cannot_reach_it(external, certs):
    with Client(external.address, token=TOKEN, tls_ca=certs["ca"]) as client:
        job_id = client.submit(_spec()).id
        wait_for(lambda: client.get_job(job_id).state == "RUNNING", 30, "the job to run")
    with worker_link(external, job_id, tls_ca=certs["other_ca"].read_bytes()) as link, \
            pytest.raises(grpc.RpcError) as err:
        link.heartbeat(0)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "CERTIFICATE_VERIFY_FAILED" in err.value.details()


def test_a_server_whose_key_does_not_match_its_certificate_does_not_start(certs, tmp_path):
    other_key = tmp_path / "other.key"
    trustme.CA().issue_cert("localhost").private_key_pem.write_to_path(str(other_key))
    config = ServerConfig(port=0, data_dir=tmp_path, tls_cert=certs["cert"], tls_key=other_key)
    with pytest.raises(ValueError, match="tls_key: .* does not go with the certificate"):
        Server(config, launcher=ExternalLauncher()).start()


@pytest.mark.timeout(180)
def test_a_real_job_runs_over_tls(ray_session, certs, tmp_path):
    spec = {"name": "tls", "workers": 2, "resources": {"cpus": 0.5}, "model": {"name": "mlp", "args": {"hidden": [16]}},
            "dataset": "digits", "batch_size": 32, "steps": 20, "eval_every": 10}
    with Server(tls_config(certs, tmp_path)) as server, \
            Client(server.address, token=TOKEN, tls_ca=certs["ca"]) as client:
        info = client.submit(spec).wait(timeout=120)
        assert info.state == "SUCCEEDED" and info.step == 20, info.reason
        assert "val_accuracy" in info.metrics
