"""A full disk (a real one: a small tmpfs under the data dir; needs root, as CI runs) costs a
checkpoint, never the job: a periodic checkpoint that cannot be written is logged and training
goes on; no partial file outlives the failed write; a submit whose working_dir cannot be stored
fails with RESOURCE_EXHAUSTED and leaves no job."""

from __future__ import annotations

import os
import random
import subprocess

import pytest
import torch

from gradhub.client.client import Client
from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import ResourceExhaustedError
from gradhub.server.app import Server
from gradhub.server.config import ServerConfig
from gradhub.server.launcher import ExternalLauncher

from ..conftest import wait_for, worker_link

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")
NUMEL = 100_000  # 400 KB of parameters, 800 KB with the momentum: more than the 512 KiB disk holds


@pytest.fixture
def small_disks(tmp_path):
    data = tmp_path / "data"
    mounts = [data / "checkpoints", data / "working_dirs"]
    for m in mounts:
        m.mkdir(parents=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(m)],
                              capture_output=True, text=True, check=False)
        if done.returncode:  # root without CAP_SYS_ADMIN (a locked-down container)
            for mounted in mounts[:mounts.index(m)]:
                subprocess.run(["umount", "-l", str(mounted)], check=False)
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield data
    finally:
        for m in mounts:
            subprocess.run(["umount", "-l", str(m)], check=False)


def test_a_full_disk_costs_checkpoints_not_the_job(small_disks, tmp_path):
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "blob.bin").write_bytes(random.Random(0).randbytes(600_000))  # incompressible
    with (Server(ServerConfig(port=0, data_dir=small_disks), launcher=ExternalLauncher()) as server,
          Client(server.address) as client):
        with pytest.raises(ResourceExhaustedError, match="disk: the working_dir could not be stored"):
            client.submit({"name": "big", "model": "mlp", "dataset": "digits", "steps": 1, "working_dir": str(folder)})
        assert client.list_jobs() == [] and not list((small_disks / "working_dirs").iterdir())

        job = client.submit({"name": "ckpt", "model": "mlp", "dataset": "digits", "steps": 50, "workers": 1,
                             "checkpoint_every": 2, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}})
        wait_for(lambda: client.get_job(job.id).state == "RUNNING", 30, "the job to run")
        layout = Layout(("w",), ((NUMEL,),))
        with worker_link(server, job.id, 0) as link:
            link.register("t", 0, total_steps=50, train_size=1)
            link.init_parameters(layout, torch.zeros(NUMEL))
            params = torch.empty(NUMEL)
            version = link.pull(layout, 0, params).version
            for step in range(6):  # three checkpoints due, none fits
                version = link.push_pull(layout, step, version, torch.ones(NUMEL), params).version
            wait_for(lambda: sum("not written" in line for line in client.logs(job.id)) >= 3, 30,
                     "three checkpoints to be reported as not written")
            assert version == 6 and client.get_job(job.id).state == "RUNNING", "training went on"
        assert [p.name for p in (small_disks / "checkpoints").rglob("*") if p.is_file()] == []
        client.cancel(job.id)
