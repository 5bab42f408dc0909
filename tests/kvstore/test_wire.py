"""The chunk fast path (services/kvstore/wire.py) is byte-identical to protobuf both ways."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.kvstore.wire import ChunkMessage, chunk_message, parse_get_response, parse_put_request
from services.protos.headwise.v1 import kvstore_pb2 as pb


@given(index=st.integers(0, 2**32 - 1), parts=st.lists(st.binary(max_size=300), max_size=4))
def test_chunk_message_is_what_protobuf_writes_and_reads(index: int, parts: list[bytes]) -> None:
    data = b"".join(parts)
    wire = chunk_message(index, parts)
    assert wire == pb.PutRequest(chunk=pb.Chunk(index=index, data=data)).SerializeToString()
    assert wire == pb.GetResponse(chunk=pb.Chunk(index=index, data=data)).SerializeToString()
    for parse in (parse_put_request, parse_get_response):
        msg = parse(wire)
        assert isinstance(msg, ChunkMessage) and msg.WhichOneof("part") == "chunk"
        assert (msg.chunk.index, bytes(msg.chunk.data)) == (index, data)


def test_other_encodings_go_through_protobuf() -> None:
    header = pb.PutRequest(header=pb.PutHeader(key="k", header=b"h", num_chunks=2, total_bytes=9))
    assert parse_put_request(header.SerializeToString()) == header
    inner = pb.Chunk(index=3, data=b"frame")
    reordered = b"\x12" + bytes([len(b"\x12\x05frame\x08\x03")]) + b"\x12\x05frame\x08\x03"  # data before index
    assert bytes(parse_put_request(reordered).chunk.data) == b"frame" and parse_put_request(reordered).chunk.index == 3
    unknown = inner.SerializeToString() + b"\x18\x01"  # an unknown field 3 inside the chunk
    msg = parse_put_request(b"\x12" + bytes([len(unknown)]) + unknown)
    assert isinstance(msg, pb.PutRequest) and (msg.chunk.index, msg.chunk.data) == (3, b"frame")
    twice = pb.PutRequest(chunk=inner).SerializeToString() * 2  # protobuf merges a repeated message field
    assert isinstance(parse_put_request(twice), pb.PutRequest)
