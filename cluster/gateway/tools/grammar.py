"""Grammars that force a tool call, for tool_choice "required" or a named function.

The grammar (llguidance's Lark dialect) admits exactly the outputs that
`parse_tool_calls(family, ...)` reads as calls of the allowed tools, in compact JSON:

    start: call ("\n" call)*            (or `start: call` for exactly one call)
    call: call_0 | call_1
    call_0: "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": " args_0 "}\n</tool_call>"
    args_0: %json {...the tool's parameters schema...}

Each call names one of the allowed tools, and its arguments validate against that tool's
`parameters` (JSON written with ", " and ": " and no other whitespace, so nothing
unbounded hides in it). Exactly one call when the choice names a function or parallel tool
calls are off.
"""

from __future__ import annotations

import json
from typing import Any

from pdserve.cluster.gateway.tools.calls import CALL_FORMATS, call_head, call_tail, check_family
from pdserve.cluster.gateway.tools.checks import named_choice

# llguidance's options for the embedded JSON: the separators the call head uses, and no
# free whitespace.
_COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def forced_tool_grammar(family: str, tools: list[dict] | None, tool_choice: Any,
                        parallel_tool_calls: bool) -> str | None:
    """The Lark text of the module docstring, or None when `tool_choice` forces nothing
    ("auto", "none", None). ValueError for a choice naming a function not in `tools`, or
    "required" with no tools. Expects tools that passed `check_tools`."""
    check_family(family)
    named = named_choice(tool_choice)
    if tool_choice != "required" and named is None:
        return None
    functions = [tool["function"] for tool in tools or []]
    if named is not None:
        functions = [f for f in functions if f["name"] == named]
        if not functions:
            raise ValueError(f"tool_choice names the function {named!r}, which is not among the tools")
    if not functions:
        raise ValueError('tool_choice "required" needs at least one tool, and the request has none')
    separator = _literal(CALL_FORMATS[family].separator)
    several = parallel_tool_calls and named is None
    lines = [f"start: call ({separator} call)*" if several else "start: call",
             "call: " + " | ".join(f"call_{k}" for k in range(len(functions)))]
    for k, function in enumerate(functions):
        head, tail = _literal(call_head(family, function["name"])), _literal(call_tail(family))
        lines.append(f"call_{k}: {head} args_{k} {tail}")
        lines.append(f"args_{k}: %json {json.dumps(_arguments_schema(function.get('parameters')))}")
    return "\n".join(lines) + "\n"


# OpenAI: a function without `parameters` takes none, so its arguments are `{}`.
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def _arguments_schema(parameters: dict | None) -> dict:
    """A tool's parameters schema as an object schema, with llguidance's compact-JSON
    options."""
    schema = dict(_NO_PARAMETERS if parameters is None else parameters)
    schema.setdefault("type", "object")
    schema["x-guidance"] = _COMPACT_JSON
    return schema


def _literal(text: str) -> str:
    """A Lark string literal for `text` (JSON's escapes are Lark's)."""
    return json.dumps(text)
