"""Structured outputs through both APIs over an in-process engine on SmolLM2: the official
`openai` client's `response_format` (json_object, json_schema, and `parse` with a pydantic
model), vLLM's `guided_*` extra fields, gRPC's `structured_output`; streamed and not.
Outputs parse and validate; schemas the server cannot enforce are refused naming what is
unsupported."""

from __future__ import annotations

import json
import re

import grpc
import httpx
import jsonschema
import pydantic
import pytest
from gateway_fixtures import GrpcServers, served_gateway

from pdserve.proto import serving_pb2

MODEL = "smollm2"
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "colors"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "colors": {"type": "array", "maxItems": 3, "items": {"enum": ["red", "green", "blue"]}}}}
ASK = [{"role": "user", "content": "Describe a person as JSON: name, age and favourite colors."}]


@pytest.fixture(scope="module")
def served(smollm2_gguf_path):
    with served_gateway("smollm2-135m-instruct", model_name=MODEL, block_size=16, num_blocks=512) as served:
        yield served


@pytest.fixture(scope="module")
def grpc_stub(gateway):
    from pdserve.proto import serving_pb2_grpc

    servers = GrpcServers()
    channel = grpc.insecure_channel(servers.serve(gateway.frontend))
    yield serving_pb2_grpc.GenerationStub(channel)
    channel.close()
    servers.close()


def _schema_format(schema: dict, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": strict}}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_response_format_validates(client, stream):
    kwargs = {"model": MODEL, "messages": ASK, "max_tokens": 120, "temperature": 0.8, "seed": 3,
              "response_format": _schema_format(PERSON)}
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        reply = client.chat.completions.create(**kwargs)
        text, finish = reply.choices[0].message.content, [reply.choices[0].finish_reason]
    jsonschema.validate(json.loads(text), PERSON)
    assert finish == ["stop"]


def test_the_openai_clients_parse_helper_gets_its_pydantic_model(client):
    class Answer(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=30)
        country: str = pydantic.Field(max_length=30)
        population_millions: float

    reply = client.chat.completions.parse(
        model=MODEL, max_tokens=120, temperature=0, response_format=Answer,
        messages=[{"role": "user", "content": "Which city is the capital of France? Answer in JSON."}])
    assert isinstance(reply.choices[0].message.parsed, Answer)


def test_json_object_and_guided_fields_on_both_endpoints(client):
    # Any JSON object is unbounded: on many prompts a 135M model nests objects until
    # max_tokens (valid so far, never closed). This prompt's greedy reply closes.
    paris = [{"role": "user", "content": "Describe a person as JSON with name, age and favourite colors. "
              "What is the capital of France?"}]
    reply = client.chat.completions.create(model=MODEL, messages=paris, max_tokens=120, temperature=0,
                                           response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    prompt = "The capital of France is"
    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0,
                                     extra_body={"guided_choice": ["Paris", "Lyon", "Nice"]})
    assert done.choices[0].text in ("Paris", "Lyon", "Nice") and done.choices[0].finish_reason == "stop"
    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0,
                                     extra_body={"guided_regex": r" [A-Z][a-z]{2,12}\."})
    assert re.fullmatch(r" [A-Z][a-z]{2,12}\.", done.choices[0].text)
    done = client.completions.create(model=MODEL, prompt="Is the sky blue?", max_tokens=20, temperature=0,
                                     extra_body={"guided_grammar": 'root ::= " " ("Yes" | "No") "."'})
    assert done.choices[0].text in (" Yes.", " No.")
    done = client.completions.create(model=MODEL, prompt="A person as JSON:", max_tokens=120, temperature=0,
                                     extra_body={"guided_json": PERSON})
    jsonschema.validate(json.loads(done.choices[0].text), PERSON)


@pytest.mark.parametrize(("body", "param", "named"), [
    ({"response_format": _schema_format({"type": "array", "uniqueItems": True})}, "response_format", "uniqueItems"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "regex"),
    ({"guided_grammar": "start: nowhere"}, "guided_grammar", "nowhere"),
    ({"guided_choice": []}, "guided_choice", ""),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex", "only one"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
])
def test_unsupported_or_conflicting_constraints_are_400s_naming_them(base_url, body, param, named):
    reply = httpx.post(f"{base_url}/v1/chat/completions", timeout=60,
                       json={"model": MODEL, "messages": ASK, "max_tokens": 8, **body})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and named in error["message"]


def test_non_strict_schemas_drop_unsupported_keywords(client):
    schema = {"type": "array", "uniqueItems": True, "maxItems": 3, "items": {"type": "integer"}}
    reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=40, temperature=0,
                                           response_format=_schema_format(schema, strict=False))
    value = json.loads(reply.choices[0].message.content)
    assert isinstance(value, list) and len(value) <= 3


def test_grpc_structured_output(grpc_stub):
    schema = serving_pb2.StructuredOutput(json_schema=json.dumps(PERSON))
    responses = list(grpc_stub.Generate(serving_pb2.GenerateRequest(
        chat=serving_pb2.Chat(messages=[serving_pb2.ChatMessage(role="user", content=ASK[0]["content"])]),
        max_tokens=120, temperature=0.0, structured_output=schema), timeout=120))
    jsonschema.validate(json.loads("".join(r.text for r in responses)), PERSON)
    choice = serving_pb2.StructuredOutput(choice=serving_pb2.Choices(options=["Paris", "Rome"]))
    responses = list(grpc_stub.Generate(serving_pb2.GenerateRequest(
        text="The capital of France is", max_tokens=10, temperature=0.0, structured_output=choice), timeout=120))
    assert "".join(r.text for r in responses) in ("Paris", "Rome")
    for bad in (serving_pb2.StructuredOutput(json_schema='{"type": "array", "uniqueItems": true}'),
                serving_pb2.StructuredOutput(json_schema="{not json"), serving_pb2.StructuredOutput()):
        with pytest.raises(grpc.RpcError) as caught:
            list(grpc_stub.Generate(serving_pb2.GenerateRequest(text="x", structured_output=bad), timeout=60))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "structured_output" in caught.value.details()
