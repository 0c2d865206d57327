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
from tool_cases import ASK, PARAMETERS, TOOLS, streamed_tool_calls

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


@pytest.mark.parametrize("deployment", ["disaggregated", "colocated"])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_forced_tool_calls_validate_streamed_and_not(request, deployment, choice):
    client = _client(request.getfixturevalue(deployment))
    kwargs = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": choice, "max_tokens": 120,
              "temperature": 0}
    reply = client.chat.completions.create(**kwargs)
    calls = [(c.function.name, c.function.arguments) for c in reply.choices[0].message.tool_calls]
    assert reply.choices[0].finish_reason == "tool_calls" and calls
    for name, arguments in calls:
        assert name in (PARAMETERS if choice == "required" else {"get_time"})
        jsonschema.validate(json.loads(arguments), PARAMETERS[name])
    streamed, finishes = streamed_tool_calls(client.chat.completions.create(stream=True, **kwargs))
    assert [(c["name"], c["arguments"]) for c in streamed] == calls and finishes == ["tool_calls"]


@pytest.mark.parametrize("deployment", ["disaggregated", "colocated"])
def test_a_tool_result_in_the_history_gets_a_text_answer(request, deployment):
    client = _client(request.getfixturevalue(deployment))
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=80, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    reply = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=40,
                                           temperature=0, tool_choice="none")
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls


@pytest.mark.parametrize("deployment", ["disaggregated", "colocated"])
def test_four_streamed_choices_share_one_prompt(request, deployment):
    server = request.getfixturevalue(deployment)
    client = _client(server)
    kwargs = {"model": MODEL, "max_tokens": 24, "temperature": 0,
              "messages": [{"role": "user", "content": "Name three rivers in Europe."}]}
    single = client.chat.completions.create(**kwargs).choices[0].message.content
    before = _routes(server)
    texts: dict[int, str] = {}
    for chunk in client.chat.completions.create(stream=True, n=4, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert texts == {i: single for i in range(4)}
    routed = {path: n - before.get(path, 0) for path, n in _routes(server).items()}
    # One sequence takes the usual path (prefilled remotely when disaggregated); the
    # other three join it on its decode worker and share its prompt's pages.
    assert routed.get("group") == 3
    assert routed.get("remote" if deployment == "disaggregated" else "local") == 1


def _routes(server: ServeProcess) -> dict[str, float]:
    """pdserve_routes_total by prefill path, summed over decode workers."""
    routes: dict[str, float] = {}
    for name, value in server.metrics().items():
        if name.startswith("pdserve_routes_total{"):
            path = name.split('prefill="')[1].split('"')[0]
            routes[path] = routes.get(path, 0) + value
    return routes
