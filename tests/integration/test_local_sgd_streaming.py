"""Streaming local-sgd (``fragments``, Streaming DiLoCo) through the real server and real Ray
workers: a job equals a plain single-process reference of the same schedule (N model copies,
fragment p's pseudo-gradient averaged and its outer step taken at its staggered step, its new
global values merged ``fragment_overlap`` steps later with ``fragment_mix``) to <= 1e-5, also
when a worker is killed mid-round; with one fragment the reference is plain DiLoCo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from gradhub.client.client import Client
from gradhub.proto.codec import Layout
from gradhub.worker.data import digits, get_batch, global_batch_indices
from gradhub.worker.models import mlp
from gradhub.worker.sync_schedule import SyncSchedule

from ..conftest import final_params
from .test_local_sgd import (
    BATCH,
    HIDDEN,
    INNER,
    OUTER,
    SEED,
    _optimizer,
    diloco,
    first_read_at,
    spec,
    worst,
)


def streaming_diloco(workers: int, steps: int, h: int, inner: dict, outer: dict, fragments: int = 1,
                     overlap: int = 0, mix: float = 0.0) -> dict[str, torch.Tensor]:
    """Plain single-process Streaming DiLoCo: the reference. Every boundary b (inner steps done)
    first takes the syncs due at b (each after merging what is still in flight), then merges
    the exchanges due by b, then trains step b on every copy."""
    torch.manual_seed(SEED)
    model = mlp(hidden=HIDDEN)
    params = list(model.parameters())
    copies = []
    for _ in range(workers):
        torch.manual_seed(SEED)
        copy = mlp(hidden=HIDDEN)
        copies.append((list(copy.parameters()), copy, _optimizer(copy.parameters(), inner)))
    outer_opt = _optimizer(params, outer)
    parts = Layout(tuple(n for n, _ in model.named_parameters()), tuple(tuple(p.shape) for p in params)) \
        .partition(fragments)
    schedule = SyncSchedule(h, fragments, overlap, steps)
    known = [p.detach().clone() for p in params]  # the global values the workers last received
    pending: list[tuple[int, int, list[torch.Tensor]]] = []  # (merge at, first tensor, new global values)

    def merge(due: int) -> None:
        for item in [x for x in pending if x[0] <= due]:
            pending.remove(item)
            _, first, values = item
            for k, value in enumerate(values):
                known[first + k] = value
                with torch.no_grad():
                    for local, _, _ in copies:
                        local[first + k].mul_(mix).add_(value, alpha=1 - mix) if mix else local[first + k].copy_(value)

    train, _ = digits()
    loss_fn = nn.CrossEntropyLoss()
    sync = 0
    for b in range(steps + 1):
        while sync < schedule.syncs and schedule.boundary(sync) == b:
            merge(steps)
            first, count = parts[schedule.fragment(sync)]
            mine = range(first, first + count)
            deltas = [[known[i] - local[i].detach() for i in mine] for local, _, _ in copies]
            for i, p in enumerate(params):
                p.grad = sum(d[i - first] for d in deltas) / workers if i in mine else None
            outer_opt.step()
            pending.append((schedule.merge_at(sync), first, [params[i].detach().clone() for i in mine]))
            sync += 1
        merge(b)
        if b == steps:
            break
        for rank, (_, copy, opt) in enumerate(copies):
            idx = global_batch_indices(len(train), workers * BATCH, SEED, b)[rank * BATCH:(rank + 1) * BATCH]
            x, y = get_batch(train, idx)
            opt.zero_grad()
            loss_fn(copy(x), y).backward()
            opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_one_fragment_of_the_reference_is_plain_diloco():
    assert worst(streaming_diloco(2, 20, 5, INNER, OUTER), diloco(2, 20, 5, INNER, OUTER)) == 0.0


STEPS, H, WORKERS = 40, 10, 2
# 3 fragments of rounds of 10 sync at steps 3, 6, 10, 13, ...: the kill at step 27 lands while sync 7's
# exchange (pushed at 26, merged at 28) is in flight; the worker replays syncs 6 and 7 from its
# state kept at sync 6 (checkpoint_every 3), then takes sync 7's values from the server
KILL_RANK, KILL_STEP = 1, 27


@pytest.mark.timeout(300)
def test_streaming_jobs_equal_the_reference_also_with_a_worker_killed(server, tmp_path):
    # fragments on both transports: this one on gRPC streams, the other on the data plane
    plain = {**spec(WORKERS, STEPS, H, INNER), "name": "streaming", "fragments": 2, "transport": "grpc"}
    overlapped = {**spec(WORKERS, STEPS, H, INNER), "name": "streaming-killed", "fragments": 3,
                  "fragment_overlap": 2, "fragment_mix": 0.5, "checkpoint_every": 3, "max_restarts": 1,
                  "working_dir": str(Path(__file__).parent / "user_code"),
                  "dataset": {"factory": "gh_zoo:kill_on_sample_digits",
                              "args": {"at": first_read_at(WORKERS, KILL_RANK, KILL_STEP),
                                       "marker": str(tmp_path / "fired")}}}
    with Client(server.address) as client:
        jobs = [client.submit(plain), client.submit(overlapped)]
        infos = [job.wait(timeout=240) for job in jobs]
        for info in infos:
            assert info.state == "SUCCEEDED", (info.reason, client.logs(info.id))
        logs = "\n".join(client.logs(infos[1].id))
        assert (tmp_path / "fired").exists() and logs.count(" died ") == 1, logs
        assert [i.total_steps for i in infos] == [STEPS // H * 2, STEPS // H * 3]  # a server step per fragment
        got = [final_params(client, info, tmp_path / info.name) for info in infos]
    for params, (f, overlap, mix) in zip(got, [(2, 0, 0.0), (3, 2, 0.5)], strict=True):
        expected = streaming_diloco(WORKERS, STEPS, H, INNER, OUTER, f, overlap, mix)
        assert worst(params, expected) <= 1e-5, f"{f} fragments: differs from the reference by {worst(params, expected):.3g}"
    assert worst(got[0], diloco(WORKERS, STEPS, H, INNER, OUTER)) > 1e-4  # streaming is not plain DiLoCo
