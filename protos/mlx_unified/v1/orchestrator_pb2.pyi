import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from mlx_unified.v1 import common_pb2 as _common_pb2
from mlx_unified.v1 import distillation_pb2 as _distillation_pb2
from mlx_unified.v1 import rlhf_pb2 as _rlhf_pb2
from mlx_unified.v1 import training_pb2 as _training_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StageKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_KIND_UNSPECIFIED: _ClassVar[StageKind]
    STAGE_KIND_SFT: _ClassVar[StageKind]
    STAGE_KIND_DISTILL: _ClassVar[StageKind]
    STAGE_KIND_REWARD_MODEL: _ClassVar[StageKind]
    STAGE_KIND_DPO: _ClassVar[StageKind]
    STAGE_KIND_PPO: _ClassVar[StageKind]
    STAGE_KIND_GRPO: _ClassVar[StageKind]
    STAGE_KIND_EXPORT: _ClassVar[StageKind]
    STAGE_KIND_KTO: _ClassVar[StageKind]
    STAGE_KIND_ORPO: _ClassVar[StageKind]

class RunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATE_UNSPECIFIED: _ClassVar[RunState]
    RUN_STATE_PENDING: _ClassVar[RunState]
    RUN_STATE_RUNNING: _ClassVar[RunState]
    RUN_STATE_SUCCEEDED: _ClassVar[RunState]
    RUN_STATE_FAILED: _ClassVar[RunState]
    RUN_STATE_CANCELLED: _ClassVar[RunState]

class StageState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_STATE_UNSPECIFIED: _ClassVar[StageState]
    STAGE_STATE_PENDING: _ClassVar[StageState]
    STAGE_STATE_RUNNING: _ClassVar[StageState]
    STAGE_STATE_SUCCEEDED: _ClassVar[StageState]
    STAGE_STATE_FAILED: _ClassVar[StageState]
    STAGE_STATE_CANCELLED: _ClassVar[StageState]
    STAGE_STATE_SKIPPED: _ClassVar[StageState]
STAGE_KIND_UNSPECIFIED: StageKind
STAGE_KIND_SFT: StageKind
STAGE_KIND_DISTILL: StageKind
STAGE_KIND_REWARD_MODEL: StageKind
STAGE_KIND_DPO: StageKind
STAGE_KIND_PPO: StageKind
STAGE_KIND_GRPO: StageKind
STAGE_KIND_EXPORT: StageKind
STAGE_KIND_KTO: StageKind
STAGE_KIND_ORPO: StageKind
RUN_STATE_UNSPECIFIED: RunState
RUN_STATE_PENDING: RunState
RUN_STATE_RUNNING: RunState
RUN_STATE_SUCCEEDED: RunState
RUN_STATE_FAILED: RunState
RUN_STATE_CANCELLED: RunState
STAGE_STATE_UNSPECIFIED: StageState
STAGE_STATE_PENDING: StageState
STAGE_STATE_RUNNING: StageState
STAGE_STATE_SUCCEEDED: StageState
STAGE_STATE_FAILED: StageState
STAGE_STATE_CANCELLED: StageState
STAGE_STATE_SKIPPED: StageState

class Binding(_message.Message):
    __slots__ = ("input", "from_stage")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    FROM_STAGE_FIELD_NUMBER: _ClassVar[int]
    input: str
    from_stage: str
    def __init__(self, input: _Optional[str] = ..., from_stage: _Optional[str] = ...) -> None: ...

class Stage(_message.Message):
    __slots__ = ("name", "kind", "sft", "distill", "reward_model", "dpo", "ppo", "grpo", "export", "kto", "orpo", "inputs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SFT_FIELD_NUMBER: _ClassVar[int]
    DISTILL_FIELD_NUMBER: _ClassVar[int]
    REWARD_MODEL_FIELD_NUMBER: _ClassVar[int]
    DPO_FIELD_NUMBER: _ClassVar[int]
    PPO_FIELD_NUMBER: _ClassVar[int]
    GRPO_FIELD_NUMBER: _ClassVar[int]
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    KTO_FIELD_NUMBER: _ClassVar[int]
    ORPO_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: StageKind
    sft: _training_pb2.SFTSpec
    distill: _distillation_pb2.DistillationSpec
    reward_model: _rlhf_pb2.RewardModelSpec
    dpo: _rlhf_pb2.DPOSpec
    ppo: _rlhf_pb2.PPOSpec
    grpo: _rlhf_pb2.GRPOSpec
    export: _training_pb2.ExportSpec
    kto: _rlhf_pb2.KTOSpec
    orpo: _rlhf_pb2.ORPOSpec
    inputs: _containers.RepeatedCompositeFieldContainer[Binding]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[StageKind, str]] = ..., sft: _Optional[_Union[_training_pb2.SFTSpec, _Mapping]] = ..., distill: _Optional[_Union[_distillation_pb2.DistillationSpec, _Mapping]] = ..., reward_model: _Optional[_Union[_rlhf_pb2.RewardModelSpec, _Mapping]] = ..., dpo: _Optional[_Union[_rlhf_pb2.DPOSpec, _Mapping]] = ..., ppo: _Optional[_Union[_rlhf_pb2.PPOSpec, _Mapping]] = ..., grpo: _Optional[_Union[_rlhf_pb2.GRPOSpec, _Mapping]] = ..., export: _Optional[_Union[_training_pb2.ExportSpec, _Mapping]] = ..., kto: _Optional[_Union[_rlhf_pb2.KTOSpec, _Mapping]] = ..., orpo: _Optional[_Union[_rlhf_pb2.ORPOSpec, _Mapping]] = ..., inputs: _Optional[_Iterable[_Union[Binding, _Mapping]]] = ...) -> None: ...

