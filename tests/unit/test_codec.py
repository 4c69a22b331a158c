"""The wire codec: layouts and their checks, byte views, chunking and the receiving buffer."""

from __future__ import annotations

import pytest
import torch

from gradhub.proto.codec import (
    Layout,
    Receiver,
    as_bytes,
    dtype_name,
    encode,
    iter_chunks,
    torch_dtype,
)
from gradhub.proto.contract.errors import ProtocolError
from gradhub.proto.v1 import tensor_pb2
from gradhub.proto.v1.tensor_pb2 import BFLOAT16, DTYPE_UNSPECIFIED, FLOAT16, FLOAT32

LAYOUT = Layout(names=("weight", "bias", "scale"), shapes=((3, 4), (3,), ()))
DTYPES = [(FLOAT32, torch.float32), (FLOAT16, torch.float16), (BFLOAT16, torch.bfloat16)]


# ------------------------------------------------------------------ layouts
def test_layout_sizes() -> None:
    assert LAYOUT.numels == (12, 3, 1)
    assert LAYOUT.numel == 16
    assert LAYOUT.nbytes(FLOAT32) == 64
    assert LAYOUT.nbytes(FLOAT16) == LAYOUT.nbytes(BFLOAT16) == 32
    assert LAYOUT.nbytes(DTYPE_UNSPECIFIED) == 64


@pytest.mark.parametrize(
    ("names", "shapes", "message"),
    [
        (("a", "b"), ((1,),), "names and shapes differ in length"),
        (("a", "a"), ((1,), (2,)), "duplicate tensor names"),
    ],
)
def test_layout_rejects_bad_definitions(
    names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...], message: str,
) -> None:
    with pytest.raises(ProtocolError, match=message):
        Layout(names, shapes)


def test_a_model_on_the_wire_has_a_tensor() -> None:
    with pytest.raises(ProtocolError, match="at least one parameter tensor"):
        Layout.from_metas([])


def test_metas_round_trip() -> None:
    metas = LAYOUT.metas(FLOAT16)
    assert [(m.name, m.dtype, list(m.shape)) for m in metas] == [
        ("weight", FLOAT16, [3, 4]), ("bias", FLOAT16, [3]), ("scale", FLOAT16, [])
    ]
    assert Layout.from_metas(metas) == LAYOUT
    LAYOUT.check_metas(metas, FLOAT16)  # no error


def test_from_metas_rejects_a_negative_dimension() -> None:
    metas = LAYOUT.metas(FLOAT32)
    metas[1].shape[0] = -3
    with pytest.raises(ProtocolError, match=r"tensors\[1\].shape: negative dimension in \[-3\]"):
        Layout.from_metas(metas)


def _metas(**change: object) -> list[tensor_pb2.TensorMeta]:
    """The layout's FLOAT32 metas with tensor 1 changed."""
    metas = LAYOUT.metas(FLOAT32)
    bias = metas[1]
    for key, value in change.items():
        if key == "shape":
            del bias.shape[:]
            bias.shape.extend(value)  # type: ignore[arg-type]
        else:
            setattr(bias, key, value)
    return metas


@pytest.mark.parametrize(
    ("metas", "message"),
    [
        (LAYOUT.metas(FLOAT32)[:2], "tensors: got 2 tensors, the job's model has 3"),
        (_metas(name="b"), r"tensors\[1\].name: got 'b', expected 'bias'"),
        (_metas(shape=[1, 3]), r"tensors\[1\].shape: 'bias' has shape \[1, 3\], expected \[3\]"),
        (_metas(dtype=FLOAT16),
         r"tensors\[1\].dtype: 'bias' is FLOAT16, expected FLOAT32 for this job's compression"),
    ],
)
def test_check_metas_names_the_tensor_and_field(
    metas: list[tensor_pb2.TensorMeta], message: str,
) -> None:
    with pytest.raises(ProtocolError, match=message):
        LAYOUT.check_metas(metas, FLOAT32)


def test_split_gives_shaped_views_and_name_at_finds_the_owner() -> None:
    flat = torch.arange(16, dtype=torch.float32)
    parts = LAYOUT.split(flat)
    assert list(parts) == ["weight", "bias", "scale"]
    assert [tuple(t.shape) for t in parts.values()] == [(3, 4), (3,), ()]
    assert parts["bias"].tolist() == [12.0, 13.0, 14.0]
    parts["scale"].fill_(-1.0)  # views, not copies
    assert flat[15] == -1.0
    assert [LAYOUT.name_at(i) for i in (0, 11, 12, 14, 15)] == [
        "weight", "weight", "bias", "bias", "scale"
    ]


