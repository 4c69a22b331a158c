"""A graceful server stop (``docker compose down``, SIGTERM) leaves running jobs RUNNING, and the
next server on the same data dir resumes them: stopping is not the job's failure."""

from __future__ import annotations

import pytest

from gradhub.client.client import Client
from gradhub.server.app import Server
from gradhub.server.config import ServerConfig
from gradhub.server.job_db import JobDB

from ..conftest import wait_for


@pytest.mark.parametrize("mode, steps", [("ps-sync", 1500),  # allreduce steps are faster
                                         pytest.param("allreduce", 2500, marks=pytest.mark.long)])
def test_stopping_the_server_does_not_fail_a_running_job(ray_session, tmp_path, mode, steps):
    spec = {"name": "survivor", "mode": mode, "workers": 2, "resources": {"cpus": 0.5}, "dataset": "digits",
            "model": {"name": "mlp", "args": {"hidden": [128, 128]}}, "steps": steps, "checkpoint_every": 50}
    with Server(ServerConfig(port=0, data_dir=tmp_path)) as first, Client(first.address) as client:
        job = client.submit(spec)
        wait_for(lambda: client.get_job(job.id).step > 60, 120, "the job to pass its first checkpoint")
    with JobDB(tmp_path / "jobs.db") as db:
        record = db.get(job.id)
    assert record.state == "RUNNING", f"{record.state}: {record.reason}"

    with Server(ServerConfig(port=0, data_dir=tmp_path)) as second, Client(second.address) as client:
        info = client.job(job.id).wait(timeout=240)
        logs = "\n".join(client.logs(job.id))
    assert info.state == "SUCCEEDED" and info.step == steps
    assert "resuming from the checkpoint at step" in logs
    assert "failed" not in logs.lower()
