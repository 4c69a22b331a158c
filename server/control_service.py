"""gRPC adapter for the WorkerControl service: a job's workers join, stay alive and report, in
every mode, and (allreduce) save and load their group's checkpoints."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING, Protocol

import grpc
from google.protobuf.message import Message

from gradhub.proto.codec import Receiver, chunk_parser, serialize_chunk
from gradhub.proto.contract.errors import ProtocolError
from gradhub.proto.state import StatePlan, TrainingState, state_messages
from gradhub.proto.v1 import ps_pb2, ps_pb2_grpc
from gradhub.server import limits
from gradhub.server.rpc import handler, job_credential
from gradhub.server.shard_set import endpoints as shard_endpoints
from gradhub.server.store import ParameterStore

if TYPE_CHECKING:
    from gradhub.server.data_plane import DataPlane
from gradhub.server.tracker import Formation, GroupTracker

JOIN_RETRY_S = 0.05  # how soon a worker asks again while its group is not complete


class WorkerBackend(Protocol):
    """What the worker services need from the server: the job's state, notifications, checkpoints."""

    heartbeat_interval_s: float
    collective_timeout_s: float

    def store(self, job_id: str) -> ParameterStore:
        """A ps-* job's parameter store (FAILED_PRECONDITION for an allreduce job)."""
        ...

    def state(self, job_id: str) -> ParameterStore | GroupTracker:
        """What the server keeps of a running job in any mode."""
        ...

    def tracker(self, job_id: str) -> GroupTracker:
        """An allreduce job's tracker (FAILED_PRECONDITION for a ps-* job)."""
        ...

    def takes_states(self, job_id: str) -> None:
        """FAILED_PRECONDITION unless the job's workers send states (allreduce, local-sgd)."""
        ...

    def save_checkpoint(self, job_id: str, rank: int, state: TrainingState) -> tuple[int, int]:
        """allreduce: store rank 0's state; local-sgd: a worker's inner state at a round;
        returns (step, bytes written)."""
        ...

    def load_checkpoint(self, job_id: str, rank: int) -> TrainingState:
        """allreduce: the state the job's current group starts from; local-sgd: the worker's
        kept inner state and the global parameters of the rounds since (to replay)."""
        ...

    def join_group(self, job_id: str, rank: int, step: int | None) -> tuple[Formation | None, int, str]:
        """allreduce mode: worker ``rank`` asks to join the next group, holding the state after
        ``step`` (None: none). Returns (the group or None: not yet, the rendezvous store's port, its
        key prefix for the group)."""
        ...

    def on_register(self, job_id: str, rank: int, total_steps: int, train_size: int) -> None: ...

    def register_on_shards(self, job_id: str, rank: int, host: str, pid: int, credential: str
                           ) -> tuple[list[dict[str, object]], int | None]:
        """ps_shards > 1: register worker ``rank`` with the job's other shards too; where their
        data planes are (none for a job of one shard), and the least of its next steps there
        (None: no other shard)."""
        ...

    def check_worker(self, job_id: str, credential: str) -> None:
        """AuthError unless ``credential`` is the one the job gave its workers."""
        ...

    def on_metrics(self, job_id: str, rank: int, step: int, kind: str, metrics: Mapping[str, float]) -> None: ...