def test_offsets_and_parts_are_the_layouts_own_and_computed_once() -> None:
    assert [LAYOUT.offset(i) for i in range(4)] == [0, 12, 15, 16]
    part = LAYOUT.part(1, 2)
    assert (part.names, part.shapes, part.numel) == (("bias", "scale"), ((3,), ()), 4)
    assert LAYOUT.part(1, 2) is part  # kept: the server asks for a bucket's on every push
    assert LAYOUT.part(0, 0) is LAYOUT
    for _ in range(2):  # a bad part is refused every time, never kept
        with pytest.raises(ProtocolError, match=r"first_tensor: tensors 2 to 3 are not a part"):
            LAYOUT.part(2, 2)
    assert Layout(LAYOUT.names, LAYOUT.shapes) == LAYOUT  # what is kept is no part of equality


# ------------------------------------------------------------------- dtypes
def test_dtype_lookup() -> None:
    assert torch_dtype(DTYPE_UNSPECIFIED) is torch.float32
    for wire, dtype in DTYPES:
        assert torch_dtype(wire) is dtype
    with pytest.raises(ProtocolError, match="dtype: unknown wire dtype 99"):
        torch_dtype(99)
    assert dtype_name(BFLOAT16) == "BFLOAT16"
    assert dtype_name(99) == "99"


# --------------------------------------------------------- bytes and chunks
@pytest.mark.parametrize(("wire", "dtype"), DTYPES)
@pytest.mark.parametrize("chunk", [1, 6, 64, 1 << 20])
def test_encode_chunk_receive_round_trip(wire: int, dtype: torch.dtype, chunk: int) -> None:
    flat = torch.randn(16, generator=torch.Generator().manual_seed(3)) * 1e3
    encoded = encode(flat, wire)
    assert encoded.dtype is dtype and encoded.is_contiguous()
    assert torch.equal(encoded, flat.to(dtype))
    data = as_bytes(encoded)
    assert len(data) == LAYOUT.nbytes(wire)
    receiver = Receiver(LAYOUT.nbytes(wire))
    for piece in iter_chunks(data, chunk):
        assert 0 < len(piece) <= chunk
        receiver.write(piece)
    out = receiver.tensor(wire)
    assert out.dtype is dtype
    assert torch.equal(out, flat.to(dtype))


def test_encode_float32_does_not_copy_and_as_bytes_is_a_view() -> None:
    flat = torch.zeros(4)
    encoded = encode(flat, FLOAT32)
    assert encoded.data_ptr() == flat.data_ptr()
    view = as_bytes(flat)
    flat[0] = 1.0
    assert bytes(view[:4]) == torch.tensor([1.0]).numpy().tobytes()


def test_encode_detaches_from_autograd() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    assert not encode(p, FLOAT16).requires_grad
    as_bytes(encode(p, FLOAT32))  # numpy() would refuse a tensor that requires grad


def test_as_bytes_needs_a_contiguous_tensor() -> None:
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        as_bytes(torch.zeros(4, 4).t())


def test_iter_chunks_cuts_at_the_chunk_size() -> None:
    data = memoryview(bytes(range(10)))
    assert list(iter_chunks(data, 4)) == [bytes([0, 1, 2, 3]), bytes([4, 5, 6, 7]), bytes([8, 9])]
    assert list(iter_chunks(memoryview(b""), 4)) == []


def test_receiver_refuses_too_many_bytes() -> None:
    receiver = Receiver(8)
    receiver.write(b"\0" * 6)
    with pytest.raises(ProtocolError, match="more than the expected 8 bytes"):
        receiver.write(b"\0" * 3)
    assert receiver.received == 6  # the rejected chunk wrote nothing


def test_receiver_refuses_too_few_bytes() -> None:
    receiver = Receiver(8)
    receiver.write(b"\0" * 4)
    with pytest.raises(ProtocolError, match=r"got 4 of the expected 8 bytes \(stream cut short\?\)"):
        receiver.tensor(FLOAT32)


def test_receiver_of_nothing_gives_an_empty_tensor() -> None:
    out = Receiver(0).tensor(FLOAT16)
    assert out.dtype is torch.float16 and out.numel() == 0
