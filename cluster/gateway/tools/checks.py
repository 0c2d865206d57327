"""The checks on a request's `tools` and `tool_choice`, once, before anything uses them.

After `check_tools(tools, tool_choice)` passes: every tool is {"type": "function",
"function": {"name": N, ...}} with N unique and as OpenAI spells names, its `parameters`
(if any) a JSON schema of an object, and `tool_choice` one of "auto", "none", "required"
or {"type": "function", "function": {"name": N}} with N among the tools; "required" and a
named function come with at least one tool.
"""

from __future__ import annotations

import re
from typing import Any

TOOL_CHOICES = ("auto", "none", "required")
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names


def check_tools(tools: list[dict] | None, tool_choice: Any) -> None:
    """Raise ValueError naming the first problem (see the module docstring)."""
    names: list[str] = []
    for i, tool in enumerate(tools or []):
        names.append(_checked_tool(f"tools[{i}]", tool, names))
    named = named_choice(tool_choice)
    if tool_choice == "required" and not names:
        raise ValueError('tool_choice "required" needs at least one tool, and the request has none')
    if named is not None and named not in names:
        among = f"the tools are: {', '.join(names)}" if names else "the request has no tools"
        raise ValueError(f"tool_choice names the function {named!r}, which is not among the tools ({among})")


def named_choice(tool_choice: Any) -> str | None:
    """The function a `tool_choice` names, or None for "auto", "none", "required" and None.
    ValueError for anything else."""
    if tool_choice is None or (isinstance(tool_choice, str) and tool_choice in TOOL_CHOICES):
        return None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return function["name"]
    raise ValueError('tool_choice must be "auto", "none", "required" or {"type": "function", "function": '
                     f'{{"name": ...}}}}, got {_show(tool_choice)}')


def _checked_tool(where: str, tool: Any, earlier: list[str]) -> str:
    """The name of a well-formed tool (one not named in `earlier`); ValueError otherwise."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = _show(tool.get("type")) if isinstance(tool, dict) else type(tool).__name__
        raise ValueError(f'{where}.type must be "function", the only kind of tool pdserve serves; got {kind}')
    function = tool.get("function")
    if not isinstance(function, dict):
        # A request error (HTTP 400) like every other here, whatever the type involved.
        raise ValueError(f"{where}.function must be an object with the function's name, "  # noqa: TRY004
                         f"got {_show(function)}")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-', got {_show(name)}")
    if name in earlier:
        raise ValueError(f"{where}.function.name {name!r} is also the name of tools[{earlier.index(name)}]; "
                         "function names must be unique")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise ValueError(f"{where}.function.description must be a string, got {_show(description)}")
    parameters = function.get("parameters")
    if parameters is not None and not (isinstance(parameters, dict) and parameters.get("type", "object") == "object"):
        raise ValueError(f'{where}.function.parameters must be the JSON schema of an object ("type": "object"), '
                         f"got {_show(parameters)}")
    return name


def _show(value: Any, limit: int = 80) -> str:
    """`value` for an error message, cut short: requests may hold anything."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
