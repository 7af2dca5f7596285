from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Fingerprint(_message.Message):
    __slots__ = ("architecture", "num_layers", "kv_heads", "head_dim", "dtype", "weights_sha256")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    weights_sha256: str
    def __init__(self, architecture: _Optional[str] = ..., num_layers: _Optional[int] = ..., kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ..., weights_sha256: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_frame_bytes", "max_transfer_bytes", "max_tokens")
    MAX_FRAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TRANSFER_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_frame_bytes: int
    max_transfer_bytes: int
    max_tokens: int
    def __init__(self, max_frame_bytes: _Optional[int] = ..., max_transfer_bytes: _Optional[int] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class NegotiateRequest(_message.Message):
    __slots__ = ("fingerprint", "profiles", "policy", "context_tokens", "bandwidth_bps", "deadline_s", "quality_floor")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BPS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FLOOR_FIELD_NUMBER: _ClassVar[int]
    fingerprint: Fingerprint
    profiles: _containers.RepeatedScalarFieldContainer[str]
    policy: str
    context_tokens: int
    bandwidth_bps: float
    deadline_s: float
    quality_floor: float
    def __init__(self, fingerprint: _Optional[_Union[Fingerprint, _Mapping]] = ..., profiles: _Optional[_Iterable[str]] = ..., policy: _Optional[str] = ..., context_tokens: _Optional[int] = ..., bandwidth_bps: _Optional[float] = ..., deadline_s: _Optional[float] = ..., quality_floor: _Optional[float] = ...) -> None: ...

class NegotiateReply(_message.Message):
    __slots__ = ("fingerprint", "profile", "limits", "reason", "expected_seconds", "expected_fidelity", "capabilities")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIDELITY_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    fingerprint: Fingerprint
    profile: str
    limits: Limits
    reason: str
    expected_seconds: float
    expected_fidelity: float
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, fingerprint: _Optional[_Union[Fingerprint, _Mapping]] = ..., profile: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., reason: _Optional[str] = ..., expected_seconds: _Optional[float] = ..., expected_fidelity: _Optional[float] = ..., capabilities: _Optional[_Iterable[str]] = ...) -> None: ...

class LayerHeader(_message.Message):
    __slots__ = ("kept_tokens", "positions")
    KEPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    kept_tokens: int
    positions: bytes
    def __init__(self, kept_tokens: _Optional[int] = ..., positions: _Optional[bytes] = ...) -> None: ...

class Header(_message.Message):
    __slots__ = ("transfer_id", "fingerprint", "profile", "seq_len", "batch", "layers", "segmented")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTED_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    fingerprint: Fingerprint
    profile: str
    seq_len: int
    batch: int
    layers: _containers.RepeatedCompositeFieldContainer[LayerHeader]
    segmented: bool
    def __init__(self, transfer_id: _Optional[str] = ..., fingerprint: _Optional[_Union[Fingerprint, _Mapping]] = ..., profile: _Optional[str] = ..., seq_len: _Optional[int] = ..., batch: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[LayerHeader, _Mapping]]] = ..., segmented: _Optional[bool] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("token_start", "token_end", "profile", "layers", "token_ids")
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_start: int
    token_end: int
    profile: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerHeader]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., profile: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerHeader, _Mapping]]] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("layer", "token_start", "token_end", "raw_size", "crc32c", "payload")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    RAW_SIZE_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    layer: int
    token_start: int
    token_end: int
    raw_size: int
    crc32c: int
    payload: bytes
    def __init__(self, layer: _Optional[int] = ..., token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., raw_size: _Optional[int] = ..., crc32c: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class Trailer(_message.Message):
    __slots__ = ("num_chunks", "payload_bytes")
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    num_chunks: int
    payload_bytes: int
    def __init__(self, num_chunks: _Optional[int] = ..., payload_bytes: _Optional[int] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("header", "chunk", "trailer", "segment")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    header: Header
    chunk: Chunk
    trailer: Trailer
    segment: Segment
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., trailer: _Optional[_Union[Trailer, _Mapping]] = ..., segment: _Optional[_Union[Segment, _Mapping]] = ...) -> None: ...

class TransferReply(_message.Message):
    __slots__ = ("session_id", "bytes_received", "assemble_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    ASSEMBLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    bytes_received: int
    assemble_seconds: float
    def __init__(self, session_id: _Optional[str] = ..., bytes_received: _Optional[int] = ..., assemble_seconds: _Optional[float] = ...) -> None: ...

class SegmentAck(_message.Message):
    __slots__ = ("segment", "bytes_received", "done")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    segment: int
    bytes_received: int
    done: TransferReply
    def __init__(self, segment: _Optional[int] = ..., bytes_received: _Optional[int] = ..., done: _Optional[_Union[TransferReply, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("session_id", "question", "token_ids", "max_new_tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    question: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_new_tokens: int
    def __init__(self, session_id: _Optional[str] = ..., question: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., max_new_tokens: _Optional[int] = ...) -> None: ...

class GenerateReply(_message.Message):
    __slots__ = ("text", "token_ids", "inject_seconds", "decode_seconds")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    INJECT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    inject_seconds: float
    decode_seconds: float
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., inject_seconds: _Optional[float] = ..., decode_seconds: _Optional[float] = ...) -> None: ...
