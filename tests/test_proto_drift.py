"""The checked-in gRPC stubs are exactly what `python proto/generate.py` makes of the
.proto sources: editing a .proto without regenerating fails here."""

from __future__ import annotations

from pathlib import Path

from pdserve.proto import generate

PROTO_DIR = Path(__file__).resolve().parents[1] / "proto"
REGENERATE = "run `python proto/generate.py` and commit the stubs"


def _stubs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name.endswith(("_pb2.py", "_pb2_grpc.py"))}


def test_checked_in_stubs_match_the_proto_sources(tmp_path):
    generate.generate(tmp_path)
    fresh, checked_in = _stubs(tmp_path), _stubs(PROTO_DIR)
    assert fresh, "protoc produced no stubs"
    assert sorted(checked_in) == sorted(fresh), f"stubs missing or stale: {REGENERATE}"
    for name, content in fresh.items():
        assert checked_in[name] == content, f"proto/{name} is out of date: {REGENERATE}"


def test_stubs_import_inside_the_pdserve_namespace():
    from pdserve.proto import kv_transfer_pb2, kv_transfer_pb2_grpc, serving_pb2, serving_pb2_grpc

    assert kv_transfer_pb2.DESCRIPTOR.name == "pdserve/proto/kv_transfer.proto"
    service = kv_transfer_pb2.DESCRIPTOR.services_by_name["KVTransfer"]
    assert [m.name for m in service.methods] == ["Info", "Transfer"]
    assert hasattr(kv_transfer_pb2_grpc, "KVTransferStub")

    assert serving_pb2.DESCRIPTOR.name == "pdserve/proto/serving.proto"
    assert serving_pb2.DESCRIPTOR.package == "pdserve.serving.v1"
    service = serving_pb2.DESCRIPTOR.services_by_name["Generation"]
    assert [(m.name, m.server_streaming) for m in service.methods] == [("Generate", True), ("Abort", False)]
    assert hasattr(serving_pb2_grpc, "GenerationStub")


def test_generate_request_tells_unset_sampling_fields_from_zero():
    """The gateway applies its defaults only to fields the client left unset."""
    from pdserve.proto import serving_pb2

    request = serving_pb2.GenerateRequest(temperature=0.0, top_k=0)
    assert request.HasField("temperature") and request.HasField("top_k")
    assert not request.HasField("max_tokens") and not request.HasField("timeout_seconds")
    inputs = serving_pb2.DESCRIPTOR.message_types_by_name["GenerateRequest"].oneofs_by_name["input"]
    assert [f.name for f in inputs.fields] == ["text", "token_ids", "chat"]
