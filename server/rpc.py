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


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, grpc.RpcError) and not context.is_active():
        # the client cancelled or went away mid-stream (e.g. a worker closing its session)
        context.abort(grpc.StatusCode.CANCELLED, "the client went away")
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL and not isinstance(exc, GradhubError):
        log.exception("unexpected error in RPC handler")
        context.abort(code, f"internal error: {type(exc).__name__}: {exc}")
    metadata = error_metadata(exc)
    if metadata:
        context.set_trailing_metadata(metadata)  # the client rebuilds the same class
    context.abort(code, str(exc))


def handler(fn: F) -> F:
    """Wrap a servicer method so domain errors become the right gRPC status.

    Works for unary and server-streaming (generator) methods alike; the server
    never goes down because of one bad request.
    """
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                yield from fn(self, request, context)
            except Exception as exc:
                if _aborted(context):
                    raise
                _abort(context, exc)

        return stream  # type: ignore[return-value]

    @functools.wraps(fn)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as exc:
            if _aborted(context):
                raise
            _abort(context, exc)

    return unary  # type: ignore[return-value]


def _aborted(context: grpc.ServicerContext) -> bool:
    """True when the handler already called ``context.abort`` (which raises a bare Exception)."""
    code = context.code()
    return code is not None and code is not grpc.StatusCode.OK


class TokenInterceptor(grpc.ServerInterceptor):
    """Rejects every RPC whose ``authorization`` metadata is not ``Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        def deny(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny = deny

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(given).encode(), self._expected):
            return continuation(handler_call_details)
        method = continuation(handler_call_details)
        if method is None:
            return None
        if method.request_streaming and method.response_streaming:
            return grpc.stream_stream_rpc_method_handler(lambda it, ctx: self._deny(None, ctx))
        if method.request_streaming:
            return grpc.stream_unary_rpc_method_handler(lambda it, ctx: self._deny(None, ctx))
        if method.response_streaming:
            return grpc.unary_stream_rpc_method_handler(lambda r, ctx: self._deny(r, ctx))
        return grpc.unary_unary_rpc_method_handler(self._deny)
