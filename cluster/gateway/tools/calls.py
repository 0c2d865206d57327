"""Tool calls as models write them, and their parser.

A family is the text format a model was trained to write its calls in:

    hermes   <tool_call>
             {"name": "get_weather", "arguments": {"city": "Paris"}}
             </tool_call>                (one block per call; text before the first is content)
    llama3   {"name": "get_weather", "parameters": {"city": "Paris"}}
                                         (the whole output; "; " between calls; may start
                                          with <|python_tag|>)

`CALL_FORMATS` is the one description of both that rendering (history, forcing grammars)
reads; the parser accepts what it describes and a little more ("arguments" or "parameters"
in either family, any whitespace between the parts).

Parsing is all or nothing: an output with a malformed call anywhere (bad JSON, an unclosed
tag, arguments that are not an object, a missing name, unknown keys, text between or after
the calls) is plain content, whole and unchanged, with no calls.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, NamedTuple

FAMILIES = ("hermes", "llama3")

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"  # Llama 3 starts tool-call output with it (a special token)


class ToolCall(NamedTuple):
    id: str  # "call_" + 24 hex digits, random per call
    name: str
    arguments: str  # the JSON text of an object, exactly as the model wrote it


class CallFormat(NamedTuple):
    """How one family writes a call: open + {"name": N, "<arguments_key>": ARGS} + close,
    calls joined by `separator`."""

    open: str
    close: str
    arguments_key: str
    separator: str


CALL_FORMATS = {
    "hermes": CallFormat(HERMES_OPEN + "\n", "\n" + HERMES_CLOSE, "arguments", "\n"),
    "llama3": CallFormat("", "", "parameters", "; "),
}

# Keys a call object may hold besides its name: the arguments under either name, and the
# {"type": "function"} that Llama models sometimes add.
_ARGUMENT_KEYS = ("arguments", "parameters")
_JSON_SPACE = " \t\n\r"


def check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown tool-call format {family!r}; choose one of: {', '.join(FAMILIES)}")


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def call_head(family: str, name: str) -> str:
    """The text of a call in `family` up to its arguments."""
    fmt = CALL_FORMATS[family]
    return f'{fmt.open}{{"name": {json.dumps(name)}, "{fmt.arguments_key}": '


def call_tail(family: str) -> str:
    """The text of a call in `family` after its arguments."""
    return "}" + CALL_FORMATS[family].close


def format_calls(family: str, calls: list[tuple[str, str]]) -> str:
    """(name, arguments JSON text) pairs as the model would write them."""
    separator = CALL_FORMATS[family].separator
    return separator.join(call_head(family, name) + arguments + call_tail(family) for name, arguments in calls)


def parse_tool_calls(family: str, text: str) -> tuple[str | None, list[ToolCall]]:
    """A complete model output -> (content, calls). Content is None when empty. Never raises
    for any `text` (ValueError only for an unknown family); see the module docstring."""
    check_family(family)
    parsed = _parse_hermes(text) if family == "hermes" else _parse_llama3(text)
    if parsed is None:
        return text or None, []
    content, calls = parsed
    return content or None, [ToolCall(new_call_id(), name, arguments) for name, arguments in calls]


def _parse_hermes(text: str) -> tuple[str, list[tuple[str, str]]] | None:
    start = text.find(HERMES_OPEN)
    if start < 0:
        return None
    calls, i = [], start
    while i < len(text):
        if not text.startswith(HERMES_OPEN, i):
            return None
        call = _scan_call(text, _skip_space(text, i + len(HERMES_OPEN)))
        if call is None:
            return None
        name, arguments, i = call
        i = _skip_space(text, i)
        if not text.startswith(HERMES_CLOSE, i):
            return None
        calls.append((name, arguments))
        i = _skip_space(text, i + len(HERMES_CLOSE))
    # The whitespace before the first call belongs to neither (the stream holds it back).
    return text[:start].rstrip(), calls


def _parse_llama3(text: str) -> tuple[str, list[tuple[str, str]]] | None:
    i = _skip_space(text, 0)
    if text.startswith(PYTHON_TAG, i):
        i = _skip_space(text, i + len(PYTHON_TAG))
    calls = []
    while True:
        call = _scan_call(text, i)
        if call is None:
            return None
        name, arguments, i = call
        calls.append((name, arguments))
        i = _skip_space(text, i)
        if text.startswith(";", i):
            i = _skip_space(text, i + 1)
        elif i < len(text):
            return None
        if i == len(text):  # a trailing ";" is tolerated
            return "", calls


def _skip_space(text: str, i: int) -> int:
    """The first index at or after i that is not whitespace (str.isspace, as str.strip)."""
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Python's json reads NaN and Infinity, which no JSON client would; they make a call malformed.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _scan_call(text: str, i: int) -> tuple[str, str, int] | None:
    """The call object that starts at text[i] -> (name, arguments text, index after it), or
    None when there is none: not JSON, not an object, or not a call's keys and types."""
    try:
        fields, end = _scan_object(text, i)
    except (ValueError, RecursionError):  # json's errors are ValueErrors; deep nesting recurses
        return None
    name = fields.pop("name", (None, ""))[0]
    if fields.get("type", (None, ""))[0] == "function":
        del fields["type"]
    # What is left must be the arguments, under one of their two keys.
    if not isinstance(name, str) or not name or len(fields) != 1 or not set(fields) <= set(_ARGUMENT_KEYS):
        return None
    [(arguments, arguments_text)] = fields.values()
    if not isinstance(arguments, dict):
        return None
    return name, arguments_text, end


def _scan_object(text: str, i: int) -> tuple[dict[str, tuple[Any, str]], int]:
    """The JSON object at text[i] -> ({key: (value, value's source text)}, index after it).
    Raises ValueError where there is no object, or a key repeats."""
    if not text.startswith("{", i):
        raise ValueError("not an object")
    fields: dict[str, tuple[Any, str]] = {}
    i = _skip_json_space(text, i + 1)
    if text.startswith("}", i):
        return fields, i + 1
    while True:
        if not text.startswith('"', i):
            raise ValueError("expected a key")
        key, i = _DECODER.raw_decode(text, i)
        i = _skip_json_space(text, i)
        if not text.startswith(":", i):
            raise ValueError("expected ':'")
        start = _skip_json_space(text, i + 1)
        value, i = _DECODER.raw_decode(text, start)
        if key in fields:
            raise ValueError(f"key {key!r} repeats")
        fields[key] = (value, text[start:i])
        i = _skip_json_space(text, i)
        if text.startswith("}", i):
            return fields, i + 1
        if not text.startswith(",", i):
            raise ValueError("expected ',' or '}'")
        i = _skip_json_space(text, i + 1)


def _skip_json_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in _JSON_SPACE:
        i += 1
    return i
