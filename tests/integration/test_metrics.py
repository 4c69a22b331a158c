"""``/metrics`` (Prometheus' text format) on a real server with real Ray workers: scraped twice
while a job trains, the values move (steps, bytes, updates, RPC counts), jobs are counted by
state, and the staleness histogram and the step-time split are there. The HTTP side asks for
the token like the gRPC port; ``/healthz`` does not.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gradhub.client.client import Client
from gradhub.server.app import Server
from gradhub.server.config import ServerConfig
from gradhub.server.launcher import ExternalLauncher

from ..conftest import wait_for

TOKEN = "metrics-token-" + "m" * 12


def scrape(server: Server, token: str | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, by (name, sorted labels)."""
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/metrics")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def server(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with Server(ServerConfig(port=0, http_port=0, data_dir=tmp_path_factory.mktemp("metrics"))) as s:
        yield s


@pytest.mark.timeout(180)
def test_metrics_move_while_a_job_trains(server):
    spec = {"name": "metrics", "mode": "ps-async", "workers": 2, "resources": {"cpus": 0.5},
            "model": {"name": "mlp", "args": {"hidden": [16]}}, "dataset": "digits", "batch_size": 16,
            "steps": 100_000}
    with Client(server.address) as client:
        job = client.submit(spec)
        wait_for(lambda: client.get_job(job.id).step >= 20 and len(client.get_job(job.id).workers) == 2, 60,
                 "the job to train")
        first = scrape(server)
        labels = (("job", job.id), ("rank", "0"))
        wait_for(lambda: scrape(server)[("gradhub_worker_step", labels)] >= first[("gradhub_worker_step", labels)] + 20,
                 30, "the worker's step to move on /metrics")
        wait_for(lambda: ("gradhub_worker_communication_seconds", labels) in scrape(server), 10,
                 "the workers' first report of their step time")
        second = scrape(server)
        client.cancel(job.id)
        wait_for(lambda: client.get_job(job.id).done, 60, "the job to end")

    assert second[("gradhub_jobs", (("state", "RUNNING"),))] == 1
    assert ("gradhub_queue_length", ()) in second
    for name in ("gradhub_worker_pushed_bytes_total", "gradhub_worker_pulled_bytes_total"):
        assert second[(name, labels)] > first[(name, labels)] > 0, name
    shard = (("job", job.id), ("shard", "0"))
    assert second[("gradhub_ps_updates_total", shard)] > first[("gradhub_ps_updates_total", shard)]
    assert second[("gradhub_ps_received_bytes_total", shard)] > 0
    assert second[("gradhub_worker_loss", labels)] > 0
    assert second[("gradhub_worker_samples_per_second", labels)] > 0
    assert second[("gradhub_worker_compute_seconds", labels)] > 0
    assert ("gradhub_worker_restarts_total", labels) in second
    staleness = second[("gradhub_staleness_count", (("job", job.id),))]
    assert staleness == second[("gradhub_staleness_bucket", (("job", job.id), ("le", "+Inf")))] > 0
    pushes = [v for (name, lab), v in second.items()
              if name == "gradhub_rpc_calls_total" and ("method", "Register") in lab and ("code", "OK") in lab]
    assert pushes and pushes[0] >= 2, "both workers' Register calls were counted"
    after = scrape(server)
    assert after[("gradhub_jobs", (("state", "CANCELLED"),))] >= 1
    assert ("gradhub_worker_step", labels) not in after, "an ended job's workers are gone"


def test_the_http_side_asks_for_the_token_and_healthz_does_not(tmp_path):
    config = ServerConfig(port=0, http_port=0, data_dir=tmp_path, token=TOKEN)
    with Server(config, launcher=ExternalLauncher()) as server:
        with pytest.raises(urllib.error.HTTPError) as err:
            scrape(server)
        assert err.value.code == 401
        with pytest.raises(urllib.error.HTTPError):
            scrape(server, "wrong")
        assert ("gradhub_queue_length", ()) in scrape(server, TOKEN)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/healthz", timeout=10) as response:
            assert response.read() == b"ok\n"


def test_a_server_without_a_token_answers_only_to_its_loopback_names(tmp_path):
    """No DNS rebinding: a page of another site that resolves its own name to this machine gets
    nothing from a server that asks for no token."""
    with Server(ServerConfig(port=0, http_port=0, data_dir=tmp_path), launcher=ExternalLauncher()) as server:
        for host, allowed in ((f"127.0.0.1:{server.http_port}", True), (f"localhost:{server.http_port}", True),
                              (f"[::1]:{server.http_port}", True), ("evil.example:80", False), ("10.1.2.3", False)):
            request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/metrics", headers={"Host": host})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    assert allowed and response.status == 200, host
            except urllib.error.HTTPError as e:
                assert not allowed and e.code == 403, (host, e.code)
