"""allreduce mode end to end, through the real server (port 0) and real Ray workers that form
a Gloo group: the same guarantee as ps-sync, and the same view for the user.

- with N workers of batch b, the final parameters equal single-process PyTorch on the same
  global batches of N*b samples (<= 1e-5 after 100 steps) for SGD-momentum, Adam and AdamW,
  N = 1, 2, 4; and ps-sync gives the same parameters for the same spec;
- fp16/bf16 compression of the all-reduce trains, close to the float32 result;
- the default suite runs each optimizer and world size once, and bf16; CI runs the rest of the
  matrix (marked ``matrix``);
- status shows every worker while it runs, checkpoints come from rank 0, cancel ends the group.
"""

from __future__ import annotations

import os

import pytest
import torch

from gradhub.client.client import Client

from ..conftest import final_params, selected, selected_tests, tiered, wait_for
from .test_exactness import OPTIMIZERS, SEED, STEPS, WORLD_SIZES, reference
from .test_exactness import spec as ps_spec


def spec(workers: int, optimizer: str, mode: str = "allreduce", **extra) -> dict:
    return {**ps_spec(workers, OPTIMIZERS[optimizer]), "mode": mode,
            "name": f"{mode}-{optimizer}-{workers}", **extra}


SAME_SPEC = ("adam", 2)  # run in both modes
COMPRESSED = ("fp16", "bf16")
# the default suite's exactness jobs: each optimizer and world size once; CI runs the rest (matrix)
DEFAULT = {(1, "sgd-momentum"), (2, "adam"), (4, "adamw")}


@pytest.fixture(scope="module")
def finished(request, server, tmp_path_factory):
    """The jobs the selected tests read, submitted at once (the FIFO queue runs them as the CPUs
    allow)."""
    tests, wanted = selected_tests(request), selected(request, "job")
    if tests & {"test_ps_sync_and_allreduce_give_the_same_parameters", "test_the_user_sees_the_same_metrics_as_in_ps_modes",
                "test_compressed_allreduce_trains_close_to_float32"}:
        wanted.add((2, "adam"))  # what they compare with
    with Client(server.address) as client:
        jobs = {("allreduce", n, opt): client.submit(spec(n, opt)) for n, opt in sorted(wanted)}
        if "test_ps_sync_and_allreduce_give_the_same_parameters" in tests:
            jobs[("ps-sync", *SAME_SPEC[::-1])] = client.submit(spec(SAME_SPEC[1], SAME_SPEC[0], mode="ps-sync"))
        for c in selected(request, "compression"):
            jobs[(c, 2, "adam")] = client.submit(spec(2, "adam", compression=c, name=f"allreduce-{c}"))
        if "test_rank_0_streams_checkpoints_that_pull_and_resume" in tests:
            jobs[("checkpoints", 2, "sgd-momentum")] = client.submit(
                spec(2, "sgd-momentum", checkpoint_every=25, keep_checkpoints=10, eval_every=50, name="ckpt"))
        tmp = tmp_path_factory.mktemp("allreduce")
        out = {}
        for key, job in jobs.items():
            info = job.wait(timeout=240)
            out[key] = (info, final_params(client, info, tmp))
        return out


@pytest.mark.parametrize("job", tiered([(n, opt) for opt in OPTIMIZERS for n in WORLD_SIZES], DEFAULT), ids=[f"{opt}-{n}" for opt in OPTIMIZERS for n in WORLD_SIZES])
def test_allreduce_equals_single_process_pytorch(finished, job):
    workers, optimizer = job
    info, params = finished[("allreduce", workers, optimizer)]
    assert info.state == "SUCCEEDED" and info.mode == "allreduce"
    assert info.step == info.version == info.total_steps == STEPS
    expected = reference(workers, OPTIMIZERS[optimizer])
    assert params.keys() == expected.keys()
    worst = max(float((params[k] - expected[k]).abs().max()) for k in expected)
    assert worst <= 1e-5, f"max |gradhub - pytorch| = {worst:.3g} for {optimizer} with {workers} workers"
    torch.manual_seed(SEED)
    from gradhub.worker.models import mlp

    init = mlp(hidden=[32]).state_dict()
    assert max(float((params[k] - init[k]).abs().max()) for k in init) > 1e-2  # training moved them


