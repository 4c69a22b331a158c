"""Deleting a job that has ended removes it, its log, its checkpoints and its working dir; a job
still queued or running is refused (cancel it first); the CLI says what happened in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gradhub.client.cli import app
from gradhub.client.client import Client
from gradhub.proto.contract.errors import NotFoundError, StateError
from gradhub.server.app import Server
from gradhub.server.checkpoints import CheckpointStore
from gradhub.server.config import ServerConfig
from gradhub.server.launcher import ExternalLauncher

from ..conftest import wait_for


@pytest.fixture
def server(tmp_path):
    with Server(ServerConfig(port=0, data_dir=tmp_path / "data"), launcher=ExternalLauncher({"CPU": 2})) as s:
        yield s


def _spec(name: str, working_dir: Path | None = None) -> dict:
    spec = {"name": name, "model": "mlp", "dataset": "digits", "steps": 5, "workers": 1, "resources": {"cpus": 2}}
    return spec | ({"working_dir": str(working_dir)} if working_dir else {})


def test_a_finished_job_is_deleted_with_everything_it_left(server, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "helper.py").write_text("X = 1\n")
    data = tmp_path / "data"
    with Client(server.address) as client:
        running = client.submit(_spec("runs"))
        wait_for(lambda: client.get_job(running.id).state == "RUNNING", 30, "the first job to run")
        job = client.submit(_spec("ends", code))  # queued behind the first (2 CPUs)
        CheckpointStore(data / "checkpoints").save(job.id, 3, 3, {"w": torch.ones(2)})
        assert (data / "working_dirs" / f"{job.id}.zip").exists()
        with pytest.raises(StateError, match="is QUEUED; cancel it first"):
            client.delete(job.id)
        with pytest.raises(StateError, match="is RUNNING; cancel it first"):
            client.delete(running.id)
        client.cancel(job.id)
        client.delete(job.id)
        with pytest.raises(NotFoundError):
            client.get_job(job.id)
        assert [j.id for j in client.list_jobs()] == [running.id]
        assert not (data / "checkpoints" / job.id).exists()
        assert not (data / "working_dirs" / f"{job.id}.zip").exists()
        with pytest.raises(NotFoundError):
            client.delete(job.id)  # once is enough
        assert client.get_job(running.id).state == "RUNNING"  # the other job did not notice


def test_gradhub_delete(server):
    with Client(server.address) as client:
        job = client.submit(_spec("cli"))
        client.cancel(job.id)
        wait_for(lambda: client.get_job(job.id).state == "CANCELLED", 30, "the job to be cancelled")
    runner = CliRunner()
    result = runner.invoke(app, ["delete", job.id, "--server", server.address])
    assert result.exit_code == 0 and result.stdout.strip() == f"{job.id} deleted", result.output
    again = runner.invoke(app, ["delete", job.id, "--server", server.address])
    assert again.exit_code == 1 and again.stderr.startswith("error: ") and job.id in again.stderr


def test_jobs_past_the_retention_are_pruned(tmp_path):
    import time

    config = ServerConfig(port=0, data_dir=tmp_path / "data", retention_days=7)
    with Server(config, launcher=ExternalLauncher({"CPU": 2})) as server, Client(server.address) as client:
        running = client.submit(_spec("runs"))
        wait_for(lambda: client.get_job(running.id).state == "RUNNING", 30, "the job to run")
        old, recent = client.submit(_spec("old")), client.submit(_spec("recent"))
        for job in (old, recent):
            client.cancel(job.id)
        now = time.time()
        server.manager.db.update(old.id, finished_at=now - 8 * 86400)
        server.manager.db.update(recent.id, finished_at=now - 6 * 86400)
        assert server.manager.prune(now) == [old.id]
        assert sorted(j.id for j in client.list_jobs()) == sorted([running.id, recent.id])
