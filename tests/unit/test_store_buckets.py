"""Bucketed pushes (a ps worker pushes its step's gradient in runs of tensors while backward
runs): the store takes the step once its buckets cover the model, exactly as the whole push;
a bucket received again is a retry, one overlapping another is refused, and a worker that
registers again pushes its step afresh."""

from __future__ import annotations

import pytest
import torch

from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import ProtocolError, StateError
from gradhub.proto.v1 import tensor_pb2
from gradhub.server.store import ParameterStore, StoreConfig

LAYOUT = Layout(("a", "b", "c", "d"), ((3, 2), (4,), (5,), (2, 2)))  # 6 + 4 + 5 + 4 = 19 values


def _store(mode: str = "ps-sync", world: int = 2) -> ParameterStore:
    store = ParameterStore(StoreConfig("job", mode, world, optimizer="adam", lr=0.1))
    store.set_total_steps(8)
    for rank in range(world):
        store.register(rank)
    assert store.initialize(LAYOUT, torch.linspace(-1, 1, 19))
    return store


def _buckets(grad: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
    """(first, count, values) of the buckets a worker pushes, last tensors first."""
    return [(3, 1, grad[15:]), (1, 2, grad[6:15]), (0, 1, grad[:6])]


@pytest.mark.parametrize("mode", ["ps-sync", "ps-async"])
def test_a_step_in_buckets_equals_the_whole_push(mode: str) -> None:
    bucketed, whole = _store(mode), _store(mode)
    torch.manual_seed(0)
    for step in range(3):
        grads = [torch.randn(19) for _ in range(2)]
        for rank in (1, 0):
            whole.push(rank, step, step if mode == "ps-sync" else 0, grads[rank])
            for k, (first, count, values) in enumerate(_buckets(grads[rank])):
                accepted, _ = bucketed.push(rank, step, step if mode == "ps-sync" else 0, values,
                                            first=first, count=count)
                assert accepted
                if k < 2:  # the step is not the worker's before its last bucket
                    assert bucketed.workers()[rank].clock == step
        assert bucketed.version == whole.version
    for name, value in whole.parameters().items():
        assert torch.equal(bucketed.parameters()[name], value), name


def test_a_bucket_again_is_a_retry_and_an_overlapping_one_is_refused() -> None:
    store = _store(world=1)
    assert store.push(0, 0, 0, torch.ones(4), first=3, count=1)[0]
    assert store.push(0, 0, 0, torch.ones(4), first=3, count=1) == (False, 0)
    with pytest.raises(ProtocolError, match="first_tensor: tensors 2 to 3 overlap a bucket of step 0"):
        store.push(0, 0, 0, torch.ones(9), first=2, count=2)
    assert store.push(0, 0, 0, torch.ones(15), first=0, count=3) == (True, 1)  # the rest: the step is taken
    assert store.push(0, 0, 0, torch.ones(4), first=3, count=1) == (False, 1)  # a late retry of the step


def test_unused_parameters_of_a_bucket_are_left_alone() -> None:
    store = _store(world=1)
    before = store.parameters()
    store.push(0, 0, 0, torch.ones(9), first=1, count=2, unused=[1])  # "c" got no gradient
    store.push(0, 0, 0, torch.ones(6), first=0, count=1)
    store.push(0, 0, 0, torch.ones(4), first=3, count=1)
    after = store.parameters()
    assert torch.equal(after["c"], before["c"]) and not torch.equal(after["b"], before["b"])


def test_a_worker_registering_again_pushes_its_step_afresh() -> None:
    store = _store(world=1)
    store.push(0, 0, 0, torch.full((4,), 100.0), first=3, count=1)  # from the process that died
    store.register(0)
    assert store.push(0, 0, 0, torch.ones(4), first=3, count=1)[0]  # taken, not a retry
    store.push(0, 0, 0, torch.ones(15), first=0, count=3)
    reference = _store(world=1)
    reference.push(0, 0, 0, torch.ones(19))
    assert all(torch.equal(v, reference.parameters()[k]) for k, v in store.parameters().items())


def test_buckets_are_runs_of_whole_tensors_from_the_last_one() -> None:
    from gradhub.worker.buckets import bucket_runs

    assert bucket_runs(LAYOUT, 10**6) == [(0, 4)]  # one bucket: the whole push after backward
    assert bucket_runs(LAYOUT, 40) == [(2, 2), (0, 2)]  # 36 bytes, then 40
    assert bucket_runs(LAYOUT, 1) == [(3, 1), (2, 1), (1, 1), (0, 1)]  # a tensor over the cap is its own


def _early(world: int = 2) -> ParameterStore:
    store = ParameterStore(StoreConfig("job", "ps-sync", world, optimizer="adam", lr=0.1, apply_buckets=True))
    store.set_total_steps(8)
    for rank in range(world):
        store.register(rank)
    assert store.initialize(LAYOUT, torch.linspace(-1, 1, 19))
    return store


def test_ps_sync_applies_each_bucket_once_every_worker_has_pushed_it() -> None:
    """With ``apply_buckets``, a bucket is applied as soon as every worker's copy is in: its
    new values may be pulled ahead of the step (the others' not), a pull of the step in
    flight still gets the step's old values, and the step ends bit for bit as the whole push."""
    early, whole = _early(), _store()
    before = early.parameters()
    torch.manual_seed(0)
    for step in range(3):
        grads = [torch.randn(19) for _ in range(2)]
        for rank in (1, 0):
            whole.push(rank, step, step, grads[rank])
        first, count, _ = _buckets(grads[0])[0]
        for rank in (1, 0):
            early.push(rank, step, step, _buckets(grads[rank])[0][2], first=first, count=count)
        assert early.version == step  # the step is not done, its last tensor's bucket is applied
        ahead = early.try_pull(0, step + 1, tensor_pb2.FLOAT32, first, count, ahead=True)
        assert ahead is not None and ahead.version == step + 1
        assert early.try_pull(0, step + 1, tensor_pb2.FLOAT32, 1, 2, ahead=True) is None  # not applied yet
        if step == 0:
            assert not torch.equal(ahead.data, before["d"].reshape(-1))
            again = early.try_pull(1, 0, tensor_pb2.FLOAT32)  # a worker that registered again mid-step
            assert again is not None and torch.equal(again.data, torch.linspace(-1, 1, 19))
            with pytest.raises(StateError, match="applied in part"):
                early.checkpoint_state()
        for rank in (1, 0):
            for f, c, values in _buckets(grads[rank])[1:]:
                early.push(rank, step, step, values, first=f, count=c)
        assert early.version == step + 1
    for name, value in whole.parameters().items():
        assert torch.equal(early.parameters()[name], value), name


def test_a_bucket_applied_stays_applied_when_its_worker_registers_again() -> None:
    early, whole = _early(), _store()
    grads = [torch.randn(19, generator=torch.Generator().manual_seed(r)) for r in range(2)]
    for rank in (0, 1):
        whole.push(rank, 0, 0, grads[rank])
        early.push(rank, 0, 0, _buckets(grads[rank])[0][2], first=3, count=1)  # applied
    early.push(1, 0, 0, _buckets(grads[1])[1][2], first=1, count=2)
    early.register(1)  # its process died mid-step; the new one pushes the step afresh
    for f, c, values in _buckets(grads[1]):
        early.push(1, 0, 0, values, first=f, count=c)
    for f, c, values in _buckets(grads[0])[1:]:
        early.push(0, 0, 0, values, first=f, count=c)
    assert early.version == 1
    for name, value in whole.parameters().items():
        assert torch.equal(early.parameters()[name], value), name


def test_workers_must_push_the_same_buckets() -> None:
    early = _early()
    early.push(0, 0, 0, torch.ones(4), first=3, count=1)
    with pytest.raises(ProtocolError, match="overlaps bucket"):
        early.push(1, 0, 0, torch.ones(9), first=2, count=2)
    with pytest.raises(ProtocolError, match="same buckets"):
        early.push(1, 0, 0, torch.ones(19))


def test_a_bucket_applied_wakes_the_pulls_that_wait_for_it() -> None:
    early = _early()
    woken: list[int] = []
    early.push(0, 0, 0, torch.ones(4), first=3, count=1)
    early.add_listener(lambda: woken.append(early.version))
    early.push(1, 0, 0, torch.ones(4), first=3, count=1)  # the bucket is whole: applied
    assert woken == [0] and early.try_pull(0, 1, tensor_pb2.FLOAT32, 3, 1, ahead=True) is not None


def test_async_applies_each_bucket_on_arrival_and_once() -> None:
    """ps-async with ``apply_buckets``: a bucket changes the parameters as it arrives, the
    worker's last one makes the version, and a worker that registers again mid-step pushes
    its step afresh without a bucket applied twice: the result is the whole push's."""
    config = StoreConfig("job", "ps-async", 1, optimizer="adam", lr=0.1, apply_buckets=True)
    early = ParameterStore(config)
    early.set_total_steps(8)
    early.register(0)
    assert early.initialize(LAYOUT, torch.linspace(-1, 1, 19))
    whole = _store("ps-async", world=1)
    torch.manual_seed(0)
    grads = [torch.randn(19) for _ in range(2)]
    for step, grad in enumerate(grads):
        whole.push(0, step, step, grad)
        buckets = _buckets(grad)
        first, count, values = buckets[0]
        before = early.parameters()["d"].clone()
        early.push(0, step, step, values, first=first, count=count)
        assert early.version == step and not torch.equal(early.parameters()["d"], before)  # applied on arrival
        if step == 1:  # the worker's process dies here; the new one pushes the step afresh
            early.register(0)
            for f, c, v in buckets:
                early.push(0, step, step, v, first=f, count=c)
        else:
            for f, c, v in buckets[1:]:
                early.push(0, step, step, v, first=f, count=c)
        assert early.version == step + 1
    for name, value in whole.parameters().items():
        assert torch.equal(early.parameters()[name], value), name
