"""The data plane's framing: prefixes, header limits, and errors that keep their class."""

from __future__ import annotations

import pytest

from gradhub.proto import frames
from gradhub.proto.contract.errors import AuthError, GradhubError, ProtocolError, SpecError
from gradhub.proto.v1 import data_pb2, ps_pb2


def test_a_frame_round_trips() -> None:
    frame = data_pb2.DataFrame(push=ps_pb2.PushHeader(job_id="j", rank=3, step=7), pull_next=True, payload_bytes=40)
    head = frames.frame_head(frame)
    length = frames.header_length(head[: frames.PREFIX.size], frames.MAX_HEADER_BYTES)
    assert length == len(head) - frames.PREFIX.size
    assert frames.parse_header(head[frames.PREFIX.size:]) == frame


def test_a_wrong_magic_or_a_long_header_is_refused_before_the_header_is_read() -> None:
    with pytest.raises(ProtocolError, match="magic"):
        frames.header_length(b"GET / HT", frames.MAX_HEADER_BYTES)
    with pytest.raises(ProtocolError, match="over the limit of 4096"):
        frames.header_length(frames.PREFIX.pack(frames.MAGIC, 4097), frames.MAX_HELLO_BYTES)


def test_garbage_is_not_a_header() -> None:
    with pytest.raises(ProtocolError, match="not a DataFrame"):
        frames.parse_header(b"\xff\xff\xff")


@pytest.mark.parametrize("exc", [AuthError("credential: wrong"), ProtocolError("tensors[0].shape: bad"),
                                 SpecError("optimizer.lr", "must be > 0")])
def test_an_error_reply_rebuilds_the_same_class(exc: GradhubError) -> None:
    rebuilt = frames.reply_error(frames.error_reply(exc, "INVALID_ARGUMENT").reply.error)
    assert type(rebuilt) is type(exc) and str(rebuilt) == str(exc)


def test_a_timeout_and_an_unknown_error_keep_their_meaning() -> None:
    assert isinstance(frames.reply_error(data_pb2.DataError(code="DEADLINE_EXCEEDED", message="wait")), TimeoutError)
    other = frames.reply_error(data_pb2.DataError(code="INTERNAL", message="boom"))
    assert type(other) is GradhubError and "INTERNAL: boom" in str(other)


def test_host_id_names_this_machine_and_network_namespace() -> None:
    assert frames.host_id() == frames.host_id() != ""
