"""Property-based tests (hypothesis) of what parses untrusted input: the job spec validator, the
data plane's framing, the tensor codec and the working_dir check. Whatever comes in, the answer
is a value or the documented error (SpecError, ProtocolError), never another exception; what is
valid round-trips. Bounded: a few hundred examples each, no deadline (a 2-core CI machine)."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradhub.proto import frames
from gradhub.proto.codec import Receiver, chunk_parser, data_of_chunk, encode_data_chunk
from gradhub.proto.contract.errors import ProtocolError, SpecError
from gradhub.proto.contract.spec import JobSpec
from gradhub.proto.v1 import data_pb2, ps_pb2
from gradhub.server.working_dirs import check_zip

BOUNDED = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SPEC_KEYS = [f.name for f in JobSpec.__dataclass_fields__.values()] + ["lr", "name", "args", "hidden", "x"]
json_leaf = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.sampled_from(SPEC_KEYS) | st.text(max_size=8), inner, max_size=5),
                          max_leaves=20)


@BOUNDED
@given(st.dictionaries(st.sampled_from(SPEC_KEYS), json_value, max_size=8))
def test_any_spec_is_valid_or_a_spec_error(fields: dict) -> None:
    spec = {"model": "mlp", "dataset": "digits"} | fields
    try:
        parsed = JobSpec.from_dict(spec)
    except SpecError:
        return
    assert JobSpec.from_json(parsed.to_json()) == parsed  # what is accepted round-trips


@BOUNDED
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_any_spec_text_is_valid_or_a_spec_error(text: str) -> None:
    try:
        JobSpec.from_json(text)
    except SpecError:
        pass


@BOUNDED
@given(st.binary(max_size=64))
def test_any_header_bytes_parse_or_are_a_protocol_error(raw: bytes) -> None:
    try:
        frames.parse_header(raw)
    except ProtocolError:
        pass


@BOUNDED
@given(st.binary(min_size=8, max_size=8), st.integers(0, 1 << 20))
def test_any_prefix_is_a_length_within_the_limit_or_a_protocol_error(prefix: bytes, limit: int) -> None:
    try:
        assert 0 <= frames.header_length(prefix, limit) <= limit
    except ProtocolError:
        pass


@BOUNDED
@given(st.integers(0, 2**31), st.integers(-(2**31), 2**31 - 1), st.booleans(), st.integers(0, 2**40))
def test_a_frame_round_trips(step: int, rank: int, pull_next: bool, payload: int) -> None:
    frame = data_pb2.DataFrame(push=ps_pb2.PushHeader(job_id="j", rank=rank, step=step), pull_next=pull_next,
                               payload_bytes=payload)
    head = frames.frame_head(frame)
    n = frames.header_length(head[:frames.PREFIX.size], frames.MAX_HEADER_BYTES)
    assert frames.parse_header(head[frames.PREFIX.size:frames.PREFIX.size + n]) == frame


@BOUNDED
@given(st.binary(max_size=3000), st.lists(st.integers(1, 700), min_size=1, max_size=20))
def test_a_receiver_reassembles_any_chunking(data: bytes, cuts: list[int]) -> None:
    chunks, pos, i = [], 0, 0
    while pos < len(data):
        step = cuts[i % len(cuts)]
        chunks.append(memoryview(data[pos:pos + step]))
        pos, i = pos + step, i + 1
    receiver = Receiver(len(data))
    assert receiver.fill(iter(chunks))
    assert bytes(receiver.buffer) == data


@BOUNDED
@given(st.binary(max_size=5000))
def test_a_data_chunk_round_trips(data: bytes) -> None:
    assert data_of_chunk(encode_data_chunk(data)) == data


@BOUNDED
@given(st.binary(max_size=200))
def test_any_chunk_bytes_are_a_view_a_message_or_a_decode_error(raw: bytes) -> None:
    from google.protobuf.message import DecodeError

    try:
        parsed = chunk_parser(ps_pb2.PushChunk)(raw)
    except DecodeError:
        return  # the server's WireInterceptor answers it with INVALID_ARGUMENT
    assert isinstance(parsed, memoryview | ps_pb2.PushChunk)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2000))
def test_any_working_dir_bytes_are_checked_without_surprises(raw: bytes) -> None:
    try:
        check_zip(raw)
    except SpecError:
        pass


def test_the_strategies_reach_valid_specs() -> None:
    """The spec property is not vacuous: a plain valid spec passes through the same path."""
    spec = JobSpec.from_dict({"model": "mlp", "dataset": "digits", "workers": 3, "optimizer": {"name": "adam"}})
    assert json.loads(spec.to_json())["workers"] == 3
