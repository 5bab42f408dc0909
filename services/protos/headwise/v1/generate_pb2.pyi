from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("context", "prompt", "policy", "kept", "answer_prefix", "max_new_tokens", "temperature", "top_p", "seed", "stop", "recall", "session_id", "kv_precision", "query_aware")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_PREFIX_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KV_PRECISION_FIELD_NUMBER: _ClassVar[int]
    QUERY_AWARE_FIELD_NUMBER: _ClassVar[int]
    context: str
    prompt: str
    policy: str
    kept: float
    answer_prefix: str
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    recall: bool
    session_id: str
    kv_precision: str
    query_aware: bool
    def __init__(self, context: _Optional[str] = ..., prompt: _Optional[str] = ..., policy: _Optional[str] = ..., kept: _Optional[float] = ..., answer_prefix: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., recall: _Optional[bool] = ..., session_id: _Optional[str] = ..., kv_precision: _Optional[str] = ..., query_aware: _Optional[bool] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("delta", "figures")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FIGURES_FIELD_NUMBER: _ClassVar[int]
    delta: TokenDelta
    figures: Figures
    def __init__(self, delta: _Optional[_Union[TokenDelta, _Mapping]] = ..., figures: _Optional[_Union[Figures, _Mapping]] = ...) -> None: ...

class TokenDelta(_message.Message):
    __slots__ = ("text", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Figures(_message.Message):
    __slots__ = ("prompt_tokens", "reused_tokens", "full_kv_bytes", "held_kv_bytes", "wire_bytes", "realised_kept", "recalls", "ttft_s", "decode_tok_s", "store_status", "policy", "finish_reason", "stored_kv_bytes", "kv_precision")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REUSED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FULL_KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    HELD_KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REALISED_KEPT_FIELD_NUMBER: _ClassVar[int]
    RECALLS_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOK_S_FIELD_NUMBER: _ClassVar[int]
    STORE_STATUS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STORED_KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_PRECISION_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    reused_tokens: int
    full_kv_bytes: int
    held_kv_bytes: int
    wire_bytes: int
    realised_kept: float
    recalls: int
    ttft_s: float
    decode_tok_s: float
    store_status: str
    policy: str
    finish_reason: str
    stored_kv_bytes: int
    kv_precision: str
    def __init__(self, prompt_tokens: _Optional[int] = ..., reused_tokens: _Optional[int] = ..., full_kv_bytes: _Optional[int] = ..., held_kv_bytes: _Optional[int] = ..., wire_bytes: _Optional[int] = ..., realised_kept: _Optional[float] = ..., recalls: _Optional[int] = ..., ttft_s: _Optional[float] = ..., decode_tok_s: _Optional[float] = ..., store_status: _Optional[str] = ..., policy: _Optional[str] = ..., finish_reason: _Optional[str] = ..., stored_kv_bytes: _Optional[int] = ..., kv_precision: _Optional[str] = ...) -> None: ...
