"""Chat messages and tool definitions of the OpenAI-compatible HTTP API (request side).

A conversation may carry tool calls: an assistant message's `tool_calls` (its content may
then be null) and `tool` messages with each call's result. `as_template_input` gives the
OpenAI-shaped dict that `pdserve.cluster.gateway.tools.template_messages` turns into what
the model's chat template renders.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names


class _Body(BaseModel):
    # Strict: "16" is not an integer and 1 is not a boolean, as in OpenAI's API.
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str = Field(description="The arguments as JSON text.")


class AssistantToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(None, description="Null only on an assistant message with "
                                                 "tool_calls.")
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = Field(None, description="Calls an earlier assistant reply made.")
    tool_call_id: str | None = Field(None, description="On a tool message: the call it answers.")

    @model_validator(mode="after")
    def _check_shape(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content (only an assistant message with tool_calls "
                             "may leave it null)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def as_template_input(self) -> dict[str, Any]:
        """The message as an OpenAI-shaped dict; text parts are joined by newlines."""
        content = self.content if not isinstance(self.content, list) else "\n".join(p.text for p in self.content)
        message: dict[str, Any] = {"role": self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(_Body):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema of the arguments object.")
    strict: bool | None = Field(None, description="Accepted; forced calls always follow the schema.")


class ToolDefinition(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction
