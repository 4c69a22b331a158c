"""Fragments (local-sgd streaming): ``Layout.partition`` splits a model into runs of whole
tensors, and a store with fragments updates step s's fragment alone, exactly as torch.optim
does when only those parameters have a gradient; pushes and pulls of the wrong part are refused
with nothing changed."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import ProtocolError, SpecError
from gradhub.proto.v1 import tensor_pb2
from gradhub.server.store import ParameterStore, StoreConfig

LAYOUT = Layout(("a", "b", "c", "d"), ((3, 2), (4,), (5,), (2, 2)))  # 6 + 4 + 5 + 4 = 19 values
FP32 = tensor_pb2.FLOAT32


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_a_partition_is_contiguous_runs_that_cover_the_model(parts: int) -> None:
    runs = LAYOUT.partition(parts)
    assert len(runs) == parts and all(count >= 1 for _, count in runs)
    assert runs[0][0] == 0 and sum(count for _, count in runs) == len(LAYOUT.names)
    for (first, count), (nxt, _) in pairwise(runs):
        assert first + count == nxt


def test_a_partition_balances_the_values() -> None:
    even = Layout(tuple("abcdef"), ((10,),) * 6)
    assert even.partition(3) == ((0, 2), (2, 2), (4, 2))
    assert Layout(("big", "x", "y"), ((100,), (1,), (1,))).partition(2) == ((0, 1), (1, 2))


def test_more_parts_than_tensors_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="fragments: 5 fragments for a model of 4 parameter tensors"):
        LAYOUT.partition(5)


def test_a_part_is_a_layout_of_its_own() -> None:
    part = LAYOUT.part(1, 2)
    assert part.names == ("b", "c") and part.numel == 9 and LAYOUT.offset(1) == 6
    assert LAYOUT.part(0, 0) is LAYOUT
    with pytest.raises(ProtocolError, match="first_tensor: tensors 3 to 4"):
        LAYOUT.part(3, 2)


def _store(mode: str = "ps-sync", world: int = 2) -> ParameterStore:
    store = ParameterStore(StoreConfig("job", mode, world, optimizer="sgd", lr=0.7,
                                       hyper={"momentum": 0.9, "nesterov": True}, fragments=2))
    store.set_total_steps(8)
    for rank in range(world):
        store.register(rank)
    assert store.initialize(LAYOUT, torch.linspace(-1, 1, 19))
    return store


def test_each_step_updates_its_fragment_as_torch_optim_does() -> None:
    store = _store()
    runs = LAYOUT.partition(2)
    reference = [torch.nn.Parameter(t.clone()) for t in LAYOUT.split(torch.linspace(-1, 1, 19)).values()]
    optimizer = torch.optim.SGD(reference, lr=0.7, momentum=0.9, nesterov=True)
    torch.manual_seed(0)
    for step in range(6):
        first, count = runs[step % 2]
        part = LAYOUT.part(first, count)
        grads = [torch.randn(part.numel) for _ in range(2)]
        for rank in (1, 0):
            store.push(rank, step, step, grads[rank], first=first, count=count)
        mean = (grads[0] + grads[1]) / 2
        views = list(part.split(mean).values())
        for i, p in enumerate(reference):
            p.grad = views[i - first] if first <= i < first + count else None
        optimizer.step()
        assert store.version == step + 1
    got = store.parameters()
    for name, p in zip(LAYOUT.names, reference, strict=True):
        assert torch.equal(got[name], p.detach()), name


def test_a_pull_of_a_fragment_holds_its_values() -> None:
    store = _store("ps-async")
    first, count = LAYOUT.partition(2)[1]
    snap = store.pull(0, 0, FP32, timeout=1, first=first, count=count)
    assert snap.layout == LAYOUT.part(first, count)
    assert torch.equal(snap.data, torch.linspace(-1, 1, 19)[LAYOUT.offset(first):])


def test_a_push_of_another_fragment_is_refused_and_changes_nothing() -> None:
    store = _store()
    second, count = LAYOUT.partition(2)[1]
    before = store.parameters()
    with pytest.raises(ProtocolError, match=f"first_tensor: tensors {second} to 3, but step 0 syncs fragment 0"):
        store.push(0, 0, 0, torch.ones(LAYOUT.part(second, count).numel), first=second, count=count)
    with pytest.raises(ProtocolError, match="first_tensor: the whole model, but step 0 syncs fragment 0"):
        store.push(0, 0, 0, torch.ones(19))  # the whole model
    assert store.version == 0 and store.workers()[0].clock == 0
    assert all(torch.equal(v, store.parameters()[k]) for k, v in before.items())
