"""local-sgd with quantised pseudo-gradients (compression int8 / int4) through the real server
and real Ray workers: on digits each reaches about the accuracy of the uncompressed run, and
``bytes_per_round`` shows what a round's push saves (int8 about a quarter of float32, int4 an
eighth, plus a float32 scale per block; the parameters pulled back stay float32)."""

from __future__ import annotations

import pytest

from gradhub.client.client import Client
from gradhub.proto.quant import BlockQuant
from gradhub.proto.v1 import tensor_pb2
from gradhub.worker.models import mlp

HIDDEN = [32]
STEPS, LOCAL_STEPS = 150, 10
RUNS = {
    "none": {},
    "int8": {"compression": "int8"},
    "int4": {"compression": "int4"},
    "int4-ef": {"compression": "int4", "error_feedback": True},
}


def spec(name: str, **extra) -> dict:
    return {"name": f"local-sgd-{name}", "mode": "local-sgd", "workers": 2, "resources": {"cpus": 0.5},
            "model": {"name": "mlp", "args": {"hidden": HIDDEN}}, "dataset": "digits", "batch_size": 16,
            "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.01}, "steps": STEPS,
            "local_steps": LOCAL_STEPS, "seed": 3, **extra}


# ~28 s (four trainings compared); the default suite pushes quantised gradients through the
# server in test_quantized_push.py and runs local-sgd in test_local_sgd*.py
@pytest.mark.long
@pytest.mark.timeout(420)
def test_quantised_pseudo_gradients_train_as_well_for_fewer_bytes(server):
    with Client(server.address) as client:
        jobs = {name: client.submit(spec(name, **extra)) for name, extra in RUNS.items()}
        infos = {name: job.wait(timeout=360) for name, job in jobs.items()}
    for name, info in infos.items():
        assert info.state == "SUCCEEDED", (name, info.reason)
    accuracy = {name: info.metrics["val_accuracy"] for name, info in infos.items()}
    assert accuracy["none"] > 0.85, accuracy
    for name in ("int8", "int4", "int4-ef"):
        assert accuracy[name] >= accuracy["none"] - 0.03, accuracy

    numel = sum(p.numel() for p in mlp(hidden=HIDDEN).parameters())
    pulled = 4 * numel  # the parameters come back as float32 in every run
    pushed = {name: info.metrics["bytes_per_round"] - pulled for name, info in infos.items()}
    assert pushed["none"] == 4 * numel
    assert pushed["int8"] == BlockQuant(tensor_pb2.QINT8).nbytes(numel)
    assert pushed["int4"] == pushed["int4-ef"] == BlockQuant(tensor_pb2.QINT4).nbytes(numel)
    assert pushed["int8"] / pushed["none"] == pytest.approx(0.25, abs=0.01)
    assert pushed["int4"] / pushed["none"] == pytest.approx(0.125, abs=0.01)
