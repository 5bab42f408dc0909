from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PutRequest(_message.Message):
    __slots__ = ("header", "chunk", "recall")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    header: PutHeader
    chunk: Chunk
    recall: RecallEntry
    def __init__(self, header: _Optional[_Union[PutHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., recall: _Optional[_Union[RecallEntry, _Mapping]] = ...) -> None: ...

class PutHeader(_message.Message):
    __slots__ = ("key", "header", "num_chunks", "total_bytes")
    KEY_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    key: str
    header: bytes
    num_chunks: int
    total_bytes: int
    def __init__(self, key: _Optional[str] = ..., header: _Optional[bytes] = ..., num_chunks: _Optional[int] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("index", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class RecallEntry(_message.Message):
    __slots__ = ("layer", "head", "row", "data", "part", "parts")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    head: int
    row: int
    data: bytes
    part: int
    parts: int
    def __init__(self, layer: _Optional[int] = ..., head: _Optional[int] = ..., row: _Optional[int] = ..., data: _Optional[bytes] = ..., part: _Optional[int] = ..., parts: _Optional[int] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("stored_bytes", "tenant_bytes")
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TENANT_BYTES_FIELD_NUMBER: _ClassVar[int]
    stored_bytes: int
    tenant_bytes: int
    def __init__(self, stored_bytes: _Optional[int] = ..., tenant_bytes: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: str
    def __init__(self, key: _Optional[str] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: GetHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[GetHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class GetHeader(_message.Message):
    __slots__ = ("header", "num_chunks", "total_bytes")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    header: bytes
    num_chunks: int
    total_bytes: int
    def __init__(self, header: _Optional[bytes] = ..., num_chunks: _Optional[int] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("stored_prefix",)
    STORED_PREFIX_FIELD_NUMBER: _ClassVar[int]
    stored_prefix: int
    def __init__(self, stored_prefix: _Optional[int] = ...) -> None: ...

class RecallRequest(_message.Message):
    __slots__ = ("key", "layer", "head", "row")
    KEY_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    key: str
    layer: int
    head: int
    row: int
    def __init__(self, key: _Optional[str] = ..., layer: _Optional[int] = ..., head: _Optional[int] = ..., row: _Optional[int] = ...) -> None: ...

class RecallResponse(_message.Message):
    __slots__ = ("data", "total_bytes")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    total_bytes: int
    def __init__(self, data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: str
    def __init__(self, key: _Optional[str] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("tenant", "tenant_bytes", "quota_bytes", "segments", "ttl_s", "backend", "evictions", "evicted_bytes")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TENANT_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    tenant_bytes: int
    quota_bytes: int
    segments: int
    ttl_s: int
    backend: str
    evictions: int
    evicted_bytes: int
    def __init__(self, tenant: _Optional[str] = ..., tenant_bytes: _Optional[int] = ..., quota_bytes: _Optional[int] = ..., segments: _Optional[int] = ..., ttl_s: _Optional[int] = ..., backend: _Optional[str] = ..., evictions: _Optional[int] = ..., evicted_bytes: _Optional[int] = ...) -> None: ...

class AcquireRequest(_message.Message):
    __slots__ = ("name", "holder", "limit", "ttl_s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    holder: str
    limit: int
    ttl_s: float
    def __init__(self, name: _Optional[str] = ..., holder: _Optional[str] = ..., limit: _Optional[int] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class AcquireResponse(_message.Message):
    __slots__ = ("granted", "held")
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    granted: bool
    held: int
    def __init__(self, granted: _Optional[bool] = ..., held: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("name", "holder")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    name: str
    holder: str
    def __init__(self, name: _Optional[str] = ..., holder: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class PutRecordRequest(_message.Message):
    __slots__ = ("key", "data", "ttl_s")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    key: str
    data: bytes
    ttl_s: float
    def __init__(self, key: _Optional[str] = ..., data: _Optional[bytes] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class PutRecordResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetRecordRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: str
    def __init__(self, key: _Optional[str] = ...) -> None: ...

class GetRecordResponse(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...
