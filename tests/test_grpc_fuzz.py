"""Hypothesis over the gRPC client API (`pdserve.serving.v1.Generation`): requests built
from the proto's descriptors with every field set to valid, out-of-range, huge, negative,
NaN/infinite, empty and enormous repeated values; raw random bytes and hand-made wire
records (wrong wire types, unknown and invalid field numbers) sent as the serialized
request through a generic channel call. No call may end with INTERNAL or UNKNOWN, every
error says what was wrong, no request leaks KV, and the server keeps serving: after the
run a greedy request returns the tokens it returned before.

The gateway advertises a 64-token context, so that no generated request runs long.
"""

from __future__ import annotations

import collections
import math

import grpc
import hypothesis
import pytest
from gateway_fixtures import GrpcServers, LocalGateway
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

from pdserve.cluster.gateway.grpc_api import GENERATION_SERVICE
from pdserve.proto import serving_pb2, serving_pb2_grpc

CONTEXT = 64
CALL_TIMEOUT = 60.0  # seconds; only keeps a broken server from hanging the run
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
# What a request may end with here: the gateway's refusals (a model it does not serve, a
# timeout_seconds that ran out), and gRPC's own RESOURCE_EXHAUSTED for a message over the
# size limit. Anything else (e.g. "Stream removed": trailers over the client's metadata
# limit) means the client never heard the gateway's reason.
EXPECTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.RESOURCE_EXHAUSTED}
GREEDY = serving_pb2.GenerateRequest(text="The quick brown fox", max_tokens=12, temperature=0.0, ignore_eos=True)
SETTINGS = {"deadline": None, "derandomize": True, "database": None,
            "suppress_health_check": list(hypothesis.HealthCheck)}

# ----------------------------------------------------------------------------- values

_HUGE_STRINGS = ["x" * 100_000, "ab " * 300_000]  # 100 KB; ~1 MB (under the 4 MiB message limit)
_STRINGS = st.one_of(st.text(max_size=40), st.sampled_from(["", "tiny", "user", "system", "assistant", "\x00", "🙂"]),
                     st.sampled_from(_HUGE_STRINGS))


def _integers(bits: int, signed: bool) -> st.SearchStrategy[int]:
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    edges = [v for v in (low, -1, 0, 1, 2, 20, 21, CONTEXT - 1, CONTEXT, 320, high) if low <= v <= high]
    return st.one_of(st.integers(0, 100), st.sampled_from(edges), st.integers(low, high))


def _floats(width: int) -> st.SearchStrategy[float]:
    edges = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 1e-300, 1e38, 1e300, math.inf, -math.inf, math.nan]
    return st.one_of(st.sampled_from(edges), st.floats(width=width, allow_nan=True, allow_infinity=True))


_SCALARS = {
    FieldDescriptor.TYPE_STRING: _STRINGS,
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_UINT32: _integers(32, signed=False),
    FieldDescriptor.TYPE_INT32: _integers(32, signed=True),
    FieldDescriptor.TYPE_INT64: _integers(64, signed=True),
    FieldDescriptor.TYPE_FLOAT: _floats(32),
    FieldDescriptor.TYPE_DOUBLE: _floats(64),
    FieldDescriptor.TYPE_ENUM: _integers(32, signed=True),  # proto3 enums are open: unknown values parse
}


# Values a field accepts, by field name, for requests that should be served: the tiny
# model's name and vocabulary (320 ids), sampling values in range, a short max_tokens.
_VALID = {
    "model": st.just("tiny"),
    "text": st.text(min_size=1, max_size=40),
    "ids": st.lists(st.integers(0, 319), min_size=1, max_size=20),
    "role": st.sampled_from(["system", "user", "assistant"]),
    "content": st.text(max_size=40),
    "max_tokens": st.integers(1, 16),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1),
    "stop": st.lists(st.text(min_size=1, max_size=5), max_size=3),
    "stop_token_ids": st.lists(st.integers(0, 319), max_size=5),
    "logprobs": st.integers(0, 20),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "min_tokens": st.integers(0, 4),
    "logit_bias": st.dictionaries(st.integers(0, 319), st.floats(-100, 100), max_size=3),
    "timeout_seconds": st.floats(1, 60),
}


def _field_values(field: FieldDescriptor, valid: bool) -> st.SearchStrategy:
    if valid and field.name in _VALID:
        return _VALID[field.name]
    if _is_map(field):  # key -> value pairs, from the entry message's two fields
        key, value = (_field_values(field.message_type.fields_by_name[n], valid) for n in ("key", "value"))
        return st.dictionaries(key, value, max_size=4)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        element = messages(field.message_type, valid)
    elif field.type in _SCALARS:
        element = _SCALARS[field.type]
    else:
        raise NotImplementedError(f"{field.full_name}: no strategy for field type {field.type}; add one")
    if not field.is_repeated:
        return element
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return st.lists(element, max_size=4)
    # Empty, short, or enormous: one short value many times (50,000 of them take under 1 MB).
    short = st.text(max_size=4) if field.type == FieldDescriptor.TYPE_STRING else element
    enormous = st.builds(lambda value, n: [value] * n, short, st.sampled_from([1_000, 50_000]))
    return st.one_of(st.lists(element, max_size=4), enormous)


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def messages(descriptor: Descriptor, valid: bool = False) -> st.SearchStrategy[Message]:
    """Messages of `descriptor`'s type with any subset of its fields set (several members
    of a oneof included: the last one set wins, as on the wire); with `valid`, set to
    values in _VALID where it has some."""
    message_class = GetMessageClass(descriptor)
    optional = {field.name: _field_values(field, valid) for field in descriptor.fields}

    def build(values: dict) -> Message:
        message = message_class()
        for name, value in values.items():
            field = descriptor.fields_by_name[name]
            if _is_map(field):
                getattr(message, name).update(value)
            elif field.is_repeated:
                getattr(message, name).extend(value)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(message, name).CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return st.fixed_dictionaries({}, optional=optional).map(build)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