class PipelineSpec(_message.Message):
    __slots__ = ("name", "base_model", "dataset", "datasets", "stages", "auto_configure", "cache", "labels", "register_as")
    class DatasetsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.DatasetRef
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.DatasetRef, _Mapping]] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    AUTO_CONFIGURE_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    REGISTER_AS_FIELD_NUMBER: _ClassVar[int]
    name: str
    base_model: _common_pb2.ModelRef
    dataset: _common_pb2.DatasetRef
    datasets: _containers.MessageMap[str, _common_pb2.DatasetRef]
    stages: _containers.RepeatedCompositeFieldContainer[Stage]
    auto_configure: bool
    cache: bool
    labels: _containers.ScalarMap[str, str]
    register_as: str
    def __init__(self, name: _Optional[str] = ..., base_model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., dataset: _Optional[_Union[_common_pb2.DatasetRef, _Mapping]] = ..., datasets: _Optional[_Mapping[str, _common_pb2.DatasetRef]] = ..., stages: _Optional[_Iterable[_Union[Stage, _Mapping]]] = ..., auto_configure: _Optional[bool] = ..., cache: _Optional[bool] = ..., labels: _Optional[_Mapping[str, str]] = ..., register_as: _Optional[str] = ...) -> None: ...

class Pipeline(_message.Message):
    __slots__ = ("pipeline_id", "spec", "resolved", "create_time")
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    pipeline_id: str
    spec: PipelineSpec
    resolved: _struct_pb2.Struct
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, pipeline_id: _Optional[str] = ..., spec: _Optional[_Union[PipelineSpec, _Mapping]] = ..., resolved: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class StageRun(_message.Message):
    __slots__ = ("name", "kind", "state", "attempt", "service", "job_id", "job", "result", "cached_from", "error", "start_time", "end_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CACHED_FROM_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: StageKind
    state: StageState
    attempt: int
    service: str
    job_id: str
    job: _common_pb2.Job
    result: _common_pb2.Checkpoint
    cached_from: str
    error: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[StageKind, str]] = ..., state: _Optional[_Union[StageState, str]] = ..., attempt: _Optional[int] = ..., service: _Optional[str] = ..., job_id: _Optional[str] = ..., job: _Optional[_Union[_common_pb2.Job, _Mapping]] = ..., result: _Optional[_Union[_common_pb2.Checkpoint, _Mapping]] = ..., cached_from: _Optional[str] = ..., error: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Run(_message.Message):
    __slots__ = ("run_id", "pipeline_id", "state", "stages", "create_time", "start_time", "end_time", "error", "result")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    pipeline_id: str
    state: RunState
    stages: _containers.RepeatedCompositeFieldContainer[StageRun]
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    error: str
    result: _common_pb2.Checkpoint
    def __init__(self, run_id: _Optional[str] = ..., pipeline_id: _Optional[str] = ..., state: _Optional[_Union[RunState, str]] = ..., stages: _Optional[_Iterable[_Union[StageRun, _Mapping]]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error: _Optional[str] = ..., result: _Optional[_Union[_common_pb2.Checkpoint, _Mapping]] = ...) -> None: ...

class RunStateChange(_message.Message):
    __slots__ = ("from_state", "to_state", "reason")
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    from_state: RunState
    to_state: RunState
    reason: str
    def __init__(self, from_state: _Optional[_Union[RunState, str]] = ..., to_state: _Optional[_Union[RunState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class StageStateChange(_message.Message):
    __slots__ = ("stage", "from_state", "to_state", "reason", "job_id")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    stage: str
    from_state: StageState
    to_state: StageState
    reason: str
    job_id: str
    def __init__(self, stage: _Optional[str] = ..., from_state: _Optional[_Union[StageState, str]] = ..., to_state: _Optional[_Union[StageState, str]] = ..., reason: _Optional[str] = ..., job_id: _Optional[str] = ...) -> None: ...

class StageJobEvent(_message.Message):
    __slots__ = ("stage", "event")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    stage: str
    event: _common_pb2.JobEvent
    def __init__(self, stage: _Optional[str] = ..., event: _Optional[_Union[_common_pb2.JobEvent, _Mapping]] = ...) -> None: ...

class RunEvent(_message.Message):
    __slots__ = ("run_id", "seq", "time", "run_state_change", "stage_state_change", "job_event")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    RUN_STATE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    STAGE_STATE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    JOB_EVENT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    seq: int
    time: _timestamp_pb2.Timestamp
    run_state_change: RunStateChange
    stage_state_change: StageStateChange
    job_event: StageJobEvent
    def __init__(self, run_id: _Optional[str] = ..., seq: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., run_state_change: _Optional[_Union[RunStateChange, _Mapping]] = ..., stage_state_change: _Optional[_Union[StageStateChange, _Mapping]] = ..., job_event: _Optional[_Union[StageJobEvent, _Mapping]] = ...) -> None: ...

class Template(_message.Message):
    __slots__ = ("name", "description", "spec")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    spec: PipelineSpec
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., spec: _Optional[_Union[PipelineSpec, _Mapping]] = ...) -> None: ...

class CreatePipelineRequest(_message.Message):
    __slots__ = ("request_id", "spec")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    spec: PipelineSpec
    def __init__(self, request_id: _Optional[str] = ..., spec: _Optional[_Union[PipelineSpec, _Mapping]] = ...) -> None: ...

class CreatePipelineResponse(_message.Message):
    __slots__ = ("pipeline",)
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    pipeline: Pipeline
    def __init__(self, pipeline: _Optional[_Union[Pipeline, _Mapping]] = ...) -> None: ...

class GetPipelineRequest(_message.Message):
    __slots__ = ("pipeline_id",)
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    pipeline_id: str
    def __init__(self, pipeline_id: _Optional[str] = ...) -> None: ...

class GetPipelineResponse(_message.Message):
    __slots__ = ("pipeline",)
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    pipeline: Pipeline
    def __init__(self, pipeline: _Optional[_Union[Pipeline, _Mapping]] = ...) -> None: ...

class ListPipelinesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListPipelinesResponse(_message.Message):
    __slots__ = ("pipelines", "next_page_token")
    PIPELINES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    pipelines: _containers.RepeatedCompositeFieldContainer[Pipeline]
    next_page_token: str
    def __init__(self, pipelines: _Optional[_Iterable[_Union[Pipeline, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListTemplatesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTemplatesResponse(_message.Message):
    __slots__ = ("templates",)
    TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    templates: _containers.RepeatedCompositeFieldContainer[Template]
    def __init__(self, templates: _Optional[_Iterable[_Union[Template, _Mapping]]] = ...) -> None: ...

class CreatePipelineFromTemplateRequest(_message.Message):
    __slots__ = ("request_id", "template", "base_model", "dataset", "overrides", "name", "auto_configure")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    AUTO_CONFIGURE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    template: str
    base_model: _common_pb2.ModelRef
    dataset: _common_pb2.DatasetRef
    overrides: _struct_pb2.Struct
    name: str
    auto_configure: bool
    def __init__(self, request_id: _Optional[str] = ..., template: _Optional[str] = ..., base_model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., dataset: _Optional[_Union[_common_pb2.DatasetRef, _Mapping]] = ..., overrides: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., name: _Optional[str] = ..., auto_configure: _Optional[bool] = ...) -> None: ...

class CreatePipelineFromTemplateResponse(_message.Message):
    __slots__ = ("pipeline",)
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    pipeline: Pipeline
    def __init__(self, pipeline: _Optional[_Union[Pipeline, _Mapping]] = ...) -> None: ...

class RunPipelineRequest(_message.Message):
    __slots__ = ("request_id", "pipeline_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    pipeline_id: str
    def __init__(self, request_id: _Optional[str] = ..., pipeline_id: _Optional[str] = ...) -> None: ...

class RunPipelineResponse(_message.Message):
    __slots__ = ("run", "created")
    RUN_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    run: Run
    created: bool
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GetRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: Run
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "pipeline_id")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    pipeline_id: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., pipeline_id: _Optional[str] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs", "next_page_token")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[Run]
    next_page_token: str
    def __init__(self, runs: _Optional[_Iterable[_Union[Run, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchRunRequest(_message.Message):
    __slots__ = ("run_id", "after_seq")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    after_seq: int
    def __init__(self, run_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class WatchRunResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: RunEvent
    def __init__(self, event: _Optional[_Union[RunEvent, _Mapping]] = ...) -> None: ...

class CancelRunRequest(_message.Message):
    __slots__ = ("run_id", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: Run
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ...) -> None: ...

class StartTrainingRequest(_message.Message):
    __slots__ = ("request_id", "stage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    stage: Stage
    def __init__(self, request_id: _Optional[str] = ..., stage: _Optional[_Union[Stage, _Mapping]] = ...) -> None: ...

class StartTrainingResponse(_message.Message):
    __slots__ = ("run", "pipeline")
    RUN_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    run: Run
    pipeline: Pipeline
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ..., pipeline: _Optional[_Union[Pipeline, _Mapping]] = ...) -> None: ...
