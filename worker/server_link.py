"""A worker's connection to the gradhub server (created inside the worker process): the
WorkerControl service in every mode (register, heartbeats, metrics, allreduce checkpoints) and,
in the ps modes, the tensors (initial parameters, pushes, pulls): on the server's data plane
(``gradhub.worker.data_link``) when the job's ``transport`` is ``auto`` and it can be reached,
else on the ParameterServer service's gRPC streams.

Every call has a deadline. Unary calls are retried by the channel's service config
on UNAVAILABLE only; pushes and pulls are retried here (gRPC: UNAVAILABLE; data plane: a
broken connection, reopened), which is safe because the server applies each (job, rank, step)
at most once.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Self, TypeVar

import grpc
import torch

from gradhub.proto.channels import open_channel
from gradhub.proto.codec import (
    Layout,
    Receiver,
    as_bytes,
    as_wire,
    chunk_parser,
    encode,
    iter_data_chunks,
    torch_dtype,
)
from gradhub.proto.contract.errors import (
    JOB_CREDENTIAL_KEY,
    GradhubError,
    ProtocolError,
    from_rpc_error,
)
from gradhub.proto.model_state import ModelLayout, tensors_from_proto, tensors_to_proto
from gradhub.proto.shards import sum_of_squares
from gradhub.proto.state import TrainingState, read_state, state_messages
from gradhub.proto.v1 import data_pb2, ps_pb2, ps_pb2_grpc, tensor_pb2
from gradhub.worker.data_link import DataLink, ServerWaitTimeout
from gradhub.worker.push_codec import PushEncoder
from gradhub.worker.shard_links import ShardedLink

T = TypeVar("T")

log = logging.getLogger(__name__)
RPC_TIMEOUT_S = 30.0
PULL_WAIT_S = 65.0  # the server answers within 60 s; the worker then asks again
RETRY_FOR_S = 60.0
SESSION_S = 3600.0  # a PushPull session's deadline; the worker then opens a new one

_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "gradhub.v1.ParameterServer"}, {"service": "gradhub.v1.WorkerControl"}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", _SERVICE_CONFIG),
]


class Pulled(NamedTuple):
    """What a pull brings besides the parameters: their version, the job's buffers and, for an
    elastic job, how many workers it runs on now (0: its fixed size)."""

    version: int
    buffers: dict[str, torch.Tensor]
    world_size: int = 0


class ServerLink:
    """One worker's connection to the server for one job."""

    def __init__(self, address: str, job_id: str, rank: int, compression: str = "none",
                 transport: str = "auto", credential: str = "", tls_ca: bytes | None = None,
                 compression_block: int | None = None, error_feedback: bool = False,
                 shared_memory: bool = True) -> None:
        """``transport``: ``auto`` (the data plane when the server offers one and it can be
        reached, else gRPC, with the reason logged) or ``grpc``; ``credential``: the job's, which
        its launcher gave this worker (the server takes the worker's calls only with it);
        ``tls_ca``: the server speaks TLS, verified with these certificates (PEM; None: plaintext);
        ``compression_block``, ``error_feedback``: the job's, for int8 / int4 pushes;
        ``shared_memory``: on the server's host, payloads go through shared memory when the server
        offers it (else through the Unix socket)."""
        if transport not in ("auto", "grpc"):
            raise ValueError(f"transport: must be auto or grpc, not {transport!r}")
        self.job_id, self.rank = job_id, rank
        # an elastic job: the size its gradients are computed for now, which pushes say (0: fixed size)
        self.world_size = 0
        self._clip_push_norm = False  # RegisterResponse.clip_push_norm
        self._transport = transport
        self._shared_memory = shared_memory
        self._data: DataLink | ShardedLink | None = None
        self._side: DataLink | None = None  # a second data-plane connection: pulls beside pushes
        self.transport = "grpc"  # what this worker's tensors use: "shm", "unix", "tcp" or "grpc"
        self.host = address.rsplit(":", 1)[0].strip("[]")  # the server's host (its rendezvous store is there)
        self.encoder = PushEncoder(compression, compression_block, error_feedback)
        self.wire_dtype = self.encoder.wire_dtype  # of pushes
        self.params_dtype = self.encoder.params_dtype  # of pulled parameters (float32 when pushes are quantised)
        self._metadata = ((JOB_CREDENTIAL_KEY, credential),)
        self._tls_ca = tls_ca
        self._channel = open_channel(address, CHANNEL_OPTIONS, tls_ca)
        self._control = ps_pb2_grpc.WorkerControlStub(self._channel)
        # The hot methods carry pre-serialized data chunks out and zero-copy views in
        # (byte-identical to the generated stubs' encoding; see gradhub.proto.codec).
        svc = "/gradhub.v1.ParameterServer/"
        self._init = self._channel.stream_unary(svc + "InitParameters", request_serializer=_push_request,
                                                response_deserializer=ps_pb2.PushResponse.FromString)
        self._push = self._channel.stream_unary(svc + "PushGradients", request_serializer=_push_request,
                                                response_deserializer=ps_pb2.PushResponse.FromString)
        self._push_pull = self._channel.stream_stream(svc + "PushPull", request_serializer=_push_request,
                                                      response_deserializer=_pull_response)
        self._pull = self._channel.unary_stream(svc + "PullParameters",
                                                request_serializer=ps_pb2.PullRequest.SerializeToString,
                                                response_deserializer=_pull_response)
        control = "/gradhub.v1.WorkerControl/"
        self._save = self._channel.stream_unary(control + "SaveCheckpoint", request_serializer=_push_request,
                                                response_deserializer=ps_pb2.SaveCheckpointResponse.FromString)
        self._load = self._channel.unary_stream(control + "LoadCheckpoint",
                                                request_serializer=ps_pb2.LoadCheckpointRequest.SerializeToString,
                                                response_deserializer=_checkpoint_response)
        self._staging: torch.Tensor | None = None
        # each pushed layout's (the model's, or a fragment's) tensor metas, for headers, by identity
        self._metas: dict[int, tuple[Layout, list[tensor_pb2.TensorMeta]]] = {}
        self._session: _Session | None = None

    def close(self) -> None:
        self._close_session()
        if self._side is not None:
            self._side.close()
        if self._data is not None:
            self._data.close()
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ calls
    def register(self, host: str, pid: int, total_steps: int, train_size: int) -> ps_pb2.RegisterResponse:
        request = ps_pb2.RegisterRequest(job_id=self.job_id, rank=self.rank, host=host, pid=pid,
                                         total_steps=total_steps, train_size=train_size)
        self.encoder.reset()  # an error-feedback residual belongs to one registration
        reply = _translated(lambda: self._control.Register(request, timeout=RPC_TIMEOUT_S, metadata=self._metadata,
                                                        wait_for_ready=True))
        self._clip_push_norm = reply.clip_push_norm
        self._open_data(reply)
        return reply

    def _open_data(self, reply: ps_pb2.RegisterResponse) -> None:
        """Connect to the data plane the server offers (with this registration's credential),
        or stay on gRPC: by choice, or with a warning that says why."""
        if self._data is not None:
            self._data.close()
            self._data = None
        if self._side is not None:
            self._side.close()
            self._side = None
        self.transport = "grpc"
        if self._transport == "grpc" or not reply.HasField("data"):
            if reply.shards:
                raise ProtocolError(f"transport: the job's parameter server has {len(reply.shards)} shards, "
                                    "which workers reach on the data plane only")
            return
        link = self._link(reply.data)
        if reply.shards:  # ps_shards > 1: the control store and one connection per shard; no gRPC fallback
            sharded = ShardedLink([link, *(self._link(e)
                                           for e in reply.shards)], clip=reply.clip_across_shards,
                                  push_norm=reply.clip_push_norm, control_first=reply.control_first)
            sharded.connect()
            self._data, self.transport = sharded, sharded.kind
            return
        try:
            link.connect()
        except (OSError, GradhubError) as e:
            log.warning("worker %d: the data plane at %s cannot be used (%s: %s); sending tensors on "
                        "gRPC streams instead", self.rank, link.where, type(e).__name__, e)
            return
        self._data, self.transport = link, link.kind

    def _link(self, endpoint: ps_pb2.DataEndpoint) -> DataLink:
        return DataLink(endpoint, self.job_id, self.rank, self.host, self._tls_ca, self._shared_memory)

    def init_parameters(self, state: Layout | ModelLayout, params: torch.Tensor, frozen: torch.Tensor | None = None,
                        buffers: Mapping[str, torch.Tensor] | None = None) -> bool:
        """Send the job's initial state: the trainable parameters (a ``Layout`` describes a
        model of those alone), then the frozen ones (their only trip), the buffers and the
        tied keys."""
        if isinstance(state, Layout):
            state = ModelLayout(trainable=state)
        flat = params if frozen is None else torch.cat([params.detach().cpu(), frozen])

        header = ps_pb2.PushHeader(job_id=self.job_id, rank=self.rank,
                                   tensors=state.trainable.metas(tensor_pb2.FLOAT32),
                                   frozen=state.frozen.metas(tensor_pb2.FLOAT32) if state.frozen else [],
                                   buffers=tensors_to_proto(buffers or {}), aliases=dict(state.aliases))
        if self._data is not None:
            return self._on_data(lambda d: d.init(header, flat)).accepted

        def call() -> ps_pb2.PushResponse:
            return self._init(_push_stream(header, flat, tensor_pb2.FLOAT32),
                              timeout=_transfer_timeout(flat), metadata=self._metadata)
        return _retry(call).accepted

    def push(self, layout: Layout, step: int, base_version: int, grads: torch.Tensor,
             buffers: Mapping[str, torch.Tensor] | None = None, unused: Sequence[int] = (),
             first: int | None = None) -> bool:
        """Push the flat gradient for ``step`` (with this worker's buffers, when the job uses
        them, and the parameters that got no gradient); False when the server already had it.
        With ``first``, ``layout`` is a fragment: the model's tensors from index ``first`` on."""
        payload = self._encode(grads, layout, first)  # once: a retry resends these bytes
        header = self._push_header(layout, step, base_version, buffers, unused, first,
                                   self._push_norm_sq(grads, payload, layout, first))
        grads = payload
        if self._data is not None:  # (params_dtype: a sharded job that clips still pulls, into scratch)
            return self._on_data(lambda d: d.push(header, grads, self.wire_dtype,
                                                  params_dtype=self.params_dtype)).accepted

        def call() -> ps_pb2.PushResponse:
            return self._push(_push_stream(header, grads, self.wire_dtype),
                              timeout=_transfer_timeout(grads), metadata=self._metadata)
        return _retry(call).accepted

    def pull(self, layout: Layout, step: int, params: torch.Tensor, first: int | None = None) -> Pulled:
        """Wait as the mode requires, then write the parameters for ``step`` into ``params`` (with
        ``first``, of the fragment ``layout`` that starts at the model's tensor ``first``).

        Returns the version received and the job's buffers at that version.
        """
        if self._data is not None:
            return self._pull_on(self._data, self._pull_request(layout, step, first), layout, params)
        return _until_answered(lambda: self._pull_once(layout, step, params, first))

    def pull_beside(self, layout: Layout, step: int, params: torch.Tensor, first: int) -> Pulled:
        """A bucket's parameters for ``step`` (the ``layout`` of the model's tensors from
        ``first`` on) as soon as the server has applied that bucket, on a second data-plane
        connection, so that a thread pulls while another pushes (the link is full duplex). For
        one thread at a time; the data plane alone (``transport`` not grpc)."""
        data = self._data
        if not isinstance(data, DataLink):
            raise ProtocolError("transport: pulls beside pushes need the data plane of an unsharded server")
        if self._side is None:
            self._side = self._link(data.endpoint)
        return self._pull_on(self._side, self._pull_request(layout, step, first), layout, params)

    def _pull_on(self, link: DataLink | ShardedLink, request: ps_pb2.PullRequest, layout: Layout,
                 params: torch.Tensor) -> Pulled:
        """``request`` on data-plane ``link``, asked again each time the server's bounded wait
        for the other workers runs out (a slow or restarting worker is waited for)."""
        while True:
            try:
                return _pulled(self._on_data(lambda d: d.pull(request, layout, params), link))
            except ServerWaitTimeout:
                continue

    def push_pull(self, layout: Layout, step: int, base_version: int, grads: torch.Tensor,
                  params: torch.Tensor, buffers: Mapping[str, torch.Tensor] | None = None,
                  unused: Sequence[int] = (), first: int | None = None, pull_layout: Layout | None = None,
                  pull_part_only: bool = False) -> Pulled:
        """Push the gradient for ``step`` and receive the parameters for ``step + 1`` into
        ``params``, in one round trip on this worker's long-lived PushPull call; returns their
        version and the job's buffers. On any failure the call is reopened and the push sent
        again (applied at most once). With ``first``, the push is of the part ``layout`` of the
        model: a fragment, whose parameters come back, or the last bucket of a step, after which
        the whole model's come back (``pull_layout``, the model's), or with ``pull_part_only``
        that bucket's alone (the worker pulled the others' as each was applied)."""
        payload = self._encode(grads, layout, first)  # once: a retry resends these bytes
        header = self._push_header(layout, step, base_version, buffers, unused, first,
                                   self._push_norm_sq(grads, payload, layout, first))
        header.pull_part_only = pull_part_only
        pulled = layout if pull_layout is None else pull_layout
        pull_first = first if pull_layout is None else None
        grads = payload
        if self._data is not None:
            try:
                return _pulled(self._on_data(lambda d: d.push(header, grads, self.wire_dtype, (pulled, params),
                                                              self.params_dtype)))
            except ServerWaitTimeout:  # pushed; the parameters are still to come
                return self.pull(pulled, step + 1, params, pull_first)

        def call() -> Pulled:
            if self._session is None:
                self._session = _Session(self._push_pull, self._metadata)
            try:
                responses = self._session.send(_push_stream(header, grads, self.wire_dtype))
                return self._receive_params(responses, pulled, params, to_end=False)
            except BaseException:
                self._close_session()
                raise

        return _until_answered(call)  # asking again re-pushes: a duplicate is ignored

    def _on_data(self, call: Callable[[DataLink | ShardedLink], T], link: DataLink | ShardedLink | None = None) -> T:
        """``call`` on the data plane (``link``; by default this worker's main connection),
        reconnecting and calling again while the connection breaks (for a bounded time); the
        server's own errors are raised as they are."""
        data = self._data if link is None else link
        assert data is not None

        def attempt() -> T:
            if not data.connected:
                data.connect()
            return call(data)
        return _with_backoff(attempt, lambda e: isinstance(e, OSError))

    def _encode(self, grads: torch.Tensor, layout: Layout, first: int | None) -> torch.Tensor:
        """A push's payload (``PushEncoder.encode``); quantised for several shards, each
        shard's slice (of a bucket: its pieces) on its own (``ShardedLink.encode``)."""
        if isinstance(self._data, ShardedLink) and self.encoder.quant is not None:
            return self._data.encode(self.encoder, grads, layout, first or 0)
        return self.encoder.encode(grads, layout)

    def _push_norm_sq(self, grads: torch.Tensor, payload: torch.Tensor, layout: Layout,
                      first: int | None = None) -> float | None:
        """An async job that clips over shards: the sum of squares of the gradient as the shards
        will hold it, by which each one clips its slice: ``grads``', or, when pushes are
        quantised, the decoded values' of ``payload`` (what the shards decode, slice by slice);
        of a bucket (the model's tensors from ``first`` on), its part of the step's (the link
        adds them up). None for every other job."""
        if not self._clip_push_norm:
            return None
        if self.encoder.quant is None:
            return sum_of_squares([grads])
        if isinstance(self._data, ShardedLink):
            return self._data.decoded_sum_of_squares(self.encoder.quant, payload, layout, first or 0)
        return sum_of_squares([self.encoder.quant.decode(payload, layout.numel)])

    def _push_header(self, layout: Layout, step: int, base_version: int,
                     buffers: Mapping[str, torch.Tensor] | None, unused: Sequence[int],
                     first: int | None = None, norm_sq: float | None = None) -> ps_pb2.PushHeader:
        """A push's header; ``norm_sq``: ``_push_norm_sq``'s, for an async job that clips over shards."""
        kept = self._metas.get(id(layout))
        if kept is None or kept[0] is not layout:
            kept = self._metas[id(layout)] = (layout, layout.metas(self.wire_dtype))
        metas = kept[1]
        return ps_pb2.PushHeader(job_id=self.job_id, rank=self.rank, step=step, base_version=base_version,
                                 tensors=metas, unused=list(unused), quant_block=self.encoder.quant_block,
                                 buffers=tensors_to_proto(buffers) if buffers else [], first_tensor=first or 0,
                                 world_size=self.world_size, clip_norm_sq=norm_sq)

    def _pull_request(self, layout: Layout, step: int, first: int | None) -> ps_pb2.PullRequest:
        return ps_pb2.PullRequest(job_id=self.job_id, rank=self.rank, step=step, dtype=as_wire(self.params_dtype),
                                  first_tensor=first or 0, tensor_count=0 if first is None else len(layout.names))

    def _close_session(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def _pull_once(self, layout: Layout, step: int, params: torch.Tensor, first: int | None = None) -> Pulled:
        request = self._pull_request(layout, step, first)
        stream = self._pull(request, timeout=PULL_WAIT_S + _transfer_timeout(params), metadata=self._metadata)
        return self._receive_params(stream, layout, params)

    def _receive_params(self, stream: Iterator[ps_pb2.PullChunk | memoryview], layout: Layout,
                        params: torch.Tensor, to_end: bool = True) -> Pulled:
        """Read one parameter message (header + bytes) into ``params``; ``to_end``: the stream
        ends after it (a plain pull) rather than carrying more (a session)."""
        first = next(stream, None)
        if first is None or isinstance(first, memoryview) or first.WhichOneof("kind") != "header":
            raise ProtocolError("pull: the server's stream did not start with a header")
        layout.check_metas(first.header.tensors, self.params_dtype)
        direct = params.device.type == "cpu" and self.params_dtype == tensor_pb2.FLOAT32
        if direct:
            target = as_bytes(params)
        else:
            if self._staging is None or self._staging.numel() < layout.numel:  # a fragment takes its front
                self._staging = torch.empty(layout.numel, dtype=torch_dtype(self.params_dtype),
                                            pin_memory=params.device.type == "cuda")
            target = as_bytes(self._staging[:layout.numel])
        receiver = Receiver(len(target), into=target)
        if not receiver.fill(stream):
            raise ProtocolError(f"pull: got {receiver.received} of {len(target)} bytes")
        if to_end and next(stream, None) is not None:
            raise ProtocolError("pull: the server sent more bytes than the model holds")
        if not direct:
            assert self._staging is not None
            params.copy_(self._staging[:layout.numel], non_blocking=False)
        return Pulled(first.header.version, tensors_from_proto(first.header.buffers, "buffers"),
                      first.header.world_size)

    def heartbeat(self, step: int) -> ps_pb2.HeartbeatResponse:
        """Whether the job is over (``stop``, ``reason``) or, allreduce, its group should re-form."""
        return _translated(lambda: self._control.Heartbeat(
            ps_pb2.HeartbeatRequest(job_id=self.job_id, rank=self.rank, step=step),
            timeout=10.0, metadata=self._metadata))

    def save_checkpoint(self, state: TrainingState) -> int:
        """allreduce mode (rank 0): store ``state`` on the server; returns once it is on disk."""
        timeout = _transfer_timeout(_numel(state))
        reply = _retry(lambda: self._save(state_messages(self.job_id, self.rank, state), timeout=timeout,
                                          metadata=self._metadata))
        return int(reply.size_bytes)

    def load_checkpoint(self) -> TrainingState:
        """allreduce mode: the state the job's group starts from (see ``register().next_step``)."""
        def call() -> TrainingState:
            stream = self._load(ps_pb2.LoadCheckpointRequest(job_id=self.job_id, rank=self.rank),
                                timeout=RPC_TIMEOUT_S * 10, metadata=self._metadata)
            first = next(stream, None)
            if first is None or isinstance(first, memoryview) or first.WhichOneof("kind") != "header":
                raise ProtocolError("checkpoint: the server's stream did not start with a header")
            return read_state(first.header, stream)
        return _retry(call)

    def join_group(self, step: int | None) -> ps_pb2.JoinGroupResponse:
        """allreduce mode: ask to join the next group, holding the state after ``step`` whole steps
        (None: none). ``ready`` is false until every rank has asked."""
        request = ps_pb2.JoinGroupRequest(job_id=self.job_id, rank=self.rank, has_state=step is not None,
                                          step=step or 0)
        return _translated(lambda: self._control.JoinGroup(request, timeout=RPC_TIMEOUT_S, metadata=self._metadata))

    def report(self, step: int, kind: str, metrics: Mapping[str, float]) -> None:
        """Report metrics; the server takes finite values only, so a NaN or Inf (a diverging loss)
        is left out here, with a warning."""
        finite = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
        if len(finite) < len(metrics):
            log.warning("step %d: not reporting non-finite %s", step,
                        ", ".join(f"{k}={v}" for k, v in metrics.items() if k not in finite))
        _translated(lambda: self._control.ReportMetrics(
            ps_pb2.ReportMetricsRequest(job_id=self.job_id, rank=self.rank, step=step, kind=kind,
                                        metrics=finite),
            timeout=RPC_TIMEOUT_S, metadata=self._metadata))


class _Session:
    """One long-lived PushPull call. Each push's messages go in through a queue (encoded lazily,
    in gRPC's sending thread); the answers are read from the one response stream."""

    def __init__(self, method: Any, metadata: Any) -> None:
        self._pushes: queue.SimpleQueue[Iterator[Any] | None] = queue.SimpleQueue()
        self._responses = method(self._requests(), timeout=SESSION_S, metadata=metadata)

    def _requests(self) -> Iterator[Any]:
        while (push := self._pushes.get()) is not None:
            yield from push

    def send(self, push: Iterator[Any]) -> Iterator[Any]:
        self._pushes.put(push)
        return self._responses

    def close(self) -> None:
        self._pushes.put(None)
        self._responses.cancel()


def _push_stream(header: ps_pb2.PushHeader, flat: torch.Tensor, wire_dtype: int) -> Iterator[ps_pb2.PushChunk | bytes]:
    yield ps_pb2.PushChunk(header=header)
    yield from iter_data_chunks(as_bytes(encode(flat, wire_dtype)))


def _push_request(message: ps_pb2.PushChunk | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


_pull_response = chunk_parser(ps_pb2.PullChunk)
_checkpoint_response = chunk_parser(ps_pb2.CheckpointChunk)


def _pulled(reply: data_pb2.DataReply) -> Pulled:
    return Pulled(reply.params.version, tensors_from_proto(reply.params.buffers, "buffers"), reply.params.world_size)


def _numel(state: TrainingState) -> int:
    params = sum(t.numel() for t in state.params.values())
    return params * 3 if state.optimizer_state else params  # Adam keeps two more of each


def _transfer_timeout(flat: torch.Tensor | int) -> float:
    # generous: 30 s plus 1 s per 50 MB
    numel = flat if isinstance(flat, int) else flat.numel()
    return RPC_TIMEOUT_S + numel * 4 / 50e6


def _until_answered(call: Callable[[], T]) -> T:
    """``call`` (with ``_retry``) again each time the server's bounded wait for the other
    workers runs out (DEADLINE_EXCEEDED): a slow or restarting worker is waited for, not failed."""
    while True:
        try:
            return _retry(call)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise


def _translated(call: Callable[[], T]) -> T:
    """``call()``, with a gradhub error the server raised raised as the same class."""
    try:
        return call()
    except grpc.RpcError as e:
        rebuilt = from_rpc_error(e)
        if rebuilt is not None:
            raise rebuilt from e
        raise


def _retry(call: Callable[[], T]) -> T:
    """Retry ``call`` on UNAVAILABLE (server restarting, connection reset) for a bounded time.
    A gradhub error the server raised is raised here as the same class (``_translated``)."""
    return _with_backoff(lambda: _translated(call),
                         lambda e: isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.UNAVAILABLE)


def _with_backoff(call: Callable[[], T], retryable: Callable[[Exception], bool]) -> T:
    """``call()``, again after a growing pause (0.2 s doubling to 2 s) while it raises a
    ``retryable`` error, for at most RETRY_FOR_S; then that error."""
    deadline, delay = time.monotonic() + RETRY_FOR_S, 0.2
    while True:
        try:
            return call()
        except Exception as e:
            if not retryable(e) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)  # backoff before a retry, not synchronization
            delay = min(delay * 2, 2.0)

