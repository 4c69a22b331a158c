"""A ps worker's gradient goes to the server in buckets while backward still runs: through the
real server (port 0) and its data plane, the later layers' bucket arrives before the worker
pushes anything itself (the bucket thread sent it from inside backward), the step becomes the
worker's only with its last bucket, and the parameters that come back are those of the whole
push (a second job pushes the same gradient in one piece). With ``pull_buckets`` (a GPU worker's
default), the server applies each bucket as it is whole and the worker pulls it on a second
connection while backward runs: the round trip after backward carries the first layers' bucket
alone, and the parameters are the same."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradhub.worker.buckets import BucketPusher
from gradhub.worker.flat import FlatModel

from ..conftest import wait_for
from .test_data_plane import _running, _worker


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _step(server, cap_bytes: int, pull_buckets: bool = False, mode: str = "ps-sync",
          ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """One step of a fresh job: the parameters pulled after it, and the buckets."""
    job_id = _running(server, mode=mode)
    store = server.manager.store(job_id)
    model = _model()
    flat = FlatModel(model)
    with _worker(server, job_id) as link, BucketPusher(link, flat, cap_bytes, pull_buckets=pull_buckets) as pusher:
        link.init_parameters(flat.layout, flat.params.detach().clone())
        version = link.pull(flat.layout, 0, flat.params).version
        pusher.begin(0, version)
        flat.zero_grad()
        with pusher.micro_batch(0):
            torch.manual_seed(1)
            model(torch.randn(5, 4)).square().mean().backward()
        if pusher.bucketed:
            first_bytes = 4 * flat.layout.part(*pusher.runs[0]).numel
            wait_for(lambda: store.workers()[0].bytes_in >= first_bytes, 10, "the first bucket to arrive")
        assert store.workers()[0].clock == 0 and store.version == 0  # not the worker's step yet
        if pull_buckets:  # the applied buckets' parameters came back beside the pushes, before finish
            whole = 4 * flat.layout.numel
            ahead = whole - 4 * flat.layout.part(*pusher.runs[-1]).numel
            wait_for(lambda: store.workers()[0].bytes_out == whole + ahead, 10, "the applied buckets pulled")
        flat.gather_grads()
        pusher.finish(None, flat.unused(), flat.params)
        assert store.workers()[0].clock == 1 and store.version == 1
        if pull_buckets:  # the later layers' parameters are not in the model until their forward needs them
            before = flat.params.detach().clone()
            with torch.no_grad():
                model(torch.randn(5, 4))  # each module's forward lands its bucket's parameters
            assert not torch.equal(before, flat.params)
        return flat.params.detach().clone(), pusher.runs


@pytest.mark.parametrize("mode", ["ps-sync", "ps-async"])  # ps-async: each bucket applied as it arrives
def test_buckets_go_out_while_backward_runs_and_change_nothing(server, mode):
    params, runs = _step(server, cap_bytes=200, mode=mode)  # 6 tensors of 12 to 256 bytes: several buckets
    assert len(runs) > 2 and runs[-1][0] == 0
    whole, one = _step(server, cap_bytes=1 << 20, mode=mode)
    assert one == [(0, 6)]
    assert torch.equal(params, whole)


def test_each_applied_bucket_comes_back_while_backward_runs(server):
    params, runs = _step(server, cap_bytes=200, pull_buckets=True)
    whole, _ = _step(server, cap_bytes=1 << 20)
    assert len(runs) > 2 and torch.equal(params, whole)
