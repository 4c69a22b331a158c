"""Shared gRPC edge helpers: domain errors -> status codes (with the error's class in the trailing
metadata, see ``gradhub.proto.contract.errors.rebuild_error``), and the bearer-token interceptor."""

from __future__ import annotations

import functools
import hmac
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc.aio import AbortError

from gradhub.proto.contract.errors import (
    AuthError,
    FactoryError,
    GradhubError,
    NotFoundError,
    ProtocolError,
    SpecError,
    StateError,
    error_metadata,
)

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

_STATUS: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (SpecError, grpc.StatusCode.INVALID_ARGUMENT),
    (ProtocolError, grpc.StatusCode.INVALID_ARGUMENT),
    (FactoryError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (StateError, grpc.StatusCode.FAILED_PRECONDITION),
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
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


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects every RPC whose ``authorization`` metadata is not ``Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(given).encode(), self._expected):
            return await continuation(handler_call_details)
        method = await continuation(handler_call_details)
        if method is None:
            return None

        async def deny(request: Any, context: Any) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        async def deny_stream(request: Any, context: Any) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
            yield  # an async generator, as a streaming handler must be

        if method.request_streaming and method.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny_stream)
        if method.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if method.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny_stream)
        return grpc.unary_unary_rpc_method_handler(deny)
