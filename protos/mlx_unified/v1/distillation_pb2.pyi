from mlx_unified.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Divergence(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIVERGENCE_UNSPECIFIED: _ClassVar[Divergence]
    DIVERGENCE_FORWARD_KL: _ClassVar[Divergence]
    DIVERGENCE_REVERSE_KL: _ClassVar[Divergence]
    DIVERGENCE_JSD: _ClassVar[Divergence]
    DIVERGENCE_TOTAL_VARIATION: _ClassVar[Divergence]

class TemperatureMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TEMPERATURE_MODE_UNSPECIFIED: _ClassVar[TemperatureMode]
    TEMPERATURE_MODE_FIXED: _ClassVar[TemperatureMode]
    TEMPERATURE_MODE_ANNEALED: _ClassVar[TemperatureMode]
    TEMPERATURE_MODE_ADAPTIVE: _ClassVar[TemperatureMode]

class FeatureLoss(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEATURE_LOSS_UNSPECIFIED: _ClassVar[FeatureLoss]
    FEATURE_LOSS_MSE: _ClassVar[FeatureLoss]
    FEATURE_LOSS_COSINE: _ClassVar[FeatureLoss]
DIVERGENCE_UNSPECIFIED: Divergence
DIVERGENCE_FORWARD_KL: Divergence
DIVERGENCE_REVERSE_KL: Divergence
DIVERGENCE_JSD: Divergence
DIVERGENCE_TOTAL_VARIATION: Divergence
TEMPERATURE_MODE_UNSPECIFIED: TemperatureMode
TEMPERATURE_MODE_FIXED: TemperatureMode
TEMPERATURE_MODE_ANNEALED: TemperatureMode
TEMPERATURE_MODE_ADAPTIVE: TemperatureMode
FEATURE_LOSS_UNSPECIFIED: FeatureLoss
FEATURE_LOSS_MSE: FeatureLoss
FEATURE_LOSS_COSINE: FeatureLoss

class TemperatureConfig(_message.Message):
    __slots__ = ("mode", "initial", "final", "min")
    MODE_FIELD_NUMBER: _ClassVar[int]
    INITIAL_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    mode: TemperatureMode
    initial: float
    final: float
    min: float
    def __init__(self, mode: _Optional[_Union[TemperatureMode, str]] = ..., initial: _Optional[float] = ..., final: _Optional[float] = ..., min: _Optional[float] = ...) -> None: ...

class Teacher(_message.Message):
    __slots__ = ("model", "weight", "route_value", "quantize_bits", "endpoint", "remote")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ROUTE_VALUE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_BITS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    REMOTE_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    weight: float
    route_value: str
    quantize_bits: int
    endpoint: str
    remote: _common_pb2.RemoteBackend
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., weight: _Optional[float] = ..., route_value: _Optional[str] = ..., quantize_bits: _Optional[int] = ..., endpoint: _Optional[str] = ..., remote: _Optional[_Union[_common_pb2.RemoteBackend, _Mapping]] = ...) -> None: ...

class LayerPair(_message.Message):
    __slots__ = ("student_layer", "teacher_layer")
    STUDENT_LAYER_FIELD_NUMBER: _ClassVar[int]
    TEACHER_LAYER_FIELD_NUMBER: _ClassVar[int]
    student_layer: int
    teacher_layer: int
    def __init__(self, student_layer: _Optional[int] = ..., teacher_layer: _Optional[int] = ...) -> None: ...

class FeatureDistillation(_message.Message):
    __slots__ = ("enabled", "layer_map", "uniform", "loss", "weight")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    LAYER_MAP_FIELD_NUMBER: _ClassVar[int]
    UNIFORM_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    layer_map: _containers.RepeatedCompositeFieldContainer[LayerPair]
    uniform: bool
    loss: FeatureLoss
    weight: float
    def __init__(self, enabled: _Optional[bool] = ..., layer_map: _Optional[_Iterable[_Union[LayerPair, _Mapping]]] = ..., uniform: _Optional[bool] = ..., loss: _Optional[_Union[FeatureLoss, str]] = ..., weight: _Optional[float] = ...) -> None: ...

class OnPolicyConfig(_message.Message):
    __slots__ = ("fraction", "max_new_tokens", "temperature")
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    fraction: float
    max_new_tokens: int
    temperature: float
    def __init__(self, fraction: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ...) -> None: ...

class TeacherCacheConfig(_message.Message):
    __slots__ = ("enabled", "top_k")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    top_k: int
    def __init__(self, enabled: _Optional[bool] = ..., top_k: _Optional[int] = ...) -> None: ...

class StudentInit(_message.Message):
    __slots__ = ("keep_teacher_layers", "num_layers")
    KEEP_TEACHER_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    keep_teacher_layers: _containers.RepeatedScalarFieldContainer[int]
    num_layers: int
    def __init__(self, keep_teacher_layers: _Optional[_Iterable[int]] = ..., num_layers: _Optional[int] = ...) -> None: ...

class DistillationSpec(_message.Message):
    __slots__ = ("student", "teachers", "route_field", "dataset", "method", "lora", "optimizer", "loop", "resources", "divergence", "alpha", "jsd_beta", "temperature", "features", "on_policy", "teacher_cache", "student_init", "output_name", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STUDENT_FIELD_NUMBER: _ClassVar[int]
    TEACHERS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LOOP_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    DIVERGENCE_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    JSD_BETA_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    ON_POLICY_FIELD_NUMBER: _ClassVar[int]
    TEACHER_CACHE_FIELD_NUMBER: _ClassVar[int]
    STUDENT_INIT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    student: _common_pb2.ModelRef
    teachers: _containers.RepeatedCompositeFieldContainer[Teacher]
    route_field: str
    dataset: _common_pb2.DatasetRef
    method: _common_pb2.FinetuneMethod
    lora: _common_pb2.LoraConfig
    optimizer: _common_pb2.OptimizerConfig
    loop: _common_pb2.LoopConfig
    resources: _common_pb2.Resources
    divergence: Divergence
    alpha: float
    jsd_beta: float
    temperature: TemperatureConfig
    features: FeatureDistillation
    on_policy: OnPolicyConfig
    teacher_cache: TeacherCacheConfig
    student_init: StudentInit
    output_name: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, student: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., teachers: _Optional[_Iterable[_Union[Teacher, _Mapping]]] = ..., route_field: _Optional[str] = ..., dataset: _Optional[_Union[_common_pb2.DatasetRef, _Mapping]] = ..., method: _Optional[_Union[_common_pb2.FinetuneMethod, str]] = ..., lora: _Optional[_Union[_common_pb2.LoraConfig, _Mapping]] = ..., optimizer: _Optional[_Union[_common_pb2.OptimizerConfig, _Mapping]] = ..., loop: _Optional[_Union[_common_pb2.LoopConfig, _Mapping]] = ..., resources: _Optional[_Union[_common_pb2.Resources, _Mapping]] = ..., divergence: _Optional[_Union[Divergence, str]] = ..., alpha: _Optional[float] = ..., jsd_beta: _Optional[float] = ..., temperature: _Optional[_Union[TemperatureConfig, _Mapping]] = ..., features: _Optional[_Union[FeatureDistillation, _Mapping]] = ..., on_policy: _Optional[_Union[OnPolicyConfig, _Mapping]] = ..., teacher_cache: _Optional[_Union[TeacherCacheConfig, _Mapping]] = ..., student_init: _Optional[_Union[StudentInit, _Mapping]] = ..., output_name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StartDistillationRequest(_message.Message):
    __slots__ = ("request_id", "spec", "validate_only")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    spec: DistillationSpec
    validate_only: bool
    def __init__(self, request_id: _Optional[str] = ..., spec: _Optional[_Union[DistillationSpec, _Mapping]] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class StartDistillationResponse(_message.Message):
    __slots__ = ("job", "created")
    JOB_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    job: _common_pb2.Job
    created: bool
    def __init__(self, job: _Optional[_Union[_common_pb2.Job, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...
