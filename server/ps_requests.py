"""What both parameter-server adapters (gRPC streams and the data plane) check in a request's
header before they allocate or read a byte of its payload, and how they hand the received
bytes to the store. No transport in here."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import ProtocolError, StateError
from gradhub.proto.model_state import ModelLayout, buffer_specs, tensors_from_proto
from gradhub.proto.shards import shards_of
from gradhub.proto.v1 import ps_pb2, tensor_pb2
from gradhub.server.store import ParameterStore


@dataclass(frozen=True)
class InitRequest:
    """A checked InitParameters header: the model it describes and the bytes that follow."""

    model: ModelLayout
    buffers: dict[str, torch.Tensor]
    trainable_bytes: int
    payload_bytes: int  # trainable (a shard's: its slice), then frozen (shard 0's alone), float32

    def take(self, store: ParameterStore, flat: torch.Tensor) -> bool:
        """Give the received payload (float32) to the store; False when it had parameters already."""
        if not bool(flat.isfinite().all()):
            raise ProtocolError("parameter values: initial parameters contain NaN or Inf")
        n = self.trainable_bytes // 4
        params, frozen = flat[:n], (flat[n:] if self.payload_bytes > self.trainable_bytes else None)
        return store.initialize(self.model, params, frozen, self.buffers)


def init_request(header: ps_pb2.PushHeader, max_model_bytes: int, shard: tuple[int, int] = (0, 1)) -> InitRequest:
    """``header`` describes the whole model; ``shard`` (index, count): the payload is that
    shard's slice of the trainable parameters (and, for shard 0, the frozen ones)."""
    if not header.tensors:
        raise ProtocolError("tensors: the header lists no tensors")
    for field, metas in (("tensors", header.tensors), ("frozen", header.frozen)):
        for i, meta in enumerate(metas):
            if meta.dtype != tensor_pb2.FLOAT32:
                raise ProtocolError(f"{field}[{i}].dtype: initial parameters must be FLOAT32")
    buffers = tensors_from_proto(header.buffers, "buffers")
    model = ModelLayout(trainable=Layout.from_metas(header.tensors),
                        frozen=Layout.from_metas(header.frozen) if header.frozen else None,
                        buffers=buffer_specs(buffers), aliases=dict(header.aliases))
    trainable = model.trainable.nbytes(tensor_pb2.FLOAT32)
    total = trainable + (model.frozen.nbytes(tensor_pb2.FLOAT32) if model.frozen else 0)
    if total > max_model_bytes:
        raise ProtocolError(f"tensors: a model of {total} bytes is over the server's limit of "
                            f"{max_model_bytes} (gradhub server --max-model-bytes)")
    index, count = shard
    if count > 1:
        trainable = shards_of(model.trainable, count)[index].numel * 4
        total = trainable + (total - model.trainable.nbytes(tensor_pb2.FLOAT32) if index == 0 else 0)
    return InitRequest(model, buffers, trainable, total)


def push_bytes(store: ParameterStore, header: ps_pb2.PushHeader) -> int:
    """The bytes of the gradient ``header`` announces, once its tensors match the job's model
    (a sharded job's control store holds none: its pushes list none, and bring the buffers)."""
    layout = store.layout
    if not header.tensors and (layout is None or layout.names):
        raise ProtocolError("tensors: the header lists no tensors")
    if layout is None:
        raise StateError("parameters: the job has no parameters yet; pull before pushing")
    config = store.config
    layout = pushed_layout(layout, header)  # the model, a bucket or a fragment (the store checks which)
    layout.check_metas(header.tensors, config.wire_dtype)
    quant = config.quant
    if quant is None:
        if header.quant_block:
            raise ProtocolError(f"quant_block: {header.quant_block}, but compression {config.compression!r} "
                                "does not quantise")
        return layout.nbytes(config.wire_dtype)
    if header.quant_block != quant.block:
        raise ProtocolError(f"quant_block: {header.quant_block}, the job's compression_block is {quant.block}")
    return quant.nbytes(layout.numel)


def pushed_layout(layout: Layout, header: ps_pb2.PushHeader) -> Layout:
    """What a push's tensors are: the model, or the fragment from ``first_tensor`` on."""
    return layout.part(*push_part(layout, header))


def pull_part_after(store: ParameterStore, header: ps_pb2.PushHeader) -> tuple[int, int]:
    """What a push-and-pull brings back: a fragment's parameters after its push, and a bucket's
    when the header asks for its own part only (``pull_part_only``: the worker pulled the other
    buckets' already); else the whole model's after a whole push or a step's last bucket."""
    layout = store.layout
    assert layout is not None  # the push was taken
    return push_part(layout, header) if store.config.fragments > 1 or header.pull_part_only else (0, 0)


def push_part(layout: Layout, header: ps_pb2.PushHeader) -> tuple[int, int]:
    """The tensors (first, count) a push covers, as a pull names them ((0, 0): the model)."""
    if not header.first_tensor and len(header.tensors) == len(layout.names):
        return 0, 0
    return header.first_tensor, len(header.tensors)


def take_push(store: ParameterStore, header: ps_pb2.PushHeader, payload: torch.Tensor,
              buffers: dict[str, torch.Tensor] | None) -> tuple[bool, int]:
    """Hand a received push (its checked bytes as ``payload``, in the payload dtype) to the
    store: as it is, or decoded to float32 when the job quantises (the store keeps float32).
    Returns (accepted, version)."""
    quant = store.config.quant
    layout = store.layout
    assert layout is not None  # push_bytes checked it
    first, count = push_part(layout, header)
    norm_sq = header.clip_norm_sq if header.HasField("clip_norm_sq") else None
    if quant is None:
        return store.push(header.rank, header.step, header.base_version, payload, buffers, list(header.unused),
                          first=first, count=count, world_size=header.world_size, norm_sq=norm_sq)
    grad = quant.decode(payload, pushed_layout(layout, header).numel)
    return store.push(header.rank, header.step, header.base_version, grad, buffers, list(header.unused),
                      wire_bytes=payload.numel(), first=first, count=count, world_size=header.world_size,
                      norm_sq=norm_sq)


def take_clip_total(store: ParameterStore, request: ps_pb2.PullRequest) -> None:
    """A pull that brings the norm over every shard of the step before (``clip_total_sq`` set:
    clipping over shards in ps-sync): that step is taken, before the pull waits for it."""
    store.clip_total(request.step - 1, request.clip_total_sq)


def push_buffers(header: ps_pb2.PushHeader) -> dict[str, torch.Tensor] | None:
    return tensors_from_proto(header.buffers, "buffers") if header.buffers else None
