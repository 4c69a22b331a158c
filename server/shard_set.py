"""A sharded job's parameter server as one (``ps_shards: K``): store 0 is the job's control
``ParameterStore`` on the gRPC server (no trainable value: the job's steps, its buffers, frozen
parameters and schedule), stores 1 to K are the shards, ``ShardServer``s each in a process of
its own (Ray actors, ``gradhub.server.shard_actors``; in this process for tests and external
workers, ``LocalShards``). Here: what the control plane asks of them, and how their states
merge into the one checkpoint an unsharded job would write."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from gradhub.proto import frames
from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import StateError
from gradhub.proto.shards import (
    merge_optimizer_state,
    merge_params,
    shards_of,
    split_optimizer_state,
    total_of_parts,
)
from gradhub.proto.v1 import ps_pb2
from gradhub.server.shard_server import ShardServer, ShardStats
from gradhub.server.store import CheckpointState, ParameterStore, StoreConfig


class OtherShards(Protocol):
    """Shards 1 to K of a running job; every call answers for each of them, in order."""

    def endpoints(self) -> list[dict[str, object]]:
        """Where each one's data plane is (``ShardServer.endpoint``)."""
        ...

    def register(self, rank: int, host: str, pid: int, credential: str, total_steps: int,
                 at_least: int | None = None) -> list[int]:
        """Register worker ``rank`` on each one; its next step there (``ParameterStore.register``)."""
        ...

    def follow(self, size: int, clocks: Sequence[int], at_once: bool = False) -> list[int]:
        """An elastic job's size changed on the control store: each one follows; their
        versions then (``ParameterStore.follow``)."""
        ...

    def resume_from(self, states: Sequence[CheckpointState], total_steps: int) -> None:
        """Resume each one from its state (its slice, ``resume_slices``, or the whole model's)."""
        ...

    def captures(self, step: int) -> list[CheckpointState | None]: ...

    def checkpoint_states(self) -> list[CheckpointState]: ...

    def stats(self) -> list[ShardStats]: ...

    def lost(self) -> list[int]:
        """The shards (their indexes) whose process died."""
        ...

    def mark_dead(self, rank: int) -> None: ...

    def clip_held(self) -> list[int | None]:
        """The step each one holds for its norm (``ShardClip``), if any."""
        ...

    def clip_parts(self, step: int) -> list[float | None]: ...

    def clip_total(self, step: int, total_sq: float) -> None: ...

    def close(self, reason: str) -> None: ...

    def stop(self) -> None: ...


def endpoints(others: Sequence[dict[str, object]], credential: str) -> list[ps_pb2.DataEndpoint]:
    """The shards' ``RegisterResponse.shards`` for a worker whose credential is ``credential``."""
    return [ps_pb2.DataEndpoint(protocol=frames.DATA_PROTOCOL, credential=credential, tls=bool(e.get("tls")),
                                tcp_host=str(e["tcp_host"]), tcp_port=int(str(e["tcp_port"])),
                                unix_path=str(e["unix_path"]), host_id=str(e["host_id"]),
                                shared_memory=bool(e.get("shared_memory"))) for e in others]


def merge_states(store: ParameterStore, own: CheckpointState, others: Sequence[CheckpointState], *,
                 checkpoint: bool = True) -> CheckpointState:
    """The whole model's checkpoint from the control store's (``store``'s, ``own``) and the
    shards', taken at the same step. In ps-sync every shard is at the same version; in
    ps-async and ps-ssp a checkpoint's shards hold the same pushes, every worker at the same
    clock on each (``StoreConfig.fences_checkpoints``); else the states do not belong together
    (a ``StateError``). ``checkpoint=False``: the states of a job as it stopped, where an async
    worker may have pushed its last step to some shards only (each worker at its least clock)."""
    model = store.model
    if model is None:
        raise StateError("parameters: the job has no parameters yet")
    states = [own, *others]
    if store.config.mode == "ps-sync" and len({s.version for s in states}) > 1:
        raise StateError(f"shards: at versions {[s.version for s in states]}, not one step of the job")
    if checkpoint and len({s.clocks for s in states}) > 1:
        raise StateError(f"shards: workers' clocks {[list(s.clocks) for s in states]}, not one checkpoint")
    shards = shards_of(model.trainable, len(states))
    trainable = merge_params(model.trainable, shards, [s.params for s in states])
    frozen = {n: own.params[n] for n in (model.frozen.names if model.frozen else ())}
    buffers = {b.name: own.params[b.name] for b in model.buffers}
    optimizer = merge_optimizer_state(model.trainable, store.config.param_groups, shards,
                                      [s.optimizer_state for s in states])
    # (checkpoint=False) a worker that pushed to some shards and not yet to others: its least clock
    clocks = tuple(min(c) for c in zip(*(s.clocks for s in states), strict=True))
    return CheckpointState(step=min(s.step for s in states), version=min(s.version for s in states),
                           params=model.state_dict(trainable, frozen, buffers), optimizer_state=optimizer,
                           scheduler_state=own.scheduler_state, clocks=clocks)


