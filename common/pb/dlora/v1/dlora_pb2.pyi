from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_UNSPECIFIED: _ClassVar[Codec]
    FLOAT32: _ClassVar[Codec]
    BFLOAT16: _ClassVar[Codec]
    FLOAT16: _ClassVar[Codec]
    INT8_BLOCKWISE: _ClassVar[Codec]
    UINT8: _ClassVar[Codec]

class LayerRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ABSENT: _ClassVar[LayerRole]
    FORWARD: _ClassVar[LayerRole]
    FORWARD_BACKWARD: _ClassVar[LayerRole]

class StepProtocol(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYERWISE: _ClassVar[StepProtocol]
    ADAPTER: _ClassVar[StepProtocol]
CODEC_UNSPECIFIED: Codec
FLOAT32: Codec
BFLOAT16: Codec
FLOAT16: Codec
INT8_BLOCKWISE: Codec
UINT8: Codec
ABSENT: LayerRole
FORWARD: LayerRole
FORWARD_BACKWARD: LayerRole
LAYERWISE: StepProtocol
ADAPTER: StepProtocol

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "codec", "scales", "block_size")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    codec: Codec
    scales: bytes
    block_size: int
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., codec: _Optional[_Union[Codec, str]] = ..., scales: _Optional[bytes] = ..., block_size: _Optional[int] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol", "model_fingerprint", "session_id", "targets", "codec_up", "codec_down", "block_size_down", "client_name", "warmup_epochs", "budget", "revive", "kill_threshold", "step_protocol", "lora_rank", "lora_alpha", "lora_dropout", "dropout_seed", "codec_weights", "edge_layers")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    CODEC_UP_FIELD_NUMBER: _ClassVar[int]
    CODEC_DOWN_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_DOWN_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    WARMUP_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    REVIVE_FIELD_NUMBER: _ClassVar[int]
    KILL_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    STEP_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    LORA_DROPOUT_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_SEED_FIELD_NUMBER: _ClassVar[int]
    CODEC_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    EDGE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    protocol: str
    model_fingerprint: str
    session_id: str
    targets: _containers.RepeatedScalarFieldContainer[str]
    codec_up: Codec
    codec_down: Codec
    block_size_down: int
    client_name: str
    warmup_epochs: int
    budget: int
    revive: int
    kill_threshold: float
    step_protocol: StepProtocol
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    dropout_seed: int
    codec_weights: Codec
    edge_layers: int
    def __init__(self, protocol: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., session_id: _Optional[str] = ..., targets: _Optional[_Iterable[str]] = ..., codec_up: _Optional[_Union[Codec, str]] = ..., codec_down: _Optional[_Union[Codec, str]] = ..., block_size_down: _Optional[int] = ..., client_name: _Optional[str] = ..., warmup_epochs: _Optional[int] = ..., budget: _Optional[int] = ..., revive: _Optional[int] = ..., kill_threshold: _Optional[float] = ..., step_protocol: _Optional[_Union[StepProtocol, str]] = ..., lora_rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., lora_dropout: _Optional[float] = ..., dropout_seed: _Optional[int] = ..., codec_weights: _Optional[_Union[Codec, str]] = ..., edge_layers: _Optional[int] = ...) -> None: ...

