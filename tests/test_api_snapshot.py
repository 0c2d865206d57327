"""The public contracts do not change by accident: the HTTP API's OpenAPI schema and the
gRPC file descriptors equal the snapshots in tests/data/api, and every sampling field a
client may set (`SAMPLING_FIELDS`, from SamplingParams) is in both APIs.

A deliberate API change regenerates the snapshots with `python tests/test_api_snapshot.py`
and commits them with the change, so that the diff shows what clients will see.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

from google.protobuf import descriptor_pb2

from pdserve.cluster.gateway.metrics import GatewayMetrics
from pdserve.cluster.gateway.openai.api import create_app
from pdserve.cluster.gateway.openai.protocol import ChatCompletionRequest, CompletionRequest
from pdserve.proto import kv_transfer_pb2, serving_pb2
from pdserve.runtime.sampling_params import SAMPLING_FIELDS

SNAPSHOTS = Path(__file__).resolve().parent / "data" / "api"
REGENERATE = "if the change is deliberate, run `python tests/test_api_snapshot.py` and commit the snapshots"
DESCRIPTORS = {"serving": serving_pb2, "kv_transfer": kv_transfer_pb2}


def openapi_text() -> str:
    frontend = types.SimpleNamespace(metrics=GatewayMetrics())  # create_app reads only the metrics
    return json.dumps(create_app(frontend).openapi(), indent=1, sort_keys=True)


def descriptor_text(module) -> str:
    return str(descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb))


def test_openapi_schema_equals_the_snapshot():
    assert openapi_text() == (SNAPSHOTS / "openapi.json").read_text(), f"the OpenAPI schema changed: {REGENERATE}"


def test_grpc_descriptors_equal_the_snapshots():
    for name, module in DESCRIPTORS.items():
        expected = (SNAPSHOTS / f"{name}.descriptor.txt").read_text()
        assert descriptor_text(module) == expected, f"proto {name} changed: {REGENERATE}"


def test_every_sampling_field_is_in_both_apis():
    generate = serving_pb2.DESCRIPTOR.message_types_by_name["GenerateRequest"].fields_by_name
    assert set(SAMPLING_FIELDS) <= set(generate), "GenerateRequest lacks sampling fields"
    for body in (CompletionRequest(prompt="hi"), ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])):
        assert sorted(body.sampling()) == sorted(SAMPLING_FIELDS)


if __name__ == "__main__":
    SNAPSHOTS.mkdir(parents=True, exist_ok=True)
    (SNAPSHOTS / "openapi.json").write_text(openapi_text())
    for name, module in DESCRIPTORS.items():
        (SNAPSHOTS / f"{name}.descriptor.txt").write_text(descriptor_text(module))
