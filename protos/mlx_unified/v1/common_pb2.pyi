import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_PENDING: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class DatasetFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATASET_FORMAT_UNSPECIFIED: _ClassVar[DatasetFormat]
    DATASET_FORMAT_TEXT: _ClassVar[DatasetFormat]
    DATASET_FORMAT_CHAT: _ClassVar[DatasetFormat]
    DATASET_FORMAT_COMPLETION: _ClassVar[DatasetFormat]
    DATASET_FORMAT_PREFERENCE: _ClassVar[DatasetFormat]
    DATASET_FORMAT_PROMPT: _ClassVar[DatasetFormat]

class FinetuneMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINETUNE_METHOD_UNSPECIFIED: _ClassVar[FinetuneMethod]
    FINETUNE_METHOD_FULL: _ClassVar[FinetuneMethod]
    FINETUNE_METHOD_LORA: _ClassVar[FinetuneMethod]
    FINETUNE_METHOD_DORA: _ClassVar[FinetuneMethod]
    FINETUNE_METHOD_QLORA: _ClassVar[FinetuneMethod]

class OptimizerName(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPTIMIZER_NAME_UNSPECIFIED: _ClassVar[OptimizerName]
    OPTIMIZER_NAME_ADAMW: _ClassVar[OptimizerName]
    OPTIMIZER_NAME_ADAM: _ClassVar[OptimizerName]
    OPTIMIZER_NAME_SGD: _ClassVar[OptimizerName]
    OPTIMIZER_NAME_ADAFACTOR: _ClassVar[OptimizerName]
    OPTIMIZER_NAME_LION: _ClassVar[OptimizerName]
    OPTIMIZER_NAME_MUON: _ClassVar[OptimizerName]

class LrSchedule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LR_SCHEDULE_UNSPECIFIED: _ClassVar[LrSchedule]
    LR_SCHEDULE_CONSTANT: _ClassVar[LrSchedule]
    LR_SCHEDULE_COSINE: _ClassVar[LrSchedule]
    LR_SCHEDULE_LINEAR: _ClassVar[LrSchedule]

class DistributedBackend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DISTRIBUTED_BACKEND_UNSPECIFIED: _ClassVar[DistributedBackend]
    DISTRIBUTED_BACKEND_RING: _ClassVar[DistributedBackend]
    DISTRIBUTED_BACKEND_MPI: _ClassVar[DistributedBackend]
    DISTRIBUTED_BACKEND_NCCL: _ClassVar[DistributedBackend]
    DISTRIBUTED_BACKEND_JACCL: _ClassVar[DistributedBackend]

class CheckpointKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECKPOINT_KIND_UNSPECIFIED: _ClassVar[CheckpointKind]
    CHECKPOINT_KIND_ADAPTER: _ClassVar[CheckpointKind]
    CHECKPOINT_KIND_FULL: _ClassVar[CheckpointKind]

class JobView(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_VIEW_UNSPECIFIED: _ClassVar[JobView]
    JOB_VIEW_BASIC: _ClassVar[JobView]
    JOB_VIEW_FULL: _ClassVar[JobView]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_PENDING: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
DATASET_FORMAT_UNSPECIFIED: DatasetFormat
DATASET_FORMAT_TEXT: DatasetFormat
DATASET_FORMAT_CHAT: DatasetFormat
DATASET_FORMAT_COMPLETION: DatasetFormat
DATASET_FORMAT_PREFERENCE: DatasetFormat
DATASET_FORMAT_PROMPT: DatasetFormat
FINETUNE_METHOD_UNSPECIFIED: FinetuneMethod
FINETUNE_METHOD_FULL: FinetuneMethod
FINETUNE_METHOD_LORA: FinetuneMethod
FINETUNE_METHOD_DORA: FinetuneMethod
FINETUNE_METHOD_QLORA: FinetuneMethod
OPTIMIZER_NAME_UNSPECIFIED: OptimizerName
OPTIMIZER_NAME_ADAMW: OptimizerName
OPTIMIZER_NAME_ADAM: OptimizerName
OPTIMIZER_NAME_SGD: OptimizerName
OPTIMIZER_NAME_ADAFACTOR: OptimizerName
OPTIMIZER_NAME_LION: OptimizerName
OPTIMIZER_NAME_MUON: OptimizerName
LR_SCHEDULE_UNSPECIFIED: LrSchedule
LR_SCHEDULE_CONSTANT: LrSchedule
LR_SCHEDULE_COSINE: LrSchedule
LR_SCHEDULE_LINEAR: LrSchedule
DISTRIBUTED_BACKEND_UNSPECIFIED: DistributedBackend
DISTRIBUTED_BACKEND_RING: DistributedBackend
DISTRIBUTED_BACKEND_MPI: DistributedBackend
DISTRIBUTED_BACKEND_NCCL: DistributedBackend
DISTRIBUTED_BACKEND_JACCL: DistributedBackend
CHECKPOINT_KIND_UNSPECIFIED: CheckpointKind
CHECKPOINT_KIND_ADAPTER: CheckpointKind
CHECKPOINT_KIND_FULL: CheckpointKind
JOB_VIEW_UNSPECIFIED: JobView
JOB_VIEW_BASIC: JobView
JOB_VIEW_FULL: JobView

class ModelRef(_message.Message):
    __slots__ = ("model", "adapter_path")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_PATH_FIELD_NUMBER: _ClassVar[int]
    model: str
    adapter_path: str
    def __init__(self, model: _Optional[str] = ..., adapter_path: _Optional[str] = ...) -> None: ...

class RemoteBackend(_message.Message):
    __slots__ = ("kind", "address", "model", "api_key_env", "tls", "tls_ca", "timeout_seconds", "retry_deadline_seconds")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ENV_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    TLS_CA_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RETRY_DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    address: str
    model: str
    api_key_env: str
    tls: bool
    tls_ca: str
    timeout_seconds: float
    retry_deadline_seconds: float
    def __init__(self, kind: _Optional[str] = ..., address: _Optional[str] = ..., model: _Optional[str] = ..., api_key_env: _Optional[str] = ..., tls: _Optional[bool] = ..., tls_ca: _Optional[str] = ..., timeout_seconds: _Optional[float] = ..., retry_deadline_seconds: _Optional[float] = ...) -> None: ...

class DatasetRef(_message.Message):
    __slots__ = ("path", "format", "valid_path", "valid_fraction")
    PATH_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    VALID_PATH_FIELD_NUMBER: _ClassVar[int]
    VALID_FRACTION_FIELD_NUMBER: _ClassVar[int]
    path: str
    format: DatasetFormat
    valid_path: str
    valid_fraction: float
    def __init__(self, path: _Optional[str] = ..., format: _Optional[_Union[DatasetFormat, str]] = ..., valid_path: _Optional[str] = ..., valid_fraction: _Optional[float] = ...) -> None: ...

class LoraConfig(_message.Message):
    __slots__ = ("rank", "scale", "dropout", "num_layers", "keys", "alpha")
    RANK_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    rank: int
    scale: float
    dropout: float
    num_layers: int
    keys: _containers.RepeatedScalarFieldContainer[str]
    alpha: float
    def __init__(self, rank: _Optional[int] = ..., scale: _Optional[float] = ..., dropout: _Optional[float] = ..., num_layers: _Optional[int] = ..., keys: _Optional[_Iterable[str]] = ..., alpha: _Optional[float] = ...) -> None: ...

class QuantizationConfig(_message.Message):
    __slots__ = ("bits", "group_size")
    BITS_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    bits: int
    group_size: int
    def __init__(self, bits: _Optional[int] = ..., group_size: _Optional[int] = ...) -> None: ...

class OptimizerConfig(_message.Message):
    __slots__ = ("name", "learning_rate", "weight_decay", "beta1", "beta2", "eps", "momentum", "schedule", "warmup_steps", "min_lr_ratio", "grad_clip_norm", "bias_correction")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    MIN_LR_RATIO_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    BIAS_CORRECTION_FIELD_NUMBER: _ClassVar[int]
    name: OptimizerName
    learning_rate: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    momentum: float
    schedule: LrSchedule
    warmup_steps: int
    min_lr_ratio: float
    grad_clip_norm: float
    bias_correction: bool
    def __init__(self, name: _Optional[_Union[OptimizerName, str]] = ..., learning_rate: _Optional[float] = ..., weight_decay: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., momentum: _Optional[float] = ..., schedule: _Optional[_Union[LrSchedule, str]] = ..., warmup_steps: _Optional[int] = ..., min_lr_ratio: _Optional[float] = ..., grad_clip_norm: _Optional[float] = ..., bias_correction: _Optional[bool] = ...) -> None: ...

class LoopConfig(_message.Message):
    __slots__ = ("batch_size", "grad_accumulation_steps", "max_steps", "epochs", "max_seq_length", "seed", "steps_per_report", "steps_per_eval", "val_batches", "steps_per_checkpoint", "keep_last_checkpoints", "grad_checkpoint", "mask_prompt", "dtype")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRAD_ACCUMULATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_REPORT_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_EVAL_FIELD_NUMBER: _ClassVar[int]
    VAL_BATCHES_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    KEEP_LAST_CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    GRAD_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    MASK_PROMPT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    grad_accumulation_steps: int
    max_steps: int
    epochs: int
    max_seq_length: int
    seed: int
    steps_per_report: int
    steps_per_eval: int
    val_batches: int
    steps_per_checkpoint: int
    keep_last_checkpoints: int
    grad_checkpoint: bool
    mask_prompt: bool
    dtype: str
    def __init__(self, batch_size: _Optional[int] = ..., grad_accumulation_steps: _Optional[int] = ..., max_steps: _Optional[int] = ..., epochs: _Optional[int] = ..., max_seq_length: _Optional[int] = ..., seed: _Optional[int] = ..., steps_per_report: _Optional[int] = ..., steps_per_eval: _Optional[int] = ..., val_batches: _Optional[int] = ..., steps_per_checkpoint: _Optional[int] = ..., keep_last_checkpoints: _Optional[int] = ..., grad_checkpoint: _Optional[bool] = ..., mask_prompt: _Optional[bool] = ..., dtype: _Optional[str] = ...) -> None: ...

class Resources(_message.Message):
    __slots__ = ("num_processes", "hosts", "hostfile", "backend")
    NUM_PROCESSES_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    HOSTFILE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    num_processes: int
    hosts: _containers.RepeatedScalarFieldContainer[str]
    hostfile: str
    backend: DistributedBackend
    def __init__(self, num_processes: _Optional[int] = ..., hosts: _Optional[_Iterable[str]] = ..., hostfile: _Optional[str] = ..., backend: _Optional[_Union[DistributedBackend, str]] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("path", "kind", "step", "base_model", "sha256", "job_id", "metrics", "create_time")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PATH_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    path: str
    kind: CheckpointKind
    step: int
    base_model: str
    sha256: str
    job_id: str
    metrics: _containers.ScalarMap[str, float]
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, path: _Optional[str] = ..., kind: _Optional[_Union[CheckpointKind, str]] = ..., step: _Optional[int] = ..., base_model: _Optional[str] = ..., sha256: _Optional[str] = ..., job_id: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "kind", "state", "request_id", "create_time", "start_time", "end_time", "step", "total_steps", "metrics", "latest_checkpoint", "result", "error", "resolved_config", "attempts", "output_dir", "labels", "eta_seconds")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    LATEST_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_CONFIG_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIR_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    kind: str
    state: JobState
    request_id: str
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    step: int
    total_steps: int
    metrics: _containers.ScalarMap[str, float]
    latest_checkpoint: Checkpoint
    result: Checkpoint
    error: str
    resolved_config: _struct_pb2.Struct
    attempts: int
    output_dir: str
    labels: _containers.ScalarMap[str, str]
    eta_seconds: float
    def __init__(self, job_id: _Optional[str] = ..., kind: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., request_id: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., latest_checkpoint: _Optional[_Union[Checkpoint, _Mapping]] = ..., result: _Optional[_Union[Checkpoint, _Mapping]] = ..., error: _Optional[str] = ..., resolved_config: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., attempts: _Optional[int] = ..., output_dir: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., eta_seconds: _Optional[float] = ...) -> None: ...

class StateChange(_message.Message):
    __slots__ = ("from_state", "to_state", "reason")
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    from_state: JobState
    to_state: JobState
    reason: str
    def __init__(self, from_state: _Optional[_Union[JobState, str]] = ..., to_state: _Optional[_Union[JobState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total_steps", "epoch", "tokens", "eta_seconds", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    epoch: float
    tokens: int
    eta_seconds: float
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., epoch: _Optional[float] = ..., tokens: _Optional[int] = ..., eta_seconds: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class LogMessage(_message.Message):
    __slots__ = ("level", "text")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    level: str
    text: str
    def __init__(self, level: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "seq", "time", "state_change", "progress", "checkpoint", "log")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    seq: int
    time: _timestamp_pb2.Timestamp
    state_change: StateChange
    progress: Progress
    checkpoint: Checkpoint
    log: LogMessage
    def __init__(self, job_id: _Optional[str] = ..., seq: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state_change: _Optional[_Union[StateChange, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., checkpoint: _Optional[_Union[Checkpoint, _Mapping]] = ..., log: _Optional[_Union[LogMessage, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "states", "kind")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    states: _containers.RepeatedScalarFieldContainer[JobState]
    kind: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., states: _Optional[_Iterable[_Union[JobState, str]]] = ..., kind: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "after_seq", "view")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_seq: int
    view: JobView
    def __init__(self, job_id: _Optional[str] = ..., after_seq: _Optional[int] = ..., view: _Optional[_Union[JobView, str]] = ...) -> None: ...

class WatchJobResponse(_message.Message):
    __slots__ = ("event", "job")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    event: JobEvent
    job: Job
    def __init__(self, event: _Optional[_Union[JobEvent, _Mapping]] = ..., job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...
