"""A job's curves: train points (loss, samples/s, learning rate; at most one a second) and a
point per evaluation, from ``Client.metrics`` (GetJobMetrics), and the same scalars in the job's
TensorBoard event files, whose folder ``get_job`` names; deleting the job removes both."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradhub.client.client import Client


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of the event files in ``folder`` (TFRecord framing: length, its CRC, the
    Event protobuf, its CRC), read with tensorboardX's own protos."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            length = int.from_bytes(data[pos:pos + 8], "little")
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["ps-sync", "allreduce"])
def test_curves_and_tensorboard_files(server, mode):
    spec = {"name": "curves", "mode": mode, "workers": 2, "resources": {"cpus": 0.5},
            "model": {"name": "mlp", "args": {"hidden": [16]}}, "dataset": "digits", "batch_size": 16,
            "steps": 200, "eval_every": 50, "optimizer": {"name": "sgd", "lr": 0.05},
            "lr_schedule": {"name": "step", "step_size": 100, "gamma": 0.5}}
    with Client(server.address) as client:
        info = client.submit(spec).wait(timeout=150)
        assert info.state == "SUCCEEDED", info.reason
        points = client.metrics(info.id)
        evals = [p for p in points if p.kind == "eval"]
        assert [p.step for p in evals] == [50, 100, 150, 200]
        assert all("val_accuracy" in p.metrics for p in evals)
        train = [p for p in points if p.kind == "train"]
        assert train and all(p.metrics["loss"] > 0 and p.metrics["samples_per_s"] > 0 for p in train)
        assert {round(p.metrics["lr"], 6) for p in train} <= {0.05, 0.025, 0.0125}
        assert [p.seq for p in points] == sorted(p.seq for p in points)
        assert client.metrics(info.id, after=points[-1].seq) == []

        folder = Path(client.get_job(info.id).tensorboard_dir)
        assert folder.is_dir() and folder.name == info.id
        found = scalars(folder)
        assert [step for step, _ in found["eval/val_accuracy"]] == [50, 100, 150, 200]
        assert len(found["train/loss"]) == len(train)
        client.delete(info.id)
        assert not folder.exists()
