"""A pulled checkpoint is exactly the server's parameters: sha256 verified, loads into a fresh
model with strict keys, metadata names the job, step and version."""

from __future__ import annotations

import hashlib

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from gradhub.client.client import Client
from gradhub.server.app import Server
from gradhub.server.config import ServerConfig
from gradhub.server.launcher import ExternalLauncher
from gradhub.worker.flat import FlatModel
from gradhub.worker.models import seeded_model

from ..conftest import wait_for, worker_link


def test_pulled_checkpoint_equals_the_servers_parameters(tmp_path):
    with Server(ServerConfig(port=0, data_dir=tmp_path / "data"), launcher=ExternalLauncher()) as server, \
            Client(server.address) as client:
        job = client.submit({"name": "ckpt", "workers": 1, "model": {"name": "mlp", "args": {"hidden": [32]}},
                             "dataset": "digits", "steps": 10, "checkpoint_every": 2,
                             "optimizer": {"name": "adam", "lr": 0.01}, "resources": {"cpus": 1}})
        wait_for(lambda: client.get_job(job.id).state == "RUNNING", 30, "the job to run")
        model = FlatModel(seeded_model(0, "mlp", None, {"hidden": [32]}))
        with worker_link(server, job.id, 0) as ps:
            ps.register("t", 0, total_steps=10, train_size=1)
            ps.init_parameters(model.layout, model.params)
            version = ps.pull(model.layout, 0, model.params).version
            for step in range(2):
                grads = torch.randn(model.params.shape, generator=torch.Generator().manual_seed(step))
                version = ps.push_pull(model.layout, step, version, grads, model.params).version
        wait_for(lambda: [c.step for c in client.list_checkpoints(job.id)] == [2], 30, "the step-2 checkpoint")
        on_server = server.manager.store(job.id).parameters()  # still at version 2: nobody pushed since

        path = tmp_path / "pulled.safetensors"
        meta = client.pull_checkpoint(job.id, path)
        assert meta.step == 2 and meta.version == 2
        assert hashlib.sha256(path.read_bytes()).hexdigest() == meta.sha256
        pulled = load_file(path)
        assert pulled.keys() == on_server.keys()
        for name, tensor in on_server.items():
            assert torch.equal(pulled[name], tensor), name
        fresh = seeded_model(123, "mlp", None, {"hidden": [32]})
        fresh.load_state_dict(pulled, strict=True)
        assert all(torch.equal(fresh.state_dict()[k], on_server[k]) for k in on_server)
        with safe_open(str(path), "pt") as f:
            assert f.metadata() == {"job_id": job.id, "step": "2", "version": "2"}
        client.cancel(job.id)
