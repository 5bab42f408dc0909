"""Chunk messages on the wire without protobuf copies: the bulk path of Put and Get.

`PutRequest` and `GetResponse` both carry a chunk as field 2 (`Chunk{index = 1; data = 2}`),
so one serialised chunk message is, byte for byte, what protobuf itself would write:

    0x12 | varint(len(inner) + len(frame)) | inner = [0x08 | varint(index)] 0x12 | varint(len(frame)) | frame

Building it is one join of the frame's pieces (straight from the tensors on put, straight
from Redis on get) instead of building a message, copying it into a parent and serialising
it; reading it gives a memoryview of the frame inside the received bytes instead of parsed
copies. Anything that is not exactly one chunk field (headers, recall entries, a peer that
orders fields differently or adds unknown ones) goes through the generated protobuf classes,
so every valid encoding of the .proto is still accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import grpc

from services.protos.headwise.v1 import kvstore_pb2 as pb

_CHUNK_FIELD = 0x12  # field 2, length-delimited: PutRequest.chunk, GetResponse.chunk, Chunk.data
_INDEX_FIELD = 0x08  # field 1, varint: Chunk.index


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """(value, next position); ValueError past the end or over 64 bits."""
    n = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, pos
        shift += 7


@dataclass(frozen=True)
class RawChunk:
    """A received chunk: what `pb.Chunk` holds, with `data` a view into the message bytes."""

    index: int
    data: memoryview


@dataclass(frozen=True)
class ChunkMessage:
    """A PutRequest / GetResponse whose part is a chunk, read without copying its frame."""

    chunk: RawChunk

    @staticmethod
    def WhichOneof(_group: str) -> str:  # noqa: N802 (the protobuf message's method name)
        return "chunk"


def chunk_message(index: int, parts: Sequence[bytes | memoryview]) -> bytes:
    """The serialised PutRequest / GetResponse carrying chunk `index` whose frame is `parts` joined."""
    size = sum(len(p) for p in parts)
    # proto3 leaves out fields at their default (index 0, empty data); so does this, byte for byte
    inner = (bytes((_INDEX_FIELD,)) + _varint(index) if index else b"") + (
        bytes((_CHUNK_FIELD,)) + _varint(size) if size else b"")
    return b"".join((bytes((_CHUNK_FIELD,)), _varint(len(inner) + size), inner, *parts))


def parse_chunk(buf: bytes) -> ChunkMessage | None:
    """The chunk in `buf` if `buf` is exactly one chunk field of plain index/data; else None."""
    view = memoryview(buf)
    try:
        if not view or view[0] != _CHUNK_FIELD:
            return None
        size, pos = _read_varint(view, 1)
        if pos + size != len(view):
            return None
        index, data = 0, None
        seen: set[int] = set()
        while pos < len(view):
            tag = view[pos]
            if tag in seen or tag not in (_INDEX_FIELD, _CHUNK_FIELD):
                return None  # repeated or unknown field: let protobuf apply its merge rules
            seen.add(tag)
            value, pos = _read_varint(view, pos + 1)
            if tag == _INDEX_FIELD:
                index = value
            else:
                if pos + value > len(view):
                    return None
                data, pos = view[pos : pos + value], pos + value
        if index >= 1 << 32:
            return None
        return ChunkMessage(RawChunk(index, data if data is not None else memoryview(b"")))
    except ValueError:
        return None


def parse_put_request(buf: bytes) -> ChunkMessage | pb.PutRequest:
    return parse_chunk(buf) or pb.PutRequest.FromString(buf)


def parse_get_response(buf: bytes) -> ChunkMessage | pb.GetResponse:
    return parse_chunk(buf) or pb.GetResponse.FromString(buf)


def serialize(msg) -> bytes:
    """A pre-serialised message (bytes) as is; a protobuf message serialised."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


def add_kvstore_handlers(servicer, server: grpc.aio.Server) -> None:
    """`kvstore_pb2_grpc.add_KVStoreServicer_to_server`, with the chunk fast path on Put and Get."""
    desc = pb.DESCRIPTOR.services_by_name["KVStore"]
    unary = {m.name: getattr(pb, m.input_type.name) for m in desc.methods  # every unary rpc of the proto
             if not (m.client_streaming or m.server_streaming)}
    handlers = {name: grpc.unary_unary_rpc_method_handler(getattr(servicer, name), request_deserializer=req.FromString,
                                                          response_serializer=serialize)
                for name, req in unary.items()}
    handlers["Put"] = grpc.stream_unary_rpc_method_handler(servicer.Put, request_deserializer=parse_put_request,
                                                           response_serializer=serialize)
    handlers["Get"] = grpc.unary_stream_rpc_method_handler(servicer.Get, request_deserializer=pb.GetRequest.FromString,
                                                           response_serializer=serialize)
    handlers["Recall"] = grpc.unary_stream_rpc_method_handler(servicer.Recall,
                                                              request_deserializer=pb.RecallRequest.FromString,
                                                              response_serializer=serialize)
    service = desc.full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)