class StepWeights(_message.Message):
    __slots__ = ("step", "micro_batches", "train", "modules", "weights", "trained", "more")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    step: int
    micro_batches: int
    train: bool
    modules: _containers.RepeatedScalarFieldContainer[int]
    weights: Tensor
    trained: _containers.RepeatedScalarFieldContainer[int]
    more: bool
    def __init__(self, step: _Optional[int] = ..., micro_batches: _Optional[int] = ..., train: _Optional[bool] = ..., modules: _Optional[_Iterable[int]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., trained: _Optional[_Iterable[int]] = ..., more: _Optional[bool] = ...) -> None: ...

class StepBegin(_message.Message):
    __slots__ = ("step", "micro_batch", "embeddings", "attention_mask", "train", "layer_roles")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    LAYER_ROLES_FIELD_NUMBER: _ClassVar[int]
    step: int
    micro_batch: int
    embeddings: Tensor
    attention_mask: Tensor
    train: bool
    layer_roles: _containers.RepeatedScalarFieldContainer[LayerRole]
    def __init__(self, step: _Optional[int] = ..., micro_batch: _Optional[int] = ..., embeddings: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., train: _Optional[bool] = ..., layer_roles: _Optional[_Iterable[_Union[LayerRole, str]]] = ...) -> None: ...

class LoraDelta(_message.Message):
    __slots__ = ("step", "micro_batch", "layer", "group", "delta")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    step: int
    micro_batch: int
    layer: int
    group: int
    delta: Tensor
    def __init__(self, step: _Optional[int] = ..., micro_batch: _Optional[int] = ..., layer: _Optional[int] = ..., group: _Optional[int] = ..., delta: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class HiddenGrad(_message.Message):
    __slots__ = ("step", "micro_batch", "grad")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    step: int
    micro_batch: int
    grad: Tensor
    def __init__(self, step: _Optional[int] = ..., micro_batch: _Optional[int] = ..., grad: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class LoraGrad(_message.Message):
    __slots__ = ("step", "micro_batch", "layer", "group", "grad_input")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    GRAD_INPUT_FIELD_NUMBER: _ClassVar[int]
    step: int
    micro_batch: int
    layer: int
    group: int
    grad_input: Tensor
    def __init__(self, step: _Optional[int] = ..., micro_batch: _Optional[int] = ..., layer: _Optional[int] = ..., group: _Optional[int] = ..., grad_input: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class EpochReport(_message.Message):
    __slots__ = ("epoch", "layers", "deltas")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    layers: _containers.RepeatedScalarFieldContainer[int]
    deltas: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, epoch: _Optional[int] = ..., layers: _Optional[_Iterable[int]] = ..., deltas: _Optional[_Iterable[float]] = ...) -> None: ...

class EdgeMessage(_message.Message):
    __slots__ = ("hello", "step_begin", "lora_delta", "hidden_grad", "lora_grad", "epoch_report", "step_weights")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    STEP_BEGIN_FIELD_NUMBER: _ClassVar[int]
    LORA_DELTA_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_GRAD_FIELD_NUMBER: _ClassVar[int]
    LORA_GRAD_FIELD_NUMBER: _ClassVar[int]
    EPOCH_REPORT_FIELD_NUMBER: _ClassVar[int]
    STEP_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    step_begin: StepBegin
    lora_delta: LoraDelta
    hidden_grad: HiddenGrad
    lora_grad: LoraGrad
    epoch_report: EpochReport
    step_weights: StepWeights
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., step_begin: _Optional[_Union[StepBegin, _Mapping]] = ..., lora_delta: _Optional[_Union[LoraDelta, _Mapping]] = ..., hidden_grad: _Optional[_Union[HiddenGrad, _Mapping]] = ..., lora_grad: _Optional[_Union[LoraGrad, _Mapping]] = ..., epoch_report: _Optional[_Union[EpochReport, _Mapping]] = ..., step_weights: _Optional[_Union[StepWeights, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("session_id", "protocol", "num_layers", "model_type", "server_version", "step_protocol")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    protocol: str
    num_layers: int
    model_type: str
    server_version: str
    step_protocol: StepProtocol
    def __init__(self, session_id: _Optional[str] = ..., protocol: _Optional[str] = ..., num_layers: _Optional[int] = ..., model_type: _Optional[str] = ..., server_version: _Optional[str] = ..., step_protocol: _Optional[_Union[StepProtocol, str]] = ...) -> None: ...

class LoraForward(_message.Message):
    __slots__ = ("step", "micro_batch", "layer", "group", "x")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    step: int
    micro_batch: int
    layer: int
    group: int
    x: Tensor
    def __init__(self, step: _Optional[int] = ..., micro_batch: _Optional[int] = ..., layer: _Optional[int] = ..., group: _Optional[int] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Hidden(_message.Message):
    __slots__ = ("step", "micro_batch", "hidden")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    step: int
    micro_batch: int
    hidden: Tensor
    def __init__(self, step: _Optional[int] = ..., micro_batch: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class LoraBackward(_message.Message):
    __slots__ = ("step", "micro_batch", "layer", "group", "grad_output")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    step: int
    micro_batch: int
    layer: int
    group: int
    grad_output: Tensor
    def __init__(self, step: _Optional[int] = ..., micro_batch: _Optional[int] = ..., layer: _Optional[int] = ..., group: _Optional[int] = ..., grad_output: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class StepDone(_message.Message):
    __slots__ = ("step", "micro_batch", "cloud_seconds")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    CLOUD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    step: int
    micro_batch: int
    cloud_seconds: float
    def __init__(self, step: _Optional[int] = ..., micro_batch: _Optional[int] = ..., cloud_seconds: _Optional[float] = ...) -> None: ...

class StepError(_message.Message):
    __slots__ = ("step", "micro_batch", "code", "message")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    step: int
    micro_batch: int
    code: str
    message: str
    def __init__(self, step: _Optional[int] = ..., micro_batch: _Optional[int] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class InputGrad(_message.Message):
    __slots__ = ("step", "micro_batch", "grad")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    step: int
    micro_batch: int
    grad: Tensor
    def __init__(self, step: _Optional[int] = ..., micro_batch: _Optional[int] = ..., grad: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class LoraGrads(_message.Message):
    __slots__ = ("step", "modules", "grads")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    step: int
    modules: _containers.RepeatedScalarFieldContainer[int]
    grads: Tensor
    def __init__(self, step: _Optional[int] = ..., modules: _Optional[_Iterable[int]] = ..., grads: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class KRCommand(_message.Message):
    __slots__ = ("epoch", "active", "killed", "revived", "next_active")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    KILLED_FIELD_NUMBER: _ClassVar[int]
    REVIVED_FIELD_NUMBER: _ClassVar[int]
    NEXT_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    active: _containers.RepeatedScalarFieldContainer[int]
    killed: _containers.RepeatedScalarFieldContainer[int]
    revived: _containers.RepeatedScalarFieldContainer[int]
    next_active: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, epoch: _Optional[int] = ..., active: _Optional[_Iterable[int]] = ..., killed: _Optional[_Iterable[int]] = ..., revived: _Optional[_Iterable[int]] = ..., next_active: _Optional[_Iterable[int]] = ...) -> None: ...

class CloudMessage(_message.Message):
    __slots__ = ("welcome", "lora_forward", "hidden", "lora_backward", "step_done", "step_error", "kr_command", "lora_grads", "input_grad")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    LORA_FORWARD_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    LORA_BACKWARD_FIELD_NUMBER: _ClassVar[int]
    STEP_DONE_FIELD_NUMBER: _ClassVar[int]
    STEP_ERROR_FIELD_NUMBER: _ClassVar[int]
    KR_COMMAND_FIELD_NUMBER: _ClassVar[int]
    LORA_GRADS_FIELD_NUMBER: _ClassVar[int]
    INPUT_GRAD_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    lora_forward: LoraForward
    hidden: Hidden
    lora_backward: LoraBackward
    step_done: StepDone
    step_error: StepError
    kr_command: KRCommand
    lora_grads: LoraGrads
    input_grad: InputGrad
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., lora_forward: _Optional[_Union[LoraForward, _Mapping]] = ..., hidden: _Optional[_Union[Hidden, _Mapping]] = ..., lora_backward: _Optional[_Union[LoraBackward, _Mapping]] = ..., step_done: _Optional[_Union[StepDone, _Mapping]] = ..., step_error: _Optional[_Union[StepError, _Mapping]] = ..., kr_command: _Optional[_Union[KRCommand, _Mapping]] = ..., lora_grads: _Optional[_Union[LoraGrads, _Mapping]] = ..., input_grad: _Optional[_Union[InputGrad, _Mapping]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("status", "model_type", "model_fingerprint", "open_sessions")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    OPEN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    status: str
    model_type: str
    model_fingerprint: str
    open_sessions: int
    def __init__(self, status: _Optional[str] = ..., model_type: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., open_sessions: _Optional[int] = ...) -> None: ...
