"""Tensor codec for the wire: flat tensors <-> raw bytes in ~1 MiB chunks, and tensor layouts.

A model's tensors travel as one header (a ``TensorMeta`` per tensor: name, dtype,
shape) followed by their bytes back to back in meta order, cut into chunks of
``CHUNK_BYTES``. Nothing here pickles; bytes are little-endian as torch lays them out.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate, pairwise
from math import prod
from typing import Any, TypeVar, cast

import torch
from google.protobuf.message import Message

from gradhub.proto.contract.errors import ProtocolError, SpecError
from gradhub.proto.v1 import tensor_pb2

CHUNK_BYTES = 1 << 20
M = TypeVar("M", bound=Message)

WIRE_DTYPES: dict[int, torch.dtype] = {
    tensor_pb2.FLOAT32: torch.float32,
    tensor_pb2.FLOAT16: torch.float16,
    tensor_pb2.BFLOAT16: torch.bfloat16,
}
# a job's compression -> the dtype its pushes carry (pulls: ``params_dtype``)
COMPRESSION_DTYPES: dict[str, int] = {
    "none": tensor_pb2.FLOAT32,
    "fp16": tensor_pb2.FLOAT16,
    "bf16": tensor_pb2.BFLOAT16,
    "int8": tensor_pb2.QINT8,
    "int4": tensor_pb2.QINT4,
}
# block-quantised push dtypes and their bits (the format: gradhub.proto.quant)
QUANT_BITS: dict[int, int] = {tensor_pb2.QINT8: 8, tensor_pb2.QINT4: 4}


def as_wire(wire_dtype: int) -> tensor_pb2.DType:
    """A wire dtype (an int, as everywhere here) typed as the messages' dtype fields are: the
    generated stubs type a protobuf enum apart from int, which it is at run time."""
    return cast("tensor_pb2.DType", wire_dtype)


def dtype_name(wire_dtype: int) -> str:
    return tensor_pb2.DType.Name(wire_dtype) if wire_dtype in tensor_pb2.DType.values() else str(wire_dtype)


def torch_dtype(wire_dtype: int) -> torch.dtype:
    """The torch dtype for a wire dtype; FLOAT32 when unspecified."""
    if wire_dtype == tensor_pb2.DTYPE_UNSPECIFIED:
        return torch.float32
    try:
        return WIRE_DTYPES[wire_dtype]
    except KeyError:
        raise ProtocolError(f"dtype: unknown wire dtype {wire_dtype}") from None


def payload_dtype(wire_dtype: int) -> torch.dtype:
    """The dtype of a payload's raw tensor: the wire dtype's, or uint8 for a quantised push
    (scales and codes, decoded by gradhub.proto.quant)."""
    return torch.uint8 if wire_dtype in QUANT_BITS else torch_dtype(wire_dtype)


def params_dtype(compression: str) -> int:
    """The dtype pulled parameters travel in: the compression's float dtype, FLOAT32 for the
    quantised ones (parameters are never quantised)."""
    wire = COMPRESSION_DTYPES[compression]
    return tensor_pb2.FLOAT32 if wire in QUANT_BITS else wire


@dataclass(frozen=True)
class Layout:
    """Names and shapes of a model's parameters, in order, as one flat float32 vector (none at
    all: a sharded job's control store, ``gradhub.proto.shards``; a model on the wire has one
    at least, ``from_metas``)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.shapes):
            raise ProtocolError("tensors: names and shapes differ in length")
        if len(set(self.names)) != len(self.names):
            raise ProtocolError("tensors: duplicate tensor names")

    # computed once (a layout is immutable): the parameter server reads them on every push
    @cached_property
    def numels(self) -> tuple[int, ...]:
        return tuple(prod(s) for s in self.shapes)

    @cached_property
    def numel(self) -> int:
        return sum(self.numels)

    @cached_property
    def _starts(self) -> tuple[int, ...]:
        """Where each tensor starts in the flat vector, and (last) where the vector ends."""
        return (0, *accumulate(self.numels))

    @cached_property
    def _parts(self) -> dict[tuple[int, int], Layout]:
        """The parts ``part`` cut, by (first, count): the server asks for a bucket's or a
        fragment's on every push."""
        return {}

    def nbytes(self, wire_dtype: int) -> int:
        return self.numel * torch_dtype(wire_dtype).itemsize

    def metas(self, wire_dtype: int) -> list[tensor_pb2.TensorMeta]:
        return [
            tensor_pb2.TensorMeta(name=n, dtype=as_wire(wire_dtype), shape=list(s))
            for n, s in zip(self.names, self.shapes, strict=True)
        ]

    @classmethod
    def from_metas(cls, metas: Sequence[tensor_pb2.TensorMeta]) -> Layout:
        if not metas:
            raise ProtocolError("tensors: a model needs at least one parameter tensor")
        for i, m in enumerate(metas):
            if any(d < 0 for d in m.shape):
                raise ProtocolError(f"tensors[{i}].shape: negative dimension in {list(m.shape)}")
        return cls(tuple(m.name for m in metas), tuple(tuple(m.shape) for m in metas))

    def check_metas(self, metas: Sequence[tensor_pb2.TensorMeta], wire_dtype: int) -> None:
        """Raise ProtocolError naming the first tensor whose name, shape or dtype differs."""
        if len(metas) != len(self.names):
            raise ProtocolError(
                f"tensors: got {len(metas)} tensors, the job's model has {len(self.names)}"
            )
        for i, (m, name, shape) in enumerate(zip(metas, self.names, self.shapes, strict=True)):
            if m.name != name:
                raise ProtocolError(f"tensors[{i}].name: got '{m.name}', expected '{name}'")
            if tuple(m.shape) != shape:
                raise ProtocolError(
                    f"tensors[{i}].shape: '{name}' has shape {list(m.shape)}, expected {list(shape)}"
                )
            if m.dtype != wire_dtype:
                raise ProtocolError(
                    f"tensors[{i}].dtype: '{name}' is {dtype_name(m.dtype)}, "
                    f"expected {dtype_name(wire_dtype)} for this job's compression"
                )

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` shaped as each named tensor."""
        return {name: flat[a:b].view(shape)
                for name, shape, (a, b) in zip(self.names, self.shapes, pairwise(self._starts), strict=True)}

    def part(self, first: int, count: int) -> Layout:
        """Tensors ``first`` to ``first + count - 1`` as a layout of their own (a fragment);
        ``count`` 0 is the whole model (then ``first`` must be 0)."""
        if count == 0 and first == 0:
            return self
        part = self._parts.get((first, count))
        if part is None:
            if count <= 0 or first < 0 or first + count > len(self.names):
                raise ProtocolError(f"first_tensor: tensors {first} to {first + count - 1} are not a part of the "
                                    f"model's {len(self.names)} tensors")
            part = self._parts[first, count] = Layout(self.names[first:first + count],
                                                      self.shapes[first:first + count])
        return part

    def offset(self, first: int) -> int:
        """Where tensor ``first`` starts in the flat vector."""
        return self._starts[first] if 0 <= first < len(self._starts) else sum(self.numels[:first])

    def partition(self, parts: int) -> tuple[tuple[int, int], ...]:
        """``parts`` contiguous runs of whole tensors, as (first, count), each ending where the
        running total of elements first reaches its share (every run holds at least one)."""
        n = len(self.names)
        if n == 0 and parts == 1:
            return ((0, 0),)  # no tensor (a sharded job's control store): one run of none
        if not 1 <= parts <= n:
            raise SpecError("fragments", f"{parts} fragments for a model of {n} parameter tensors "
                                         f"(at most one fragment per tensor)")
        bounds, total, seen, i = [0], self.numel, 0, 0
        for k in range(1, parts):
            while i < n - (parts - k) and (seen < total * k / parts or i < bounds[-1] + 1):
                seen += self.numels[i]
                i += 1
            bounds.append(i)
        bounds.append(n)
        return tuple((a, b - a) for a, b in pairwise(bounds))

    def name_at(self, element: int) -> str:
        """The tensor that holds flat element ``element``."""
        offset = 0
        for name, n in zip(self.names, self.numels, strict=True):
            offset += n
            if element < offset:
                return name
        return self.names[-1]


def as_bytes(flat: torch.Tensor) -> memoryview:
    """A byte view of a contiguous CPU tensor (no copy)."""
    if flat.device.type != "cpu" or not flat.is_contiguous():
        raise ValueError("as_bytes needs a contiguous CPU tensor")
    if flat.dtype == torch.bfloat16:  # numpy has no bfloat16
        flat = flat.view(torch.int16)
    return flat.numpy().data.cast("B")


def from_bytes(buffer: bytearray | memoryview, dtype: torch.dtype) -> torch.Tensor:
    """A flat tensor of ``dtype`` over ``buffer`` (no copy), ``as_bytes``'s inverse; of no bytes,
    an empty one (``torch.frombuffer`` refuses an empty buffer)."""
    return torch.frombuffer(buffer, dtype=dtype) if len(buffer) else torch.empty(0, dtype=dtype)


def encode(flat: torch.Tensor, wire_dtype: int) -> torch.Tensor:
    """``flat`` (float32) converted to the wire dtype, as a contiguous CPU tensor; a quantised
    push's ``flat`` is its payload already (uint8, from gradhub.proto.quant)."""
    target = payload_dtype(wire_dtype)
    out = flat.detach()
    if target == torch.uint8 and out.dtype != torch.uint8:
        raise ValueError(f"encode: a {dtype_name(wire_dtype)} push is quantised first (gradhub.proto.quant)")
    if out.dtype != target:
        out = out.to(target)
    if out.device.type != "cpu":
        out = out.cpu()
    return out.contiguous()


def iter_chunks(data: memoryview, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """``data`` cut into ``bytes`` objects of ``chunk_bytes`` (the last may be shorter)."""
    for start in range(0, len(data), chunk_bytes):
        yield bytes(data[start : start + chunk_bytes])


class Receiver:
    """Collects a known number of bytes from a stream of chunks into one buffer: a new one,
    or ``into`` (e.g. the bytes of an existing tensor)."""

    def __init__(self, expected: int, into: memoryview | None = None) -> None:
        if into is not None and len(into) != expected:
            raise ValueError(f"into holds {len(into)} bytes, expected {expected}")
        self.expected = expected
        self.buffer = bytearray(expected) if into is None else into
        self._view = memoryview(self.buffer)
        self.received = 0

    def fill(self, chunks: Iterator[Any]) -> bool:
        """Write chunks from ``chunks`` (zero-copy views, or messages with a ``data`` field)
        until the expected bytes are in; False when the stream ended first. Stops there: a
        session stream may carry more after them."""
        while self.received < self.expected:
            chunk = next(chunks, None)
            if chunk is None:
                return False
            self.take(chunk)
        return True

    async def afill(self, chunks: AsyncIterator[Any], stall_s: float | None = None) -> bool:
        """``fill`` from an async stream (a call served on an event loop); TimeoutError when no
        chunk comes for ``stall_s`` seconds."""
        while self.received < self.expected:
            async with asyncio.timeout(stall_s):
                chunk = await anext(chunks, None)
            if chunk is None:
                return False
            self.take(chunk)
        return True

    def take(self, chunk: Any) -> None:
        """One chunk of the stream: a zero-copy view, or a message whose ``data`` is set."""
        if isinstance(chunk, memoryview):
            self.write(chunk)
        elif chunk.WhichOneof("kind") == "data":
            self.write(chunk.data)
        else:
            raise ProtocolError("data: only data chunks may follow the header")

    def write(self, data: bytes | memoryview) -> None:
        end = self.received + len(data)
        if end > self.expected:
            raise ProtocolError(
                f"byte count: stream carries more than the expected {self.expected} bytes"
            )
        self._view[self.received : end] = data
        self.received = end

    def tensor(self, wire_dtype: int) -> torch.Tensor:
        """The received bytes as a flat tensor of the wire dtype (a quantised push: its uint8
        payload), sharing the buffer."""
        if self.received != self.expected:
            raise ProtocolError(
                f"byte count: got {self.received} of the expected {self.expected} bytes "
                "(stream cut short?)"
            )
        return from_bytes(self.buffer, payload_dtype(wire_dtype))


# --- the hot path: data chunks encoded by hand, byte-identical to protobuf's encoding ---
# PushChunk and PullChunk both carry ``bytes data = 2`` in a oneof; a chunk holding only data
# serializes as tag 0x12, the length as a varint, then the bytes. Encoding that directly
# copies each chunk once (instead of building a message and serializing it), and decoding
# returns a zero-copy view. Anything else falls back to the generated protobuf classes.

_DATA_TAG = 0x12  # field 2, wire type 2 (length-delimited)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_data_chunk(data: bytes | bytearray | memoryview) -> bytes:
    """A serialized PushChunk/PullChunk whose only field is ``data``."""
    return b"".join((bytes((_DATA_TAG,)), _varint(len(data)), data))


def iter_data_chunks(data: memoryview, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """``data`` as serialized data chunks of ``chunk_bytes`` each."""
    for start in range(0, len(data), chunk_bytes):
        yield encode_data_chunk(data[start : start + chunk_bytes])


def chunk_parser(message: type[M]) -> Callable[[bytes], M | memoryview]:
    """A gRPC deserializer for a chunk stream of ``message`` (PushChunk, PullChunk,
    CheckpointChunk): data chunks come through as zero-copy views, anything else is parsed."""
    def parse(raw: bytes) -> M | memoryview:
        data = data_of_chunk(raw)
        return data if data is not None else message.FromString(raw)
    return parse


def serialize_chunk(message: Message | bytes) -> bytes:
    """The response serializer of a chunk stream: pre-serialized data chunks (``bytes``) pass
    as they are, messages are serialized."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def data_of_chunk(raw: bytes) -> memoryview | None:
    """The payload of a serialized chunk that holds only ``data`` (no copy); None otherwise."""
    if not raw or raw[0] != _DATA_TAG:
        return None
    length, shift, pos = 0, 0, 1
    while pos < len(raw):
        byte = raw[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift > 63:
            return None
    else:
        return None
    if pos + length != len(raw):
        return None
    return memoryview(raw)[pos:]