# One wire record: a field number (the message's, unknown ones, 0 and past the largest
# allowed, which are invalid), any wire type (3, 4: groups; 6, 7: invalid), and a payload
# of that wire type or of random bytes.
_RECORDS = st.tuples(
    st.one_of(st.sampled_from([f.number for f in serving_pb2.GenerateRequest.DESCRIPTOR.fields]),
              st.sampled_from([0, 6, 99, 2**29 - 1, 2**29])),
    st.integers(0, 7),
    st.one_of(st.binary(max_size=16), st.integers(0, 2**64 - 1).map(_varint)),
)


def _wire(records: list[tuple[int, int, bytes]]) -> bytes:
    """Serialize records; a length-delimited one gets its length (sometimes a wrong one)."""
    out = bytearray()
    for number, wire_type, payload in records:
        out += _varint(number << 3 | wire_type)
        out += _varint(len(payload)) + payload if wire_type == 2 else payload
    return bytes(out)


# ----------------------------------------------------------------------------- server

@pytest.fixture(scope="module")
def gateway(tiny_llama_dir):
    gateway = LocalGateway.start(tiny_llama_dir, max_model_len=CONTEXT)
    yield gateway
    gateway.close()


@pytest.fixture(scope="module")
def channel(gateway):
    servers = GrpcServers()
    with grpc.insecure_channel(servers.serve(gateway.frontend)) as channel:
        yield channel
    servers.close()


@pytest.fixture(scope="module")
def greedy_before(channel):
    """The greedy tokens of GREEDY before any fuzzing (the first test to ask computes them)."""
    return _tokens(serving_pb2_grpc.GenerationStub(channel))


def _tokens(stub) -> list[int]:
    return [t for response in stub.Generate(GREEDY, timeout=CALL_TIMEOUT) for t in response.token_ids]


class Outcomes(collections.Counter):
    """Status codes seen, by name; checks each call's outcome as it records it."""

    def call(self, invoke) -> None:
        try:
            invoke()
        except grpc.RpcError as error:
            code, details = error.code(), error.details()
            assert code not in NEVER and details, (code, details)
            assert code in EXPECTED, (code, details)
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert "larger than max" in details, details
            self[code.name] += 1
        else:
            self["OK"] += 1


def _fuzz(strategy, check, max_examples: int) -> None:
    @hypothesis.settings(max_examples=max_examples, **SETTINGS)
    @hypothesis.given(value=strategy)
    def run(value):
        check(value)

    run()


# ----------------------------------------------------------------------------- tests

def test_generate_requests_from_the_descriptor(channel, gateway, greedy_before):
    stub = serving_pb2_grpc.GenerationStub(channel)
    outcomes = Outcomes()
    descriptor = serving_pb2.GenerateRequest.DESCRIPTOR
    _fuzz(st.one_of(messages(descriptor, valid=True), messages(descriptor)),
          lambda request: outcomes.call(lambda: list(stub.Generate(request, timeout=CALL_TIMEOUT))), 300)
    # Not degenerate: some requests were served and some refused as invalid.
    assert outcomes["OK"] > 0 and outcomes["INVALID_ARGUMENT"] > 0, outcomes
    assert gateway.wait_for_kv_blocks_in_use(0) == 0


def test_abort_requests_from_the_descriptor(channel, greedy_before):
    stub = serving_pb2_grpc.GenerationStub(channel)
    outcomes = Outcomes()
    _fuzz(messages(serving_pb2.AbortRequest.DESCRIPTOR, valid=True),
          lambda request: outcomes.call(lambda: stub.Abort(request, timeout=CALL_TIMEOUT)), 50)
    assert outcomes["OK"] > 0 and outcomes["INVALID_ARGUMENT"] > 0, outcomes


@pytest.mark.parametrize("method", ["Generate", "Abort"])
def test_raw_bytes_and_wrong_wire_types(channel, gateway, greedy_before, method):
    path = f"/{GENERATION_SERVICE}/{method}"
    # No serializers: the bytes go on the wire as they are.
    call = channel.unary_stream(path) if method == "Generate" else channel.unary_unary(path)
    outcomes = Outcomes()

    def send(data: bytes) -> None:
        outcomes.call(lambda: list(call(data, timeout=CALL_TIMEOUT)) if method == "Generate"
                      else call(data, timeout=CALL_TIMEOUT))

    _fuzz(st.one_of(st.binary(max_size=200), st.lists(_RECORDS, max_size=6).map(_wire)), send, 150)
    assert outcomes["INVALID_ARGUMENT"] > 0, outcomes
    assert gateway.wait_for_kv_blocks_in_use(0) == 0


def test_the_server_still_serves_the_same_tokens(channel, gateway, greedy_before):
    stub = serving_pb2_grpc.GenerationStub(channel)
    assert _tokens(stub) == greedy_before and len(greedy_before) == 12
    assert gateway.frontend.num_in_flight == 0 and gateway.frontend.num_preparing == 0
    assert gateway.wait_for_kv_blocks_in_use(0) == 0
