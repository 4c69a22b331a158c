"""Training state on the wire: state dicts <-> JSON + tensors, and a TrainingState as a
CheckpointHeader plus data chunks, read back exactly or rejected with a message naming the fault."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from gradhub.proto.codec import CHUNK_BYTES, data_of_chunk
from gradhub.proto.contract.errors import ProtocolError
from gradhub.proto.state import (
    TrainingState,
    _data_chunks,
    decode_state,
    encode_state,
    read_state,
    state_messages,
)
from gradhub.proto.v1 import ps_pb2, tensor_pb2


# ------------------------------------------------------------------ helpers
def _trained(steps: int = 2) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """A small model after ``steps`` Adam steps with a StepLR schedule."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.99))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_same(got: Any, want: Any, where: str = "<root>") -> None:
    """Deep equality that also checks types (tuple vs list, int vs str keys) and NaN."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert torch.equal(got, want), where
    elif isinstance(want, dict):
        assert list(got) == list(want), f"{where}: keys {list(got)} != {list(want)}"
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}.{i}")
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got), where
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def _through_json(state: Any, path: str = "") -> Any:
    """encode -> JSON text -> decode, as a checkpoint or the wire does it."""
    tensors: dict[str, torch.Tensor] = {}
    text = json.dumps(encode_state(state, path, tensors), allow_nan=False)
    return decode_state(json.loads(text), tensors)


def _split(messages: list[Any]) -> tuple[ps_pb2.CheckpointHeader, list[bytes]]:
    first, *rest = messages
    assert isinstance(first, ps_pb2.CheckpointChunk) and first.WhichOneof("kind") == "header"
    assert all(isinstance(raw, bytes) for raw in rest)
    return first.header, rest


def _views(raws: list[bytes]) -> Iterator[memoryview]:
    """What the server's deserializer hands read_state: each data chunk's payload."""
    for raw in raws:
        view = data_of_chunk(raw)
        assert view is not None, "a data chunk that is not a plain serialized data chunk"
        yield view


def _state(**params: torch.Tensor) -> TrainingState:
    return TrainingState(
        step=3, params=params or {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2)}
    )


# ------------------------------------------------------- state dict <-> JSON
def test_adam_state_dict_round_trips_and_resumes_identically() -> None:
    model, opt, _ = _trained()
    want = opt.state_dict()
    got = _through_json(want)
    assert_same(got, want)
    assert isinstance(got["param_groups"][0]["betas"], tuple)
    assert list(got["state"]) == [0, 1, 2, 3]  # int keys, not "0".."3"

    # an optimizer loaded from the decoded state takes the same next step as the original
    twin = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    twin.load_state_dict(model.state_dict())
    twin_opt = torch.optim.Adam(twin.parameters())
    twin_opt.load_state_dict(copy.deepcopy(got))  # loading shares same-dtype tensors
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_scheduler_state_dicts_round_trip_with_non_finite_floats() -> None:
    _, opt, step_lr = _trained()
    assert_same(_through_json(step_lr.state_dict(), "scheduler."), step_lr.state_dict())

    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt).state_dict()
    assert plateau["best"] == math.inf  # a real state dict holding a non-finite float
    got = _through_json(plateau, "scheduler.")
    assert_same(got, plateau)
    assert got["best"] == math.inf and got["mode_worse"] == math.inf


def test_tags_int_keys_tuples_and_nan_survive() -> None:
    want = {
        "nan": math.nan, "-inf": -math.inf, "pair": (1, (2.5, "x")), "nested": [(), [None, True]],
        "ints": {0: "a", 7: {1: torch.tensor([1.0, 2.0])}},
        "looks_like_a_tag": {"__tensor__": "not a tensor"}, "tuple_tag": {"__tuple__": [1]},
    }  # fmt: skip
    got = _through_json(want)
    assert_same(got, want)
    assert got["looks_like_a_tag"] == {"__tensor__": "not a tensor"}


def test_encode_moves_tensors_out_by_dotted_path() -> None:
    tensors: dict[str, torch.Tensor] = {}
    encoded = encode_state({"state": {0: {"exp_avg": torch.zeros(2)}}}, "scheduler.", tensors)
    assert list(tensors) == ["scheduler.state.0.exp_avg"]
    assert "exp_avg" in json.dumps(encoded)
    with pytest.raises(TypeError, match="cannot store x of type set"):
        encode_state({"x": {1, 2}}, "", {})


def test_decode_names_a_tensor_that_was_not_sent() -> None:
    with pytest.raises(ProtocolError, match="refers to tensor 'missing', which was not sent"):
        decode_state({"a": {"__tensor__": "missing"}}, {})


# ------------------------------------------------------------------ the wire
def test_state_messages_read_state_round_trip() -> None:
    model, opt, sched = _trained()
    want = TrainingState(
        step=2,
        params=_params(model),
        optimizer_state=opt.state_dict(),
        scheduler_state=sched.state_dict(),
    )
    header, raws = _split(list(state_messages("j-1", 0, want)))
    assert (header.job_id, header.rank, header.step) == ("j-1", 0, 2)
    assert [m.name for m in header.params] == list(want.params)
    assert all(m.dtype == tensor_pb2.FLOAT32 for m in [*header.params, *header.state])

    got = read_state(header, _views(raws))
    assert got.step == 2
    assert_same(got.params, want.params)
    assert_same(got.optimizer_state, want.optimizer_state)
    assert_same(got.scheduler_state, want.scheduler_state)


def test_params_only_round_trip_with_scalar_and_empty_tensors() -> None:
    want = _state(w=torch.randn(3, 2), scale=torch.tensor(2.5), empty=torch.empty(0, 4))
    header, raws = _split(list(state_messages("j", 0, want)))
    assert header.optimizer_json == "" and header.scheduler_json == "" and not header.state
    got = read_state(header, _views(raws))
    assert got.optimizer_state is None and got.scheduler_state is None
    assert_same(got.params, want.params)


def test_read_state_accepts_data_chunk_messages_too() -> None:
    want = _state()
    header, raws = _split(list(state_messages("j", 0, want)))
    messages = (ps_pb2.CheckpointChunk.FromString(raw) for raw in raws)
    assert_same(read_state(header, messages).params, want.params)


def test_large_state_is_cut_into_chunks_of_at_most_chunk_bytes() -> None:
    big = torch.randn(CHUNK_BYTES // 4 * 2 + 1000)  # a bit over 2 chunks
    want = _state(big=big, small=torch.ones(3))
    header, raws = _split(list(state_messages("j", 0, want)))
    sizes = [len(v) for v in _views(raws)]
    assert len(sizes) == 3
    assert max(sizes) <= CHUNK_BYTES and sum(sizes) == (big.numel() + 3) * 4
    assert_same(read_state(header, _views(raws)).params, want.params)


def test_buffers_keep_their_dtype_and_optimizer_state_must_be_float() -> None:
    state = _state(w=torch.ones(3), count=torch.tensor(7), mask=torch.tensor([True, False, True]),
                   half=torch.tensor([0.5, 1.5], dtype=torch.float16), stats=torch.randn(5, dtype=torch.float64))
    header, raws = _messages(state)
    back = read_state(header, _views(raws))
    assert list(back.params) == list(state.params)
    for name, t in state.params.items():
        assert back.params[name].dtype == t.dtype and torch.equal(back.params[name], t), name
    with pytest.raises(TypeError, match="state: tensor 'count' is torch.int32"):
        list(
            state_messages(
                "j",
                0,
                TrainingState(
                    1, {"w": torch.ones(1)}, {"count": torch.tensor(1, dtype=torch.int32)}
                ),
            )
        )


# ----------------------------------------------------------------- chunking
TENSORS = [
    torch.tensor(1.5),  # 0-dim: 4 bytes
    torch.empty(0),
    torch.arange(5.0),
    torch.empty(2, 0),
    torch.randn(13, dtype=torch.float64),  # sent as float64 (optimizer state is converted first)
    torch.randn(3, 4).t(),  # not contiguous
    torch.tensor(-2.0),
]


@pytest.mark.parametrize("chunk_bytes", [1, 4, 8, 12, 28, 44, 1 << 20])
def test_data_chunks_are_the_float32_bytes_back_to_back(chunk_bytes: int) -> None:
    want = b"".join(t.contiguous().numpy().tobytes() for t in TENSORS)  # each in its own dtype
    payloads = [bytes(v) for v in _views(list(_data_chunks(TENSORS, chunk_bytes)))]
    assert b"".join(payloads) == want
    assert all(len(p) == chunk_bytes for p in payloads[:-1])
    assert 0 < len(payloads[-1]) <= chunk_bytes


def test_data_chunks_of_nothing_is_no_chunk() -> None:
    assert list(_data_chunks([], 8)) == []
    assert list(_data_chunks([torch.empty(0), torch.empty(3, 0)], 8)) == []


# ---------------------------------------------------------------- bad input
def _messages(state: TrainingState | None = None) -> tuple[ps_pb2.CheckpointHeader, list[bytes]]:
    if state is None:
        _, opt, sched = _trained(1)
        state = TrainingState(
            1, {"w": torch.ones(2, 3), "b": torch.zeros(2)}, opt.state_dict(), sched.state_dict()
        )
    return _split(list(state_messages("j", 0, state)))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_rejected(bad: float) -> None:
    header, raws = _messages(_state(w=torch.tensor([1.0, bad]), b=torch.ones(1)))
    with pytest.raises(ProtocolError, match="state values: 'w' holds NaN or Inf"):
        read_state(header, _views(raws))


def test_non_finite_optimizer_state_is_rejected() -> None:
    state = TrainingState(1, {"w": torch.ones(2)}, {"m": torch.tensor([0.0, math.nan])})
    header, raws = _messages(state)
    with pytest.raises(ProtocolError, match="NaN or Inf"):
        read_state(header, _views(raws))


@pytest.mark.parametrize("dtype", [99, tensor_pb2.DTYPE_UNSPECIFIED])
def test_a_param_meta_of_unknown_dtype_is_named(dtype: int) -> None:
    header, raws = _messages()
    header.params[1].dtype = dtype
    name = header.params[1].name
    with pytest.raises(ProtocolError, match=rf"params\[1\]\.dtype: '{name}' has unknown dtype"):
        read_state(header, _views(raws))


@pytest.mark.parametrize("field", ["state"])
@pytest.mark.parametrize("dtype", [tensor_pb2.FLOAT16, tensor_pb2.DTYPE_UNSPECIFIED])
def test_a_meta_that_is_not_float32_is_named(field: str, dtype: int) -> None:
    header, raws = _messages()
    getattr(header, field)[1].dtype = dtype
    name = getattr(header, field)[1].name
    with pytest.raises(ProtocolError, match=rf"{field}\[1\]\.dtype: '{name}' must be FLOAT32"):
        read_state(header, _views(raws))


def test_too_few_bytes() -> None:
    header, raws = _messages()
    payload = b"".join(bytes(v) for v in _views(raws))
    with pytest.raises(ProtocolError, match=r"byte count: got \d+ of the expected \d+ bytes"):
        read_state(header, iter([memoryview(payload[:-4])]))
    with pytest.raises(ProtocolError, match="byte count"):
        read_state(header, iter([]))


def test_too_many_bytes_in_the_last_chunk_or_after_it() -> None:
    header, raws = _messages()
    payload = b"".join(bytes(v) for v in _views(raws))
    with pytest.raises(ProtocolError, match="byte count: stream carries more than the expected"):
        read_state(header, iter([memoryview(payload + b"\0\0\0\0")]))
    with pytest.raises(ProtocolError, match="byte count: stream carries more than the expected"):
        read_state(header, iter([memoryview(payload), memoryview(b"\0\0\0\0")]))


def test_a_state_without_params_is_a_workers_own() -> None:
    """local-sgd's inner optimizer state travels without parameters; a header that drops the
    parameters its bytes carry is still refused, by the byte count."""
    _, opt, sched = _trained(1)
    header, raws = _messages(TrainingState(4, {}, opt.state_dict(), sched.state_dict()))
    got = read_state(header, _views(raws))
    assert got.step == 4 and got.params == {}
    assert got.optimizer_state["param_groups"] == opt.state_dict()["param_groups"]
    header, raws = _messages()
    del header.params[:]
    with pytest.raises(ProtocolError, match="byte count"):
        read_state(header, _views(raws))


def test_json_referring_to_a_tensor_not_sent() -> None:
    header, raws = _messages()
    optim = json.loads(header.optimizer_json)
    optim["state"]["__dict__"][0][1]["exp_avg"] = {"__tensor__": "state.9.exp_avg"}
    header.optimizer_json = json.dumps(optim)
    with pytest.raises(
        ProtocolError, match="refers to tensor 'state.9.exp_avg', which was not sent"
    ):
        read_state(header, _views(raws))


@pytest.mark.parametrize("field", ["optimizer_json", "scheduler_json"])
def test_invalid_json_names_its_field(field: str) -> None:
    header, raws = _messages()
    setattr(header, field, "{not json")
    with pytest.raises(ProtocolError, match=f"{field}: not valid JSON"):
        read_state(header, _views(raws))


@pytest.mark.parametrize("bad", ['{"__dict__": 5}', '{"__tuple__": 1}', '{"__float__": "x"}', '{"__dict__": [[1]]}'])
def test_malformed_tags_are_a_protocol_error(bad: str) -> None:
    header, raws = _messages()
    header.scheduler_json = bad
    with pytest.raises(ProtocolError, match="scheduler_json: malformed state"):
        read_state(header, _views(raws))


def test_a_non_data_chunk_after_the_header() -> None:
    header, _ = _messages()
    with pytest.raises(ProtocolError, match="only data chunks may follow the header"):
        read_state(header, iter([ps_pb2.CheckpointChunk(header=header)]))
