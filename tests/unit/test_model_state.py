"""A model's whole state as it travels: which keys are trainable, frozen, buffers or tied aliases,
buffers inline with their own dtype, and a checkpoint's state_dict split back and checked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import ProtocolError, SpecError
from gradhub.proto.model_state import (
    MAX_INLINE_BYTES,
    ModelLayout,
    TensorSpec,
    tensors_from_proto,
    tensors_to_proto,
)
from gradhub.proto.v1 import tensor_pb2
from gradhub.worker.flat import FlatModel, describe


class Zoo(nn.Module):
    """Tied weights, a frozen layer, BatchNorm buffers and a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("cache", torch.ones(3), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.frozen(self.embed(tokens).mean(1))))


def test_describe_sorts_every_state_dict_key_into_one_place() -> None:
    model = Zoo()
    layout, trainable, frozen, buffers = describe(model)
    assert list(trainable) == ["embed.weight", "norm.weight", "norm.bias"]
    assert list(frozen) == ["frozen.weight", "frozen.bias"]
    assert list(buffers) == ["norm.running_mean", "norm.running_var", "norm.num_batches_tracked"]
    assert dict(layout.aliases) == {"head.weight": "embed.weight"}
    assert layout.state_keys() == sorted(model.state_dict())  # the cache is not state
    assert layout.buffers[2] == TensorSpec("norm.num_batches_tracked", torch.int64, ())


def test_a_model_without_trainable_parameters_is_refused() -> None:
    with pytest.raises(SpecError, match="model: has no trainable parameters"):
        describe(nn.Linear(2, 2).requires_grad_(False))


def test_a_state_dict_entry_that_is_not_a_tensor_is_refused() -> None:
    class Extra(nn.Linear):
        def get_extra_state(self) -> object:
            return {"note": 1}

    with pytest.raises(SpecError, match=r"'_extra_state' is a dict, not a tensor"):
        describe(Extra(2, 2))


def test_flat_model_records_which_parameters_got_a_gradient() -> None:
    model = Zoo()
    flat = FlatModel(model)
    flat.zero_grad()
    assert flat.unused() == [0, 1, 2]
    model(torch.tensor([[1, 2], [3, 4]])).sum().backward()
    assert flat.unused() == []
    grads = flat.gather_grads()
    assert grads.data_ptr() == flat.grads.data_ptr() and bool(grads.abs().sum() > 0)
    assert model.head.weight is model.embed.weight  # still tied
    flat.zero_grad()
    assert flat.unused() == [0, 1, 2] and bool((flat.grads == 0).all())


def test_buffers_load_into_the_model() -> None:
    model = Zoo()
    flat = FlatModel(model)
    values = flat.buffer_values()
    values["norm.running_mean"] = torch.full((4,), 3.0)
    flat.load_buffers(values)
    assert torch.equal(model.norm.running_mean, torch.full((4,), 3.0))
    values["norm.running_mean"].zero_()  # a copy was loaded, not the tensor itself
    assert torch.equal(model.norm.running_mean, torch.full((4,), 3.0))


def test_state_dict_and_split_state_round_trip() -> None:
    model = Zoo()
    layout, trainable, frozen, buffers = describe(model)
    state = layout.state_dict(dict(trainable), dict(frozen), dict(buffers))
    assert state.keys() == model.state_dict().keys() and state["head.weight"] is state["embed.weight"]
    t, f, b = layout.split_state(model.state_dict())
    assert list(t) == list(trainable) and list(f) == list(frozen) and list(b) == list(buffers)
    assert b["norm.num_batches_tracked"].dtype == torch.int64


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s.pop("head.weight"), r"missing \['head.weight'\]"),
    (lambda s: s.update(extra=torch.ones(1)), r"unexpected \['extra'\]"),
    (lambda s: s.update({"norm.running_var": torch.ones(5)}), r"'norm.running_var' is \[4\] in the model but \[5\]"),
])
def test_split_state_names_what_does_not_match(change, message) -> None:
    model = Zoo()
    layout = describe(model)[0]
    state = dict(model.state_dict())
    change(state)
    with pytest.raises(ProtocolError, match=message):
        layout.split_state(state)


def test_model_layout_checks_its_names() -> None:
    trainable = Layout(("w",), ((2,),))
    with pytest.raises(ProtocolError, match="appears twice"):
        ModelLayout(trainable, buffers=(TensorSpec("w", torch.float32, (2,)),))
    with pytest.raises(ProtocolError, match="'v' refers to 'nope'"):
        ModelLayout(trainable, aliases={"v": "nope"})
    with pytest.raises(ProtocolError, match="both an alias"):
        ModelLayout(trainable, aliases={"w": "w"})
    with pytest.raises(ProtocolError, match=f"exceed {MAX_INLINE_BYTES >> 20} MiB"):
        ModelLayout(trainable, buffers=(TensorSpec("big", torch.float32, (MAX_INLINE_BYTES // 4 + 1,)),))


def test_check_buffers_names_the_buffer() -> None:
    layout = ModelLayout(Layout(("w",), ((2,),)), buffers=(TensorSpec("count", torch.int64, ()),))
    layout.check_buffers({"count": torch.tensor(3)}, "buffers")
    with pytest.raises(ProtocolError, match=r"buffer 'count' is torch.float32 \[\], expected torch.int64"):
        layout.check_buffers({"count": torch.tensor(3.0)}, "buffers")
    with pytest.raises(ProtocolError, match=r"got buffers \['other'\]"):
        layout.check_buffers({"other": torch.tensor(3)}, "buffers")


def test_inline_tensors_keep_dtype_shape_and_values() -> None:
    tensors = {"f64": torch.randn(2, 3, dtype=torch.float64), "i64": torch.tensor(7),
               "mask": torch.tensor([True, False]), "h": torch.randn(4).to(torch.bfloat16),
               "empty": torch.empty(0, 3)}
    back = tensors_from_proto(tensors_to_proto(tensors), "buffers")
    assert list(back) == list(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape and torch.equal(back[name], t)


def test_inline_tensors_with_a_wrong_byte_count_or_dtype_are_refused() -> None:
    msg = tensors_to_proto({"a": torch.ones(3)})[0]
    msg.data = msg.data[:-1]
    with pytest.raises(ProtocolError, match=r"buffers\[0\].data: 'a' carries 11 bytes, its dtype and shape need 12"):
        tensors_from_proto([msg], "buffers")
    msg = tensor_pb2.Tensor(meta=tensor_pb2.TensorMeta(name="a", dtype=42, shape=[1]), data=b"1234")
    with pytest.raises(ProtocolError, match=r"buffers\[0\].dtype: unknown dtype 42"):
        tensors_from_proto([msg], "buffers")
    twice = tensors_to_proto({"a": torch.ones(1)}) * 2
    with pytest.raises(ProtocolError, match="'a' appears twice"):
        tensors_from_proto(twice, "buffers")
    with pytest.raises(ProtocolError, match="cannot carry"):
        tensors_to_proto({"c": torch.ones(1, dtype=torch.complex64)})
