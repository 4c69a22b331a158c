"""gRPC adapter for the ParameterServer service: the ps modes' gradients and parameters on gRPC
streams, for workers with ``transport: grpc`` or that cannot reach the data plane
(``gradhub.server.data_plane``, the faster path). Translates between protos and ParameterStore
calls. Every method is a coroutine on the server's event loop: a push session, a pull that waits
for the other workers or an upload that stalls holds no thread."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio

from gradhub.proto.codec import Receiver, chunk_parser, serialize_chunk
from gradhub.proto.contract.errors import ProtocolError
from gradhub.proto.v1 import ps_pb2, ps_pb2_grpc, tensor_pb2
from gradhub.server import limits
from gradhub.server.control_service import WorkerBackend
from gradhub.server.ps_requests import (
    init_request,
    pull_part_after,
    push_buffers,
    push_bytes,
    take_clip_total,
    take_push,
)
from gradhub.server.rpc import handler, job_credential
from gradhub.server.store import ParameterStore
from gradhub.server.waits import MAX_PULL_WAIT_S, StoreCalls

Chunks = AsyncIterator[ps_pb2.PushChunk | memoryview]


def _header(first: ps_pb2.PushChunk | memoryview | None) -> ps_pb2.PushHeader:
    if first is None or isinstance(first, memoryview) or first.WhichOneof("kind") != "header":
        raise ProtocolError("header: the first message of a push must be a PushHeader")
    return first.header


class ParameterServerServicer(ps_pb2_grpc.ParameterServerServicer):
    """The ps modes' gRPC data path: initial parameters, pushes and pulls."""

    def __init__(self, backend: WorkerBackend, max_model_bytes: int, calls: StoreCalls,
                 stream_limits: limits.StreamLimits | None = None) -> None:
        self._backend = backend
        self._max_model_bytes = max_model_bytes
        self._calls = calls
        self._limits = stream_limits or limits.StreamLimits()

    def _authorized_store(self, job_id: str, credential: str) -> ParameterStore:
        self._backend.check_worker(job_id, credential)
        return self._backend.store(job_id)

    @handler
    async def InitParameters(self, request_iterator: Chunks, context: grpc.aio.ServicerContext) -> ps_pb2.PushResponse:
        with self._limits.hold("InitParameters", context.peer()):
            chunks = aiter(request_iterator)
            header = _header(await limits.next_within(chunks, "header"))
            store = await self._calls.run(self._authorized_store, header.job_id, job_credential(context))
            init = init_request(header, self._max_model_bytes, (store.config.shard, store.config.shards))
            receiver = Receiver(init.payload_bytes)
            await limits.receive(chunks, receiver)
            accepted = await self._calls.run(init.take, store, receiver.tensor(tensor_pb2.FLOAT32))
            return ps_pb2.PushResponse(accepted=accepted, version=store.version)

    @handler
    async def PushGradients(self, request_iterator: Chunks, context: grpc.aio.ServicerContext) -> ps_pb2.PushResponse:
        with self._limits.hold("PushGradients", context.peer()):
            chunks = aiter(request_iterator)
            _, _, accepted, version = await self._push(await limits.next_within(chunks, "header"), chunks, context)
            return ps_pb2.PushResponse(accepted=accepted, version=version)

    async def _push(self, first: ps_pb2.PushChunk | memoryview | None, chunks: Chunks,
                    context: grpc.aio.ServicerContext, to_end: bool = True,
                    ) -> tuple[ps_pb2.PushHeader, ParameterStore, bool, int]:
        """Receive one push (``first`` is its header) and hand it to the store:
        (header, store, accepted, version)."""
        header = _header(first)
        store = await self._calls.run(self._authorized_store, header.job_id, job_credential(context))
        receiver = Receiver(push_bytes(store, header))
        await limits.receive(chunks, receiver, to_end)
        grad = receiver.tensor(store.config.wire_dtype)
        accepted, version = await self._calls.call(store, take_push, store, header, grad, push_buffers(header))
        store.note_transport(header.rank, "grpc")
        return header, store, accepted, version

    async def _pull(self, store: ParameterStore, rank: int, step: int, wire_dtype: int,
                    context: grpc.aio.ServicerContext, part: tuple[int, int] = (0, 0),
                    ) -> AsyncIterator[ps_pb2.PullChunk | bytes]:
        """Wait as the mode requires (at most the call's deadline), then stream the parameters
        (of the tensors ``part``, as (first, count); (0, 0) is the whole model)."""
        remaining = context.time_remaining()
        wait = MAX_PULL_WAIT_S if remaining is None else max(0.0, min(remaining - 0.5, MAX_PULL_WAIT_S))
        snapshot = await self._calls.pull(store, rank, step, wire_dtype, wait, part)
        chunks = await self._calls.call(store, lambda: snapshot.chunks)  # encoded once per version
        yield ps_pb2.PullChunk(header=ps_pb2.PullHeader(
            version=snapshot.version, tensors=snapshot.layout.metas(wire_dtype), buffers=snapshot.buffers,
                world_size=snapshot.world_size))
        for chunk in chunks:  # already serialized PullChunks (see add_to_server)
            yield chunk

    @handler
    async def PullParameters(self, request: ps_pb2.PullRequest, context: grpc.aio.ServicerContext,
                             ) -> AsyncIterator[ps_pb2.PullChunk | bytes]:
        store = await self._calls.run(self._authorized_store, request.job_id, job_credential(context))
        if request.HasField("clip_total_sq"):
            await self._calls.call(store, take_clip_total, store, request)
        async for message in self._pull(store, request.rank, request.step, request.dtype or tensor_pb2.FLOAT32,
                                         context, (request.first_tensor, request.tensor_count)):
            yield message

    @handler
    async def PushPull(self, request_iterator: Chunks, context: grpc.aio.ServicerContext,
                       ) -> AsyncIterator[ps_pb2.PullChunk | bytes]:
        with self._limits.hold("PushPull", context.peer()):
            chunks = aiter(request_iterator)
            while True:
                first = await anext(chunks, None)  # no bound: the worker computes between pushes
                if first is None:
                    return  # the worker closed its session
                header, store, _, _ = await self._push(first, chunks, context, to_end=False)
                async for message in self._pull(store, header.rank, header.step + 1, store.config.params_dtype,
                                                context, pull_part_after(store, header)):
                    yield message


_push_request = chunk_parser(ps_pb2.PushChunk)


def add_to_server(servicer: ParameterServerServicer, server: grpc.aio.Server) -> None:
    """Register the service like the generated ``add_ParameterServerServicer_to_server``, but
    with the hot path's (de)serializers: identical bytes on the wire, one copy fewer each way."""
    handlers = {
        name: grpc.stream_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=_push_request,
            response_serializer=ps_pb2.PushResponse.SerializeToString)
        for name in ("InitParameters", "PushGradients")
    }
    handlers["PushPull"] = grpc.stream_stream_rpc_method_handler(
        servicer.PushPull, request_deserializer=_push_request, response_serializer=serialize_chunk)
    handlers["PullParameters"] = grpc.unary_stream_rpc_method_handler(
        servicer.PullParameters, request_deserializer=ps_pb2.PullRequest.FromString,
        response_serializer=serialize_chunk)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


SERVICE = "gradhub.v1.ParameterServer"
