"""Schemathesis over every operation of the HTTP API's OpenAPI schema, valid and invalid
requests alike: no response is a 5xx, every error is in the OpenAI error shape, and
responses match the schema the app publishes.

The gateway advertises a 64-token context, so that no generated request can ask for
long generations: the run stays within a bounded number of engine steps.
"""

from __future__ import annotations

import httpx
import hypothesis
import pytest
import schemathesis
from gateway_fixtures import LocalGateway, serve_asgi
from schemathesis import GenerationMode

from pdserve.cluster.gateway.openai.api import create_app

API_KEY = "sk-fuzz"
EXAMPLES_PER_OPERATION = 60


def _greedy_tokens(url: str) -> list[int]:
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 8, "temperature": 0, "logprobs": 1, "ignore_eos": True}
    response = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                          timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["logprobs"]["tokens"]


@pytest.fixture(scope="module")
def served(tiny_llama_dir):
    """The gateway under fuzz, its URL, and a greedy answer taken before any fuzzing."""
    gateway = LocalGateway.start(tiny_llama_dir, max_model_len=64)
    with serve_asgi(create_app(gateway.frontend, api_key=API_KEY)) as url:
        yield gateway, url, _greedy_tokens(url)
    gateway.close()


@pytest.fixture(scope="module")
def api_schema(served):
    _, url, _ = served
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    schema.config.update(headers={"Authorization": f"Bearer {API_KEY}"}, request_timeout=60)
    # Schema-valid requests may still be refused: the context length is the model's,
    # and options such as n=2 are declared only to be refused by name.
    schema.config.checks.update(excluded_check_names=["positive_data_acceptance"])
    return schema


OPERATIONS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/tokenize"),
              ("POST", "/detokenize"), ("GET", "/v1/models"),
              ("GET", "/v1/models/{model}"), ("GET", "/health"), ("GET", "/metrics")]
WITH_BODY = [op for op in OPERATIONS if op[0] == "POST"]


def openai_error_shape(ctx, response, case) -> None:
    """Every error response is `{"error": {"message", "type", "param", "code"}}` with a
    non-empty message."""
    if response.status_code < 400:
        return
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    assert isinstance(body["error"]["type"], str), body


def test_the_schema_has_exactly_the_fuzzed_operations(api_schema):
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


def _fuzz(api_schema, method: str, path: str, mode: GenerationMode) -> None:
    @hypothesis.settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(case=api_schema[path][method].as_strategy(generation_mode=mode))
    def call_and_check(case):
        case.call_and_validate(additional_checks=[openai_error_shape])

    call_and_check()


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_valid_requests(api_schema, method, path):
    _fuzz(api_schema, method, path, GenerationMode.POSITIVE)


@pytest.mark.parametrize(("method", "path"), WITH_BODY)
def test_invalid_requests(api_schema, method, path):
    _fuzz(api_schema, method, path, GenerationMode.NEGATIVE)


def test_after_the_fuzzing_the_gateway_answers_as_before_and_holds_nothing(served, api_schema):
    gateway, url, before = served
    assert _greedy_tokens(url) == before
    assert gateway.wait_for_kv_blocks_in_use(0) == 0
    assert gateway.frontend.num_in_flight == 0
