"""A sharded parameter server (``ps_shards``) on the wire, against a real server on port 0 whose
workers are this test (an external launcher runs the shards in the server's process: the same
``ShardServer`` that a Ray actor runs). Store 0 is the server's control store, which holds no
value (``gradhub.proto.shards``); shards 1 to 3 hold w[0:3], w[3:6] and b.

- a worker learns every shard's data plane at registration, pushes its gradient cut into the
  shards' slices and gets each slice's parameters back into the right place;
- ``gradhub status`` shows every shard: its slice, its version, the bytes it moved;
- a shard admits only the credential of a worker's latest registration, and checks every
  header against its own slice before reading a payload;
- a job that clips its gradient takes each step with the norm over every shard: each shard
  answers a push with its part, and the worker's pull brings the total;
- a quantised push (int8, int4) quantises each shard's slice on its own, which that shard decodes
  (an async job that clips names the norm of the decoded values);
- a worker that died between its pushes to two shards does that step again;
- a gradient pushed in buckets while backward runs reaches each shard as buckets of its slice
  (quantised: each piece on its own);
- in ps-async every shard takes a checkpoint with the same pushes (a pull past it waits).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gradhub.client.client import Client
from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import AuthError, ProtocolError
from gradhub.proto.quant import BlockQuant
from gradhub.proto.shards import shards_of, stores_for
from gradhub.proto.v1 import ps_pb2, tensor_pb2
from gradhub.server.app import Server
from gradhub.server.config import ServerConfig
from gradhub.server.launcher import ExternalLauncher
from gradhub.worker.data_link import DataLink
from gradhub.worker.server_link import ServerLink

from ..conftest import wait_for, worker_link

LAYOUT = Layout(("w", "b"), ((2, 3), (4,)))
NUMEL, LR, SHARDS = 10, 0.5, 3
STORES = stores_for(SHARDS)  # the server's control store (no value) and the shards


@pytest.fixture
def server(tmp_path):
    with Server(ServerConfig(port=0, data_dir=tmp_path), launcher=ExternalLauncher()) as s:
        yield s


def _running(server: Server, workers: int = 1, **extra: object) -> str:
    with Client(server.address) as client:
        info = client.submit({"name": "shards", "workers": workers, "model": "mlp", "dataset": "digits",
                              "steps": 10, "optimizer": {"name": "sgd", "lr": LR}, "resources": {"cpus": 1},
                              "ps_shards": SHARDS, **extra})
        wait_for(lambda: client.get_job(info.id).state == "RUNNING", 30, "the job to run")
    return info.id


def _worker(server: Server, job_id: str, rank: int = 0) -> tuple[ServerLink, ps_pb2.RegisterResponse]:
    link = worker_link(server, job_id, rank)
    return link, link.register("t", 0, total_steps=10, train_size=1)


def test_a_worker_trains_on_every_shard_and_status_shows_them(server: Server) -> None:
    job_id = _running(server)
    link, reg = _worker(server, job_id)
    with link:
        assert len(reg.shards) == SHARDS and all(e.credential == reg.data.credential for e in reg.shards)
        assert link.transport == f"shm ({SHARDS} shards)"  # every shard on this host: shared memory
        link.init_parameters(LAYOUT, torch.arange(NUMEL, dtype=torch.float32))
        params = torch.empty(NUMEL)
        version = link.pull(LAYOUT, 0, params).version
        assert torch.equal(params, torch.arange(NUMEL, dtype=torch.float32))
        for step in range(3):
            grad = torch.arange(NUMEL, dtype=torch.float32) + step  # a different value in every place
            version = link.push_pull(LAYOUT, step, version, grad, params).version
            assert version == step + 1
        expected = torch.arange(NUMEL, dtype=torch.float32) - LR * (3 * torch.arange(NUMEL) + 3)
        assert torch.equal(params, expected)

        with Client(server.address) as client:
            def shown() -> bool:
                shards = client.get_job(job_id).shards
                return len(shards) == STORES and all(s.version == 3 for s in shards)
            wait_for(shown, 10, "every shard at version 3 in the job's status")
            shards = client.get_job(job_id).shards
        assert [(s.first, s.end) for s in shards] == [(0, 0), (0, 3), (3, 6), (6, 10)]  # the control: none
        for s in shards:
            assert s.host and s.bytes_in == 3 * (s.end - s.first) * 4  # three pushes of its slice
            assert s.bytes_out == 4 * (s.end - s.first) * 4  # the first pull and three


def test_a_shard_admits_the_latest_registration_only_and_checks_headers(server: Server) -> None:
    job_id = _running(server)
    link, reg = _worker(server, job_id)
    with link:
        link.init_parameters(LAYOUT, torch.zeros(NUMEL))
        endpoint = reg.shards[0]
        stranger = ps_pb2.DataEndpoint()
        stranger.CopyFrom(endpoint)
        stranger.credential = "guessed"
        with pytest.raises(AuthError, match="credential"):
            DataLink(stranger, job_id, 0, "127.0.0.1").connect()
        mine = DataLink(endpoint, job_id, 0, "127.0.0.1")
        mine.connect()
        # a push of the whole model's tensors to shard 1 (whose slice is 3 values of "w") is refused
        header = ps_pb2.PushHeader(job_id=job_id, rank=0, step=0, tensors=LAYOUT.metas(tensor_pb2.FLOAT32))
        with pytest.raises(ProtocolError, match="tensors"):
            mine.push(header, torch.zeros(NUMEL), tensor_pb2.FLOAT32)
        _, again = _worker(server, job_id)  # a new registration: a new credential on every shard
        assert again.shards[0].credential != endpoint.credential
        with pytest.raises(AuthError, match="credential"):
            DataLink(endpoint, job_id, 0, "127.0.0.1").connect()


def test_a_job_that_clips_over_shards_steps_with_the_norm_over_every_shard(server: Server) -> None:
    job_id = _running(server, clip_grad_norm=1.0)
    link, reg = _worker(server, job_id)
    with link:
        assert reg.clip_across_shards
        link.init_parameters(LAYOUT, torch.zeros(NUMEL))
        params = torch.empty(NUMEL)
        version = link.pull(LAYOUT, 0, params).version
        grad = torch.arange(NUMEL, dtype=torch.float32)  # norm 16.9 over the three shards: scaled to 1
        assert link.push_pull(LAYOUT, 0, version, grad, params).version == 1
        step_one = -LR * grad / (grad.norm() + 1e-6)  # what clip_grad_norm_(max_norm=1) and SGD make of it
        torch.testing.assert_close(params, step_one)
        # a push without a pull (a worker's last step) still brings every shard the total
        assert link.push(LAYOUT, 1, 1, grad / 100)  # norm 0.17: not scaled
        assert link.pull(LAYOUT, 2, params).version == 2
        torch.testing.assert_close(params, step_one - LR * grad / 100)
        # a push that asks for the next parameters at once is refused: they wait for the norm
        shard = shards_of(LAYOUT, STORES)[1]
        mine = DataLink(reg.shards[0], job_id, 0, "127.0.0.1")
        mine.connect()
        header = ps_pb2.PushHeader(job_id=job_id, rank=0, step=2, base_version=2,
                                   tensors=shard.layout.metas(tensor_pb2.FLOAT32))
        with pytest.raises(ProtocolError, match="pull_next"):
            mine.push(header, torch.zeros(shard.hi - shard.lo), tensor_pb2.FLOAT32,
                      then_pull=(shard.layout, torch.empty(shard.hi - shard.lo)))


def test_a_step_held_for_its_norm_is_taken_when_its_worker_registers_again(server: Server) -> None:
    """The worker that would have brought the total died after its pushes: registering again
    settles the step, as the total it would have sent."""
    job_id = _running(server, clip_grad_norm=1.0)
    link, reg = _worker(server, job_id)
    with link:
        link.init_parameters(LAYOUT, torch.zeros(NUMEL))
        grad = torch.arange(NUMEL, dtype=torch.float32)
        parts = []
        for endpoint, shard in zip([reg.data, *reg.shards], shards_of(LAYOUT, STORES), strict=True):
            data = DataLink(endpoint, job_id, 0, "127.0.0.1")
            data.connect()
            header = ps_pb2.PushHeader(job_id=job_id, rank=0, step=0, tensors=shard.layout.metas(tensor_pb2.FLOAT32))
            parts.append(data.push(header, grad[shard.lo:shard.hi], tensor_pb2.FLOAT32).clip_part_sq)
            data.close()
        assert sum(parts) == pytest.approx(float(grad.double().square().sum()))
        assert server.manager.store(job_id).version == 0  # held: no worker sent the total
    again, reg = _worker(server, job_id)  # the worker, restarted
    with again:
        assert reg.next_step == 1
        params = torch.empty(NUMEL)
        assert again.pull(LAYOUT, 1, params).version == 1
        torch.testing.assert_close(params, -LR * grad / (grad.norm() + 1e-6))


def test_a_worker_that_pushed_a_step_to_some_shards_only_does_it_again(server: Server) -> None:
    """Its process died between its pushes to the control store and to the shards: registered
    again, it is told that step, pulls its parameters from every store (the control's buffers
    from before the step it took alone) and pushes it again; the result is an undisturbed run's."""
    job_id = _running(server)
    link, reg = _worker(server, job_id)
    init = torch.arange(NUMEL, dtype=torch.float32)
    grad = torch.ones(NUMEL)
    with link:
        link.init_parameters(LAYOUT, init)
        shard = shards_of(LAYOUT, STORES)[0]
        data = DataLink(reg.data, job_id, 0, "127.0.0.1")
        data.connect()
        header = ps_pb2.PushHeader(job_id=job_id, rank=0, step=0, tensors=shard.layout.metas(tensor_pb2.FLOAT32))
        assert data.push(header, grad[shard.lo:shard.hi], tensor_pb2.FLOAT32).accepted
        data.close()
        assert server.manager.store(job_id).version == 1  # the control took step 0; the shards wait for it
    again, reg = _worker(server, job_id)
    with again:
        assert reg.next_step == 0  # the least of its steps on the shards
        params = torch.empty(NUMEL)
        assert again.pull(LAYOUT, 0, params).version == 0
        assert torch.equal(params, init)  # step 0's parameters on every shard
        assert again.push_pull(LAYOUT, 0, 0, grad, params).version == 1
        assert torch.equal(params, init - LR * grad)