def resume_slices(state: CheckpointState, trainable: Layout, groups: Sequence[Mapping[str, Any]],
                  count: int) -> list[CheckpointState]:
    """Shards 1 to ``count - 1``'s slices (``count`` stores) of the whole model's checkpoint
    ``state``, whose trainable parameters are ``trainable`` (the model's order; ``groups`` the
    job's parameter groups): each shard gets its pieces and its optimizer state, not the whole
    model's."""
    missing = [n for n in trainable.names if n not in state.params]
    if missing:
        raise StateError(f"checkpoint: its manifest names trainable parameters {missing} that its state lacks")
    shards = shards_of(trainable, count)
    named = {n: state.params[n] for n in trainable.names}
    return [dataclasses.replace(state, params=shard.pieces(named), slice_of=(shard.index, count),
                                optimizer_state=split_optimizer_state(trainable, groups, shard, state.optimizer_state))
            for shard in shards[1:]]


def settle_held_clip(store: ParameterStore, others: OtherShards) -> int | None:
    """A job that clips over shards: take a step that a shard holds for its norm when every
    shard has its part, with the total the workers would have sent (the same sum, in shard
    order); returns that step. A worker registering again calls this: the one that would have
    brought the total may have died after its pushes and before its pull."""
    held = [s for s in (store.clip_held(), *others.clip_held()) if s is not None]
    if not held:
        return None
    step = min(held)
    parts = [store.clip_part(step), *others.clip_parts(step)]
    if any(p is None for p in parts):
        return None  # a worker's slice of that step is still to come: its pushes bring the rest
    total = total_of_parts(p for p in parts if p is not None)
    store.clip_total(step, total)
    others.clip_total(step, total)
    return step


class LocalShards:
    """Shards 1 to ``count - 1`` (``count`` stores) as ``ShardServer``s in this process (for
    tests and external workers)."""

    def __init__(self, config: StoreConfig, count: int, host: str, *, max_model_bytes: int,
                 tls: tuple[bytes, bytes] | None = None) -> None:
        self._servers = [ShardServer(dataclasses.replace(config, shard=i, shards=count), host,
                                     max_model_bytes=max_model_bytes, tls=tls).start() for i in range(1, count)]

    @property
    def stores(self) -> list[ParameterStore]:
        return [s.store_ for s in self._servers]

    def endpoints(self) -> list[dict[str, object]]:
        return [s.endpoint() for s in self._servers]

    def register(self, rank: int, host: str, pid: int, credential: str, total_steps: int,
                 at_least: int | None = None) -> list[int]:
        return [s.register(rank, host, pid, credential, total_steps, at_least)[1] for s in self._servers]

    def follow(self, size: int, clocks: Sequence[int], at_once: bool = False) -> list[int]:
        return [s.follow(size, clocks, at_once) for s in self._servers]

    def resume_from(self, states: Sequence[CheckpointState], total_steps: int) -> None:
        for s, state in zip(self._servers, states, strict=True):
            s.resume_from(state, total_steps)

    def captures(self, step: int) -> list[CheckpointState | None]:
        return [s.capture(step) for s in self._servers]

    def checkpoint_states(self) -> list[CheckpointState]:
        return [s.checkpoint_state() for s in self._servers]

    def stats(self) -> list[ShardStats]:
        return [s.stats() for s in self._servers]

    def lost(self) -> list[int]:
        return []  # they live as long as this process

    def mark_dead(self, rank: int) -> None:
        for s in self._servers:
            s.mark_dead(rank)

    def clip_held(self) -> list[int | None]:
        return [s.clip_held() for s in self._servers]

    def clip_parts(self, step: int) -> list[float | None]:
        return [s.clip_part(step) for s in self._servers]

    def clip_total(self, step: int, total_sq: float) -> None:
        for s in self._servers:
            s.clip_total(step, total_sq)

    def close(self, reason: str) -> None:
        for s in self._servers:
            s.close(reason)

    def stop(self) -> None:
        for s in self._servers:
            s.stop()
