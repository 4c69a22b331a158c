"""Training state on the wire: parameters, optimizer and schedule state as tensors plus JSON.

A state dict (``optimizer.state_dict()``, a schedule's) becomes JSON with its tensors moved
out by dotted path, so it can be stored (checkpoints) and sent (allreduce mode's
SaveCheckpoint / LoadCheckpoint) without pickling. ``state_messages`` and ``read_state``
carry a whole ``TrainingState`` as one ``CheckpointHeader`` and its bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from gradhub.proto.codec import CHUNK_BYTES, Layout, Receiver, encode_data_chunk, from_bytes
from gradhub.proto.contract.errors import ProtocolError
from gradhub.proto.model_state import BUFFER_DTYPES, WIRE_OF_DTYPE
from gradhub.proto.v1 import ps_pb2, tensor_pb2

_TAGS = ("__tensor__", "__tuple__", "__float__", "__dict__")


@dataclass(frozen=True)
class TrainingState:
    """Everything needed to continue training exactly after ``step`` steps."""

    step: int
    params: dict[str, torch.Tensor]  # the model's state_dict: parameters and buffers by key, in order
    optimizer_state: dict[str, Any] | None = None
    scheduler_state: dict[str, Any] | None = None


# --------------------------------------------------------------------- state dict <-> JSON


def encode_state(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-ready form of a state dict: tensors move to ``tensors`` keyed by their dotted path.

    Tuples, non-string dict keys and non-finite floats are tagged so ``decode_state`` restores them.
    """
    where = path.rstrip(".") or "<root>"
    if isinstance(obj, torch.Tensor):
        key = path.rstrip(".")
        if key in tensors:
            raise ValueError(f"two state tensors map to the checkpoint key {key!r}")
        tensors[key] = obj
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, (list, tuple)):
        items = [encode_state(v, f"{path}{i}.", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, Mapping):
        plain = all(isinstance(k, str) for k in obj) and not (
            len(obj) == 1 and next(iter(obj)) in _TAGS
        )
        if plain:
            return {k: encode_state(v, f"{path}{k}.", tensors) for k, v in obj.items()}
        return {
            "__dict__": [
                [encode_state(k, f"{path}{k}.key.", tensors), encode_state(v, f"{path}{k}.", tensors)]
                for k, v in obj.items()
            ]
        }
    raise TypeError(
        f"cannot store {where} of type {type(obj).__name__} in a checkpoint "
        "(supported: tensors, numbers, str, None, lists, tuples, dicts)"
    )


def decode_state(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of ``encode_state``."""
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        tag, value = next(iter(obj.items()))
        if tag == "__tensor__":
            try:
                return tensors[value]
            except (KeyError, TypeError):
                raise ProtocolError(f"state: refers to tensor {value!r}, which was not sent") from None
        if tag == "__tuple__":
            return tuple(decode_state(v, tensors) for v in value)
        if tag == "__float__":
            return float(value)
        if tag == "__dict__":
            return {decode_state(k, tensors): decode_state(v, tensors) for k, v in value}
    return {k: decode_state(v, tensors) for k, v in obj.items()}


# --------------------------------------------------------------------- the wire


def state_messages(job_id: str, rank: int, state: TrainingState) -> Iterator[ps_pb2.CheckpointChunk | bytes]:
    """``state`` as a header and serialized data chunks of about ``CHUNK_BYTES``."""
    header, tensors = state_header(job_id, rank, state)
    yield ps_pb2.CheckpointChunk(header=header)
    yield from _data_chunks(tensors)


def state_header(job_id: str, rank: int, state: TrainingState) -> tuple[ps_pb2.CheckpointHeader, list[torch.Tensor]]:
    """``state``'s header, and the tensors whose bytes follow it back to back (``read_state``)."""
    extra: dict[str, torch.Tensor] = {}
    optim = None if state.optimizer_state is None else encode_state(state.optimizer_state, "", extra)
    sched = None if state.scheduler_state is None else encode_state(state.scheduler_state, "scheduler.", extra)
    for name, t in extra.items():
        if not t.dtype.is_floating_point:
            raise TypeError(f"state: tensor {name!r} is {t.dtype}; only floating-point state can be sent")
    for name, t in state.params.items():
        if t.dtype not in WIRE_OF_DTYPE:
            raise TypeError(f"params: tensor {name!r} is {t.dtype}, which gradhub cannot carry")
    header = ps_pb2.CheckpointHeader(
        job_id=job_id, rank=rank, step=state.step,
        params=_metas(state.params, keep_dtype=True), state=_metas(extra),
        optimizer_json="" if optim is None else json.dumps(optim, allow_nan=False),
        scheduler_json="" if sched is None else json.dumps(sched, allow_nan=False),
    )
    return header, [*state.params.values(), *(t.to(torch.float32) for t in extra.values())]


def read_state(header: ps_pb2.CheckpointHeader, chunks: Iterator[Any]) -> TrainingState:
    """The state a header announces, its bytes read from ``chunks`` (data chunks or views).

    Raises ProtocolError naming what is wrong (a tensor, the byte count, the JSON)."""
    plan = StatePlan(header)
    receiver = Receiver(plan.nbytes)
    if receiver.fill(chunks) and next(chunks, None) is not None:
        raise ProtocolError(f"byte count: stream carries more than the expected {plan.nbytes} bytes")
    return plan.decode(receiver)


class StatePlan:
    """A checked CheckpointHeader: how many bytes follow it (``nbytes``, known before any is read),
    and how to turn them into the TrainingState (``decode``)."""

    def __init__(self, header: ps_pb2.CheckpointHeader) -> None:
        """A header without params is a worker's own state (local-sgd's inner optimizer)."""
        for i, m in enumerate(header.params):
            if m.dtype not in BUFFER_DTYPES:
                raise ProtocolError(f"params[{i}].dtype: '{m.name}' has unknown dtype {m.dtype}")
        for i, m in enumerate(header.state):
            if m.dtype != tensor_pb2.FLOAT32:
                raise ProtocolError(f"state[{i}].dtype: '{m.name}' must be FLOAT32")
        self.header = header
        self.params_layout = Layout.from_metas(header.params) if header.params else None
        self.state_layout = Layout.from_metas(header.state) if header.state else None
        self.dtypes = [BUFFER_DTYPES[m.dtype] for m in header.params]
        numels = self.params_layout.numels if self.params_layout else ()
        self.sizes = [n * d.itemsize for n, d in zip(numels, self.dtypes, strict=True)]
        self.params_bytes = sum(self.sizes)
        self.nbytes = self.params_bytes + (self.state_layout.nbytes(tensor_pb2.FLOAT32) if self.state_layout else 0)

    def decode(self, receiver: Receiver) -> TrainingState:
        total, header = self.nbytes, self.header
        if receiver.received != total:
            raise ProtocolError(f"byte count: got {receiver.received} of the expected {total} bytes "
                                "(stream cut short?)")
        raw = from_bytes(receiver.buffer, torch.uint8)
        params, offset = {}, 0
        layout = self.params_layout
        names, shapes = (layout.names, layout.shapes) if layout else ((), ())
        for name, shape, dtype, size in zip(names, shapes, self.dtypes, self.sizes, strict=True):
            # a copy: a tensor after an odd-sized one (int8, bool) does not start aligned
            t = raw[offset:offset + size].clone().view(dtype).view(shape) if size else torch.empty(shape, dtype=dtype)
            if dtype.is_floating_point and not bool(t.isfinite().all()):
                raise ProtocolError(f"state values: '{name}' holds NaN or Inf (did training diverge?)")
            params[name] = t
            offset += size
        flat = raw[self.params_bytes:].clone().view(torch.float32)
        if not bool(flat.isfinite().all()):
            raise ProtocolError("state values: the optimizer state holds NaN or Inf (did training diverge?)")
        extra = self.state_layout.split(flat) if self.state_layout else {}
        return TrainingState(step=header.step, params=params,
                             optimizer_state=_state_of("optimizer_json", header.optimizer_json, extra),
                             scheduler_state=_state_of("scheduler_json", header.scheduler_json, extra))


def _state_of(field: str, text: str, tensors: Mapping[str, torch.Tensor]) -> Any:
    if not text:
        return None
    try:
        return decode_state(json.loads(text), tensors)
    except json.JSONDecodeError as e:
        raise ProtocolError(f"{field}: not valid JSON ({e})") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise ProtocolError(f"{field}: malformed state ({e})") from None


def _metas(tensors: Mapping[str, torch.Tensor], keep_dtype: bool = False) -> list[tensor_pb2.TensorMeta]:
    return [tensor_pb2.TensorMeta(name=n, dtype=WIRE_OF_DTYPE[t.dtype] if keep_dtype else tensor_pb2.FLOAT32,
                                  shape=list(t.shape)) for n, t in tensors.items()]


def _data_chunks(tensors: Iterable[torch.Tensor], chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The tensors' float32 bytes back to back, as serialized data chunks of ``chunk_bytes``
    (small tensors share a chunk; a large one is sent from its own memory)."""
    pending = bytearray()
    for t in tensors:
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data
        start = 0
        if pending:
            start = min(chunk_bytes - len(pending), len(data))
            pending += data[:start]
            if len(pending) == chunk_bytes:
                yield encode_data_chunk(pending)
                pending = bytearray()
        while len(data) - start >= chunk_bytes:
            yield encode_data_chunk(data[start:start + chunk_bytes])
            start += chunk_bytes
        pending += data[start:]
    if pending:
        yield encode_data_chunk(pending)
