"""Errors keep their type on the wire: the server names the class (and a SpecError's field) in
the trailing metadata, and the client and the workers rebuild it from one table."""

from __future__ import annotations

import pytest

from gradhub.proto.contract.errors import (
    ERRORS,
    GradhubError,
    NotFoundError,
    PeerLostError,
    ProtocolError,
    SpecError,
    StateError,
    error_metadata,
    from_rpc_error,
    rebuild_error,
)


@pytest.mark.parametrize("exc", [ProtocolError("tensors[0].shape: bad"), StateError("closed"),
                                 NotFoundError("job 'x' not found"), PeerLostError("worker 1 lost"),
                                 GradhubError("other")])
def test_every_gradhub_error_comes_back_as_its_class(exc: GradhubError) -> None:
    back = rebuild_error(error_metadata(exc), str(exc))
    assert type(back) is type(exc) and str(back) == str(exc)


def test_a_spec_error_keeps_its_field() -> None:
    exc = SpecError("optimizer.param_groups[0].params", "no trainable parameter left matches ['x']")
    back = rebuild_error(list(error_metadata(exc)), str(exc))
    assert isinstance(back, SpecError)
    assert back.field == exc.field and back.problem == exc.problem and str(back) == str(exc)


def test_no_metadata_or_an_unknown_class_rebuilds_nothing() -> None:
    assert error_metadata(ValueError("x")) == ()
    assert rebuild_error((), "x") is None and rebuild_error(None, "x") is None
    assert rebuild_error((("gradhub-error", "os.system"),), "x") is None  # only the table's classes
    assert set(ERRORS) >= {"SpecError", "ProtocolError", "StateError", "NotFoundError", "WorkerFailure"}


class _FakeRpcError(Exception):
    def __init__(self, metadata: tuple[tuple[str, str], ...], details: str) -> None:
        self._m, self._d = metadata, details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._m

    def details(self) -> str:
        return self._d


def test_from_rpc_error_reads_a_grpc_error() -> None:
    exc = StateError("the job is over")
    assert isinstance(from_rpc_error(_FakeRpcError(error_metadata(exc), str(exc))), StateError)
    assert from_rpc_error(ValueError("not an RpcError")) is None
