from gradhub.proto.v1 import ps_pb2 as _ps_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataHello(_message.Message):
    __slots__ = ("protocol", "job_id", "rank", "credential")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    protocol: int
    job_id: str
    rank: int
    credential: str
    def __init__(self, protocol: _Optional[int] = ..., job_id: _Optional[str] = ..., rank: _Optional[int] = ..., credential: _Optional[str] = ...) -> None: ...

class RegionRequest(_message.Message):
    __slots__ = ("bytes",)
    BYTES_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    def __init__(self, bytes: _Optional[int] = ...) -> None: ...

class DataError(_message.Message):
    __slots__ = ("code", "message", "error_class", "field")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CLASS_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    error_class: str
    field: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., error_class: _Optional[str] = ..., field: _Optional[str] = ...) -> None: ...

class DataReply(_message.Message):
    __slots__ = ("accepted", "version", "params", "error", "clip_part_sq", "region_bytes")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CLIP_PART_SQ_FIELD_NUMBER: _ClassVar[int]
    REGION_BYTES_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    version: int
    params: _ps_pb2.PullHeader
    error: DataError
    clip_part_sq: float
    region_bytes: int
    def __init__(self, accepted: _Optional[bool] = ..., version: _Optional[int] = ..., params: _Optional[_Union[_ps_pb2.PullHeader, _Mapping]] = ..., error: _Optional[_Union[DataError, _Mapping]] = ..., clip_part_sq: _Optional[float] = ..., region_bytes: _Optional[int] = ...) -> None: ...

class DataFrame(_message.Message):
    __slots__ = ("hello", "init", "push", "pull", "reply", "region", "pull_next", "payload_bytes", "in_region", "region_offset", "reply_offset", "shared")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    PULL_NEXT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    IN_REGION_FIELD_NUMBER: _ClassVar[int]
    REGION_OFFSET_FIELD_NUMBER: _ClassVar[int]
    REPLY_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    hello: DataHello
    init: _ps_pb2.PushHeader
    push: _ps_pb2.PushHeader
    pull: _ps_pb2.PullRequest
    reply: DataReply
    region: RegionRequest
    pull_next: bool
    payload_bytes: int
    in_region: bool
    region_offset: int
    reply_offset: int
    shared: bool
    def __init__(self, hello: _Optional[_Union[DataHello, _Mapping]] = ..., init: _Optional[_Union[_ps_pb2.PushHeader, _Mapping]] = ..., push: _Optional[_Union[_ps_pb2.PushHeader, _Mapping]] = ..., pull: _Optional[_Union[_ps_pb2.PullRequest, _Mapping]] = ..., reply: _Optional[_Union[DataReply, _Mapping]] = ..., region: _Optional[_Union[RegionRequest, _Mapping]] = ..., pull_next: _Optional[bool] = ..., payload_bytes: _Optional[int] = ..., in_region: _Optional[bool] = ..., region_offset: _Optional[int] = ..., reply_offset: _Optional[int] = ..., shared: _Optional[bool] = ...) -> None: ...
