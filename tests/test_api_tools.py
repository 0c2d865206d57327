"""Tool calling through the HTTP API with the official `openai` client, over an in-process
engine on SmolLM2 (whose chat template has no tool support: pdserve describes the tools in
the Hermes format): `tool_choice` required and named (enforced by a grammar, so the
arguments always parse and validate against the tool's schema), streamed and not, a
multi-turn conversation with a tool result, `none`, and bad tool definitions as 400s."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from gateway_fixtures import served_gateway
from tool_cases import ASK, PARAMETERS, TOOLS, streamed_tool_calls

MODEL = "smollm2"


@pytest.fixture(scope="module")
def served(smollm2_gguf_path):
    with served_gateway("smollm2-135m-instruct", model_name=MODEL, block_size=16, num_blocks=512) as served:
        yield served


def _check_calls(calls, names) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_forced_tool_calls_parse_and_validate(client, choice):
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                           max_tokens=120, temperature=0)
    message = reply.choices[0].message
    names = {"get_time"} if isinstance(choice, dict) else set(PARAMETERS)
    _check_calls(message.tool_calls, names)
    assert reply.choices[0].finish_reason == "tool_calls"
    if isinstance(choice, dict):
        assert len(message.tool_calls) == 1


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_streamed_tool_calls_match_the_whole_reply(client, choice):
    kwargs = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": choice, "max_tokens": 120,
              "temperature": 0, "parallel_tool_calls": False}
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    calls, finishes = streamed_tool_calls(chunks)
    assert finishes == ["tool_calls"] and not any(c.choices[0].delta.content for c in chunks if c.choices)
    assert [(c["name"], c["arguments"]) for c in calls] == [(c.function.name, c.function.arguments) for c in whole]
    assert len(calls) == 1
    assert calls[0]["pieces"] > 1, "the arguments arrive in pieces as they are generated"
    jsonschema.validate(json.loads(calls[0]["arguments"]), PARAMETERS[calls[0]["name"]])


def test_a_conversation_with_a_tool_result_continues_in_text(client, gateway):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=80, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})}]
    reply = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                           max_tokens=40, temperature=0)
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls
    # The prompt the model saw holds the call and its result.
    rendered = gateway.frontend.prompt_tokens.render_chat(
        *_template_input(gateway, history))
    assert "get_weather" in rendered and '"sky": "clear"' in rendered and "<tool_response>" in rendered


def _template_input(gateway, history):
    from pdserve.cluster.gateway.openai.protocol import ChatCompletionRequest

    body = ChatCompletionRequest.model_validate({"messages": history, "tools": TOOLS}, strict=False)
    return body.template_input(gateway.frontend.tool_family, gateway.frontend.tokenizer.supports_tools)


def test_auto_and_none_leave_plain_replies_as_content(client):
    for choice in ("auto", "none"):
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                               tools=TOOLS, tool_choice=choice, max_tokens=24, temperature=0)
        message = reply.choices[0].message
        if message.tool_calls:  # auto lets the model call; what it calls must still parse
            _check_calls(message.tool_calls, set(PARAMETERS))
        else:
            assert message.content is not None and reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(("body", "param", "named"), [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", "name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tool_choice": "required"}, "tool_choice", "required"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "only one"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "tools",
     "object"),
])
def test_bad_tools_are_400s_naming_them(base_url, body, param, named):
    reply = httpx.post(f"{base_url}/v1/chat/completions", timeout=60,
                       json={"model": MODEL, "messages": ASK, "max_tokens": 8, **body})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert named in error["message"]
    assert error["param"] is None or error["param"].startswith(param) or param in error["message"]
