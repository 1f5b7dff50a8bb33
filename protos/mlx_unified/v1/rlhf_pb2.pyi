from mlx_unified.v1 import common_pb2 as _common_pb2
from mlx_unified.v1 import generation_pb2 as _generation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DPOLoss(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DPO_LOSS_UNSPECIFIED: _ClassVar[DPOLoss]
    DPO_LOSS_SIGMOID: _ClassVar[DPOLoss]
    DPO_LOSS_IPO: _ClassVar[DPOLoss]
    DPO_LOSS_HINGE: _ClassVar[DPOLoss]
    DPO_LOSS_ROBUST: _ClassVar[DPOLoss]

class GRPOLossType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GRPO_LOSS_TYPE_UNSPECIFIED: _ClassVar[GRPOLossType]
    GRPO_LOSS_TYPE_DAPO: _ClassVar[GRPOLossType]
    GRPO_LOSS_TYPE_GRPO: _ClassVar[GRPOLossType]
    GRPO_LOSS_TYPE_BNPO: _ClassVar[GRPOLossType]
    GRPO_LOSS_TYPE_DR_GRPO: _ClassVar[GRPOLossType]

class RewardScaling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REWARD_SCALING_UNSPECIFIED: _ClassVar[RewardScaling]
    REWARD_SCALING_GROUP: _ClassVar[RewardScaling]
    REWARD_SCALING_BATCH: _ClassVar[RewardScaling]
    REWARD_SCALING_NONE: _ClassVar[RewardScaling]

class KTOLoss(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KTO_LOSS_UNSPECIFIED: _ClassVar[KTOLoss]
    KTO_LOSS_KTO: _ClassVar[KTOLoss]
    KTO_LOSS_APO_ZERO_UNPAIRED: _ClassVar[KTOLoss]
DPO_LOSS_UNSPECIFIED: DPOLoss
DPO_LOSS_SIGMOID: DPOLoss
DPO_LOSS_IPO: DPOLoss
DPO_LOSS_HINGE: DPOLoss
DPO_LOSS_ROBUST: DPOLoss
GRPO_LOSS_TYPE_UNSPECIFIED: GRPOLossType
GRPO_LOSS_TYPE_DAPO: GRPOLossType
GRPO_LOSS_TYPE_GRPO: GRPOLossType
GRPO_LOSS_TYPE_BNPO: GRPOLossType
GRPO_LOSS_TYPE_DR_GRPO: GRPOLossType
REWARD_SCALING_UNSPECIFIED: RewardScaling
REWARD_SCALING_GROUP: RewardScaling
REWARD_SCALING_BATCH: RewardScaling
REWARD_SCALING_NONE: RewardScaling
KTO_LOSS_UNSPECIFIED: KTOLoss
KTO_LOSS_KTO: KTOLoss
KTO_LOSS_APO_ZERO_UNPAIRED: KTOLoss

class RewardModelSpec(_message.Message):
    __slots__ = ("model", "dataset", "method", "lora", "optimizer", "loop", "resources", "use_margin", "center_rewards_coef", "output_name", "labels")
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
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LOOP_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    USE_MARGIN_FIELD_NUMBER: _ClassVar[int]
    CENTER_REWARDS_COEF_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    dataset: _common_pb2.DatasetRef
    method: _common_pb2.FinetuneMethod
    lora: _common_pb2.LoraConfig
    optimizer: _common_pb2.OptimizerConfig
    loop: _common_pb2.LoopConfig
    resources: _common_pb2.Resources
    use_margin: bool
    center_rewards_coef: float
    output_name: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., dataset: _Optional[_Union[_common_pb2.DatasetRef, _Mapping]] = ..., method: _Optional[_Union[_common_pb2.FinetuneMethod, str]] = ..., lora: _Optional[_Union[_common_pb2.LoraConfig, _Mapping]] = ..., optimizer: _Optional[_Union[_common_pb2.OptimizerConfig, _Mapping]] = ..., loop: _Optional[_Union[_common_pb2.LoopConfig, _Mapping]] = ..., resources: _Optional[_Union[_common_pb2.Resources, _Mapping]] = ..., use_margin: _Optional[bool] = ..., center_rewards_coef: _Optional[float] = ..., output_name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StartRewardModelRequest(_message.Message):
    __slots__ = ("request_id", "spec", "validate_only")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    spec: RewardModelSpec
    validate_only: bool
    def __init__(self, request_id: _Optional[str] = ..., spec: _Optional[_Union[RewardModelSpec, _Mapping]] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class StartRewardModelResponse(_message.Message):
    __slots__ = ("job", "created")
    JOB_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    job: _common_pb2.Job
    created: bool
    def __init__(self, job: _Optional[_Union[_common_pb2.Job, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class DPOSpec(_message.Message):
    __slots__ = ("policy", "reference", "dataset", "method", "lora", "optimizer", "loop", "resources", "loss", "beta", "label_smoothing", "precompute_reference", "output_name", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LOOP_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    LABEL_SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    PRECOMPUTE_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    policy: _common_pb2.ModelRef
    reference: _common_pb2.ModelRef
    dataset: _common_pb2.DatasetRef
    method: _common_pb2.FinetuneMethod
    lora: _common_pb2.LoraConfig
    optimizer: _common_pb2.OptimizerConfig
    loop: _common_pb2.LoopConfig
    resources: _common_pb2.Resources
    loss: DPOLoss
    beta: float
    label_smoothing: float
    precompute_reference: bool
    output_name: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, policy: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., reference: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., dataset: _Optional[_Union[_common_pb2.DatasetRef, _Mapping]] = ..., method: _Optional[_Union[_common_pb2.FinetuneMethod, str]] = ..., lora: _Optional[_Union[_common_pb2.LoraConfig, _Mapping]] = ..., optimizer: _Optional[_Union[_common_pb2.OptimizerConfig, _Mapping]] = ..., loop: _Optional[_Union[_common_pb2.LoopConfig, _Mapping]] = ..., resources: _Optional[_Union[_common_pb2.Resources, _Mapping]] = ..., loss: _Optional[_Union[DPOLoss, str]] = ..., beta: _Optional[float] = ..., label_smoothing: _Optional[float] = ..., precompute_reference: _Optional[bool] = ..., output_name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StartDPORequest(_message.Message):
    __slots__ = ("request_id", "spec", "validate_only")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    spec: DPOSpec
    validate_only: bool
    def __init__(self, request_id: _Optional[str] = ..., spec: _Optional[_Union[DPOSpec, _Mapping]] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class StartDPOResponse(_message.Message):
    __slots__ = ("job", "created")
    JOB_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    job: _common_pb2.Job
    created: bool
    def __init__(self, job: _Optional[_Union[_common_pb2.Job, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class RewardSource(_message.Message):
    __slots__ = ("reward_model", "reward_function")
    REWARD_MODEL_FIELD_NUMBER: _ClassVar[int]
    REWARD_FUNCTION_FIELD_NUMBER: _ClassVar[int]
    reward_model: _common_pb2.ModelRef
    reward_function: str
    def __init__(self, reward_model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., reward_function: _Optional[str] = ...) -> None: ...

class RolloutConfig(_message.Message):
    __slots__ = ("batch_size", "sampling", "endpoint", "remote", "sync_every", "max_staleness")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    REMOTE_FIELD_NUMBER: _ClassVar[int]
    SYNC_EVERY_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    sampling: _generation_pb2.SamplingParams
    endpoint: str
    remote: _common_pb2.RemoteBackend
    sync_every: int
    max_staleness: int
    def __init__(self, batch_size: _Optional[int] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., endpoint: _Optional[str] = ..., remote: _Optional[_Union[_common_pb2.RemoteBackend, _Mapping]] = ..., sync_every: _Optional[int] = ..., max_staleness: _Optional[int] = ...) -> None: ...

class PPOSpec(_message.Message):
    __slots__ = ("policy", "reference", "dataset", "reward", "method", "lora", "optimizer", "loop", "resources", "rollout", "ppo_epochs", "minibatch_size", "gamma", "lam", "clip_range", "clip_range_value", "vf_coef", "init_kl_coef", "adaptive_kl", "kl_target", "kl_horizon", "whiten_advantages", "output_name", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LOOP_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    PPO_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    MINIBATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    LAM_FIELD_NUMBER: _ClassVar[int]
    CLIP_RANGE_FIELD_NUMBER: _ClassVar[int]
    CLIP_RANGE_VALUE_FIELD_NUMBER: _ClassVar[int]
    VF_COEF_FIELD_NUMBER: _ClassVar[int]
    INIT_KL_COEF_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_KL_FIELD_NUMBER: _ClassVar[int]
    KL_TARGET_FIELD_NUMBER: _ClassVar[int]
    KL_HORIZON_FIELD_NUMBER: _ClassVar[int]
    WHITEN_ADVANTAGES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    policy: _common_pb2.ModelRef
    reference: _common_pb2.ModelRef
    dataset: _common_pb2.DatasetRef
    reward: RewardSource
    method: _common_pb2.FinetuneMethod
    lora: _common_pb2.LoraConfig
    optimizer: _common_pb2.OptimizerConfig
    loop: _common_pb2.LoopConfig
    resources: _common_pb2.Resources
    rollout: RolloutConfig
    ppo_epochs: int
    minibatch_size: int
    gamma: float
    lam: float
    clip_range: float
    clip_range_value: float
    vf_coef: float
    init_kl_coef: float
    adaptive_kl: bool
    kl_target: float
    kl_horizon: float
    whiten_advantages: bool
    output_name: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, policy: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., reference: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., dataset: _Optional[_Union[_common_pb2.DatasetRef, _Mapping]] = ..., reward: _Optional[_Union[RewardSource, _Mapping]] = ..., method: _Optional[_Union[_common_pb2.FinetuneMethod, str]] = ..., lora: _Optional[_Union[_common_pb2.LoraConfig, _Mapping]] = ..., optimizer: _Optional[_Union[_common_pb2.OptimizerConfig, _Mapping]] = ..., loop: _Optional[_Union[_common_pb2.LoopConfig, _Mapping]] = ..., resources: _Optional[_Union[_common_pb2.Resources, _Mapping]] = ..., rollout: _Optional[_Union[RolloutConfig, _Mapping]] = ..., ppo_epochs: _Optional[int] = ..., minibatch_size: _Optional[int] = ..., gamma: _Optional[float] = ..., lam: _Optional[float] = ..., clip_range: _Optional[float] = ..., clip_range_value: _Optional[float] = ..., vf_coef: _Optional[float] = ..., init_kl_coef: _Optional[float] = ..., adaptive_kl: _Optional[bool] = ..., kl_target: _Optional[float] = ..., kl_horizon: _Optional[float] = ..., whiten_advantages: _Optional[bool] = ..., output_name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StartPPORequest(_message.Message):
    __slots__ = ("request_id", "spec", "validate_only")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    spec: PPOSpec
    validate_only: bool
    def __init__(self, request_id: _Optional[str] = ..., spec: _Optional[_Union[PPOSpec, _Mapping]] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class StartPPOResponse(_message.Message):
    __slots__ = ("job", "created")
    JOB_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    job: _common_pb2.Job
    created: bool
    def __init__(self, job: _Optional[_Union[_common_pb2.Job, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GRPOSpec(_message.Message):
    __slots__ = ("policy", "reference", "dataset", "reward", "method", "lora", "optimizer", "loop", "resources", "rollout", "group_size", "beta", "clip_range", "output_name", "labels", "loss_type", "scale_rewards", "num_iterations")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LOOP_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    CLIP_RANGE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LOSS_TYPE_FIELD_NUMBER: _ClassVar[int]
    SCALE_REWARDS_FIELD_NUMBER: _ClassVar[int]
    NUM_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    policy: _common_pb2.ModelRef
    reference: _common_pb2.ModelRef
    dataset: _common_pb2.DatasetRef
    reward: RewardSource
    method: _common_pb2.FinetuneMethod
    lora: _common_pb2.LoraConfig
    optimizer: _common_pb2.OptimizerConfig
    loop: _common_pb2.LoopConfig
    resources: _common_pb2.Resources
    rollout: RolloutConfig
    group_size: int
    beta: float
    clip_range: float
    output_name: str
    labels: _containers.ScalarMap[str, str]
    loss_type: GRPOLossType
    scale_rewards: RewardScaling
    num_iterations: int
    def __init__(self, policy: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., reference: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., dataset: _Optional[_Union[_common_pb2.DatasetRef, _Mapping]] = ..., reward: _Optional[_Union[RewardSource, _Mapping]] = ..., method: _Optional[_Union[_common_pb2.FinetuneMethod, str]] = ..., lora: _Optional[_Union[_common_pb2.LoraConfig, _Mapping]] = ..., optimizer: _Optional[_Union[_common_pb2.OptimizerConfig, _Mapping]] = ..., loop: _Optional[_Union[_common_pb2.LoopConfig, _Mapping]] = ..., resources: _Optional[_Union[_common_pb2.Resources, _Mapping]] = ..., rollout: _Optional[_Union[RolloutConfig, _Mapping]] = ..., group_size: _Optional[int] = ..., beta: _Optional[float] = ..., clip_range: _Optional[float] = ..., output_name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., loss_type: _Optional[_Union[GRPOLossType, str]] = ..., scale_rewards: _Optional[_Union[RewardScaling, str]] = ..., num_iterations: _Optional[int] = ...) -> None: ...

class StartGRPORequest(_message.Message):
    __slots__ = ("request_id", "spec", "validate_only")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    spec: GRPOSpec
    validate_only: bool
    def __init__(self, request_id: _Optional[str] = ..., spec: _Optional[_Union[GRPOSpec, _Mapping]] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class StartGRPOResponse(_message.Message):
    __slots__ = ("job", "created")
    JOB_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    job: _common_pb2.Job
    created: bool
    def __init__(self, job: _Optional[_Union[_common_pb2.Job, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class KTOSpec(_message.Message):
    __slots__ = ("policy", "reference", "dataset", "method", "lora", "optimizer", "loop", "resources", "loss_type", "beta", "desirable_weight", "undesirable_weight", "precompute_reference", "output_name", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LOOP_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    LOSS_TYPE_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    DESIRABLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    UNDESIRABLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PRECOMPUTE_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    policy: _common_pb2.ModelRef
    reference: _common_pb2.ModelRef
    dataset: _common_pb2.DatasetRef
    method: _common_pb2.FinetuneMethod
    lora: _common_pb2.LoraConfig
    optimizer: _common_pb2.OptimizerConfig
    loop: _common_pb2.LoopConfig
    resources: _common_pb2.Resources
    loss_type: KTOLoss
    beta: float
    desirable_weight: float
    undesirable_weight: float
    precompute_reference: bool
    output_name: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, policy: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., reference: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., dataset: _Optional[_Union[_common_pb2.DatasetRef, _Mapping]] = ..., method: _Optional[_Union[_common_pb2.FinetuneMethod, str]] = ..., lora: _Optional[_Union[_common_pb2.LoraConfig, _Mapping]] = ..., optimizer: _Optional[_Union[_common_pb2.OptimizerConfig, _Mapping]] = ..., loop: _Optional[_Union[_common_pb2.LoopConfig, _Mapping]] = ..., resources: _Optional[_Union[_common_pb2.Resources, _Mapping]] = ..., loss_type: _Optional[_Union[KTOLoss, str]] = ..., beta: _Optional[float] = ..., desirable_weight: _Optional[float] = ..., undesirable_weight: _Optional[float] = ..., precompute_reference: _Optional[bool] = ..., output_name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StartKTORequest(_message.Message):
    __slots__ = ("request_id", "spec", "validate_only")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    spec: KTOSpec
    validate_only: bool
    def __init__(self, request_id: _Optional[str] = ..., spec: _Optional[_Union[KTOSpec, _Mapping]] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class StartKTOResponse(_message.Message):
    __slots__ = ("job", "created")
    JOB_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    job: _common_pb2.Job
    created: bool
    def __init__(self, job: _Optional[_Union[_common_pb2.Job, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class ORPOSpec(_message.Message):
    __slots__ = ("policy", "dataset", "method", "lora", "optimizer", "loop", "resources", "beta", "output_name", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    POLICY_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LOOP_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    policy: _common_pb2.ModelRef
    dataset: _common_pb2.DatasetRef
    method: _common_pb2.FinetuneMethod
    lora: _common_pb2.LoraConfig
    optimizer: _common_pb2.OptimizerConfig
    loop: _common_pb2.LoopConfig
    resources: _common_pb2.Resources
    beta: float
    output_name: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, policy: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., dataset: _Optional[_Union[_common_pb2.DatasetRef, _Mapping]] = ..., method: _Optional[_Union[_common_pb2.FinetuneMethod, str]] = ..., lora: _Optional[_Union[_common_pb2.LoraConfig, _Mapping]] = ..., optimizer: _Optional[_Union[_common_pb2.OptimizerConfig, _Mapping]] = ..., loop: _Optional[_Union[_common_pb2.LoopConfig, _Mapping]] = ..., resources: _Optional[_Union[_common_pb2.Resources, _Mapping]] = ..., beta: _Optional[float] = ..., output_name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StartORPORequest(_message.Message):
    __slots__ = ("request_id", "spec", "validate_only")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    spec: ORPOSpec
    validate_only: bool
    def __init__(self, request_id: _Optional[str] = ..., spec: _Optional[_Union[ORPOSpec, _Mapping]] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class StartORPOResponse(_message.Message):
    __slots__ = ("job", "created")
    JOB_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    job: _common_pb2.Job
    created: bool
    def __init__(self, job: _Optional[_Union[_common_pb2.Job, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("reward_model", "items")
    REWARD_MODEL_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    reward_model: _common_pb2.ModelRef
    items: _containers.RepeatedCompositeFieldContainer[_generation_pb2.PromptCompletion]
    def __init__(self, reward_model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., items: _Optional[_Iterable[_Union[_generation_pb2.PromptCompletion, _Mapping]]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores",)
    SCORES_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, scores: _Optional[_Iterable[float]] = ...) -> None: ...
