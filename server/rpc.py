"""Shared gRPC edge helpers: domain errors -> status codes (with the error's class in the trailing
metadata, see ``gradhub.proto.contract.errors.rebuild_error``), the interceptor that asks a
user's calls for their token, and the one that refuses garbage requests."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc.aio import AbortError

from gradhub.proto.contract.errors import (
    JOB_CREDENTIAL_KEY,
    AuthError,
    FactoryError,
    GradhubError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolError,
    ResourceExhaustedError,
    ServerUnavailableError,
    SpecError,
    StateError,
    error_metadata,
)
from gradhub.server.auth import Users

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

_STATUS: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (SpecError, grpc.StatusCode.INVALID_ARGUMENT),
    (ProtocolError, grpc.StatusCode.INVALID_ARGUMENT),
    (FactoryError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (StateError, grpc.StatusCode.FAILED_PRECONDITION),
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ServerUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (GradhubError, grpc.StatusCode.INTERNAL),
]


def status_for(exc: BaseException) -> grpc.StatusCode:
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def _status(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The status, details and trailing metadata (the error's class) that report ``exc``."""
    if isinstance(exc, grpc.RpcError):
        # the client cancelled or went away mid-stream (e.g. a worker closing its session)
        return grpc.StatusCode.CANCELLED, "the client went away", ()
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL and not isinstance(exc, GradhubError):
        log.error("unexpected error in RPC handler", exc_info=exc)
        return code, f"internal error: {type(exc).__name__}: {exc}", ()
    return code, str(exc), error_metadata(exc)


def _abort(context: Any, exc: BaseException) -> None:
    """End a call run in the server's thread pool (a sync handler) with ``exc``'s status."""
    code, details, metadata = _status(exc)
    if metadata:
        context.set_trailing_metadata(metadata)  # the client rebuilds the same class
    context.abort(code, details)


async def _abort_async(context: Any, exc: BaseException) -> None:
    """End a call run on the event loop (an async handler) with ``exc``'s status."""
    code, details, metadata = _status(exc)
    if metadata:
        context.set_trailing_metadata(metadata)
    await context.abort(code, details)


def handler(fn: F) -> F:
    """Wrap a servicer method so domain errors become the right gRPC status.

    Works for every kind the server runs: plain and generator methods (in the server's thread
    pool) and coroutine and async-generator methods (on its event loop, for calls that wait or
    stream for long: they hold no thread). The server never goes down because of one bad request.
    """
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def astream(self: Any, request: Any, context: Any) -> Any:
            try:
                async for item in fn(self, request, context):
                    yield item
            except AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - every error becomes a status
                await _abort_async(context, exc)

        return astream  # type: ignore[return-value]

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def aunary(self: Any, request: Any, context: Any) -> Any:
            try:
                return await fn(self, request, context)
            except AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - every error becomes a status
                await _abort_async(context, exc)

        return aunary  # type: ignore[return-value]

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(self: Any, request: Any, context: Any) -> Any:
            try:
                yield from fn(self, request, context)
            except AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - every error becomes a status
                _abort(context, exc)

        return stream  # type: ignore[return-value]

    @functools.wraps(fn)
    def unary(self: Any, request: Any, context: Any) -> Any:
        try:
            return fn(self, request, context)
        except AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            _abort(context, exc)

    return unary  # type: ignore[return-value]


def job_credential(context: Any) -> str:
    """The job credential a worker's call carries (``""`` when none)."""
    return str(dict(context.invocation_metadata() or ()).get(JOB_CREDENTIAL_KEY, ""))


# the services users call (with a bearer token); the others are the workers'
USER_SERVICES = ("/gradhub.v1.JobService/", "/gradhub.v1.SweepService/")


def authorization(context: Any) -> str:
    """The ``authorization`` metadata of a call (``""`` when none)."""
    return str(dict(context.invocation_metadata() or ()).get("authorization", ""))


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """The user services' calls (JobService, SweepService) need a bearer token that ``users`` knows (its handlers then ask
    ``users`` who the caller is, and check what that user may do). The worker services' calls
    carry their job's credential instead, which every one of their handlers checks: a user's
    token gives no worker's rights, and a job's credential no user's."""

    def __init__(self, users: Users) -> None:
        self._users = users

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        method = await continuation(handler_call_details)
        if method is None or not str(handler_call_details.method).startswith(USER_SERVICES):
            return method
        given = str(dict(handler_call_details.invocation_metadata or ()).get("authorization", ""))
        try:
            self._users.authenticate(given)
        except AuthError as e:
            return _deny(method, grpc.StatusCode.UNAUTHENTICATED, str(e))
        return method


def _deny(method: Any, code: grpc.StatusCode, details: str) -> Any:
    """A handler of ``method``'s kind that ends the call with ``code``."""

    async def deny(request: Any, context: Any) -> None:
        await context.abort(code, details)

    async def deny_stream(request: Any, context: Any) -> Any:
        await context.abort(code, details)
        yield  # an async generator, as a streaming handler must be

    if method.request_streaming and method.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream)
    if method.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if method.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream)
    return grpc.unary_unary_rpc_method_handler(deny)


class _Garbage:
    """What a request that does not parse becomes, so that its call ends with INVALID_ARGUMENT
    (gRPC itself would answer UNKNOWN, or INTERNAL mid-stream, and log a traceback)."""

    def __init__(self, error: Exception) -> None:
        self.message = f"request: not a valid message ({type(error).__name__}: {error})"


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw) if deserializer is not None else raw
        except Exception as e:  # noqa: BLE001 - any parse failure is the client's garbage
            return _Garbage(e)
    return parse


def _checked_sync_iterator(requests: Any) -> Any:
    for request in requests:
        if isinstance(request, _Garbage):
            raise ProtocolError(request.message)
        yield request


async def _checked_async_iterator(requests: Any) -> Any:
    async for request in requests:
        if isinstance(request, _Garbage):
            raise ProtocolError(request.message)
        yield request


def _garbage_checked(behavior: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
    """``behavior`` that refuses garbage requests with INVALID_ARGUMENT (as sync or async as it is)."""
    is_async = inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)
    if streaming:
        wrap = _checked_async_iterator if is_async else _checked_sync_iterator
        if inspect.isasyncgenfunction(behavior):
            async def astream(requests: Any, context: Any) -> Any:
                async for item in behavior(wrap(requests), context):
                    yield item
            return astream
        if is_async:
            async def aunary(requests: Any, context: Any) -> Any:
                return await behavior(wrap(requests), context)
            return aunary
        return lambda requests, context: behavior(wrap(requests), context)

    if inspect.isasyncgenfunction(behavior):
        async def agen(request: Any, context: Any) -> Any:
            if isinstance(request, _Garbage):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            async for item in behavior(request, context):
                yield item
        return agen
    if is_async:
        async def acall(request: Any, context: Any) -> Any:
            if isinstance(request, _Garbage):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await behavior(request, context)
        return acall

    def call(request: Any, context: Any) -> Any:
        if isinstance(request, _Garbage):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return behavior(request, context)
    return call


class WireInterceptor(grpc.aio.ServerInterceptor):
    """Every method's requests are parsed leniently: one that is not a valid message ends its call
    with INVALID_ARGUMENT and a one-line reason, and leaves nothing in the server's log."""

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        method = await continuation(handler_call_details)
        if method is None:
            return None
        kind = ("stream" if method.request_streaming else "unary") + "_" + (
            "stream" if method.response_streaming else "unary")
        return method._replace(request_deserializer=_tolerant(method.request_deserializer),
                               **{kind: _garbage_checked(getattr(method, kind), method.request_streaming)})
