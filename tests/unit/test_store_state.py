"""ParameterStore beyond the flat parameters: buffers in each buffer mode, frozen parameters and
tied keys in the state_dict, unused parameters left alone, clipping and parameter groups, each
compared with plain torch."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import ProtocolError, SpecError
from gradhub.proto.contract.optim import parameter_groups
from gradhub.proto.model_state import ModelLayout, TensorSpec
from gradhub.server.store import ParameterStore, StoreConfig

TRAINABLE = Layout(("w", "b"), ((2, 3), (2,)))
MODEL = ModelLayout(TRAINABLE, frozen=Layout(("f",), ((4,),)),
                    buffers=(TensorSpec("mean", torch.float32, (2,)), TensorSpec("count", torch.int64, ())),
                    aliases={"w_tied": "w"})


def _store(world_size: int = 2, mode: str = "ps-sync", **config: Any) -> ParameterStore:
    store = ParameterStore(StoreConfig("job", mode, world_size, optimizer="sgd", lr=0.5, **config))
    store.set_total_steps(10)
    for rank in range(world_size):
        store.register(rank)
    buffers = {"mean": torch.zeros(2), "count": torch.tensor(0)}
    assert store.initialize(MODEL, torch.arange(8.0), torch.full((4,), 9.0), buffers)
    return store


def _buffers(mean: float, count: int) -> dict[str, torch.Tensor]:
    return {"mean": torch.full((2,), mean), "count": torch.tensor(count)}


def test_the_state_dict_holds_every_key_frozen_untouched_and_tied_keys_equal() -> None:
    store = _store(1)
    store.push(0, 0, 0, torch.ones(8), _buffers(1.0, 1))
    state = store.state_dict()
    assert sorted(state) == ["b", "count", "f", "mean", "w", "w_tied"]
    assert torch.equal(state["f"], torch.full((4,), 9.0))
    assert torch.equal(state["w_tied"], state["w"]) and torch.equal(state["w"], torch.arange(6.0).view(2, 3) - 0.5)
    assert state["count"].dtype == torch.int64 and int(state["count"]) == 1
    checkpoint = store.checkpoint_state()
    assert checkpoint.params.keys() == state.keys()


@pytest.mark.parametrize(("mode", "expected_mean", "expected_count"), [
    ("broadcast", 1.0, 1),  # rank 0's
    ("local", 1.0, 1),  # rank 0's too (the workers do not load them)
    ("average", 2.0, 1),  # the mean of floating buffers; others from rank 0
])
def test_buffers_after_a_step(mode: str, expected_mean: float, expected_count: int) -> None:
    store = _store(2, buffers=mode)
    store.push(1, 0, 0, torch.ones(8), _buffers(3.0, 7))
    store.push(0, 0, 0, torch.ones(8), _buffers(1.0, 1))
    state = store.state_dict()
    assert torch.equal(state["mean"], torch.full((2,), expected_mean))
    assert int(state["count"]) == expected_count
    # and they are served with the parameters
    snap = store.pull(1, 1, 1, timeout=1.0)
    assert [b.meta.name for b in snap.buffers] == ["mean", "count"]


def test_buffers_stay_when_rank_0_sends_none() -> None:
    store = _store(2)
    store.push(0, 0, 0, torch.ones(8))
    store.push(1, 0, 0, torch.ones(8), _buffers(3.0, 7))  # not rank 0: not the job's
    assert torch.equal(store.state_dict()["mean"], torch.zeros(2))


def test_bad_buffers_are_refused_before_anything_changes() -> None:
    store = _store(1)
    with pytest.raises(ProtocolError, match="buffer 'count' is torch.float32"):
        store.push(0, 0, 0, torch.ones(8), {"mean": torch.zeros(2), "count": torch.tensor(1.0)})
    with pytest.raises(ProtocolError, match="non-finite value .* in buffer 'mean'"):
        store.push(0, 0, 0, torch.ones(8), _buffers(float("nan"), 1))
    assert store.version == 0 and store.workers()[0].clock == 0


def test_a_parameter_no_worker_used_is_not_updated() -> None:
    store = _store(2)
    store.push(0, 0, 0, torch.ones(8), unused=[1])  # rank 0: no gradient for 'b'
    store.push(1, 0, 0, torch.ones(8), unused=[1])
    assert torch.equal(store.parameters()["b"], torch.tensor([6.0, 7.0]))
    assert not torch.equal(store.parameters()["w"], torch.arange(6.0).view(2, 3))


def test_a_parameter_one_worker_used_gets_the_average_with_zeros() -> None:
    store = _store(2)
    grad0 = torch.ones(8)
    grad1 = torch.ones(8)
    grad1[6:] = 0  # rank 1 sends zeros where it had no gradient
    store.push(0, 0, 0, grad0)
    store.push(1, 0, 0, grad1, unused=[1])
    assert torch.equal(store.parameters()["b"], torch.tensor([6.0, 7.0]) - 0.5 * 0.5)


def test_unused_indexes_outside_the_model_are_refused() -> None:
    store = _store(1)
    with pytest.raises(ProtocolError, match="unused: index 2 is outside the model's 2 parameters"):
        store.push(0, 0, 0, torch.ones(8), unused=[2])


def test_clipping_matches_clip_grad_norm_on_the_averaged_gradient() -> None:
    store = _store(2, clip_grad_norm=0.1)
    g0, g1 = torch.randn(8), torch.randn(8)
    store.push(0, 0, 0, g0)
    store.push(1, 0, 0, g1)
    params = [torch.nn.Parameter(t.clone()) for t in TRAINABLE.split(torch.arange(8.0)).values()]
    for p, g in zip(params, TRAINABLE.split((g0 + g1) / 2).values(), strict=True):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, 0.1)
    torch.optim.SGD(params, lr=0.5).step()
    for p, got in zip(params, store.parameters().values(), strict=True):
        assert torch.equal(p.detach(), got)


def test_parameter_groups_by_name() -> None:
    named = [(n, torch.nn.Parameter(torch.zeros(1))) for n in ("enc.weight", "enc.bias", "norm.weight", "head.weight")]
    groups = parameter_groups(named, [{"params": ["*.bias", "norm.*"], "weight_decay": 0.0},
                                      {"params": ["head.*"], "lr": 0.1, "betas": [0.8, 0.9]}])
    by_id = {id(p): n for n, p in named}
    assert [[by_id[id(p)] for p in g["params"]] for g in groups] == [
        ["enc.bias", "norm.weight"], ["head.weight"], ["enc.weight"]]
    assert groups[0]["weight_decay"] == 0.0 and groups[1]["lr"] == 0.1 and groups[1]["betas"] == (0.8, 0.9)
    assert parameter_groups(named, []) == [p for _, p in named]
    with pytest.raises(SpecError, match=r"optimizer.param_groups\[1\].params: no trainable parameter left "
                                        r"matches \['\*.bias'\]"):
        parameter_groups(named, [{"params": ["*.bias"]}, {"params": ["*.bias"]}])


def test_the_store_builds_the_groups() -> None:
    store = _store(1, param_groups=({"params": ["b"], "lr": 0.0},))
    store.push(0, 0, 0, torch.ones(8))
    assert torch.equal(store.parameters()["b"], torch.tensor([6.0, 7.0]))  # lr 0 for 'b'
    assert torch.equal(store.parameters()["w"], torch.arange(6.0).view(2, 3) - 0.5)


def test_averaging_buffers_refuses_a_push_without_them_before_anything_changes() -> None:
    store = _store(2, buffers="average")
    store.push(0, 0, 0, torch.ones(8), _buffers(1.0, 1))
    with pytest.raises(ProtocolError, match="buffers: worker 1 sent none; the job averages every worker's"):
        store.push(1, 0, 0, torch.ones(8))
    assert store.version == 0 and store.workers()[1].clock == 0
    store.push(1, 0, 0, torch.ones(8), _buffers(3.0, 2))
    assert store.version == 1 and torch.equal(store.state_dict()["mean"], torch.full((2,), 2.0))


def test_groups_that_match_nothing_leave_the_store_uninitialized() -> None:
    store = ParameterStore(StoreConfig("job", "ps-sync", 1, param_groups=({"params": ["nope.*"]},)))
    store.set_total_steps(10)
    store.register(0)
    with pytest.raises(SpecError, match=r"param_groups\[0\].params: no trainable parameter left matches"):
        store.initialize(MODEL, torch.arange(8.0), torch.full((4,), 9.0), _buffers(0.0, 0))
    assert not store.initialized and store.layout is None
