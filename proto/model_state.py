"""A model's whole state as gradhub moves it, beyond the flat vector of trainable parameters.

The trainable parameters travel as one flat float32 vector (``Layout``, the hot path). The
rest of a model's ``state_dict`` is described here: frozen parameters (sent once, at
initialisation), buffers (BatchNorm statistics and counters, in their own dtype, carried
inline in push and pull headers) and the keys that alias another key (tied weights). Worker
and server share this description, so the server can write checkpoints that load with
``model.load_state_dict(...)`` strictly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from math import prod

import torch

from gradhub.proto.codec import Layout, as_wire, from_bytes
from gradhub.proto.contract.errors import ProtocolError
from gradhub.proto.v1 import tensor_pb2

# Buffers keep their dtype on the wire and in checkpoints.
BUFFER_DTYPES: dict[tensor_pb2.DType, torch.dtype] = {
    tensor_pb2.FLOAT32: torch.float32, tensor_pb2.FLOAT16: torch.float16,
    tensor_pb2.BFLOAT16: torch.bfloat16, tensor_pb2.FLOAT64: torch.float64,
    tensor_pb2.INT64: torch.int64, tensor_pb2.INT32: torch.int32, tensor_pb2.INT16: torch.int16,
    tensor_pb2.INT8: torch.int8, tensor_pb2.UINT8: torch.uint8, tensor_pb2.BOOL: torch.bool,
}  # fmt: skip
WIRE_OF_DTYPE: dict[torch.dtype, tensor_pb2.DType] = {v: k for k, v in BUFFER_DTYPES.items()}

# Buffers ride inside a header message; gRPC messages here are limited to 64 MiB.
MAX_INLINE_BYTES = 32 << 20


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one buffer."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class ModelLayout:
    """Everything in a model's ``state_dict`` and how it travels.

    ``trainable``: unique parameters with ``requires_grad`` (a tied parameter once, under its
    first name), the flat vector gradients and updates use. ``frozen``: parameters with
    ``requires_grad=False``. ``buffers``: persistent buffers (unique). ``aliases``: every other
    ``state_dict`` key, mapped to the key that carries the same tensor.
    """

    trainable: Layout
    frozen: Layout | None = None
    buffers: tuple[TensorSpec, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [*self.trainable.names, *(self.frozen.names if self.frozen else ()),
                 *(b.name for b in self.buffers)]
        if len(set(names)) != len(names):
            raise ProtocolError("tensors: a name appears twice among parameters and buffers")
        for key, target in self.aliases.items():
            if key in names:
                raise ProtocolError(f"aliases: '{key}' is both an alias and a tensor of its own")
            if target not in names:
                raise ProtocolError(f"aliases: '{key}' refers to '{target}', which the model does not send")
        if sum(b.nbytes for b in self.buffers) > MAX_INLINE_BYTES:
            raise ProtocolError(f"buffers: the model's buffers exceed {MAX_INLINE_BYTES >> 20} MiB, "
                                "the most gradhub carries with each step")

    def state_keys(self) -> list[str]:
        """Every key of the model's ``state_dict`` (sorted)."""
        return sorted([*self.trainable.names, *(self.frozen.names if self.frozen else ()),
                       *(b.name for b in self.buffers), *self.aliases])

    def state_dict(self, params: Mapping[str, torch.Tensor], frozen: Mapping[str, torch.Tensor],
                   buffers: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The full ``state_dict``: tensors by key, aliases pointing at the same tensors."""
        out = {**params, **frozen, **buffers}
        for key, target in self.aliases.items():
            out[key] = out[target]
        return out

    def split_state(self, state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                       dict[str, torch.Tensor],
                                                                       dict[str, torch.Tensor]]:
        """(trainable, frozen, buffers) of a full ``state_dict`` such as a checkpoint's, after
        checking that it holds exactly this model's keys, shapes and buffer dtypes."""
        expected, got = set(self.state_keys()), set(state)
        if expected != got:
            missing, extra = sorted(expected - got), sorted(got - expected)
            raise ProtocolError(f"state: the checkpoint does not match the model (missing {missing}, "
                                f"unexpected {extra})")
        params = [self.trainable, *([self.frozen] if self.frozen else [])]
        specs = [TensorSpec(n, torch.float32, s) for layout in params
                 for n, s in zip(layout.names, layout.shapes, strict=True)]
        for spec in [*specs, *self.buffers]:
            if tuple(state[spec.name].shape) != spec.shape:
                raise ProtocolError(f"state: '{spec.name}' is {list(spec.shape)} in the model but "
                                    f"{list(state[spec.name].shape)} in the checkpoint")
        trainable = {n: state[n] for n in self.trainable.names}
        frozen = {n: state[n] for n in (self.frozen.names if self.frozen else ())}
        buffers = {b.name: state[b.name].to(b.dtype) for b in self.buffers}
        return trainable, frozen, buffers

    def check_buffers(self, buffers: Mapping[str, torch.Tensor], where: str) -> None:
        """Raise ProtocolError unless ``buffers`` are exactly this model's, by name, dtype and shape."""
        if list(buffers) != [b.name for b in self.buffers]:
            raise ProtocolError(f"{where}: got buffers {list(buffers)}, the job's model has "
                                f"{[b.name for b in self.buffers]}")
        for b in self.buffers:
            t = buffers[b.name]
            if t.dtype != b.dtype or tuple(t.shape) != b.shape:
                raise ProtocolError(f"{where}: buffer '{b.name}' is {t.dtype} {list(t.shape)}, "
                                    f"expected {b.dtype} {list(b.shape)}")


# --------------------------------------------------------------------- inline tensors


def tensors_to_proto(tensors: Mapping[str, torch.Tensor]) -> list[tensor_pb2.Tensor]:
    """Small tensors (buffers) as inline ``Tensor`` messages, in order."""
    out = []
    for name, t in tensors.items():
        wire = WIRE_OF_DTYPE.get(t.dtype)
        if wire is None:
            raise ProtocolError(f"buffers: '{name}' has dtype {t.dtype}, which gradhub cannot carry")
        data = t.detach().to("cpu").contiguous().reshape(-1)
        raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
        out.append(tensor_pb2.Tensor(meta=tensor_pb2.TensorMeta(name=name, dtype=as_wire(wire), shape=list(t.shape)),
                                     data=raw))
    return out


def tensors_from_proto(messages: Iterable[tensor_pb2.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Inline ``Tensor`` messages back as tensors (copies), checking dtype and byte counts."""
    out: dict[str, torch.Tensor] = {}
    for i, m in enumerate(messages):
        dtype = BUFFER_DTYPES.get(m.meta.dtype)
        if dtype is None:
            raise ProtocolError(f"{where}[{i}].dtype: unknown dtype {m.meta.dtype} for '{m.meta.name}'")
        shape = tuple(m.meta.shape)
        if any(d < 0 for d in shape):
            raise ProtocolError(f"{where}[{i}].shape: negative dimension in {list(shape)}")
        nbytes = prod(shape) * dtype.itemsize
        if len(m.data) != nbytes:
            raise ProtocolError(f"{where}[{i}].data: '{m.meta.name}' carries {len(m.data)} bytes, "
                                f"its dtype and shape need {nbytes}")
        if m.meta.name in out:
            raise ProtocolError(f"{where}[{i}].name: '{m.meta.name}' appears twice")
        t = from_bytes(bytearray(m.data), dtype)
        out[m.meta.name] = t.reshape(shape)
    return out


def buffer_specs(tensors: Mapping[str, torch.Tensor]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items())


def layout_of(names: Sequence[str], shapes: Sequence[Sequence[int]]) -> Layout | None:
    """A Layout, or None when there are no tensors (Layout needs at least one)."""
    return Layout(tuple(names), tuple(tuple(s) for s in shapes)) if names else None
