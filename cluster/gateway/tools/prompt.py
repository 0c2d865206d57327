"""Tools into the prompt: which call format a model writes, and the messages (and tools)
its chat template is given.

A template that renders tools itself (it reads the variable `tools`, as Qwen2.5's and
Llama 3.1's do) gets them as they came, and the history nearly unchanged. A template that
does not (SmolLM2's chatml renders only role and content) gets everything as text in
plain messages: the tools and the format to call them in, in the system message; past
calls inside the assistant's content, written as the model would write them; tool results
as user messages in the family's tool-response form.
"""

from __future__ import annotations

import json
from typing import Any

from pdserve.cluster.gateway.tools.calls import (
    CALL_FORMATS,
    FAMILIES,
    HERMES_CLOSE,
    HERMES_OPEN,
    PYTHON_TAG,
    check_family,
    format_calls,
)


def family_for(chat_template: str | None, override: str | None = None) -> str:
    """The call format to parse a model's output in: `override` (a --tool-call-parser value)
    if given, else the one its chat template writes; "hermes" for a template without tools,
    since pdserve then describes the tools itself in that format."""
    if override is not None:
        if override not in FAMILIES:
            raise ValueError(f"unknown tool-call parser {override!r}; choose one of: {', '.join(FAMILIES)}")
        return override
    template = chat_template or ""
    if HERMES_OPEN in template:
        return "hermes"
    if PYTHON_TAG in template or "ipython" in template:  # Llama 3's tool-call and tool-result markers
        return "llama3"
    return "hermes"


def template_messages(messages: list[dict], tools: list[dict] | None, family: str,
                      template_supports_tools: bool) -> tuple[list[dict], list[dict] | None]:
    """The (messages, tools) to render an OpenAI conversation with; see the module
    docstring. `messages` are OpenAI-shaped dicts (content a string or None); nothing given
    is modified. Arguments that are not JSON are passed on as their text."""
    check_family(family)
    if template_supports_tools:
        return [_for_tool_template(m) for m in messages], tools or None
    out: list[dict] = []
    results_at: int | None = None  # the index in `out` of the user message with this turn's tool results
    for message in messages:
        message = _without_nones(message)
        role, content = message.get("role"), message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = format_calls(family, [_name_and_arguments(call) for call in message["tool_calls"]])
            out.append({"role": "assistant", "content": f"{content}\n{calls}" if content else calls})
        elif role == "tool" and results_at == len(out) - 1:  # results of one turn share a message
            out[-1]["content"] += "\n" + _tool_result(family, content)
        elif role == "tool":
            out.append({"role": "user", "content": _tool_result(family, content)})
            results_at = len(out) - 1
        else:
            out.append({**message, "content": content})
    if tools:
        description = describe_tools(family, tools)
        if out and out[0].get("role") == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{description}" if out[0]["content"] else description
        else:
            out.insert(0, {"role": "system", "content": description})
    return out, None


def describe_tools(family: str, tools: list[dict]) -> str:
    """What a model without tools in its template is told: the tools' JSON signatures and
    the exact form of a call in `family`."""
    signatures = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    fmt = CALL_FORMATS[family]
    example = f'{fmt.open}{{"name": <function-name>, "{fmt.arguments_key}": <arguments-json-object>}}{fmt.close}'
    if family == "hermes":
        return ("# Tools\n\nYou may call one or more functions to help with the user's request. "
                f"The functions, as JSON signatures, are inside <tools></tools> tags:\n<tools>\n{signatures}\n"
                "</tools>\n\nTo call a function, write a JSON object with its name and arguments inside "
                f"{HERMES_OPEN}{HERMES_CLOSE} tags, one block per call:\n{example}")
    return ("# Tools\n\nYou may call functions to help with the user's request. The functions, as JSON "
            f"signatures:\n{signatures}\n\nTo call a function, answer with only a JSON object of the form "
            f'{example}; for several calls, separate the objects with "{fmt.separator}".')


def _tool_result(family: str, content: str) -> str:
    if family == "hermes":
        return f"<tool_response>\n{content}\n</tool_response>"
    return content  # Llama 3 gives a tool's output as it is (its "ipython" turn)


def _for_tool_template(message: dict) -> dict:
    """A message for a template that renders tools: no None fields (templates test `is
    defined`), content a string, and call arguments as objects, which templates write
    with `tojson` (a JSON string there would be quoted twice)."""
    out = _without_nones(message)
    out["content"] = out.get("content") or ""
    if out.get("tool_calls"):
        out["tool_calls"] = [_with_argument_object(call) for call in out["tool_calls"]]
    return out


def _with_argument_object(call: dict) -> dict:
    function = dict(call.get("function") or {})
    arguments = _json_object(function.get("arguments"))
    if arguments is not None:
        function["arguments"] = arguments
    return {**call, "function": function}


def _name_and_arguments(call: dict) -> tuple[str, str]:
    """An OpenAI tool call -> (name, arguments JSON text); arguments that are not a JSON
    object are written as a JSON string, so the rendered call stays JSON."""
    function = call.get("function") or {}
    arguments = function.get("arguments")
    if isinstance(arguments, dict):
        text = json.dumps(arguments, ensure_ascii=False)
    elif _json_object(arguments) is not None:
        text = arguments.strip()
    else:
        text = json.dumps("" if arguments is None else str(arguments), ensure_ascii=False)
    return str(function.get("name", "")), text


def _json_object(text: Any) -> dict | None:
    if not isinstance(text, str):
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _without_nones(message: dict) -> dict:
    return {key: value for key, value in message.items() if value is not None}
