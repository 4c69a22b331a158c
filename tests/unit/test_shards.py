"""Shards of the flat parameter vector: their bounds, and merging and splitting their states.

The contract: K optimizers over the shards' pieces take exactly the whole model's optimizer's
steps, their merged state is the whole optimizer's ``state_dict()`` and splitting that gives
each shard's back."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import pytest
import torch

from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import SpecError
from gradhub.proto.contract.optim import build_optimizer, parameter_groups
from gradhub.proto.shards import (
    merge_optimizer_state,
    merge_params,
    shards_of,
    split_optimizer_state,
)

LAYOUT = Layout(("a.weight", "a.bias", "b.weight", "b.bias", "scale"), ((4, 3), (4,), (2, 4), (2,), ()))
GROUPS: list[dict[str, Any]] = [{"params": ["*.bias"], "weight_decay": 0.0, "lr": 0.05}]


def test_bounds_are_contiguous_near_equal_and_cut_tensors() -> None:
    whole = shards_of(LAYOUT, 1)[0]  # one store holds all
    assert whole.layout.names == LAYOUT.names and (whole.lo, whole.hi) == (0, LAYOUT.numel)
    for k in (2, 3, 4, 7, LAYOUT.numel):
        stores = shards_of(LAYOUT, k + 1)
        control, shards = stores[0], stores[1:]
        assert (control.lo, control.hi, control.layout.names) == (0, 0, ())  # the server's: no value
        assert control.piece_index(0) is None and control.unused([0, 1]) == []
        assert [s.index for s in stores] == list(range(k + 1))
        assert shards[0].lo == 0 and shards[-1].hi == LAYOUT.numel
        assert all(a.hi == b.lo for a, b in pairwise(shards))
        assert max(s.numel for s in shards) - min(s.numel for s in shards) <= 1
        assert all(s.layout.numel == s.numel for s in stores)
    two = shards_of(LAYOUT, 3)  # 27 values: 13 + 14; a.bias is cut at its second value
    assert two[1].layout.names == ("a.weight", "a.bias") and two[1].layout.shapes == ((12,), (1,))
    assert two[2].layout.names == ("a.bias", "b.weight", "b.bias", "scale") and two[2].starts == (1, 0, 0, 0)
    assert two[2].unused([0, 1, 4]) == [0, 3]


def test_too_many_shards_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match=f"{LAYOUT.numel + 1} shards for a model of {LAYOUT.numel}"):
        shards_of(LAYOUT, LAYOUT.numel + 2)


def _named(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in zip(LAYOUT.names, LAYOUT.shapes, strict=True)}


@pytest.mark.parametrize("name,hyper", [("sgd", {"momentum": 0.9}), ("adam", {}), ("adamw", {"weight_decay": 0.1}),
                                        ("rmsprop", {"momentum": 0.5}), ("adagrad", {}), ("adadelta", {})])
@pytest.mark.parametrize("count", [3, 4, 5], ids=["2-shards", "3-shards", "4-shards"])  # stores: the control and K
def test_sharded_steps_merge_to_the_whole_optimizer(name: str, hyper: dict[str, Any], count: int) -> None:
    whole = {n: torch.nn.Parameter(t.clone()) for n, t in _named(0).items()}
    opt = build_optimizer(parameter_groups(list(whole.items()), GROUPS), name, 0.01, hyper)
    shards = shards_of(LAYOUT, count)
    held = [{n: torch.nn.Parameter(t) for n, t in s.pieces(whole).items()} for s in shards]
    opts = [build_optimizer(parameter_groups(list(h.items()), GROUPS, shard_of=LAYOUT.names), name, 0.01, hyper)
            for h in held]
    for step in range(3):
        grads = _named(step + 1)
        grads_unused = step == 1  # a tensor no gradient reached: grad None, no update, no state change
        for n, p in whole.items():
            p.grad = None if grads_unused and n == "b.weight" else grads[n].clone()
        opt.step()
        for s, h, o in zip(shards, held, opts, strict=True):
            pieces = s.pieces(grads)
            for n, p in h.items():
                p.grad = None if grads_unused and n == "b.weight" else pieces[n]
            o.step()
    merged = merge_params(LAYOUT, shards, held)
    for n, p in whole.items():
        assert torch.equal(merged[n], p.detach()), n
    full_state = opt.state_dict()
    state = merge_optimizer_state(LAYOUT, GROUPS, shards, [o.state_dict() for o in opts])
    assert state["param_groups"] == full_state["param_groups"]
    assert state["state"].keys() == full_state["state"].keys()
    for i, s in full_state["state"].items():
        for k, v in s.items():
            assert torch.equal(state["state"][i][k], v) if torch.is_tensor(v) else state["state"][i][k] == v
    for s, o in zip(shards, opts, strict=True):
        mine = o.state_dict()
        back = split_optimizer_state(LAYOUT, GROUPS, s, full_state)
        assert back["param_groups"] == mine["param_groups"]
        for i, st in mine["state"].items():
            for k, v in st.items():
                assert torch.equal(back["state"][i][k], v) if torch.is_tensor(v) else back["state"][i][k] == v


def test_split_state_loads_into_a_shard_optimizer_and_continues_exactly() -> None:
    """A checkpoint of the whole optimizer resumes on 3 shards, and one more step there equals
    one more step of the whole optimizer."""
    whole = {n: torch.nn.Parameter(t.clone()) for n, t in _named(0).items()}
    opt = build_optimizer(parameter_groups(list(whole.items()), GROUPS), "adam", 0.01, {})
    for step in range(2):
        for n, p in whole.items():
            p.grad = _named(step + 1)[n]
        opt.step()
    saved = opt.state_dict()
    shards = shards_of(LAYOUT, 4)  # the control store and 3 shards
    held = [{n: torch.nn.Parameter(t) for n, t in s.pieces(whole).items()} for s in shards]
    opts = []
    for s, h in zip(shards, held, strict=True):
        o = build_optimizer(parameter_groups(list(h.items()), GROUPS, shard_of=LAYOUT.names), "adam", 0.01, {})
        o.load_state_dict(split_optimizer_state(LAYOUT, GROUPS, s, saved))
        opts.append(o)
    grads = _named(9)
    for n, p in whole.items():
        p.grad = grads[n]
    opt.step()
    for s, h, o in zip(shards, held, opts, strict=True):
        pieces = s.pieces(grads)
        for n, p in h.items():
            p.grad = pieces[n]
        o.step()
    merged = merge_params(LAYOUT, shards, held)
    for n, p in whole.items():
        assert torch.equal(merged[n], p.detach()), n
