"""The headline guarantee: ps-sync with N workers of batch b equals single-process PyTorch
on the same global batches of N*b samples (max abs difference <= 1e-5 after 100 steps).

Runs through the real server (port 0) and real Ray workers, with tensors on the data plane
(``transport: auto``) and, for N = 2, on the gRPC fallback path as well, and with the parameter
server in 2 shards (one worker, each optimizer) and in 4 (two workers, AdamW, the gradient
clipped by its norm over every shard) (``ps_shards``: shard 0 in the server, the others Ray
actors, each updating its slice of the parameters with its own optimizer;
tests/unit/test_store_shards.py and test_shards.py compare every other count and optimizer with
the unsharded store bit for bit). N = 4, the gRPC and the sharded jobs push their gradient in
two buckets while backward runs (``bucket_mb`` below the model's first layer; with 2 shards the
first bucket goes to shard 1 alone, the second to both; with 4 the first to shard 3, whose
slice the second completes, with every other shard's, so each answers it with its part of the
norm); the others in one push after backward. All the jobs are submitted at once, so the FIFO queue runs them as the two logical
CPUs allow. The default suite runs each optimizer, world size and transport once (``DEFAULT``);
the rest of the matrix is marked ``matrix``, which CI runs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradhub.client.client import Client
from gradhub.worker.data import digits, get_batch, global_batch_indices
from gradhub.worker.models import mlp

from ..conftest import final_params, selected, tiered

STEPS, BATCH, SEED = 100, 16, 7
OPTIMIZERS = {
    "sgd-momentum": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "adam": {"name": "adam", "lr": 0.002},
    "adamw": {"name": "adamw", "lr": 0.002, "weight_decay": 0.05},
}
WORLD_SIZES = (1, 2, 4)
CASES = [(n, "auto") for n in WORLD_SIZES] + [(2, "grpc"), (1, "shards-2")]
# (workers, transport, optimizer) of every job
JOBS = [(n, t, name) for name in OPTIMIZERS for n, t in CASES] + [(2, "shards-4", "adamw")]
# the default suite's: each optimizer, world size and transport once; CI runs the rest (matrix)
DEFAULT = {(1, "auto", "sgd-momentum"), (2, "auto", "adam"), (4, "auto", "adamw"), (2, "grpc", "sgd-momentum"),
           (1, "shards-2", "adam"), (2, "shards-4", "adamw")}
BUCKETED = {(4, "auto"), (2, "grpc"), (1, "shards-2"), (2, "shards-4")}
SMALL_BUCKETS_MB = 0.004  # the 64x32 weight (8 KB) is a bucket, the rest of the model (1.4 KB) another
CLIPPED = {(2, "shards-4")}
CLIP_NORM = 0.6  # about half of the steps' gradient norms are above it (0.31 to 1.11)


def spec(workers: int, optimizer: dict, transport: str = "auto", bucket_mb: float | None = None,
         clip: float | None = None) -> dict:
    shards = int(transport.removeprefix("shards-")) if transport.startswith("shards-") else 1
    return {
        "name": f"exact-{optimizer['name']}-{workers}-{transport}", "mode": "ps-sync", "workers": workers,
        "transport": "auto" if shards > 1 else transport, "ps_shards": shards,
        "resources": {"cpus": 0.5}, "model": {"name": "mlp", "args": {"hidden": [32]}},
        "dataset": "digits", "optimizer": optimizer, "batch_size": BATCH, "steps": STEPS, "seed": SEED,
        **({} if bucket_mb is None else {"bucket_mb": bucket_mb}),
        **({} if clip is None else {"clip_grad_norm": clip}),
    }


def reference(workers: int, optimizer: dict) -> dict[str, torch.Tensor]:
    """Plain single-process PyTorch on the same global batches (the documented recipe)."""
    return clipped_reference(workers, optimizer, None)[0]


def clipped_reference(workers: int, optimizer: dict, clip: float | None) -> tuple[dict[str, torch.Tensor], int]:
    """``reference`` with ``clip_grad_norm_(clip)`` before each step (None: none), and how many
    steps it scaled down."""
    torch.manual_seed(SEED)
    model = mlp(hidden=[32])
    hyper = {k: v for k, v in optimizer.items() if k not in ("name", "lr")}
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer["name"]]
    opt = cls(model.parameters(), lr=optimizer["lr"], **hyper)
    train, _ = digits()
    loss_fn = nn.CrossEntropyLoss()
    clipped = 0
    for step in range(STEPS):
        x, y = get_batch(train, global_batch_indices(len(train), workers * BATCH, SEED, step))
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        if clip is not None:
            clipped += bool(torch.nn.utils.clip_grad_norm_(model.parameters(), clip) > clip)
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}, clipped


@pytest.fixture(scope="module")
def finished_jobs(request, server, tmp_path_factory):
    with Client(server.address) as client:
        jobs = {(n, t, name): client.submit(spec(n, OPTIMIZERS[name], t,
                                                 SMALL_BUCKETS_MB if (n, t) in BUCKETED else None,
                                                 CLIP_NORM if (n, t) in CLIPPED else None))
                for n, t, name in JOBS if (n, t, name) in selected(request, "job")}
        out = {}
        tmp = tmp_path_factory.mktemp("exact")
        for key, job in jobs.items():
            info = job.wait(timeout=240)
            out[key] = (info, final_params(client, info, tmp))
        return out


@pytest.mark.parametrize("job", tiered(JOBS, DEFAULT), ids=[f"{o}-{n}-{t}" for n, t, o in JOBS])
def test_ps_sync_equals_single_process_pytorch(finished_jobs, job):
    workers, transport, optimizer = job
    info, params = finished_jobs[job]
    assert info.state == "SUCCEEDED" and info.step == STEPS and info.version == STEPS
    clip = CLIP_NORM if (workers, transport) in CLIPPED else None
    expected, clipped = clipped_reference(workers, OPTIMIZERS[optimizer], clip)
    if clip is not None:
        assert 10 <= clipped <= STEPS - 10, f"clip_grad_norm scaled {clipped} of {STEPS} steps: the case tests little"
    assert params.keys() == expected.keys()
    worst = max(float((params[k] - expected[k]).abs().max()) for k in expected)
    assert worst <= 1e-5, f"max |gradhub - pytorch| = {worst:.3g} for {optimizer} with {workers} workers"
    # and training moved the parameters: the comparison is not trivially between two inits
    torch.manual_seed(SEED)
    init = mlp(hidden=[32]).state_dict()
    assert max(float((params[k] - init[k]).abs().max()) for k in init) > 1e-2
