from gradhub.proto.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("job_id", "rank", "host", "pid", "total_steps", "train_size")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SIZE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    rank: int
    host: str
    pid: int
    total_steps: int
    train_size: int
    def __init__(self, job_id: _Optional[str] = ..., rank: _Optional[int] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., total_steps: _Optional[int] = ..., train_size: _Optional[int] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("version", "next_step", "needs_init", "world_size", "heartbeat_interval_s", "collective_timeout_s", "data", "shards", "clip_across_shards", "clip_push_norm", "control_first")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_FIELD_NUMBER: _ClassVar[int]
    NEEDS_INIT_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    CLIP_ACROSS_SHARDS_FIELD_NUMBER: _ClassVar[int]
    CLIP_PUSH_NORM_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIRST_FIELD_NUMBER: _ClassVar[int]
    version: int
    next_step: int
    needs_init: bool
    world_size: int
    heartbeat_interval_s: float
    collective_timeout_s: float
    data: DataEndpoint
    shards: _containers.RepeatedCompositeFieldContainer[DataEndpoint]
    clip_across_shards: bool
    clip_push_norm: bool
    control_first: bool
    def __init__(self, version: _Optional[int] = ..., next_step: _Optional[int] = ..., needs_init: _Optional[bool] = ..., world_size: _Optional[int] = ..., heartbeat_interval_s: _Optional[float] = ..., collective_timeout_s: _Optional[float] = ..., data: _Optional[_Union[DataEndpoint, _Mapping]] = ..., shards: _Optional[_Iterable[_Union[DataEndpoint, _Mapping]]] = ..., clip_across_shards: _Optional[bool] = ..., clip_push_norm: _Optional[bool] = ..., control_first: _Optional[bool] = ...) -> None: ...

class DataEndpoint(_message.Message):
    __slots__ = ("protocol", "tcp_host", "tcp_port", "unix_path", "host_id", "credential", "tls", "shared_memory")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    TCP_HOST_FIELD_NUMBER: _ClassVar[int]
    TCP_PORT_FIELD_NUMBER: _ClassVar[int]
    UNIX_PATH_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    protocol: int
    tcp_host: str
    tcp_port: int
    unix_path: str
    host_id: str
    credential: str
    tls: bool
    shared_memory: bool
    def __init__(self, protocol: _Optional[int] = ..., tcp_host: _Optional[str] = ..., tcp_port: _Optional[int] = ..., unix_path: _Optional[str] = ..., host_id: _Optional[str] = ..., credential: _Optional[str] = ..., tls: _Optional[bool] = ..., shared_memory: _Optional[bool] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("job_id", "rank", "step", "base_version", "tensors", "frozen", "buffers", "aliases", "unused", "quant_block", "first_tensor", "world_size", "pull_part_only", "clip_norm_sq")
    class AliasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    UNUSED_FIELD_NUMBER: _ClassVar[int]
    QUANT_BLOCK_FIELD_NUMBER: _ClassVar[int]
    FIRST_TENSOR_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PULL_PART_ONLY_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_SQ_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    rank: int
    step: int
    base_version: int
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorMeta]
    frozen: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorMeta]
    buffers: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    aliases: _containers.ScalarMap[str, str]
    unused: _containers.RepeatedScalarFieldContainer[int]
    quant_block: int
    first_tensor: int
    world_size: int
    pull_part_only: bool
    clip_norm_sq: float
    def __init__(self, job_id: _Optional[str] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., base_version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.TensorMeta, _Mapping]]] = ..., frozen: _Optional[_Iterable[_Union[_tensor_pb2.TensorMeta, _Mapping]]] = ..., buffers: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., aliases: _Optional[_Mapping[str, str]] = ..., unused: _Optional[_Iterable[int]] = ..., quant_block: _Optional[int] = ..., first_tensor: _Optional[int] = ..., world_size: _Optional[int] = ..., pull_part_only: _Optional[bool] = ..., clip_norm_sq: _Optional[float] = ...) -> None: ...

class PushChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("accepted", "version")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    version: int
    def __init__(self, accepted: _Optional[bool] = ..., version: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("job_id", "rank", "step", "dtype", "first_tensor", "tensor_count", "clip_total_sq")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    FIRST_TENSOR_FIELD_NUMBER: _ClassVar[int]
    TENSOR_COUNT_FIELD_NUMBER: _ClassVar[int]
    CLIP_TOTAL_SQ_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    rank: int
    step: int
    dtype: _tensor_pb2.DType
    first_tensor: int
    tensor_count: int
    clip_total_sq: float
    def __init__(self, job_id: _Optional[str] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., first_tensor: _Optional[int] = ..., tensor_count: _Optional[int] = ..., clip_total_sq: _Optional[float] = ...) -> None: ...

class PullHeader(_message.Message):
    __slots__ = ("version", "tensors", "buffers", "world_size")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    version: int
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorMeta]
    buffers: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    world_size: int
    def __init__(self, version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.TensorMeta, _Mapping]]] = ..., buffers: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., world_size: _Optional[int] = ...) -> None: ...

class PullChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PullHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[PullHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("job_id", "rank", "step")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    rank: int
    step: int
    def __init__(self, job_id: _Optional[str] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("stop", "reason", "regroup")
    STOP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REGROUP_FIELD_NUMBER: _ClassVar[int]
    stop: bool
    reason: str
    regroup: bool
    def __init__(self, stop: _Optional[bool] = ..., reason: _Optional[str] = ..., regroup: _Optional[bool] = ...) -> None: ...

class ReportMetricsRequest(_message.Message):
    __slots__ = ("job_id", "rank", "step", "kind", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    rank: int
    step: int
    kind: str
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, job_id: _Optional[str] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., kind: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ReportMetricsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointHeader(_message.Message):
    __slots__ = ("job_id", "rank", "step", "params", "state", "optimizer_json", "scheduler_json")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_JSON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    rank: int
    step: int
    params: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorMeta]
    state: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorMeta]
    optimizer_json: str
    scheduler_json: str
    def __init__(self, job_id: _Optional[str] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., params: _Optional[_Iterable[_Union[_tensor_pb2.TensorMeta, _Mapping]]] = ..., state: _Optional[_Iterable[_Union[_tensor_pb2.TensorMeta, _Mapping]]] = ..., optimizer_json: _Optional[str] = ..., scheduler_json: _Optional[str] = ...) -> None: ...

class CheckpointChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: CheckpointHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[CheckpointHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SaveCheckpointResponse(_message.Message):
    __slots__ = ("step", "size_bytes")
    STEP_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    step: int
    size_bytes: int
    def __init__(self, step: _Optional[int] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class JoinGroupRequest(_message.Message):
    __slots__ = ("job_id", "rank", "has_state", "step")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    HAS_STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    rank: int
    has_state: bool
    step: int
    def __init__(self, job_id: _Optional[str] = ..., rank: _Optional[int] = ..., has_state: _Optional[bool] = ..., step: _Optional[int] = ...) -> None: ...

class JoinGroupResponse(_message.Message):
    __slots__ = ("ready", "retry_after_s", "generation", "world_size", "group_rank", "store_port", "store_prefix", "step", "source_rank", "finished", "keep_state", "released")
    READY_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    GROUP_RANK_FIELD_NUMBER: _ClassVar[int]
    STORE_PORT_FIELD_NUMBER: _ClassVar[int]
    STORE_PREFIX_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SOURCE_RANK_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    KEEP_STATE_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    retry_after_s: float
    generation: int
    world_size: int
    group_rank: int
    store_port: int
    store_prefix: str
    step: int
    source_rank: int
    finished: bool
    keep_state: bool
    released: bool
    def __init__(self, ready: _Optional[bool] = ..., retry_after_s: _Optional[float] = ..., generation: _Optional[int] = ..., world_size: _Optional[int] = ..., group_rank: _Optional[int] = ..., store_port: _Optional[int] = ..., store_prefix: _Optional[str] = ..., step: _Optional[int] = ..., source_rank: _Optional[int] = ..., finished: _Optional[bool] = ..., keep_state: _Optional[bool] = ..., released: _Optional[bool] = ...) -> None: ...

class LoadCheckpointRequest(_message.Message):
    __slots__ = ("job_id", "rank")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    rank: int
    def __init__(self, job_id: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...