@pytest.mark.parametrize(("compression", "wire"), [("int8", tensor_pb2.QINT8), ("int4", tensor_pb2.QINT4)])
def test_a_quantised_push_is_quantised_slice_by_slice(server: Server, compression: str, wire: int) -> None:
    """Each shard's slice on its own, with error feedback per slice: shards 1 and 2 hold pieces
    of w of one shape (w[0:3], w[3:6]), each with its own rest to carry."""
    job_id = _running(server, compression=compression, compression_block=8, error_feedback=True)
    link = worker_link(server, job_id, 0, compression=compression, compression_block=8, error_feedback=True)
    link.register("t", 0, total_steps=10, train_size=1)
    quant = BlockQuant(wire, 8)  # a block per slice here (3, 3 and 4 values); the whole: 8 + 2
    sent, rest = torch.zeros(NUMEL), torch.zeros(NUMEL)
    with link:
        link.init_parameters(LAYOUT, torch.zeros(NUMEL))
        params = torch.empty(NUMEL)
        version = link.pull(LAYOUT, 0, params).version
        for step in range(2):
            grad = torch.linspace(-1, 2, NUMEL) if step == 0 else torch.linspace(0.7, -0.3, NUMEL)
            assert link.push_pull(LAYOUT, step, version, grad, params).version == step + 1
            version = step + 1
            if step == 0:
                assert not torch.equal(_decoded_by_slice(quant, grad, rest.clone()),
                                       quant.dequantize(*quant.quantize(grad)))  # other blocks than the whole's
            sent += _decoded_by_slice(quant, grad, rest)
    assert rest[0:3].abs().sum() > 0 and rest[3:6].abs().sum() > 0  # each piece of w has a rest of its own
    assert torch.equal(params, -LR * sent)


