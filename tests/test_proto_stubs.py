"""The committed gRPC stubs are exactly what `make proto` generates from proto/."""

from __future__ import annotations

from pathlib import Path

from services.protos import build


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    fresh = build.generate(tmp_path)
    assert {p.name for p in fresh} == {f"{s.stem}{suffix}" for s in build.proto_files() for suffix in build.GENERATED}
    committed = build.DEFAULT_OUT / "headwise" / "v1"
    stale = [p.name for p in fresh if not (committed / p.name).exists() or (committed / p.name).read_text() != p.read_text()]
    assert not stale, f"stubs out of date: {stale}; run `make proto` and commit services/protos"


def test_stubs_import_from_services_package() -> None:
    from services.protos.headwise.v1 import generate_pb2, generate_pb2_grpc, kvstore_pb2_grpc

    assert generate_pb2_grpc.GenerateStub and kvstore_pb2_grpc.KVStoreStub
    fields = set(generate_pb2.Figures.DESCRIPTOR.fields_by_name)
    assert {"ttft_s", "store_status", "finish_reason", "wire_bytes"} <= fields
