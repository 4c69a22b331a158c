"""ps-async, ps-ssp and gradient compression, end to end on real Ray workers."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from gradhub.client.client import Client
from gradhub.worker.models import mlp

from ..conftest import final_params

BASE = {"workers": 2, "resources": {"cpus": 0.5}, "model": {"name": "mlp", "args": {"hidden": [64]}},
        "dataset": "digits", "optimizer": {"name": "adam", "lr": 0.003}, "batch_size": 32, "epochs": 6}


@pytest.fixture(scope="module")
def jobs(server):
    with Client(server.address) as client:
        submitted = {
            "async": client.submit({**BASE, "name": "async", "mode": "ps-async"}),
            "ssp": client.submit({**BASE, "name": "ssp", "mode": "ps-ssp", "staleness": 1}),
            "fp16": client.submit({**BASE, "name": "fp16", "compression": "fp16"}),
            "bf16": client.submit({**BASE, "name": "bf16", "compression": "bf16", "checkpoint_every": 40,
                                   "keep_checkpoints": 2}),
        }
        return {k: j.wait(timeout=240) for k, j in submitted.items()}


def test_async_applies_every_push_and_records_staleness(jobs):
    info = jobs["async"]
    assert info.state == "SUCCEEDED"
    assert info.version == 2 * info.total_steps  # one update per push
    assert info.metrics["val_accuracy"] >= 0.85
    assert "max_staleness" in info.metrics


def test_ssp_finishes_learns_and_bounds_staleness(jobs):
    info = jobs["ssp"]
    assert info.state == "SUCCEEDED"
    assert info.version == 2 * info.total_steps
    assert info.metrics["val_accuracy"] >= 0.85
    # a worker at step t waits for the other to reach t - s, which can then run to t + s + 1:
    # at most (N - 1) * (2s + 1) updates land between a pull and its push
    assert info.metrics["max_staleness"] <= (2 - 1) * (2 * 1 + 1)


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
def test_compressed_jobs_learn(jobs, kind):
    info = jobs[kind]
    assert info.state == "SUCCEEDED" and info.version == info.total_steps
    assert info.metrics["val_accuracy"] >= 0.85


def test_checkpoints_every_k_steps_keep_the_last_n(jobs, server, tmp_path):
    info = jobs["bf16"]
    with Client(server.address) as client:
        ckpts = client.list_checkpoints(info.id)
        assert [c.step for c in ckpts][-1] == info.total_steps
        assert len(ckpts) == 2 and ckpts[0].step % 40 == 0
        params = final_params(client, info, tmp_path)
        # the file loads into plain PyTorch, and its metadata names the job
        model = mlp(hidden=[64])
        model.load_state_dict(params, strict=True)
        from safetensors import safe_open

        path = tmp_path / "meta.safetensors"
        client.pull_checkpoint(info.id, path, step=ckpts[0].step)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert meta["job_id"] == info.id and int(meta["step"]) == ckpts[0].step
        early = load_file(path)
        assert early.keys() == params.keys()
        assert any(not torch.equal(early[k], params[k]) for k in params)
