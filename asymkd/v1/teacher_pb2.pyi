from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    PACKED_UINT: _ClassVar[DType]

class IdEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ID_ENCODING_UNSPECIFIED: _ClassVar[IdEncoding]
    INT32_IDS: _ClassVar[IdEncoding]
    PACKED_IDS: _ClassVar[IdEncoding]

class DataPlane(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_PLANE_UNSPECIFIED: _ClassVar[DataPlane]
    GRPC: _ClassVar[DataPlane]
    TORCH: _ClassVar[DataPlane]

class Signal(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIGNAL_UNSPECIFIED: _ClassVar[Signal]
    TOP_K: _ClassVar[Signal]
    TARGET_ONLY: _ClassVar[Signal]
    AT_IDS: _ClassVar[Signal]
    SAMPLED: _ClassVar[Signal]
    FULL: _ClassVar[Signal]
    HIDDEN: _ClassVar[Signal]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
INT32: DType
INT64: DType
UINT8: DType
PACKED_UINT: DType
ID_ENCODING_UNSPECIFIED: IdEncoding
INT32_IDS: IdEncoding
PACKED_IDS: IdEncoding
DATA_PLANE_UNSPECIFIED: DataPlane
GRPC: DataPlane
TORCH: DataPlane
SIGNAL_UNSPECIFIED: Signal
TOP_K: Signal
TARGET_ONLY: Signal
AT_IDS: Signal
SAMPLED: Signal
FULL: Signal
HIDDEN: Signal

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "bits", "offset")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    bits: int
    offset: int
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., bits: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class TokenSequence(_message.Message):
    __slots__ = ("token_ids", "score_from", "at_ids", "text")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FROM_FIELD_NUMBER: _ClassVar[int]
    AT_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    score_from: int
    at_ids: Tensor
    text: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., score_from: _Optional[int] = ..., at_ids: _Optional[_Union[Tensor, _Mapping]] = ..., text: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("request_id", "sequences", "signal", "top_k", "temperature", "value_dtype", "num_samples", "seed", "id_encoding", "data_plane_session")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    VALUE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ID_ENCODING_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_SESSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    sequences: _containers.RepeatedCompositeFieldContainer[TokenSequence]
    signal: Signal
    top_k: int
    temperature: float
    value_dtype: DType
    num_samples: int
    seed: int
    id_encoding: IdEncoding
    data_plane_session: str
    def __init__(self, request_id: _Optional[str] = ..., sequences: _Optional[_Iterable[_Union[TokenSequence, _Mapping]]] = ..., signal: _Optional[_Union[Signal, str]] = ..., top_k: _Optional[int] = ..., temperature: _Optional[float] = ..., value_dtype: _Optional[_Union[DType, str]] = ..., num_samples: _Optional[int] = ..., seed: _Optional[int] = ..., id_encoding: _Optional[_Union[IdEncoding, str]] = ..., data_plane_session: _Optional[str] = ...) -> None: ...

class SequenceScores(_message.Message):
    __slots__ = ("ids", "logprobs", "tail_logprob", "target_logprob", "full", "hidden", "sequence_index", "first_row", "counts")
    IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TAIL_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TARGET_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    FIRST_ROW_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    ids: Tensor
    logprobs: Tensor
    tail_logprob: Tensor
    target_logprob: Tensor
    full: Tensor
    hidden: Tensor
    sequence_index: int
    first_row: int
    counts: Tensor
    def __init__(self, ids: _Optional[_Union[Tensor, _Mapping]] = ..., logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., tail_logprob: _Optional[_Union[Tensor, _Mapping]] = ..., target_logprob: _Optional[_Union[Tensor, _Mapping]] = ..., full: _Optional[_Union[Tensor, _Mapping]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., sequence_index: _Optional[int] = ..., first_row: _Optional[int] = ..., counts: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "results", "last", "remote")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    REMOTE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    results: _containers.RepeatedCompositeFieldContainer[SequenceScores]
    last: bool
    remote: _containers.RepeatedCompositeFieldContainer[RemoteTensor]
    def __init__(self, request_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[SequenceScores, _Mapping]]] = ..., last: _Optional[bool] = ..., remote: _Optional[_Iterable[_Union[RemoteTensor, _Mapping]]] = ...) -> None: ...

class RemoteTensor(_message.Message):
    __slots__ = ("field", "dtype", "shape", "tag")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    field: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    tag: int
    def __init__(self, field: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., tag: _Optional[int] = ...) -> None: ...

class OpenDataPlaneRequest(_message.Message):
    __slots__ = ("backend",)
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    backend: str
    def __init__(self, backend: _Optional[str] = ...) -> None: ...