def _host_label(hostname: str, peer: str) -> str:
    """``hostname (ip)``: the name the worker gives and the address the server sees it from
    (hostnames alone repeat across containers and network namespaces)."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return hostname
    ip = rest.rsplit(":", 1)[0].strip("[]")
    ip = ip.removeprefix("::ffff:")  # an IPv4 client on a dual-stack socket
    return f"{hostname} ({ip})" if hostname else ip


class WorkerControlServicer(ps_pb2_grpc.WorkerControlServicer):
    """Registration, heartbeats, metrics and (allreduce) checkpoints, for every mode."""

    def __init__(self, backend: WorkerBackend, data_plane: DataPlane | None = None, data_host: str = "",
                 stream_limits: limits.StreamLimits | None = None, max_model_bytes: int = 4 << 30) -> None:
        """``data_plane``: where ps workers send their tensors (None: gRPC only); ``data_host``:
        the host they reach it at when it is not the control plane's."""
        self._backend = backend
        self._data_plane, self._data_host = data_plane, data_host
        self._limits = stream_limits or limits.StreamLimits()
        self._max_state_bytes = 4 * max_model_bytes  # parameters, buffers and optimizer state

    @handler
    def Register(self, request: ps_pb2.RegisterRequest, context: grpc.ServicerContext) -> ps_pb2.RegisterResponse:
        self._backend.check_worker(request.job_id, job_credential(context))
        store = self._backend.state(request.job_id)
        if request.total_steps < 1:
            raise ProtocolError("total_steps: must be >= 1")
        self._backend.on_register(request.job_id, request.rank, request.total_steps, request.train_size)
        host = _host_label(request.host, context.peer())
        version, next_step, needs_init = store.register(request.rank, host, request.pid)
        reply = ps_pb2.RegisterResponse(
            version=version,
            next_step=next_step,
            needs_init=needs_init,
            world_size=store.size,
            heartbeat_interval_s=self._backend.heartbeat_interval_s,
            collective_timeout_s=self._backend.collective_timeout_s,
        )
        if self._data_plane is not None and isinstance(store, ParameterStore):
            credential = store.credential(request.rank)
            reply.data.CopyFrom(self._data_plane.endpoint(credential, self._data_host))
            others, least = self._backend.register_on_shards(request.job_id, request.rank, host, request.pid,
                                                             credential)
            reply.shards.extend(shard_endpoints(others, credential))
            if least is not None:  # a step pushed to some shards and not to others is done again
                reply.next_step = min(reply.next_step, least)
            reply.clip_across_shards = store.config.clips_across_shards
            reply.clip_push_norm = store.config.clips_by_push_norm
            reply.control_first = store.config.pushes_control_first
        return reply

    @handler
    def Heartbeat(self, request: ps_pb2.HeartbeatRequest, context: grpc.ServicerContext) -> ps_pb2.HeartbeatResponse:
        self._backend.check_worker(request.job_id, job_credential(context))
        state = self._backend.state(request.job_id)
        reason = state.heartbeat(request.rank, request.step)
        regroup = isinstance(state, GroupTracker) and state.regroup_due()
        return ps_pb2.HeartbeatResponse(stop=reason is not None, reason=reason or "", regroup=regroup)

    @handler
    def JoinGroup(self, request: ps_pb2.JoinGroupRequest, context: grpc.ServicerContext) -> ps_pb2.JoinGroupResponse:
        self._backend.check_worker(request.job_id, job_credential(context))
        step = request.step if request.has_state else None
        formed, port, prefix = self._backend.join_group(request.job_id, request.rank, step)
        if formed is None:
            return ps_pb2.JoinGroupResponse(ready=False, retry_after_s=JOIN_RETRY_S)
        return ps_pb2.JoinGroupResponse(
            ready=True, generation=formed.generation, world_size=formed.world_size, group_rank=request.rank,
            store_port=port, store_prefix=prefix, step=formed.step, source_rank=formed.source,
            finished=formed.finished, keep_state=formed.keep, released=formed.released)

    @handler
    def ReportMetrics(self, request: ps_pb2.ReportMetricsRequest, context: grpc.ServicerContext) -> ps_pb2.ReportMetricsResponse:
        self._backend.check_worker(request.job_id, job_credential(context))
        if request.kind not in ("train", "eval"):
            raise ProtocolError(f"kind: must be 'train' or 'eval', got {request.kind!r}")
        check_metrics(request.metrics)
        self._backend.on_metrics(request.job_id, request.rank, request.step, request.kind, dict(request.metrics))
        return ps_pb2.ReportMetricsResponse()

    @handler
    async def SaveCheckpoint(self, request_iterator: AsyncIterator[ps_pb2.CheckpointChunk | memoryview],
                             context: grpc.aio.ServicerContext) -> ps_pb2.SaveCheckpointResponse:
        """A coroutine: an upload that stalls holds no thread (and is cut after STALL_S)."""
        with self._limits.hold("SaveCheckpoint", context.peer()):
            chunks = aiter(request_iterator)
            first = await limits.next_within(chunks, "header")
            if first is None or isinstance(first, memoryview) or first.WhichOneof("kind") != "header":
                raise ProtocolError("header: the first message of a checkpoint must be a CheckpointHeader")
            header = first.header
            # UNAUTHENTICATED, NOT_FOUND, FAILED_PRECONDITION before reading the bytes
            await asyncio.to_thread(self._backend.check_worker, header.job_id, job_credential(context))
            await asyncio.to_thread(self._backend.takes_states, header.job_id)
            plan = StatePlan(header)
            if plan.nbytes > self._max_state_bytes:
                raise ProtocolError(f"params: a state of {plan.nbytes} bytes is over the server's limit of "
                                    f"{self._max_state_bytes} (4 x gradhub server --max-model-bytes)")
            receiver = Receiver(plan.nbytes)
            await limits.receive(chunks, receiver)
            state = await asyncio.to_thread(plan.decode, receiver)
            step, size = await asyncio.to_thread(self._backend.save_checkpoint, header.job_id, header.rank, state)
            return ps_pb2.SaveCheckpointResponse(step=step, size_bytes=size)

    @handler
    def LoadCheckpoint(self, request: ps_pb2.LoadCheckpointRequest, context: grpc.ServicerContext) -> Iterator[ps_pb2.CheckpointChunk | bytes]:
        self._backend.check_worker(request.job_id, job_credential(context))
        state = self._backend.load_checkpoint(request.job_id, request.rank)
        yield from state_messages(request.job_id, request.rank, state)


