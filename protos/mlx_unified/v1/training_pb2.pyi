from mlx_unified.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExportMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPORT_MODE_UNSPECIFIED: _ClassVar[ExportMode]
    EXPORT_MODE_FUSE: _ClassVar[ExportMode]
    EXPORT_MODE_QUANTIZE: _ClassVar[ExportMode]
    EXPORT_MODE_DEQUANTIZE: _ClassVar[ExportMode]
EXPORT_MODE_UNSPECIFIED: ExportMode
EXPORT_MODE_FUSE: ExportMode
EXPORT_MODE_QUANTIZE: ExportMode
EXPORT_MODE_DEQUANTIZE: ExportMode

class SFTSpec(_message.Message):
    __slots__ = ("model", "dataset", "method", "lora", "quantization", "optimizer", "loop", "resources", "output_name", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LOOP_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    dataset: _common_pb2.DatasetRef
    method: _common_pb2.FinetuneMethod
    lora: _common_pb2.LoraConfig
    quantization: _common_pb2.QuantizationConfig
    optimizer: _common_pb2.OptimizerConfig
    loop: _common_pb2.LoopConfig
    resources: _common_pb2.Resources
    output_name: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., dataset: _Optional[_Union[_common_pb2.DatasetRef, _Mapping]] = ..., method: _Optional[_Union[_common_pb2.FinetuneMethod, str]] = ..., lora: _Optional[_Union[_common_pb2.LoraConfig, _Mapping]] = ..., quantization: _Optional[_Union[_common_pb2.QuantizationConfig, _Mapping]] = ..., optimizer: _Optional[_Union[_common_pb2.OptimizerConfig, _Mapping]] = ..., loop: _Optional[_Union[_common_pb2.LoopConfig, _Mapping]] = ..., resources: _Optional[_Union[_common_pb2.Resources, _Mapping]] = ..., output_name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StartSFTRequest(_message.Message):
    __slots__ = ("request_id", "spec", "validate_only")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    spec: SFTSpec
    validate_only: bool
    def __init__(self, request_id: _Optional[str] = ..., spec: _Optional[_Union[SFTSpec, _Mapping]] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class StartSFTResponse(_message.Message):
    __slots__ = ("job", "created")
    JOB_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    job: _common_pb2.Job
    created: bool
    def __init__(self, job: _Optional[_Union[_common_pb2.Job, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class ExportSpec(_message.Message):
    __slots__ = ("model", "mode", "quantization", "output_name", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    mode: ExportMode
    quantization: _common_pb2.QuantizationConfig
    output_name: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., mode: _Optional[_Union[ExportMode, str]] = ..., quantization: _Optional[_Union[_common_pb2.QuantizationConfig, _Mapping]] = ..., output_name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StartExportRequest(_message.Message):
    __slots__ = ("request_id", "spec", "validate_only")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    spec: ExportSpec
    validate_only: bool
    def __init__(self, request_id: _Optional[str] = ..., spec: _Optional[_Union[ExportSpec, _Mapping]] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class StartExportResponse(_message.Message):
    __slots__ = ("job", "created")
    JOB_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    job: _common_pb2.Job
    created: bool
    def __init__(self, job: _Optional[_Union[_common_pb2.Job, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...
