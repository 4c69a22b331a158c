"""The data plane's framing (documented in proto/v1/data.proto), shared by the server and the
workers: a frame is a fixed prefix (magic and header length), a ``DataFrame`` header, and the
raw payload bytes the header announces. Nothing here touches a socket or pickles."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from google.protobuf.message import DecodeError

from gradhub.proto.contract.errors import ERRORS, GradhubError, ProtocolError, SpecError
from gradhub.proto.v1 import data_pb2

# 2: a sharded job's store 0 (``RegisterResponse.data``) is the server's control store, which
# holds no trainable value; its shards are ``RegisterResponse.shards`` (``gradhub.proto.shards``)
DATA_PROTOCOL = 2
MAGIC = b"GHD1"
PREFIX = struct.Struct("<4sI")  # magic, header length (little-endian)
MAX_HEADER_BYTES = 64 << 20  # a header carries the metas and, inline, the model's buffers
MAX_HELLO_BYTES = 4 << 10  # before a connection has authenticated


def frame_head(frame: data_pb2.DataFrame) -> bytes:
    """The prefix and the serialized header of ``frame`` (its payload, if any, follows)."""
    raw = frame.SerializeToString()
    return PREFIX.pack(MAGIC, len(raw)) + raw


def header_length(prefix: bytes | bytearray | memoryview, limit: int) -> int:
    """The header length a frame's prefix announces; ProtocolError for a wrong magic or a
    header longer than ``limit``."""
    magic, length = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise ProtocolError(f"frame: magic {bytes(magic)!r} is not {MAGIC!r} (not a gradhub data-plane "
                            "peer, or a framing version this side does not speak)")
    if length > limit:
        raise ProtocolError(f"frame: header of {length} bytes is over the limit of {limit}")
    return length


def parse_header(raw: bytes | bytearray | memoryview) -> data_pb2.DataFrame:
    try:
        return data_pb2.DataFrame.FromString(bytes(raw))
    except DecodeError as e:
        raise ProtocolError(f"frame: the header is not a DataFrame ({e})") from None


def error_reply(exc: BaseException, code: str) -> data_pb2.DataFrame:
    """The reply that reports ``exc`` (``code``: the gRPC status name it gets on the control plane)."""
    error = data_pb2.DataError(code=code, message=str(exc))
    if isinstance(exc, GradhubError) and type(exc).__name__ in ERRORS:
        error.error_class = type(exc).__name__
        if isinstance(exc, SpecError):
            error.field = exc.field
    return data_pb2.DataFrame(reply=data_pb2.DataReply(error=error))


def reply_error(error: data_pb2.DataError) -> Exception:
    """The exception a worker raises for an error reply: the server's class where it is a
    gradhub error, TimeoutError for a wait that ran out, else a GradhubError with the code."""
    cls = ERRORS.get(error.error_class)
    if cls is SpecError:
        return SpecError(error.field or "spec", error.message.removeprefix(f"{error.field}: "))
    if cls is not None:
        return cls(error.message)
    if error.code == "DEADLINE_EXCEEDED":
        return TimeoutError(error.message)
    return GradhubError(f"data plane: {error.code}: {error.message}")


def host_id() -> str:
    """This machine and network namespace, as a worker and the server compare them to choose the
    Unix socket (same id) or TCP; "" when they cannot be told (then TCP)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return ""
    return f"{boot}/{netns}"
