"""FlatOptimizer: a store's optimizer stepped over its flat vector takes the tensors' steps bit
for bit (every optimizer and option gradhub supports), reads and loads the tensors' state_dict,
and goes over to the tensors, with their state, when a step leaves some out."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from gradhub.proto.contract.optim import build_optimizer, build_scheduler, optimizer_state_copy
from gradhub.server.flat_optimizer import FlatOptimizer
from tests.unit.test_optim import FOREACH_CASES

# odd sizes: every vectorized loop has a tail, and the tensors start off the vector's alignment
SHAPES = [(16, 1, 3, 3), (16,), (10, 301), (33,), (7, 5), (1,)]


def fresh(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


def grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=g) for s in SHAPES]


class Tensors:
    """The reference: the optimizer over the tensors, as the store stepped them before."""

    def __init__(self, name: str, hyper: dict[str, Any], **kw: Any) -> None:
        self.params = [torch.nn.Parameter(t) for t in fresh()]
        self.opt = build_optimizer(self.params, name, 0.01, dict(hyper), foreach=True)
        self.sched = build_scheduler(self.opt, kw.get("schedule"), 40)

    def step(self, step: int, unused: frozenset[int] = frozenset()) -> None:
        for i, (p, g) in enumerate(zip(self.params, grads(step), strict=True)):
            p.grad = None if i in unused else g
        self.opt.step()
        if self.sched is not None:
            self.sched.step()

    def values(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])


class Flat:
    """The store's way: one flat vector, its tensors' views, a FlatOptimizer."""

    def __init__(self, name: str, hyper: dict[str, Any], **kw: Any) -> None:
        self.vector = torch.cat([t.reshape(-1) for t in fresh()])
        self.params, start = [], 0
        for s in SHAPES:
            n = torch.Size(s).numel()
            self.params.append(torch.nn.Parameter(self.vector[start:start + n].view(s)))
            start += n
        self.opt = build_optimizer(self.params, name, 0.01, dict(hyper), foreach=True)
        self.sched = build_scheduler(self.opt, kw.get("schedule"), 40)
        self.stepper = FlatOptimizer(self.opt, self.vector, self.params)

    def step(self, step: int, unused: frozenset[int] = frozenset()) -> None:
        g = grads(step)
        if self.stepper.flat and not unused:
            self.stepper.step(torch.cat([t.reshape(-1) for t in g]))
        else:
            self.stepper.to_tensors("a step left tensors out")
            for i, (p, t) in enumerate(zip(self.params, g, strict=True)):
                p.grad = None if i in unused else t
            self.opt.step()
            for p in self.params:
                p.grad = None
        if self.sched is not None:
            self.sched.step()

    def values(self) -> torch.Tensor:
        return self.vector.clone()


def same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i, sa in a["state"].items():
        sb = b["state"][i]
        assert sa.keys() == sb.keys(), i
        for k, va in sa.items():
            vb = sb[k]
            if torch.is_tensor(va):
                assert torch.equal(va, vb) and va.shape == vb.shape and va.dtype == vb.dtype, (i, k)
            else:
                assert va == vb, (i, k)


CASES = pytest.mark.parametrize(("name", "hyper"), FOREACH_CASES,
                                ids=[f"{n}-{i}" for i, (n, _) in enumerate(FOREACH_CASES)])


@CASES
def test_steps_over_the_flat_vector_are_the_tensors_bit_for_bit(name: str, hyper: dict[str, Any]) -> None:
    ref, flat = Tensors(name, hyper), Flat(name, hyper)
    assert flat.stepper.flat, flat.stepper.why_not
    for step in range(25):
        ref.step(step)
        flat.step(step)
    assert flat.stepper.flat
    assert torch.equal(ref.values(), flat.values())
    assert not torch.equal(flat.values(), torch.cat([t.reshape(-1) for t in fresh()]))  # it did train
    same_state(optimizer_state_copy(ref.opt), flat.stepper.state_dict())  # a checkpoint cannot tell


@CASES
def test_a_step_that_leaves_a_tensor_out_goes_over_to_the_tensors_with_their_state(
        name: str, hyper: dict[str, Any]) -> None:
    ref, flat = Tensors(name, hyper, schedule={"name": "cosine", "warmup_steps": 3}), \
        Flat(name, hyper, schedule={"name": "cosine", "warmup_steps": 3})
    for step in range(12):
        unused = frozenset({4}) if step == 6 else frozenset()
        ref.step(step, unused)
        flat.step(step, unused)
        assert flat.stepper.flat == (step < 6)
    assert flat.stepper.why_not == "a step left tensors out"
    assert torch.equal(ref.values(), flat.values())
    same_state(optimizer_state_copy(ref.opt), flat.stepper.state_dict())
    assert ref.opt.param_groups[0]["lr"] == flat.opt.param_groups[0]["lr"]  # the schedule went on


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_a_checkpoints_state_loads_into_the_flat_vector_and_goes_on_the_same(name: str) -> None:
    hyper = {"momentum": 0.9} if name == "sgd" else {}
    ref, first = Tensors(name, hyper), Flat(name, hyper)
    for step in range(5):
        ref.step(step)
        first.step(step)
    saved = first.stepper.state_dict()
    resumed = Flat(name, hyper)
    resumed.vector.copy_(first.vector)
    resumed.stepper.load_state_dict(saved)
    assert resumed.stepper.flat, resumed.stepper.why_not
    assert resumed.opt.param_groups[0]["foreach"] is True
    for step in range(5, 10):
        ref.step(step)
        resumed.step(step)
    assert torch.equal(ref.values(), resumed.values())
    same_state(optimizer_state_copy(ref.opt), resumed.stepper.state_dict())


def test_a_state_whose_tensors_stepped_apart_stays_on_the_tensors() -> None:
    ref, flat = Tensors("adam", {}), Flat("adam", {})
    for step in range(4):
        unused = frozenset({1}) if step == 2 else frozenset()
        ref.step(step, unused)
        flat.step(step, unused)
    resumed = Flat("adam", {})
    resumed.vector.copy_(flat.vector)
    resumed.stepper.load_state_dict(flat.stepper.state_dict())
    assert not resumed.stepper.flat
    assert "'step' differs" in resumed.stepper.why_not
    ref.step(4)
    resumed.step(4)
    assert torch.equal(ref.values(), resumed.values())


def test_what_keeps_an_optimizer_on_the_tensors_is_named() -> None:
    vector = torch.zeros(6)
    a, b = torch.nn.Parameter(vector[:3]), torch.nn.Parameter(vector[3:])
    groups = build_optimizer([{"params": [a]}, {"params": [b], "lr": 0.5}], "sgd", 0.1, {}, foreach=True)
    assert FlatOptimizer(groups, vector, [a, b]).why_not == "2 parameter groups"
    apart = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))]
    opt = build_optimizer(apart, "sgd", 0.1, {}, foreach=True)
    assert FlatOptimizer(opt, vector, apart).why_not == "the tensors are not views of the flat vector in order"
    lbfgs = torch.optim.LBFGS([a, b])
    assert "not known to be elementwise" in FlatOptimizer(lbfgs, vector, [a, b]).why_not
    none = build_optimizer([{"params": []}], "sgd", 0.1, {}, foreach=True)
    assert FlatOptimizer(none, torch.zeros(0), []).why_not == "no trainable parameters"
    stepper = FlatOptimizer(build_optimizer([a, b], "sgd", 0.1, {}, foreach=True), vector, [a, b])
    stepper.to_tensors("asked")
    with pytest.raises(RuntimeError, match="steps the tensors now"):
        stepper.step(torch.zeros(6))