def test_ps_sync_and_allreduce_give_the_same_parameters(finished):
    optimizer, workers = SAME_SPEC
    ps_info, ps = finished[("ps-sync", workers, optimizer)]
    ar_info, ar = finished[("allreduce", workers, optimizer)]
    assert ps_info.state == ar_info.state == "SUCCEEDED"
    assert ps.keys() == ar.keys()
    worst = max(float((ps[k] - ar[k]).abs().max()) for k in ps)
    assert worst <= 1e-6, f"ps-sync and allreduce differ by {worst:.3g}"


def test_the_user_sees_the_same_metrics_as_in_ps_modes(finished):
    info, _ = finished[("allreduce", 2, "adam")]
    assert {"loss", "avg_samples_per_s", "val_loss", "val_accuracy"} <= info.metrics.keys()
    assert info.metrics["val_accuracy"] > 0.8  # digits, 100 steps of Adam: it learnt
    assert info.metrics["allreduce_s"] > 0  # the time the gradients spent in the all-reduce


@pytest.mark.parametrize("compression", tiered(COMPRESSED, {"bf16"}))
def test_compressed_allreduce_trains_close_to_float32(finished, compression):
    info, params = finished[(compression, 2, "adam")]
    assert info.state == "SUCCEEDED", info.reason
    _, full = finished[("allreduce", 2, "adam")]
    diff = max(float((params[k] - full[k]).abs().max()) for k in full)
    assert 0 < diff < 0.05, f"{compression}: {diff:.3g} from the float32 all-reduce"
    assert info.metrics["val_accuracy"] > 0.8


def test_rank_0_streams_checkpoints_that_pull_and_resume(finished, server, tmp_path):
    info, params = finished[("checkpoints", 2, "sgd-momentum")]
    assert info.state == "SUCCEEDED", info.reason
    with Client(server.address) as client:
        steps = [c.step for c in client.list_checkpoints(info.id)]
        assert steps == [25, 50, 75, 100]
        logs = "\n".join(client.logs(info.id))
        assert "checkpoint at step 50" in logs and "step 50: val_accuracy=" in logs
    # the final checkpoint holds the optimizer's state too, as the ps modes' do
    loaded = server.manager.checkpoint_store.load(info.id)
    assert loaded.info.step == STEPS and loaded.optimizer_state is not None
    assert set(loaded.optimizer_state["state"][0]) == {"momentum_buffer"}
    assert all(torch.equal(loaded.params[k], params[k]) for k in params)


@pytest.mark.timeout(180)
def test_status_shows_each_worker_and_cancel_ends_the_group(server):
    with Client(server.address) as client:
        job = client.submit(spec(2, "sgd-momentum", steps=10**6, name="long"))

        def all_training() -> bool:
            info = client.get_job(job.id)
            assert info.state in ("QUEUED", "RUNNING"), info.reason
            return len(info.workers) == 2 and all(w.state == "running" and w.step > 0 and w.pid for w in info.workers)

        wait_for(all_training, timeout=120, what="both workers to train")
        info = client.get_job(job.id)
        assert 0 < info.step <= min(w.step for w in info.workers) and info.total_steps == 10**6
        assert all(w.host for w in info.workers)
        pids = [w.pid for w in info.workers]
        client.cancel(job.id)
        wait_for(lambda: client.get_job(job.id).state == "CANCELLED", timeout=60, what="the job to be cancelled")
        wait_for(lambda: not any(_alive(p) for p in pids), timeout=30, what="the workers' processes to end")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
