"""Request bodies of the OpenAI-compatible HTTP API.

The request models are the API's contract: their types and bounds are what
`/openapi.json` publishes and what FastAPI checks before a handler runs (strict types,
unknown fields refused). Checks that need the model (context length, vocabulary, chat
template) happen later, in `Frontend.prepare`. Options that would change the output but
are not implemented are declared anyway, so that a request using them gets a 400 naming
the option (`check_supported`) instead of being served as if it had not asked.

Extensions beyond OpenAI, named as vLLM names them: `top_k`, `min_p`, `repetition_penalty`,
`min_tokens`, `stop_token_ids`, `ignore_eos`, `include_stop_str_in_output`, `return_token_ids`,
`speculate`, `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`, and `timeout`
(seconds).

Structured outputs: `response_format` (json_object, or json_schema with `strict`) or one
`guided_*` field becomes the request's `StructuredOutput`; its grammar is checked (and
unsupported schema keywords named) in `Frontend.prepare`.

The response models are in `responses`; `bodies` builds them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from pdserve.cluster.gateway.errors import invalid
from pdserve.runtime.sampling_params import (
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    SAMPLING_FIELDS,
)
from pdserve.runtime.structured_output import StructuredOutput

# The seeds torch.Generator.manual_seed accepts.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1

NonEmptyStr = Annotated[str, Field(min_length=1)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
TokenId = Annotated[int, Field(ge=0)]
T = TypeVar("T")
NonEmptyList = Annotated[list[T], Field(min_length=1)]
Bias = Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]


class _Body(BaseModel):
    # Strict: "16" is not an integer and 1 is not a boolean, as in OpenAI's API.
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = Field(False, description="Send a last chunk with empty choices and the usage.")


class JsonSchemaFormat(_Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$", description="Names the schema (OpenAI requires it).")
    description: str | None = None
    # `schema` shadows a BaseModel attribute: the field is `schema_` on the model.
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON schema; omitted "
                                           "means any JSON object.")
    strict: bool | None = Field(None, description="true (the default here): unsupported schema keywords are "
                                "a 400; false: they are ignored and the rest is still enforced.")


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _GenerationRequest(_Body):
    """Fields both endpoints share."""

    model: str | None = Field(None, description="The served model's name (see /v1/models); "
                              "omitted means the served model.")
    # OpenAI documents most fields as nullable; null means the default.
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, description="Number of choices; only 1 is supported.")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False, description="0 means greedy.")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="0 or -1 disables it.")
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False, description=(
        "Subtracted from the logit of every token already in the output."))
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False, description=(
        "Subtracted from a token's logit once per time it is already in the output."))
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False, description=(
        "Divides positive (multiplies negative) logits of tokens in the prompt or output; 1 disables it."))
    logit_bias: dict[str, Bias] | None = Field(None, max_length=MAX_LOGIT_BIAS, description=(
        "Token id (as a string) -> a bias in [-100, 100] added to its logit."))
    min_tokens: int | None = Field(None, ge=0, description="End-of-sequence and stop token ids cannot end "
                                   "the output before this many tokens.")
    user: str | None = Field(None, description="Accepted and ignored.")
    timeout: float | None = Field(None, gt=0, allow_inf_nan=False, description=(
        "Seconds the request may take; past it the request is aborted (408 before the "
        "response starts, an error event in a stream)."))
    return_token_ids: bool = Field(False, description="Also return the generated token ids.")
    speculate: bool = Field(True, description="Allow speculative decoding when the server runs it; "
                            "the output distribution is the same either way.")
    response_format: ResponseFormat | None = Field(None, description="json_object: the output is a JSON "
                                                   "object; json_schema: it matches the schema.")
    guided_json: dict[str, Any] | str | None = Field(None, description="A JSON schema the output matches.")
    guided_regex: str | None = Field(None, description="A regular expression the whole output matches.")
    guided_choice: NonEmptyList[NonEmptyStr] | None = Field(None, description="The output is one of these.")
    guided_grammar: str | None = Field(None, description="A grammar (Lark, or GBNF as llama.cpp writes it) "
                                       "the output matches.")

    def check_supported(self) -> None:
        """Raise RequestError(INVALID_ARGUMENT) naming the first option this server does
        not implement."""
        if self.n not in (None, 1):
            raise invalid(f"n={self.n} is not supported: this server returns one choice per request. "
                          "Send n=1 (or omit it) and repeat the request for more choices.", "n")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options is only allowed when stream is true.", "stream_options")
        asked = self._structured_fields()
        if len(asked) > 1:
            raise invalid(f"{' and '.join(asked)} each constrain the output; send only one of them.", asked[1])

    def _structured_fields(self) -> list[str]:
        asked = [name for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
                 if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            asked.insert(0, "response_format")
        return asked

    def structured_output(self) -> StructuredOutput | None:
        """What the output must match, or None; raises RequestError naming the field when
        it cannot be one."""
        asked = self._structured_fields()
        if not asked:
            return None
        field = asked[0]
        try:
            if field == "response_format":
                json_schema = self.response_format.json_schema
                if self.response_format.type == "json_object":
                    return StructuredOutput.json_object()
                if json_schema is None:
                    raise ValueError("response_format of type json_schema needs its json_schema "
                                     "({\"name\": ..., \"schema\": {...}})")
                if json_schema.schema_ is None:
                    return StructuredOutput.json_object()
                return StructuredOutput.json_schema(json_schema.schema_, strict=json_schema.strict is not False)
            if field == "guided_json":
                return StructuredOutput.json_schema(self.guided_json)
            if field == "guided_regex":
                return StructuredOutput.regex(self.guided_regex)
            if field == "guided_choice":
                return StructuredOutput.choice(self.guided_choice)
            return StructuredOutput.grammar(self.guided_grammar)
        except ValueError as exc:
            raise invalid(f"{field}: {exc}", field) from None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def field_names(self) -> dict[str, str]:
        """This body's names for the SamplingParams fields it spells differently, so that
        errors name the field the client sent."""
        asked = self._structured_fields()
        return {"structured_output": asked[0]} if asked else {}

    def _sampling(self, max_tokens: int | None, logprobs: int | None) -> dict[str, Any]:
        """The SamplingParams fields of this body, by their names; max_tokens and logprobs
        are spelled differently per endpoint, so the caller gives them."""
        derived = {"max_tokens": max_tokens, "logprobs": logprobs, "logit_bias": self._logit_bias(),
                   "structured_output": self.structured_output()}
        return {name: derived[name] if name in derived else getattr(self, name) for name in SAMPLING_FIELDS}

    def _logit_bias(self) -> tuple[tuple[int, float], ...] | None:
        """`logit_bias` with its keys as token ids (OpenAI sends them as strings)."""
        if not self.logit_bias:
            return None
        pairs = []
        for key, bias in self.logit_bias.items():
            if not key.isascii() or not key.isdigit():
                raise invalid(f"logit_bias keys must be token ids (non-negative integers as strings); "
                              f"got {key[:40]!r}", "logit_bias")
            pairs.append((int(key), bias))
        return tuple(sorted(pairs))


class CompletionRequest(_GenerationRequest):
    prompt: (NonEmptyStr | NonEmptyList[TokenId] | NonEmptyList[str]
             | NonEmptyList[NonEmptyList[TokenId]]) = Field(
        description="Text or token ids; a list of prompts must hold exactly one.")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="Return this many most likely alternatives per token.")
    echo: bool | None = Field(False, description="Only false is supported.")
    best_of: int | None = Field(None, description="Only 1 is supported.")
    suffix: str | None = Field(None, description="Not supported; omit it.")

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of not in (None, 1):
            raise invalid(f"best_of={self.best_of} is not supported; omit it or send 1.", "best_of")
        if self.echo:
            raise invalid("echo=true is not supported; omit it.", "echo")
        if self.suffix:
            raise invalid("suffix is not supported: this server does not insert text; omit it.", "suffix")

    def prompt_input(self) -> str | list[int]:
        """The one prompt, as text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or all(isinstance(t, int) for t in prompt):
            return prompt
        if len(prompt) != 1:
            raise invalid(f"batch prompts are not supported (got {len(prompt)} prompts); send one prompt "
                          "per request.", "prompt")
        return prompt[0]

    def sampling(self) -> dict[str, Any]:
        """The `Frontend.prepare` sampling fields of this request."""
        return self._sampling(self.max_tokens, self.logprobs)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        """The message as chat templates read it; text parts are joined by newlines."""
        content = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        message = {"role": self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Takes precedence over max_tokens.")
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Needs logprobs=true.")
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported; omit it.")
    tool_choice: str | dict[str, Any] | None = Field(None, description="Only 'none' is supported.")
    parallel_tool_calls: bool | None = Field(None, description="Accepted and ignored (no tools).")

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise invalid("tools are not supported by this server; omit tools and tool_choice.", "tools")
        if self.tool_choice not in (None, "none"):
            raise invalid("tool_choice is not supported by this server; omit it.", "tool_choice")
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs needs logprobs=true.", "top_logprobs")

    def template_messages(self) -> list[dict[str, str]]:
        return [m.as_template_input() for m in self.messages]

    def field_names(self) -> dict[str, str]:
        return {**super().field_names(),
                "max_tokens": "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens",
                "logprobs": "top_logprobs"}

    def sampling(self) -> dict[str, Any]:
        """The `Frontend.prepare` sampling fields of this request."""
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)


class TokenizeRequest(_Body):
    """`POST /tokenize`, as vLLM has it: a text, or chat messages rendered with the model's
    template and a generation prompt."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = Field(True, description="Add the model's BOS to a text prompt, as generation does.")

    def input(self) -> tuple[str | None, list[dict[str, str]] | None]:
        if (self.prompt is None) == (self.messages is None):
            raise invalid("give exactly one of prompt and messages", "prompt")
        messages = None if self.messages is None else [m.as_template_input() for m in self.messages]
        return self.prompt, messages


class DetokenizeRequest(_Body):
    """`POST /detokenize`, as vLLM has it."""

    model: str | None = None
    tokens: list[TokenId]