class DataPlaneOffer(_message.Message):
    __slots__ = ("session", "store_host", "store_port", "token", "backend", "timeout_s")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    STORE_HOST_FIELD_NUMBER: _ClassVar[int]
    STORE_PORT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    session: str
    store_host: str
    store_port: int
    token: bytes
    backend: str
    timeout_s: float
    def __init__(self, session: _Optional[str] = ..., store_host: _Optional[str] = ..., store_port: _Optional[int] = ..., token: _Optional[bytes] = ..., backend: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class GetOutputLayerRequest(_message.Message):
    __slots__ = ("chunk_bytes",)
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    chunk_bytes: int
    def __init__(self, chunk_bytes: _Optional[int] = ...) -> None: ...

class OutputLayerChunk(_message.Message):
    __slots__ = ("first_row", "weight", "bias")
    FIRST_ROW_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    first_row: int
    weight: Tensor
    bias: Tensor
    def __init__(self, first_row: _Optional[int] = ..., weight: _Optional[_Union[Tensor, _Mapping]] = ..., bias: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class OutputLayerInfo(_message.Message):
    __slots__ = ("fingerprint", "dtype", "logit_scale", "logit_softcap", "has_bias")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LOGIT_SCALE_FIELD_NUMBER: _ClassVar[int]
    LOGIT_SOFTCAP_FIELD_NUMBER: _ClassVar[int]
    HAS_BIAS_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    dtype: str
    logit_scale: float
    logit_softcap: float
    has_bias: bool
    def __init__(self, fingerprint: _Optional[str] = ..., dtype: _Optional[str] = ..., logit_scale: _Optional[float] = ..., logit_softcap: _Optional[float] = ..., has_bias: _Optional[bool] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TeacherInfo(_message.Message):
    __slots__ = ("model", "backend", "vocab_size", "hidden_size", "max_seq_len", "max_top_k", "tokenizer_hash", "tensor_parallel_size", "pipeline_parallel_size", "signals", "dtype", "max_request_tokens", "max_message_bytes", "eos_token_ids", "tokenizer_vocab_size", "value_dtypes", "id_encodings", "data_planes", "output_layer")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_HASH_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    VALUE_DTYPES_FIELD_NUMBER: _ClassVar[int]
    ID_ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_LAYER_FIELD_NUMBER: _ClassVar[int]
    model: str
    backend: str
    vocab_size: int
    hidden_size: int
    max_seq_len: int
    max_top_k: int
    tokenizer_hash: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    signals: _containers.RepeatedScalarFieldContainer[Signal]
    dtype: str
    max_request_tokens: int
    max_message_bytes: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    tokenizer_vocab_size: int
    value_dtypes: _containers.RepeatedScalarFieldContainer[DType]
    id_encodings: _containers.RepeatedScalarFieldContainer[IdEncoding]
    data_planes: _containers.RepeatedScalarFieldContainer[DataPlane]
    output_layer: OutputLayerInfo
    def __init__(self, model: _Optional[str] = ..., backend: _Optional[str] = ..., vocab_size: _Optional[int] = ..., hidden_size: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., max_top_k: _Optional[int] = ..., tokenizer_hash: _Optional[str] = ..., tensor_parallel_size: _Optional[int] = ..., pipeline_parallel_size: _Optional[int] = ..., signals: _Optional[_Iterable[_Union[Signal, str]]] = ..., dtype: _Optional[str] = ..., max_request_tokens: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., tokenizer_vocab_size: _Optional[int] = ..., value_dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., id_encodings: _Optional[_Iterable[_Union[IdEncoding, str]]] = ..., data_planes: _Optional[_Iterable[_Union[DataPlane, str]]] = ..., output_layer: _Optional[_Union[OutputLayerInfo, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompts", "max_new_tokens", "temperature", "top_p", "n", "seed", "greedy", "top_k_logprobs", "stop_token_ids", "value_dtype", "top_k", "return_text")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    GREEDY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    VALUE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RETURN_TEXT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompts: _containers.RepeatedCompositeFieldContainer[TokenSequence]
    max_new_tokens: int
    temperature: float
    top_p: float
    n: int
    seed: int
    greedy: bool
    top_k_logprobs: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    value_dtype: DType
    top_k: int
    return_text: bool
    def __init__(self, request_id: _Optional[str] = ..., prompts: _Optional[_Iterable[_Union[TokenSequence, _Mapping]]] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., n: _Optional[int] = ..., seed: _Optional[int] = ..., greedy: _Optional[bool] = ..., top_k_logprobs: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., value_dtype: _Optional[_Union[DType, str]] = ..., top_k: _Optional[int] = ..., return_text: _Optional[bool] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "prompt_index", "sample_index", "token_ids", "logprobs", "top_ids", "top_logprobs", "finished", "finish_reason", "text")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_INDEX_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_index: int
    sample_index: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: Tensor
    top_ids: Tensor
    top_logprobs: Tensor
    finished: bool
    finish_reason: str
    text: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_index: _Optional[int] = ..., sample_index: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., top_ids: _Optional[_Union[Tensor, _Mapping]] = ..., top_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...
