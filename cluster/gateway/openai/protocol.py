"""Request bodies of the OpenAI-compatible HTTP API.

The request models are the API's contract: their types and bounds are what
`/openapi.json` publishes and what FastAPI checks before a handler runs (strict types,
unknown fields refused). Checks that need the model (context length, vocabulary, chat
template) happen later, in `Frontend.prepare`. Options that would change the output but
are not implemented are declared anyway, so that a request using them gets a 400 naming
the option (`check_supported`) instead of being served as if it had not asked.

Extensions beyond OpenAI, named as vLLM names them: `top_k`, `min_p`, `repetition_penalty`,
`min_tokens`, `stop_token_ids`, `ignore_eos`, `include_stop_str_in_output`, `return_token_ids`,
`speculate`, `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`, `prompt_logprobs`,
and `timeout` (seconds).

Structured outputs: `response_format` (json_object, or json_schema with `strict`) or one
`guided_*` field becomes the request's `StructuredOutput`; its grammar is checked (and
unsupported schema keywords named) in `Frontend.prepare`.

The response models are in `responses`; `bodies` builds them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field

from pdserve.cluster.gateway.errors import invalid
from pdserve.cluster.gateway.openai.messages import ChatMessage, NamedToolChoice, ToolDefinition, _Body
from pdserve.cluster.gateway.tools import check_tools, forced_tool_grammar, template_messages
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

MAX_CHOICES = 16  # n and best_of: each choice is a sequence in flight
MAX_TOOLS = 128  # tools per request: each is described in the prompt
NonEmptyStr = Annotated[str, Field(min_length=1)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
TokenId = Annotated[int, Field(ge=0)]
T = TypeVar("T")
NonEmptyList = Annotated[list[T], Field(min_length=1)]
Bias = Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]


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
    n: int | None = Field(1, ge=1, le=MAX_CHOICES, description="Number of choices; they share the prompt's "
                          "KV, and each draws from its own seed stream.")
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
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description=(
        "Also return each prompt token's logprob and this many most likely tokens at its position "
        "(a top-level `prompt_logprobs` list, null for the first token). The prompt is then computed "
        "in full, without the prefix cache."))
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
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def num_sequences(self) -> int:
        """Sequences to generate: `num_choices`, or more for completions' best_of."""
        return self.num_choices

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
    echo: bool | None = Field(False, description="Return the prompt (detokenized) before the completion; "
                              "with logprobs, the logprob lists start with the prompt's tokens (the first "
                              "one's logprob null).")
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES, description=(
        "Generate this many sequences and return the n with the highest mean token logprob; not with stream."))
    suffix: str | None = Field(None, description="Not supported; omit it.")

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of is not None and self.best_of < self.num_choices:
            raise invalid(f"best_of ({self.best_of}) must be at least n ({self.num_choices}).", "best_of")
        if self.stream and self.num_sequences > self.num_choices:
            raise invalid("best_of cannot be used with stream: the best choices are known only at the end.",
                          "best_of")
        if self.suffix:
            raise invalid("suffix is not supported: this server does not insert text; omit it.", "suffix")

    @property
    def num_sequences(self) -> int:
        return max(self.best_of or 1, self.num_choices)

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
        """The `Frontend.prepare` sampling fields of this request. An echo with logprobs
        needs the prompt's logprobs, with as many alternatives as the completion's."""
        fields = self._sampling(self.max_tokens, self.logprobs)
        if self.echo and self.logprobs is not None:
            fields["prompt_logprobs"] = max(self.prompt_logprobs or 0, self.logprobs)
        return fields


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Takes precedence over max_tokens.")
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Needs logprobs=true.")
    tools: list[ToolDefinition] | None = Field(None, max_length=MAX_TOOLS, description=(
        "Functions the model may call; described to it through its chat template."))
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(None, description=(
        "auto (the default with tools): the model decides; none: no calls; required or a named function: "
        "the output is that many calls, enforced by a grammar."))
    parallel_tool_calls: bool | None = Field(None, description="Allow several calls in one reply [true].")

    def check_supported(self) -> None:
        super().check_supported()
        try:
            check_tools(self._tools(), self._tool_choice())
        except ValueError as exc:
            raise invalid(str(exc), "tool_choice" if "tool_choice" in str(exc) else "tools") from None
        if self.forces_tool_calls and self._structured_fields():
            raise invalid(f"tool_choice {self._tool_choice()!r} and {self._structured_fields()[0]} each constrain "
                          "the output; send only one of them.", "tool_choice")
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs needs logprobs=true.", "top_logprobs")

    def _tools(self) -> list[dict] | None:
        return [t.model_dump(exclude_none=True, by_alias=True) for t in self.tools] if self.tools else None

    def _tool_choice(self) -> str | dict | None:
        choice = self.tool_choice
        return choice.model_dump(by_alias=True) if isinstance(choice, NamedToolChoice) else choice

    @property
    def offers_tools(self) -> bool:
        """The model is told about the tools and its output is read for calls."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forces_tool_calls(self) -> bool:
        return self.offers_tools and self.tool_choice not in (None, "auto")

    def template_input(self, tool_family: str, template_supports_tools: bool) -> tuple[list[dict], list[dict] | None]:
        """(messages, tools) to render the prompt with: the family's format for the tools,
        the history's calls and results where the template has no tool support."""
        messages = [m.as_template_input() for m in self.messages]
        if not self.offers_tools and not any(m.role == "tool" or m.tool_calls for m in self.messages):
            return messages, None
        return template_messages(messages, self._tools() if self.offers_tools else None, tool_family,
                                 template_supports_tools)

    def field_names(self) -> dict[str, str]:
        names = {**super().field_names(),
                 "max_tokens": "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens",
                 "logprobs": "top_logprobs"}
        if self.forces_tool_calls:
            names["structured_output"] = "tool_choice"
        return names

    def sampling(self, tool_family: str = "hermes") -> dict[str, Any]:
        """The `Frontend.prepare` sampling fields of this request; a required or named tool
        choice is a grammar in `tool_family`'s call format."""
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        fields = self._sampling(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)
        if self.forces_tool_calls:
            try:
                grammar = forced_tool_grammar(tool_family, self._tools(), self._tool_choice(),
                                              self.parallel_tool_calls is not False)
            except ValueError as exc:
                raise invalid(str(exc), "tool_choice") from None
            fields["structured_output"] = StructuredOutput.grammar(grammar)
        return fields


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