MAX_METRICS, MAX_METRIC_NAME = 64, 64


def check_metrics(metrics: Mapping[str, float]) -> None:
    """At most ``MAX_METRICS`` metrics a report, names of at most ``MAX_METRIC_NAME`` characters,
    finite values."""
    if len(metrics) > MAX_METRICS:
        raise ProtocolError(f"metrics: {len(metrics)} in one report; the limit is {MAX_METRICS}")
    for name, value in metrics.items():
        if not name or len(name) > MAX_METRIC_NAME:
            raise ProtocolError(f"metrics: a name must be 1 to {MAX_METRIC_NAME} characters, got {name[:80]!r}")
        if not math.isfinite(value):
            raise ProtocolError(f"metrics.{name}: must be finite, got {value}")


def add_to_server(servicer: WorkerControlServicer, server: grpc.Server) -> None:
    """Register the service like the generated ``add_WorkerControlServicer_to_server``, with the
    chunk streams' (de)serializers (data chunks as views in, pre-serialized chunks out)."""
    unary: dict[str, tuple[type[Message], type[Message]]] = {
        "Register": (ps_pb2.RegisterRequest, ps_pb2.RegisterResponse),
        "Heartbeat": (ps_pb2.HeartbeatRequest, ps_pb2.HeartbeatResponse),
        "ReportMetrics": (ps_pb2.ReportMetricsRequest, ps_pb2.ReportMetricsResponse),
        "JoinGroup": (ps_pb2.JoinGroupRequest, ps_pb2.JoinGroupResponse),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=req.FromString,
            response_serializer=resp.SerializeToString)
        for name, (req, resp) in unary.items()
    }
    handlers["SaveCheckpoint"] = grpc.stream_unary_rpc_method_handler(
        servicer.SaveCheckpoint, request_deserializer=_checkpoint_request,
        response_serializer=ps_pb2.SaveCheckpointResponse.SerializeToString)
    handlers["LoadCheckpoint"] = grpc.unary_stream_rpc_method_handler(
        servicer.LoadCheckpoint, request_deserializer=ps_pb2.LoadCheckpointRequest.FromString,
        response_serializer=serialize_chunk)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


_checkpoint_request = chunk_parser(ps_pb2.CheckpointChunk)
SERVICE = "gradhub.v1.WorkerControl"