def _decoded_by_slice(quant: BlockQuant, grad: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """What the shards decode of a push of ``grad``, each slice quantised on its own after its
    ``rest`` (what error feedback carries) is added; ``rest`` becomes what this push leaves."""
    out = torch.empty_like(grad)
    for s in shards_of(LAYOUT, STORES):
        x = grad[s.lo:s.hi] + rest[s.lo:s.hi]
        out[s.lo:s.hi] = quant.dequantize(*quant.quantize(x))
        rest[s.lo:s.hi] = x - out[s.lo:s.hi]
    return out


def test_buckets_reach_each_shard_as_buckets_of_its_slice(server: Server) -> None:
    """Shards hold w[0:3], w[3:6] and b here; the bucket of b goes to the third shard alone,
    the last bucket (w, after backward) to the first two, with every shard's parameters back."""
    job_id = _running(server)
    link, _ = _worker(server, job_id)
    with link:
        grads = [torch.arange(NUMEL, dtype=torch.float32) + step for step in range(2)]
        # the control store gets its push with the last bucket: after b's push it still waits for the step
        params = _two_steps_in_buckets(link, grads, lambda step: server.manager.store(job_id).version == step)
        assert torch.equal(params, -LR * (2 * torch.arange(NUMEL, dtype=torch.float32) + 1))
        with Client(server.address) as client:
            wait_for(lambda: all(s.version == 2 for s in client.get_job(job_id).shards), 10, "every shard at 2")
            shards = client.get_job(job_id).shards
        assert [s.bytes_in for s in shards] == [0, 2 * 3 * 4, 2 * 3 * 4, 2 * 4 * 4]  # each its own values, twice


def test_an_async_job_that_clips_over_shards_names_each_pushs_norm(server: Server) -> None:
    job_id = _running(server, mode="ps-async", clip_grad_norm=1.0)
    link, reg = _worker(server, job_id)
    with link:
        assert reg.clip_push_norm and not reg.clip_across_shards
        link.init_parameters(LAYOUT, torch.zeros(NUMEL))
        params = torch.empty(NUMEL)
        version = link.pull(LAYOUT, 0, params).version
        grad = torch.arange(NUMEL, dtype=torch.float32)  # norm 16.9 over the three shards: scaled to 1
        assert link.push_pull(LAYOUT, 0, version, grad, params).version == 1
        torch.testing.assert_close(params, -LR * grad / (grad.norm() + 1e-6))


@pytest.mark.parametrize(("compression", "wire"), [("int8", tensor_pb2.QINT8), ("int4", tensor_pb2.QINT4)])
def test_a_quantised_bucket_is_quantised_piece_by_piece(server: Server, compression: str, wire: int) -> None:
    """Shards hold w[0:3], w[3:6] and b: the bucket of b goes to the third shard alone, the last
    bucket (w) to the first two, each piece quantised on its own (each shard decodes its own
    bytes); error feedback carries each piece's rest into its next push."""
    job_id = _running(server, compression=compression, compression_block=8, error_feedback=True)
    link = worker_link(server, job_id, 0, compression=compression, compression_block=8, error_feedback=True)
    link.register("t", 0, total_steps=10, train_size=1)
    grads = [torch.linspace(-1, 2, NUMEL) * (step + 1) for step in range(2)]
    with link:
        params = _two_steps_in_buckets(link, grads)
    quant, rest = BlockQuant(wire, 8), torch.zeros(NUMEL)  # the buckets' pieces are the shards' slices here
    assert torch.equal(params, -LR * sum(_decoded_by_slice(quant, grad, rest) for grad in grads))


@pytest.mark.parametrize("shards", [2, 3])
@pytest.mark.parametrize("mode", ["ps-sync", "ps-async"])
def test_a_job_that_clips_over_shards_takes_its_gradient_in_buckets(server: Server, mode: str, shards: int) -> None:
    """Two shards hold w[0:5] and w[5:6] + b: b's bucket leaves the second's slice of the step
    incomplete, and is answered at once. Three hold w[0:3], w[3:6] and b: b's bucket completes
    the third's slice. ps-sync: the push that completes a shard's slice is answered with its
    part of the norm, and the pull after the last bucket (w's) brings every shard the total
    (without a part the pull is refused). Async: a push that completes a shard's slice before
    the last bucket waits in the worker until then, when the norm of the whole gradient is
    known, and goes with it (sent with b's own norm, the step would be scaled by another
    factor on the third shard)."""
    job_id = _running(server, mode=mode, clip_grad_norm=1.0, ps_shards=shards)
    link, _ = _worker(server, job_id)
    grads = [torch.arange(NUMEL, dtype=torch.float32), torch.arange(NUMEL, dtype=torch.float32) / 100]
    with link:
        params = _two_steps_in_buckets(link, grads)
    clipped = grads[0] / (grads[0].norm() + 1e-6)  # norm 16.9: scaled to 1; the second (0.17) is not
    torch.testing.assert_close(params, -LR * (clipped + grads[1]))


def test_an_async_job_that_clips_quantised_buckets_over_shards_names_the_decoded_norm(server: Server) -> None:
    """int8 buckets (each shard's pieces quantised on their own): the norm that goes with the
    step's last bucket is that of every piece the shards decode."""
    job_id = _running(server, mode="ps-async", clip_grad_norm=1.0, compression="int8", compression_block=8)
    link = worker_link(server, job_id, 0, compression="int8", compression_block=8)
    link.register("t", 0, total_steps=10, train_size=1)
    grads = [torch.linspace(-3, 13, NUMEL), torch.linspace(-3, 13, NUMEL) / 100]
    with link:
        params = _two_steps_in_buckets(link, grads)
    quant, rest = BlockQuant(tensor_pb2.QINT8, 8), torch.zeros(NUMEL)  # no error feedback: rest is dropped
    sent = [_decoded_by_slice(quant, grad, rest.zero_()) for grad in grads]  # pieces are the slices here
    assert float((sent[0].norm() - grads[0].norm()).abs()) > 1e-3  # the decoded norm is not the gradient's
    expected = -LR * (sent[0] / (sent[0].double().norm().float() + 1e-6) + sent[1])  # the second is not scaled
    torch.testing.assert_close(params, expected)


def test_a_quantised_last_step_of_a_job_that_clips_over_shards_brings_the_norm(server: Server) -> None:
    """A worker's last step pushes without a pull; over shards that clip it still pulls (the
    parameters into scratch) to bring the total, in the parameters' dtype, not the push's."""
    job_id = _running(server, clip_grad_norm=1.0, compression="int8", compression_block=8)
    link = worker_link(server, job_id, 0, compression="int8", compression_block=8)
    link.register("t", 0, total_steps=10, train_size=1)
    grad = torch.linspace(-3, 13, NUMEL)
    with link:
        link.init_parameters(LAYOUT, torch.zeros(NUMEL))
        params = torch.empty(NUMEL)
        assert link.push(LAYOUT, 0, link.pull(LAYOUT, 0, params).version, grad)
        assert link.pull(LAYOUT, 1, params).version == 1
    sent = _decoded_by_slice(BlockQuant(tensor_pb2.QINT8, 8), grad, torch.zeros(NUMEL))
    torch.testing.assert_close(params, -LR * sent / (sent.double().norm().float() + 1e-6))


def _two_steps_in_buckets(link: ServerLink, grads: list[torch.Tensor],
                          between: Callable[[int], bool] | None = None) -> torch.Tensor:
    """Two steps from zeros, each pushed in two buckets: b's while backward runs (then
    ``between(step)`` must hold), then w's, after backward, which brings every shard's
    parameters back. The parameters at the end."""
    link.init_parameters(LAYOUT, torch.zeros(NUMEL))
    params = torch.empty(NUMEL)
    version = link.pull(LAYOUT, 0, params).version
    w, b = LAYOUT.part(0, 1), LAYOUT.part(1, 1)
    for step, grad in enumerate(grads):
        assert link.push(b, step, version, grad[6:], first=1)
        assert between is None or between(step)
        version = link.push_pull(w, step, version, grad[:6], params, first=0, pull_layout=LAYOUT).version
        assert version == step + 1
    return params


@pytest.mark.parametrize(("compression", "wire"), [("int8", tensor_pb2.QINT8), ("int4", tensor_pb2.QINT4)])
def test_an_async_job_that_clips_quantised_pushes_over_shards_names_the_decoded_norm(
        server: Server, compression: str, wire: int) -> None:
    """The shards decode each slice's bytes and clip them by the norm of the whole decoded
    gradient (as one server clips the decoded whole), which the worker computes from its own
    payload: the values differ from the gradient's by the quantisation."""
    job_id = _running(server, mode="ps-async", clip_grad_norm=1.0, compression=compression, compression_block=8)
    link = worker_link(server, job_id, 0, compression=compression, compression_block=8)
    reg = link.register("t", 0, total_steps=10, train_size=1)
    with link:
        assert reg.clip_push_norm
        link.init_parameters(LAYOUT, torch.zeros(NUMEL))
        params = torch.empty(NUMEL)
        version = link.pull(LAYOUT, 0, params).version
        grad = torch.linspace(-3, 13, NUMEL)
        assert link.push_pull(LAYOUT, 0, version, grad, params).version == 1
    quant = BlockQuant(wire, 8)
    sent = torch.cat([quant.dequantize(*quant.quantize(grad[s.lo:s.hi])) for s in shards_of(LAYOUT, STORES)])
    assert float((sent.norm() - grad.norm()).abs()) > 1e-3  # the decoded norm is not the gradient's
    torch.testing.assert_close(params, -LR * sent / (sent.double().norm().float() + 1e-6))


def test_async_shards_take_each_checkpoint_at_one_point_of_every_worker(server: Server) -> None:
    """ps-async over three shards, a checkpoint every 2 steps: worker 0's pull of step 2 waits
    until worker 1's pushes before it are in on every shard; each shard takes the checkpoint
    with the same pushes, and they merge into the job's checkpoint at step 2."""
    job_id = _running(server, workers=2, mode="ps-async", checkpoint_every=2)
    links = [_worker(server, job_id, rank)[0] for rank in range(2)]
    params = [torch.empty(NUMEL), torch.empty(NUMEL)]
    grad = torch.ones(NUMEL)
    with links[0], links[1], Client(server.address) as client, ThreadPoolExecutor(1) as pool:
        links[0].init_parameters(LAYOUT, torch.zeros(NUMEL))
        version = links[0].pull(LAYOUT, 0, params[0]).version
        version = links[0].push_pull(LAYOUT, 0, version, grad, params[0]).version
        ahead = pool.submit(links[0].push_pull, LAYOUT, 1, version, grad, params[0])  # pulls step 2
        version = links[1].pull(LAYOUT, 0, params[1]).version
        version = links[1].push_pull(LAYOUT, 0, version, grad, params[1]).version
        wait_for(lambda: [s.version for s in client.get_job(job_id).shards] == [3] * STORES, 30,
                 "worker 0's two pushes and worker 1's first on every shard")
        assert not ahead.done()  # its pull waits for worker 1's push of step 1
        links[1].push_pull(LAYOUT, 1, version, grad, params[1])
        assert ahead.result(timeout=30).version == 4
        wait_for(lambda: [c.step for c in client.list_checkpoints(job_id)] == [2], 30,
                 "the checkpoint at step 2 written (every shard's part of it merged)")
