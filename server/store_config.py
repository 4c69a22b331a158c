"""What a parameter store takes and gives: its configuration (from the job's spec), the
parameters of one version as pulls send them, and a consistent copy of its state for a
checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from gradhub.proto.codec import (
    CHUNK_BYTES,
    COMPRESSION_DTYPES,
    QUANT_BITS,
    Layout,
    as_bytes,
    iter_data_chunks,
    params_dtype,
)
from gradhub.proto.contract.errors import SpecError
from gradhub.proto.quant import DEFAULT_BLOCK, BlockQuant
from gradhub.proto.v1 import tensor_pb2


@dataclass(frozen=True)
class StoreConfig:
    """What the store needs from a job spec."""

    job_id: str
    mode: str
    world_size: int
    staleness: int = 0
    optimizer: str = "sgd"
    lr: float = 0.01
    hyper: Mapping[str, Any] = field(default_factory=dict)
    schedule: Mapping[str, Any] | None = None
    checkpoint_every: int = 0
    compression: str = "none"
    param_groups: tuple[Mapping[str, Any], ...] = ()
    buffers: str = "broadcast"  # whose buffers the job keeps: "broadcast" (rank 0), "average", "local"
    clip_grad_norm: float | None = None
    compression_block: int | None = None  # int8 / int4: values per scale of a pushed gradient (256)
    # local-sgd (sync): keep the parameters of every version since ``trim_history``, from which
    # a restarted worker replays the rounds it lost
    keep_history: bool = False
    # async: scale a gradient computed ``s`` versions ago by 1 / (1 + s) before the step
    staleness_scaling: bool = False
    # local-sgd streaming: store step s updates fragment s % fragments alone (a run of whole
    # tensors, ``Layout.partition``); the other parameters are left exactly as they are
    fragments: int = 1
    # ps_shards: this store is store ``shard`` of the job's ``shards`` (``gradhub.proto.shards``:
    # with K shards, K + 1 stores): store 0 the server's control store (the frozen parameters,
    # the buffers, the schedule; no trainable value), stores 1 to K each a slice of the rest
    shard: int = 0
    shards: int = 1
    # bucketed pushes: apply each bucket as soon as every worker's copy of it is in (ps-sync), or
    # as it arrives (ps-async, ps-ssp); off for clipping, whose norm spans the whole gradient,
    # and for elastic jobs, whose step in flight may have to be done again at another size
    apply_buckets: bool = False
    # an elastic job (``workers: {min, max}``): over shards, each shard follows the size the
    # control store decides (``follows_control``, ``pushes_control_first``)
    elastic: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.shard < self.shards:
            raise SpecError("ps_shards", f"shard {self.shard} of {self.shards}")
        if self.buffers not in ("broadcast", "average", "local"):
            raise SpecError("buffers", f"must be broadcast, average or local, not {self.buffers!r}")
        if self.compression not in COMPRESSION_DTYPES:
            raise SpecError("compression", f"must be one of {sorted(COMPRESSION_DTYPES)}")
        if self.mode not in ("ps-sync", "ps-async", "ps-ssp"):
            raise SpecError("mode", f"the parameter store serves ps-* modes, not {self.mode!r}")
        if self.world_size < 1:
            raise SpecError("workers", "must be >= 1")
        _ = self.quant  # int8 / int4: a compression_block out of range is a SpecError

    @property
    def wire_dtype(self) -> int:
        """The dtype of gradients on the wire (parameters stay float32 on the server)."""
        return COMPRESSION_DTYPES[self.compression]

    @property
    def clips_across_shards(self) -> bool:
        """ps-sync clipping over K > 1 shards: the norm comes from the workers (``ShardClip``)."""
        return self.clip_grad_norm is not None and self.shards > 1 and self.mode == "ps-sync"

    @property
    def clips_by_push_norm(self) -> bool:
        """ps-async / ps-ssp clipping over K > 1 shards: each push names its whole gradient's norm."""
        return self.clip_grad_norm is not None and self.shards > 1 and self.mode != "ps-sync"

    @property
    def fences_checkpoints(self) -> bool:
        """ps-async / ps-ssp over K > 1 shards with periodic checkpoints: a pull of a step past a
        checkpoint's waits until every worker's pushes up to it are in, so that every shard
        takes that checkpoint at the same point of every worker's (``ParameterStore._may_pull``)."""
        return self.shards > 1 and self.mode != "ps-sync" and self.checkpoint_every > 0

    @property
    def follows_control(self) -> bool:
        """A shard (1 to K) of an elastic job: the control store decides the job's size and who
        is in it; the shard follows (``ParameterStore.follow``, and in ps-sync the size each
        push was computed for)."""
        return self.elastic and self.shard > 0

    @property
    def pushes_control_first(self) -> bool:
        """An elastic ps-async / ps-ssp job over shards: a worker's push goes to the control store
        first and to the shards once it took it, so a worker that the job let go mid-step has
        its last push refused everywhere or taken everywhere (``RegisterResponse.control_first``)."""
        return self.elastic and self.shards > 1 and self.mode != "ps-sync"

    @property
    def params_dtype(self) -> int:
        """The dtype pulled parameters travel in (float32 when pushes are quantised)."""
        return params_dtype(self.compression)

    @cached_property
    def quant(self) -> BlockQuant | None:
        """The format of quantised pushes (compression int8 / int4), else None."""
        if self.wire_dtype not in QUANT_BITS:
            return None
        return BlockQuant(self.wire_dtype, self.compression_block or DEFAULT_BLOCK)


@dataclass(frozen=True)
class Snapshot:
    """Parameters at one version, encoded in a wire dtype, for any number of pulls at once.

    ``data`` never changes while a pull may read it: in ps-sync with float32 on the wire it is
    the store's own parameters (no update can happen before every worker has pulled this
    version and pushed its next gradient), otherwise a copy made for this version.
    """

    version: int
    wire_dtype: int
    data: torch.Tensor  # flat, contiguous, CPU, in the wire dtype
    layout: Layout  # what ``data`` holds: the model, or one fragment of it
    buffers: tuple[tensor_pb2.Tensor, ...] = ()  # the job's buffers, for the header
    world_size: int = 0  # the job's size at this version (an elastic job's workers share each batch so)

    @cached_property
    def chunks(self) -> tuple[bytes, ...]:
        """``data`` as serialized gRPC data chunks of ~1 MiB (the gRPC path's pulls)."""
        return tuple(iter_data_chunks(as_bytes(self.data), CHUNK_BYTES))


@dataclass(frozen=True)
class CheckpointState:
    """A consistent copy of everything needed to resume exactly."""

    step: int
    version: int
    params: dict[str, torch.Tensor]  # the model's whole state_dict (parameters, buffers, tied keys)
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any] | None
    clocks: tuple[int, ...]
    # (shard, count): ``params`` and ``optimizer_state`` are only that shard's slice of the
    # model's (``gradhub.server.shard_set.resume_slices``); None: the whole model's
    slice_of: tuple[int, int] | None = None
