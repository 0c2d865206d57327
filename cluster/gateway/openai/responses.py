"""Response bodies of the OpenAI-compatible HTTP API: completions, chat completions and
their stream chunks, usage, logprobs, the model list and the error shape.

These models are what `/openapi.json` publishes for the responses; they are built by
`bodies` (generations) and `errors` (errors), and never parse client input.
Fields that extend OpenAI's shapes (`token_ids`, `prompt_token_ids`, `prompt_logprobs`) are
left out of a body when unset.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from pdserve.cluster.gateway.output_stream import Usage

# Extension fields are left out of a body when unset, so plain OpenAI clients see plain bodies.
_OMIT_IF_NONE: Any = {"default": None, "exclude_if": lambda value: value is None}


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, usage: Usage) -> UsageInfo:
        return cls(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                   total_tokens=usage.total_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens))


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: per token its text, logprob, the most likely alternatives
    (plus the token itself) by text, and its character offset in the choice's text. With
    echo the lists start with the prompt's tokens, the first of which has no logprob and no
    alternatives (null)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptTokenLogprob(BaseModel):
    """vLLM's shape of one token's logprob at a prompt position."""

    logprob: float
    rank: int  # 1 + the number of tokens more likely at that position
    decoded_token: str


# vLLM's `prompt_logprobs`: per prompt token, null for the first, then token id (as a string)
# -> its logprob, for the prompt token and the most likely tokens at its position.
PromptLogprobs = list[dict[str, PromptTokenLogprob] | None]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = Field(**_OMIT_IF_NONE)


class CompletionResponse(BaseModel):
    """A whole completion, or one stream chunk of it (same object, as OpenAI does)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = Field(**_OMIT_IF_NONE)
    prompt_token_ids: list[int] | None = Field(**_OMIT_IF_NONE)
    prompt_logprobs: PromptLogprobs | None = Field(**_OMIT_IF_NONE)  # in a stream: the first chunk's


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # JSON text of the arguments object


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the reply is only tool calls
    tool_calls: list[ToolCallOut] | None = Field(**_OMIT_IF_NONE)


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = Field(**_OMIT_IF_NONE)


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_token_ids: list[int] | None = Field(**_OMIT_IF_NONE)
    prompt_logprobs: PromptLogprobs | None = Field(**_OMIT_IF_NONE)


class FunctionCallDelta(BaseModel):
    name: str | None = Field(**_OMIT_IF_NONE)  # in the call's first delta only
    arguments: str  # the next piece of the arguments' JSON text


class ToolCallDelta(BaseModel):
    """A piece of one tool call in a stream, as OpenAI's client accumulates it: the first
    delta of call `index` carries its id, type and name; later ones more arguments."""

    index: int
    id: str | None = Field(**_OMIT_IF_NONE)
    type: Literal["function"] | None = Field(**_OMIT_IF_NONE)
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(**_OMIT_IF_NONE)
    content: str | None = Field(**_OMIT_IF_NONE)
    tool_calls: list[ToolCallDelta] | None = Field(**_OMIT_IF_NONE)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = Field(**_OMIT_IF_NONE)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = Field(**_OMIT_IF_NONE)


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pdserve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
