"""Tool definitions shared by the tool-calling tests, and how a client reads streamed calls."""

from __future__ import annotations

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 30},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                   "properties": {"zone": {"type": "string", "maxLength": 20},
                                  "24h": {"type": "boolean"}}}}}
TOOLS = [WEATHER, TIME]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def streamed_tool_calls(chunks) -> tuple[list[dict], list[str]]:
    """Per call (by index) its id, name, arguments and how many deltas carried it, as
    OpenAI's client accumulates them; and every finish reason seen. Asserts a call's id
    comes once."""
    calls: dict[int, dict] = {}
    finishes = []
    for chunk in chunks:
        for choice in chunk.choices:
            for piece in choice.delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"id": None, "name": "", "arguments": "", "pieces": 0})
                if piece.id is not None:
                    assert call["id"] is None, "a call's id comes once"
                    call["id"] = piece.id
                call["name"] += piece.function.name or ""
                call["arguments"] += piece.function.arguments or ""
                call["pieces"] += 1
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    return [calls[i] for i in sorted(calls)], finishes
