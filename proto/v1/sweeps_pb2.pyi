from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Trial(_message.Message):
    __slots__ = ("number", "job_id", "state", "params_json", "value", "metrics", "step", "total_steps", "job_state", "reason", "evaluations", "created_at", "finished_at")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    JOB_STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    number: int
    job_id: str
    state: str
    params_json: str
    value: float
    metrics: _containers.ScalarMap[str, float]
    step: int
    total_steps: int
    job_state: str
    reason: str
    evaluations: int
    created_at: float
    finished_at: float
    def __init__(self, number: _Optional[int] = ..., job_id: _Optional[str] = ..., state: _Optional[str] = ..., params_json: _Optional[str] = ..., value: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., job_state: _Optional[str] = ..., reason: _Optional[str] = ..., evaluations: _Optional[int] = ..., created_at: _Optional[float] = ..., finished_at: _Optional[float] = ...) -> None: ...

class Sweep(_message.Message):
    __slots__ = ("id", "name", "owner", "state", "reason", "spec_json", "created_at", "finished_at", "trials", "best", "metric", "mode", "trials_total", "parallel")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    TRIALS_FIELD_NUMBER: _ClassVar[int]
    BEST_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TRIALS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PARALLEL_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    owner: str
    state: str
    reason: str
    spec_json: str
    created_at: float
    finished_at: float
    trials: _containers.RepeatedCompositeFieldContainer[Trial]
    best: int
    metric: str
    mode: str
    trials_total: int
    parallel: int
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., owner: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., spec_json: _Optional[str] = ..., created_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., trials: _Optional[_Iterable[_Union[Trial, _Mapping]]] = ..., best: _Optional[int] = ..., metric: _Optional[str] = ..., mode: _Optional[str] = ..., trials_total: _Optional[int] = ..., parallel: _Optional[int] = ...) -> None: ...

class SubmitSweepRequest(_message.Message):
    __slots__ = ("spec_json", "working_dir_zip")
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    WORKING_DIR_ZIP_FIELD_NUMBER: _ClassVar[int]
    spec_json: str
    working_dir_zip: bytes
    def __init__(self, spec_json: _Optional[str] = ..., working_dir_zip: _Optional[bytes] = ...) -> None: ...

class SubmitSweepResponse(_message.Message):
    __slots__ = ("sweep",)
    SWEEP_FIELD_NUMBER: _ClassVar[int]
    sweep: Sweep
    def __init__(self, sweep: _Optional[_Union[Sweep, _Mapping]] = ...) -> None: ...

class GetSweepRequest(_message.Message):
    __slots__ = ("sweep_id",)
    SWEEP_ID_FIELD_NUMBER: _ClassVar[int]
    sweep_id: str
    def __init__(self, sweep_id: _Optional[str] = ...) -> None: ...

class GetSweepResponse(_message.Message):
    __slots__ = ("sweep",)
    SWEEP_FIELD_NUMBER: _ClassVar[int]
    sweep: Sweep
    def __init__(self, sweep: _Optional[_Union[Sweep, _Mapping]] = ...) -> None: ...

class ListSweepsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSweepsResponse(_message.Message):
    __slots__ = ("sweeps",)
    SWEEPS_FIELD_NUMBER: _ClassVar[int]
    sweeps: _containers.RepeatedCompositeFieldContainer[Sweep]
    def __init__(self, sweeps: _Optional[_Iterable[_Union[Sweep, _Mapping]]] = ...) -> None: ...

class CancelSweepRequest(_message.Message):
    __slots__ = ("sweep_id",)
    SWEEP_ID_FIELD_NUMBER: _ClassVar[int]
    sweep_id: str
    def __init__(self, sweep_id: _Optional[str] = ...) -> None: ...

class CancelSweepResponse(_message.Message):
    __slots__ = ("sweep",)
    SWEEP_FIELD_NUMBER: _ClassVar[int]
    sweep: Sweep
    def __init__(self, sweep: _Optional[_Union[Sweep, _Mapping]] = ...) -> None: ...

class WatchSweepRequest(_message.Message):
    __slots__ = ("sweep_id",)
    SWEEP_ID_FIELD_NUMBER: _ClassVar[int]
    sweep_id: str
    def __init__(self, sweep_id: _Optional[str] = ...) -> None: ...

class WatchSweepResponse(_message.Message):
    __slots__ = ("sweep",)
    SWEEP_FIELD_NUMBER: _ClassVar[int]
    sweep: Sweep
    def __init__(self, sweep: _Optional[_Union[Sweep, _Mapping]] = ...) -> None: ...
