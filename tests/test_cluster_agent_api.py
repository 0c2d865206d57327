"""The OpenAI features agents use, against a real `pdserve serve` on SmolLM2 with the
official `openai` client, disaggregated (1 prefill + 1 decode worker) and colocated with
speculative decoding on: structured outputs over 100 varied JSON schemas, all parsed and
validated with `jsonschema`, and greedy outputs equal between the two deployments."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from json_schema_cases import varied_schemas
from serve_process import API_KEY, ServeProcess

MODEL = "smollm2-135m-instruct"
CONCURRENCY = 8


def _server(*args: str) -> ServeProcess:
    # Room for 8 sequences of ~600 tokens of SmolLM2 KV (46 KiB a token) on each worker.
    return ServeProcess(MODEL, "--max-in-flight", "64", "--kv-cache-memory", "256", "--block-size", "16", *args)


@pytest.fixture(scope="module")
def disaggregated(smollm2_gguf_path):
    server = _server("--prefill-workers", "1", "--decode-workers", "1", "--local-prefill-tokens", "1")
    yield server
    server.stop_and_check()


@pytest.fixture(scope="module")
def colocated(smollm2_gguf_path):
    server = _server("--colocated", "--decode-workers", "1", "--speculative", "ngram")
    yield server
    server.stop_and_check()


def _client(server: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def _schema_request(client: openai.OpenAI, schema: dict, seed: int) -> tuple[str, str]:
    # Greedy: sampled at 0.8, SmolLM2-135M runs away inside a number literal now and then
    # ("1.0000..." until max_tokens, valid so far but never closed), as small models do
    # under any grammar engine; greedy outputs are reproducible and all close.
    reply = client.chat.completions.create(
        model=MODEL, max_tokens=400, temperature=0.0,
        messages=[{"role": "user", "content": f"Reply with a JSON value that matches this schema: "
                   f"{json.dumps(schema)}"}],
        response_format={"type": "json_schema", "json_schema": {"name": f"case_{seed}", "schema": schema,
                                                                "strict": True}})
    return reply.choices[0].message.content, reply.choices[0].finish_reason


@pytest.mark.parametrize("deployment", ["disaggregated", "colocated"])
def test_100_json_schema_requests_all_parse_and_validate(request, deployment):
    client = _client(request.getfixturevalue(deployment))
    schemas = varied_schemas(100)
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        replies = list(pool.map(lambda i: _schema_request(client, schemas[i], i), range(len(schemas))))
    for schema, (text, finish) in zip(schemas, replies):
        assert finish == "stop", f"{finish}: {text!r}"
        jsonschema.validate(json.loads(text), schema)


def test_greedy_structured_outputs_equal_across_deployments(disaggregated, colocated):
    """Disaggregated (first token sampled on the prefill worker, the matcher rebuilt on the
    decode worker) and colocated with speculation (drafts cut by the grammar) give the same
    greedy JSON."""
    schemas = varied_schemas(6, seed=1)
    for i, schema in enumerate(schemas):
        assert _schema_request(_client(disaggregated), schema, 2 * i) == _schema_request(
            _client(colocated), schema, 2 * i)
